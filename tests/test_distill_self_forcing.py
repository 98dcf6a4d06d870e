"""Self-Forcing on the trainer: gradient truncation through the cache (autograd), the drawn
chunk count and exit step, one exit step on every rank (2 gloo processes), resume exactness."""

import json
import os
import subprocess
import sys

import pytest
import torch

from forcelab.train.config import load_train_config
from forcelab.train.recipe import StepContext
from forcelab.train.trainer import Trainer



@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher):
    return tiny_teacher(layers=1)


def sf_config(tmp_path, teacher_dir, *extra):
    return load_train_config([], [
        "recipe=self_forcing", f"roles.teacher.init={teacher_dir}", "data.batch_size=2", "data.frames=8",
        "algo.frames=4", "algo.min_chunks=2", "algo.max_chunks=4", "logging.wandb=disabled",
        "logging.progress=false", "roles.generator.update_every=2", "roles.generator.lr=1e-3",
        "roles.critic.lr=1e-3", "roles.generator.ema_decay=0.9", f"output_dir={tmp_path / 'run'}", *extra])


def test_only_the_exit_pass_carries_gradients_and_none_crosses_the_cache(tmp_path, teacher_dir):
    trainer = Trainer(sf_config(tmp_path, teacher_dir, "algo.frames=8", "algo.min_chunks=4", "algo.max_chunks=4"))
    recipe, model = trainer.recipe, trainer.module("generator")
    grad_passes = []
    hook = model.register_forward_hook(lambda m, a, k, out: grad_passes.append(torch.is_grad_enabled()) or None,
                                       with_kwargs=True)
    batch, positions = trainer.next_batch()
    ctx = StepContext(0, 0, 0, positions, torch.device("cpu"))
    out = recipe.generate(batch, ctx, grad=True)
    hook.remove()
    chunks = 4
    assert out.x0.shape[2] == 8 and out.mask.all()
    assert sum(grad_passes) == chunks                       # one gradient pass per chunk: its exit step
    assert len(grad_passes) > chunks                        # ... among no-grad denoising and commit passes
    pieces = out.x0.split(2, dim=2)
    for k in range(1, chunks):
        later = pieces[k].sum()
        earlier = torch.autograd.grad(later, [pieces[j] for j in range(k)], retain_graph=True, allow_unused=True)
        assert all(g is None for g in earlier), k           # the cache holds no graph of earlier chunks
    grads = torch.autograd.grad(out.x0.sum(), [p for p in model.parameters()], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_chunk_count_and_exit_step_vary_and_the_window_is_the_last_frames(tmp_path, teacher_dir):
    trainer = Trainer(sf_config(tmp_path, teacher_dir))
    recipe = trainer.recipe
    draws = {recipe.draw_rollout(StepContext(s, 0, 0, [0], torch.device("cpu"))) for s in range(40)}
    assert {f for f, _ in draws} == {4, 6, 8} and {e for _, e in draws} == {0, 1, 2, 3}
    batch, positions = trainer.next_batch()
    for step in range(40):
        ctx = StepContext(step, 0, 0, positions, torch.device("cpu"))
        frames, _ = recipe.draw_rollout(ctx)
        if frames == 8:
            break
    out = recipe.generate(batch, ctx, grad=True)
    assert out.x0.shape[2] == 4                              # DMD sees the teacher's horizon only
    assert out.mask[0].tolist() == [False, False, True, True]   # the re-encoded first chunk is masked


WINDOW_CHECKPOINTING = ("model_overrides.window_frames=4", "model_overrides.sink_frames=2",
                        "roles.generator.gradient_checkpointing=true", "roles.critic.gradient_checkpointing=true")


@pytest.mark.parametrize("extra", [(), WINDOW_CHECKPOINTING], ids=["full", "window_checkpointing"])
def test_resume_is_bit_exact(tmp_path, teacher_dir, resume_is_exact, extra):
    resume_is_exact(lambda folder, *a: sf_config(folder, teacher_dir, *a), tmp_path,
                    ("generator", "critic", "generator_ema"), *extra)
    assert not (tmp_path / "a" / "run" / "checkpoint-000006" / "teacher").exists()   # frozen roles are not copied


DRAWS_SCRIPT = """
import json, sys, torch
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer
trainer = Trainer(load_train_config([], sys.argv[2:]))
seen, real = [], trainer.recipe.draw_rollout
def record(ctx):
    out = real(ctx)
    seen.append([ctx.step, ctx.micro, *out])
    return out
trainer.recipe.draw_rollout = record
trainer.run()
with open(f"{sys.argv[1]}/draws-{trainer.rank}.json", "w") as f:
    json.dump(seen, f)
from forcelab.train.parallel import exit_processes
exit_processes()   # as the CLI ends a multi-process run (train/parallel.py)
"""


def test_two_processes_draw_the_same_rollout(tmp_path, teacher_dir):
    args = [f"roles.teacher.init={teacher_dir}", "recipe=self_forcing", "data.batch_size=1", "data.frames=8",
            "algo.frames=4", "algo.min_chunks=1", "algo.max_chunks=2", "logging.wandb=disabled",
            "logging.progress=false", "max_steps=4", f"output_dir={tmp_path / 'run'}"]
    script = tmp_path / "draws.py"
    script.write_text(DRAWS_SCRIPT)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(script), str(tmp_path), *args],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d0, d1 = (json.loads((tmp_path / f"draws-{r}.json").read_text()) for r in (0, 1))
    assert d0 == d1 and len(d0) >= 4
    assert len({(f, e) for _, _, f, e in d0}) > 1


def test_bf16_autocast_rollout_trains(tmp_path, teacher_dir):
    last = Trainer(sf_config(tmp_path, teacher_dir, "max_steps=3", "mixed_precision=bf16")).run()
    assert all(torch.isfinite(torch.tensor(v)) for k, v in last.items() if k.endswith("loss"))
