"""The console a researcher reads: every role's latest loss on every line (roles update at
different rates), the wandb offline line, and an end-of-run summary that says where things are
and how to use them."""

import torch

from forcelab.train.config import load_train_config
from forcelab.train.metrics import MetricsLogger
from forcelab.train.trainer import Trainer


def test_every_console_line_shows_every_roles_latest_loss(tmp_path, capsys):
    """Self-Forcing's generator updates every 5th step, the console prints every 20th: the
    generator's loss must still reach the console."""
    cfg = load_train_config([], ["logging.every=4", "logging.wandb=disabled", "logging.progress=false"])
    log = MetricsLogger(tmp_path, cfg, True, {}, 0)
    for step in range(1, 9):
        metrics = {"critic/loss": 1.0 + step}
        if step % 5 == 0:
            metrics["generator/loss"] = 0.5
        log.log(step, metrics)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 4", "step 8"]
    assert "generator" not in lines[0]                        # no generator step yet
    assert "critic/loss=9" in lines[1] and "generator/loss=0.5 (step 5)" in lines[1]


def test_a_run_ends_with_a_summary(tmp_path, capsys):
    cfg = load_train_config([], [
        "recipe=teacher", "model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_layers=1",
        "model_overrides.num_heads=2", "data.frames=4", "data.batch_size=1", "max_steps=2", "checkpoint.every=2",
        "logging.wandb=disabled", "logging.progress=false", f"output_dir={tmp_path / 'run'}"])
    torch.manual_seed(0)
    Trainer(cfg).run()
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert "finished: step 2 of 2" in err and "generator/loss" in err
    assert f"run folder: {run} (last checkpoint checkpoint-000002)" in err
    assert f"forcelab generate {run}" in err and f"forcelab eval toybench {run / 'videos'}" in err


def test_an_offline_wandb_run_says_how_to_sync_it(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from forcelab.train import metrics

    files = tmp_path / "wandb" / "offline-run-1" / "files"
    monkeypatch.setattr(metrics, "_start_wandb", lambda *a: SimpleNamespace(dir=str(files)))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_train_config([], ["logging.wandb=offline", "logging.progress=false"])
    MetricsLogger(tmp_path, cfg, True, {}, 0)
    assert f"wandb: offline; to upload: wandb sync {files.parent}" in capsys.readouterr().err
