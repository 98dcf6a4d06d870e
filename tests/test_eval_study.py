"""The ToyBench study end to end at a handful of steps: trains, generates 1x and longer rollouts
with and without sink + window, scores, and tabulates mean and spread over seeds; resumes."""

import json

from forcelab.cli import main as cli_main


def test_quick_study_tabulates_every_variant_over_seeds(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["eval", "toybench", "--suite", "quick", "--seeds", "2", "--recipes", "teacher", "self_forcing",
            "--out", str(out)]
    assert cli_main(args) == 0
    record = json.loads((out / "study.json").read_text())
    assert set(record["table"]) == {"teacher", "self_forcing"}
    assert set(record["table"]["teacher"]) == {"1x"}
    assert set(record["table"]["self_forcing"]) == {"1x", "2x sink+window", "2x full cache"}
    cell = record["table"]["self_forcing"]["2x sink+window"]["adherence"]
    assert cell["n"] == 2 and cell["std"] >= 0
    assert sorted(p.name for p in (out / "self_forcing").iterdir()) == ["seed0", "seed1"]
    table = (out / "study.md").read_text()
    assert "| self_forcing | 2x full cache |" in table and "±" in table
    header = next(line for line in table.splitlines() if line.startswith("| recipe | rollout |"))
    assert "| fidelity_psnr | fidelity_adherent |" in header
    assert 0 <= record["table"]["teacher"]["1x"]["fidelity_adherent"]["n"] <= 2   # NaN seeds left out
    capsys.readouterr()
    assert cli_main(args) == 0          # everything finished: nothing is trained or generated again
    assert "wrote 2 video(s)" not in capsys.readouterr().out
