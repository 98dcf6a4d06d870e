"""The trainer: resume exactness, gradient accumulation, data-parallel equivalence, the NaN
guard, clear errors, and the run folder as the input of generate / export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forcelab.cli import main as cli_main
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer, TrainingAborted

# a tiny model so every test trains in about a second
TINY = ["model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_layers=1",
        "model_overrides.num_heads=2", "data.frames=4", "data.batch_size=2", "logging.wandb=disabled",
        "logging.progress=false", "logging.every=100", "roles.generator.lr=1e-3",
        "roles.generator.ema_decay=0.9", "roles.generator.ema_start=2", "roles.generator.grad_clip=1.0",
        "roles.generator.lr_schedule=cosine", "roles.generator.warmup_steps=2"]
RECIPES = {
    "teacher": ["recipe=teacher"],
    "diffusion_forcing": ["recipe=diffusion_forcing", "model_overrides.chunk_frames=2"],
    "teacher_forcing": ["recipe=diffusion_forcing", "model_overrides.chunk_frames=2", "algo.teacher_forcing=true"],
    "ar_diffusion": ["recipe=ar_diffusion", "algo.num_levels=50"],
}


def config(tmp_path, name, *extra):
    return load_train_config([], TINY + RECIPES[name] + [f"output_dir={tmp_path / 'run'}", *extra])


def weights(run_dir: Path, step: int, role="generator") -> dict:
    d = run_dir / f"checkpoint-{step:06d}" / role
    return load_file(str(d / "diffusion_pytorch_model.safetensors"))


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["generator/loss"]) for r in rows]


@pytest.mark.parametrize("name", list(RECIPES))
def test_resume_is_bit_exact(tmp_path, name):
    straight = config(tmp_path / "a", name, "max_steps=6", "checkpoint.every=3")
    Trainer(straight).run()
    split = config(tmp_path / "b", name, "max_steps=6", "checkpoint.every=3")
    Trainer(split).run(stop_at=3)
    run_b = tmp_path / "b" / "run"
    assert [p.name for p in sorted(run_b.glob("checkpoint-*"))] == ["checkpoint-000003"]
    Trainer(split, resume="latest").run()
    run_a = tmp_path / "a" / "run"
    assert losses(run_a) == losses(run_b)
    wa, wb = weights(run_a, 6), weights(run_b, 6)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = weights(run_a, 6, "generator_ema"), weights(run_b, 6, "generator_ema")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # the weights did move (a run that trains nothing would pass the comparison trivially)
    w3 = weights(run_a, 3)
    assert any(not torch.equal(w3[k], wa[k]) for k in wa)


def test_resume_through_the_cli(tmp_path):
    cfg = config(tmp_path, "teacher", "max_steps=4", "checkpoint.every=2")
    Trainer(cfg).run(stop_at=2)
    args = ["train", *TINY, "recipe=teacher", f"output_dir={tmp_path / 'run'}", "max_steps=4",
            "checkpoint.every=2", "--resume", "latest"]
    assert cli_main(args) == 0
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2, 3, 4]


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    big = config(tmp_path / "big", "teacher", "max_steps=3", "data.batch_size=4")
    acc = config(tmp_path / "acc", "teacher", "max_steps=3", "data.batch_size=2", "gradient_accumulation_steps=2")
    small = config(tmp_path / "small", "teacher", "max_steps=3", "data.batch_size=2")
    for c in (big, acc, small):
        Trainer(c).run()
    wb, wa, ws = (weights(tmp_path / d / "run", 3) for d in ("big", "acc", "small"))
    # fp32 sums in another order: equal to rounding (stated tolerance 1e-5 relative to the weights)
    assert all(torch.allclose(wb[k], wa[k], rtol=1e-5, atol=1e-6) for k in wb)
    assert any(not torch.allclose(wb[k], ws[k], rtol=1e-5, atol=1e-6) for k in wb)


def test_a_run_states_its_strategy_world_size_and_global_batch(tmp_path, capsys):
    Trainer(config(tmp_path, "teacher", "max_steps=1", "data.batch_size=2", "gradient_accumulation_steps=3")).run()
    err = capsys.readouterr().err
    assert "parallel: ddp" in err and "over 1 process(es)" in err and "global batch 2 x 1 x 3 = 6" in err


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    """DDP over gloo: 2 processes x batch 2 == 1 process x batch 4 (same samples per step)."""
    common = [*TINY, "recipe=teacher", "max_steps=2"]
    Trainer(load_train_config([], common + ["data.batch_size=4", f"output_dir={tmp_path / 'one'}"])).run()
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "forcelab.train", *common, "data.batch_size=2", f"output_dir={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((tmp_path / "two" / "checkpoint-000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    w1, w2 = weights(tmp_path / "one", 2), weights(tmp_path / "two", 2)
    # the same samples and noise; only the order of the gradient sums differs (measured: at most
    # 2e-6 on weights of size 0.2, i.e. 0.2% of one Adam step at lr 1e-3)
    assert all(torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-5) for k in w1)
    assert losses(tmp_path / "one")[0][1] == pytest.approx(losses(tmp_path / "two")[0][1], rel=1e-6)


def test_nonfinite_guard_skips_then_aborts_keeping_the_last_checkpoint(tmp_path, monkeypatch):
    from forcelab.train.teacher import TeacherRecipe

    cfg = config(tmp_path, "teacher", "max_steps=8", "checkpoint.every=2", "max_nonfinite_steps=3",
                 "roles.generator.ema_start=1")   # the EMA (of steps 1 and 2) differs from the weights
    trainer = Trainer(cfg)
    trainer.run(stop_at=2)
    before = weights(tmp_path / "run", 2)
    ema_before = {k: e.clone() for k, e in trainer.roles["generator"].ema.items()}
    schedule_before = trainer.roles["generator"].scheduler.last_epoch
    real = TeacherRecipe.loss

    def poisoned(self, role, batch, ctx):
        loss, logs = real(self, role, batch, ctx)
        return loss * float("nan"), logs

    monkeypatch.setattr(TeacherRecipe, "loss", poisoned)
    with pytest.raises(TrainingAborted, match="3 non-finite updates in a row.*checkpoint-000002"):
        trainer.run()
    assert trainer.step == 4   # steps 3, 4, 5 were skipped (the 5th raised), none applied
    from forcelab.models.checkpoint import diffusers_to_wan
    after = trainer.module("generator").state_dict()
    assert all(torch.equal(v, after[diffusers_to_wan(k)]) for k, v in before.items())
    # a skipped update moves neither the EMA nor the LR schedule, nor counts as an update
    ema = trainer.roles["generator"].ema
    assert all(torch.equal(e, ema[k]) for k, e in ema_before.items())
    assert trainer.roles["generator"].scheduler.last_epoch == schedule_before
    assert trainer.roles["generator"].updates == 2
    assert [p.name for p in sorted((tmp_path / "run").glob("checkpoint-*"))] == ["checkpoint-000002"]


def _cli_error(capsys, args) -> str:
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_user_errors_are_one_line(tmp_path, capsys):
    assert "unknown config key 'roles.generator.lrr'" in _cli_error(
        capsys, ["train", *TINY, "roles.generator.lrr=1", f"output_dir={tmp_path}/a"])
    assert "max_steps must be a whole number >= 1, got 0" in _cli_error(capsys, ["train", *TINY, "max_steps=0"])
    assert "data.source" in _cli_error(
        capsys, ["train", *TINY, f"data.source={tmp_path}/nope", f"output_dir={tmp_path}/b"])
    assert "no role(s) ['critc']" in _cli_error(
        capsys, ["train", *TINY, "roles.critc.lr=1", f"output_dir={tmp_path}/c"])
    # weights of another model size
    Trainer(config(tmp_path / "w", "teacher", "max_steps=1")).run()
    capsys.readouterr()
    line = _cli_error(capsys, ["train", *TINY, "model_overrides.dim=48", "max_steps=1",
                               f"roles.generator.init={tmp_path / 'w' / 'run'}", f"output_dir={tmp_path}/d"])
    assert "roles.generator.init" in line and "another size" in line and "dim: weights 32, config 48" in line
    # a folder that forcelab did not write is never used as a run folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    assert "not written by forcelab" in _cli_error(capsys, ["train", *TINY, f"output_dir={tmp_path}/mine"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    # an earlier run's checkpoints are not silently trained over
    assert "--resume latest" in _cli_error(capsys, ["train", *TINY, "max_steps=1", f"output_dir={tmp_path}/w/run"])


def test_dry_run_builds_runs_one_step_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert cli_main(["train", *TINY, f"output_dir={out}", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "role generator:" in text and "parameters" in text and "peak host memory" in text
    assert "recipe: teacher" in text and "max_steps:" in text
    assert not out.exists()


def test_generate_and_export_a_finished_run(tmp_path, capsys):
    Trainer(config(tmp_path, "teacher", "max_steps=2")).run()
    run = tmp_path / "run"
    videos = tmp_path / "videos"
    assert cli_main(["generate", str(run), "--prompt", "a red ball", "--plan", "teacher", "--steps", "2",
                     "--frames", "4", "--output", str(videos), "--quiet"]) == 0
    side = json.loads(next(videos.glob("*.json")).read_text())
    assert side["vae"].startswith("toy") and side["frames"] == 4
    assert side["model"] == str(run)
    out = tmp_path / "export"
    assert cli_main(["export", str(run), str(out), "--format", "diffusers"]) == 0
    assert json.loads((out / "forcelab.json").read_text())["vae"] == "toy"
    from forcelab.models.dit import CausalDiT
    exported = CausalDiT.from_pretrained(out)
    ema = weights(run, 2, "generator_ema")
    state = exported.state_dict()
    from forcelab.models.checkpoint import diffusers_to_wan
    assert all(torch.equal(state[diffusers_to_wan(k)], v) for k, v in ema.items())
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.WanTransformer3DModel.from_pretrained(str(out))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in exported.parameters())
    wan = tmp_path / "wan"
    assert cli_main(["export", str(run / "checkpoint-000002"), str(wan), "--format", "wan", "--no-ema"]) == 0
    raw = CausalDiT.from_pretrained(wan).state_dict()
    gen = weights(run, 2)
    assert all(torch.equal(raw[diffusers_to_wan(k)], v) for k, v in gen.items())


KILL_SCRIPT = """
import os, signal, sys
import forcelab.train.checkpoint as ck
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer

