"""logging.tensorboard: the run's metrics as TensorBoard scalars, equal to metrics.jsonl, and a
resumed run continues the curves without duplicate steps."""

import json
import sys

import pytest

from forcelab.cli import main

pytest.importorskip("tensorboard", reason="tensorboard is in the dev extras: pip install tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = ["recipe=teacher", "model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_layers=1",
        "model_overrides.num_heads=2", "data.frames=4", "data.batch_size=2", "logging.wandb=disabled",
        "logging.progress=false", "logging.every=1", "roles.generator.lr=1e-3", "checkpoint.every=1",
        "logging.tensorboard=true"]


def scalars(run):
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_equal_the_jsonl_and_a_resume_continues_them(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, f"output_dir={run}", "max_steps=2"]) == 0
    assert f"tensorboard --logdir {run / 'tensorboard'}" in capsys.readouterr().err
    assert main(["train", *TINY, f"output_dir={run}", "max_steps=4", "--resume", "latest"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got = scalars(run)
    assert "generator/loss" in got or any(k.endswith("loss") for k in got)
    for tag, points in got.items():
        expected = [(r["step"], r[tag]) for r in rows if tag in r]
        assert [s for s, _ in points] == [s for s, _ in expected] == sorted({s for s, _ in expected})
        assert [v for _, v in points] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert {s for s, _ in next(iter(got.values()))} == {1, 2, 3, 4}


def test_tensorboard_without_the_package_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # as if tensorboard were not installed
    assert main(["train", *TINY, f"output_dir={tmp_path / 'run'}", "max_steps=2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "logging.tensorboard=true needs the tensorboard package: pip install tensorboard" in err[0]
    assert not list((tmp_path / "run").glob("checkpoint-*"))
