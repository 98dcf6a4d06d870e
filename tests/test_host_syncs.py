"""No host read of a tensor's values inside a training step: on a GPU each would be a
device synchronisation (the DiT's forward, the rollout, the losses, the optimizer).

Counted on CPU as the profiler sees them: every `aten::_local_scalar_dense` (what .item(),
float(), int() and bool() of a tensor dispatch to), with the Python line that asked. The one
read an update makes on purpose - the loss, gradient norm, finite flag and logs, together,
which decide whether the update is skipped - goes through `read_scalars`, counted apart."""

import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import forcelab
from forcelab.train import trainer as trainer_module
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer

READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)
PACKAGE = str(Path(forcelab.__file__).parent)


class HostReads(TorchDispatchMode):
    """Records the Python frames of every scalar read of a tensor."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            frames = [f for f in traceback.extract_stack(sys._getframe(1)) if f.filename.startswith(PACKAGE)
                      and "site-packages" not in f.filename]
            self.sites.append(" <- ".join(f"{f.filename[len(PACKAGE):]}:{f.lineno}" for f in frames[-3:][::-1]))
        return func(*args, **(kwargs or {}))


RECIPES = {   # recipe -> overrides: a rollout through the KV cache, teacher forcing, the teacher itself
    "self_forcing": ["algo.frames=4", "algo.min_chunks=2", "algo.max_chunks=3", "roles.generator.update_every=1"],
    "diffusion_forcing": [],
    "teacher": [],
}


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=1)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_training_step_reads_no_tensor_value_but_the_one_batched_read_per_update(
        recipe, tmp_path, teacher_dir, monkeypatch):
    teacher = [f"roles.teacher.init={teacher_dir}"] if recipe == "self_forcing" else [
        "model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_layers=1",
        "model_overrides.num_heads=2"]
    cfg = load_train_config([], ["recipe=" + recipe, *teacher, "data.batch_size=2", "data.frames=4",
                                 "logging.wandb=disabled", "logging.progress=false",
                                 f"output_dir={tmp_path / 'run'}", *RECIPES[recipe]])
    trainer = Trainer(cfg)
    trainer.train_step()          # first step: optimizer state and lazily built tables
    trainer.step += 1
    batched = []
    real = trainer_module.read_scalars
    monkeypatch.setattr(trainer_module, "read_scalars", lambda *a: batched.append(1) or real(*a))
    with HostReads() as reads:
        metrics = trainer.train_step()
    updates = sum(1 for r in trainer.roles.values() if r.trainable)
    assert reads.sites == [], f"{recipe}: tensor values read on the host during a step: {reads.sites}"
    assert len(batched) == updates, (recipe, len(batched), updates)
    assert all(isinstance(v, float) for v in metrics.values()), metrics


def test_the_counter_sees_the_reads_it_must_forbid():
    """The detector itself: float(), bool() and .item() of a tensor are each one read."""
    x = torch.ones(3)
    with HostReads() as reads:
        float(x.sum())
        bool(torch.isfinite(x).all())
        x[0].item()
    assert len(reads.sites) == 3