real = ck.save_state
def dying_save_state(model, path, *a, **k):
    out = real(model, path, *a, **k)
    if "checkpoint-000006" in str(path):   # the second checkpoint: weights written, the rest not yet
        os.kill(os.getpid(), signal.SIGKILL)
    return out
ck.save_state = dying_save_state
Trainer(load_train_config([], sys.argv[1:])).run()
"""


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    name = "teacher"
    straight = config(tmp_path / "a", name, "max_steps=6", "checkpoint.every=3")
    Trainer(straight).run()
    run_b = tmp_path / "b" / "run"
    args = TINY + RECIPES[name] + ["max_steps=6", "checkpoint.every=3", f"output_dir={run_b}"]
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in sorted(run_b.glob("checkpoint-*"))] == ["checkpoint-000003"]
    resumed = Trainer(config(tmp_path / "b", name, "max_steps=6", "checkpoint.every=3"), resume="latest")
    assert resumed.step == 3
    resumed.run()
    wa, wb = weights(tmp_path / "a" / "run", 6), weights(run_b, 6)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not [p.name for p in run_b.iterdir() if "tmp" in p.name]   # the dead save's leftovers are gone


@pytest.mark.parametrize("name", ["teacher", "teacher_forcing"])
def test_bf16_autocast_trains(tmp_path, name):
    cfg = config(tmp_path, name, "max_steps=2", "mixed_precision=bf16")
    last = Trainer(cfg).run()
    assert torch.isfinite(torch.tensor(last["generator/loss"]))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    run = tmp_path / "run"
    Trainer(config(tmp_path, "teacher", "max_steps=4", "checkpoint.every=1", "checkpoint.keep_last=2")).run()
    assert [p.name for p in sorted(run.glob("checkpoint-*"))] == ["checkpoint-000003", "checkpoint-000004"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".checkpoint")]
