"""The ToyBench study end to end at a handful of steps: trains, generates 1x and longer rollouts
with and without sink + window, scores, and tabulates mean and spread over seeds; resumes."""

import json

import yaml

from forcelab.cli import main as cli_main


def test_quick_study_tabulates_every_variant_over_seeds(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["eval", "toybench", "--suite", "quick", "--seeds", "2", "--recipes", "teacher", "self_forcing",
            "--out", str(out)]
    assert cli_main(args) == 0
    record = json.loads((out / "study.json").read_text())
    assert set(record["table"]) == {"teacher", "self_forcing"}
    assert set(record["table"]["teacher"]) == {"1x"}
    assert set(record["table"]["self_forcing"]) == {"1x", "2x sink+window", "2x window", "2x full cache"}
    cell = record["table"]["self_forcing"]["2x sink+window"]["adherence"]
    assert cell["n"] == 2 and cell["std"] >= 0
    assert sorted(p.name for p in (out / "self_forcing").iterdir()) == ["seed0", "seed1"]
    table = (out / "study.md").read_text()
    assert "| self_forcing | full clip | 2x full cache |" in table and "±" in table
    header = next(line for line in table.splitlines() if line.startswith("| row | trained with | rollout |"))
    assert "| fidelity_psnr | fidelity_adherent |" in header and "| background |" in header
    assert 0 <= record["table"]["teacher"]["1x"]["fidelity_adherent"]["n"] <= 2   # NaN seeds left out
    capsys.readouterr()
    assert cli_main(args) == 0          # everything finished: nothing is trained or generated again
    assert "wrote 2 video(s)" not in capsys.readouterr().out


def test_textured_study_chains_every_stage_per_seed_in_parallel_and_tests_the_claims(tmp_path):
    """--world textured: seed s of Self-Forcing starts from seed s of the ODE init, which starts
    from seed s of the textured teacher; two seeds in two processes; many-step rows are also
    sampled at 4 steps; exposure is measured for the chunk-wise rows; claims whose rows ran are
    tested with paired differences and a verdict."""
    out = tmp_path / "study"
    args = ["eval", "toybench", "--suite", "quick", "--world", "textured", "--seeds", "2", "--jobs", "2",
            "--recipes", "textured/self_forcing", "textured/diffusion_forcing", "--out", str(out)]
    assert cli_main(args) == 0
    record = json.loads((out / "study.json").read_text())
    assert record["world"] == "textured" and record["prompts"] == 2
    for row in ("teacher", "ode_init", "self_forcing", "diffusion_forcing"):
        assert sorted(p.name for p in (out / "textured" / row).iterdir()) == ["seed0", "seed1"], row
    for seed in (0, 1):        # every stage of seed 1 starts from seed 1's runs
        sf = yaml.safe_load((out / "textured" / "self_forcing" / f"seed{seed}" / "config.yaml").read_text())
        ode = yaml.safe_load((out / "textured" / "ode_init" / f"seed{seed}" / "config.yaml").read_text())
        assert sf["roles"]["generator"]["init"].endswith(f"ode_init/seed{seed}")
        assert sf["roles"]["teacher"]["init"].endswith(f"teacher/seed{seed}")
        assert ode["roles"]["teacher"]["init"].endswith(f"teacher/seed{seed}")
    assert set(record["table"]["textured/diffusion_forcing"]) == {
        "1x", "2x sink+window", "2x window", "2x full cache", "1x 4 steps", "2x sink+window 4 steps"}
    assert set(record["exposure"]) == {"textured/self_forcing", "textured/diffusion_forcing"}
    assert [r["seed"] for r in record["exposure"]["textured/self_forcing"]] == [0, 1]
    claims = {(c["metric"], c["a"], c["b"]): c for c in record["claims"]}
    c = claims["adherence", "self_forcing (1x)", "diffusion_forcing (1x 4 steps)"]
    assert c["seeds"] == 2 and c["units"] == 4 and c["ci95"][0] <= c["diff"] <= c["ci95"][1]
    assert ("exposure:background", "self_forcing (exposure)", "diffusion_forcing (exposure)") in claims
    assert not any("rolling_forcing" in c["a"] for c in record["claims"])      # rows not run: no claim
    table = (out / "study.md").read_text()
    assert "Claims: paired differences" in table and "| textured/self_forcing | window 6 + sink 2 | background |" in table
