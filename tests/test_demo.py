"""The demo's reduced run: every stage end to end (teacher, ODE init, Self-Forcing, streaming
generation, ToyBench, report) with a handful of steps, and a re-run that skips finished stages."""

import json

from forcelab.cli import main as cli_main


def test_quick_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr()
    assert f"report: {out / 'report.html'}" in printed.out
    for stage in ("teacher", "ode_init", "self_forcing"):
        assert sorted((out / stage).glob("checkpoint-*")), stage
    for name in ("teacher", "ode_init", "self_forcing"):
        result = json.loads((out / "videos" / name / "toybench.json").read_text())
        assert result["videos"] and result["speed_fps"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["lines"]) == 3 and set(summary["adherence"]) == {"self_forcing", "ode_init", "teacher"}
    html = (out / "report.html").read_text()
    assert "self_forcing" in html and "ode_init" in html and "data:image/png;base64" in html
    # the student streams past its training length
    sf = json.loads((out / "videos" / "self_forcing" / "toybench.json").read_text())
    teacher = json.loads((out / "videos" / "teacher" / "toybench.json").read_text())
    assert sf["videos"][0]["frames"] > teacher["videos"][0]["frames"]
    # a second run finds every stage finished
    assert cli_main(["demo", "--quick", "--out", str(out), "--threads", "1"]) == 0
    again = capsys.readouterr().err
    assert again.count("already finished") == 3 and again.count("already done") == 3
