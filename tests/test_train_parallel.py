"""Sharded training on 2 CPU processes (gloo, torchrun): FSDP2 and DeepSpeed ZeRO save full
weights, resume exactly, and train like plain data-parallel; a 3-role recipe runs under FSDP.

Each test is one torchrun launch of RUNS_SCRIPT, which trains (in one process group) the
same tiny teacher run three times: 6 steps straight, 3 steps + resume + 3 steps, and 6 steps
of plain data-parallel (the reference)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forcelab.models.checkpoint import diffusers_to_wan
from forcelab.models.config import DiTConfig
from forcelab.models.dit import CausalDiT

EMA_DECAY, EMA_START = 0.9, 2
TINY = ["model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_layers=2",
        "model_overrides.num_heads=2", "data.frames=4", "data.batch_size=2", "logging.wandb=disabled",
        "logging.progress=false", "logging.every=100", "roles.generator.lr=1e-3",
        f"roles.generator.ema_decay={EMA_DECAY}", f"roles.generator.ema_start={EMA_START}",
        "roles.generator.grad_clip=1.0", "roles.generator.lr_schedule=cosine", "roles.generator.warmup_steps=2",
        "recipe=teacher", "max_steps=6", "checkpoint.every=3", "gradient_accumulation_steps=2"]

RUNS_SCRIPT = """
import json
import sys
import torch
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer
base, mode, reference, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
cfg = lambda name, parallel: load_train_config([], args + [f"parallel={parallel}", f"output_dir={base}/{name}"])
straight = Trainer(cfg("straight", mode))
assert straight.parallel.name == mode, straight.parallel.name
role, train_step, recorded = straight.roles["generator"], straight.train_step, {}
def recording_step():   # the full weights after each step (collective), for the test's EMA reference
    out = train_step()
    full = straight.parallel.full_module(role, use_ema=False)
    if full is not None:
        recorded[straight.step + 1] = {k: p.detach().clone() for k, p in full.named_parameters()}
    return out
straight.train_step = recording_step
straight.run()
if straight.is_main:
    torch.save(recorded, f"{base}/straight-weights.pt")
local = lambda t: t.to_local().numel() if hasattr(t, "to_local") else t.numel()   # FSDP: the DTensor's shard
held = {"ema": sum(local(e) for e in role.ema.values()), "tensors": len(role.ema),
        "params": sum(local(getattr(p, "ds_tensor", p)) for p in role.module.parameters())}   # ZeRO-3: the partition
with open(f"{base}/held-rank{straight.rank}.json", "w") as f:
    json.dump(held, f)
Trainer(cfg("split", mode)).run(stop_at=3)
Trainer(cfg("split", mode), resume="latest").run()
if reference != "none":
    Trainer(cfg("reference", reference)).run()
from forcelab.train.parallel import exit_processes
exit_processes()   # as the CLI ends a multi-process run (train/parallel.py)
"""


def launch(tmp_path: Path, script: str, *args: str, timeout: int = 240) -> None:
    path = tmp_path / "runs.py"
    path.write_text(script)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(path), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


def weights(run: Path, step: int, role: str = "generator") -> dict:
    d = run / f"checkpoint-{step:06d}" / role
    return load_file(str(d / "diffusion_pytorch_model.safetensors"))


def losses(run: Path) -> list:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["generator/loss"]) for r in rows]


def max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)


def check_save_resume(tmp_path: Path, mode: str) -> dict:
    """The three runs' checks; returns the measured differences."""
    straight, split, ref = (tmp_path / d for d in ("straight", "split", "reference"))
    state = json.loads((split / "checkpoint-000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    # full weights in the usual DiT directory: a plain CausalDiT loads them
    full = CausalDiT.from_pretrained(split / "checkpoint-000006" / "generator")
    assert sum(p.numel() for p in full.parameters()) == sum(v.numel() for v in weights(split, 6).values())
    assert (split / "checkpoint-000006" / "generator_ema").is_dir()
    # resume: bit for bit (losses, weights, EMA)
    assert losses(straight) == losses(split)
    for role in ("generator", "generator_ema"):
        a, b = weights(straight, 6, role), weights(split, 6, role)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), role
    # each rank's EMA is the part of the weights that rank holds (a ZeRO-3 partition's padding
    # aside: under one element per process and tensor)
    for rank in range(2):
        held = json.loads((tmp_path / f"held-rank{rank}.json").read_text())
        print(f"{mode}: rank {rank} holds {held['ema']:,} EMA elements next to {held['params']:,} parameter elements")
        assert 0 <= held["params"] - held["ema"] < 2 * held["tensors"], held
    # the EMA against a float64 EMA of the full weights each step left (ema_start 2, decay 0.9)
    recorded = torch.load(tmp_path / "straight-weights.pt", weights_only=True)
    expected = None
    for step in range(EMA_START, 7):
        w = {k: v.double() for k, v in recorded[step].items()}
        expected = w if expected is None else {k: EMA_DECAY * expected[k] + (1 - EMA_DECAY) * w[k] for k in w}
    ema = {diffusers_to_wan(k): v for k, v in weights(straight, 6, "generator_ema").items()}
    assert ema.keys() == expected.keys()
    assert max_rel_diff(ema, {k: v.float() for k, v in expected.items()}) < 1e-6
    w3, w6 = weights(straight, 3), weights(straight, 6)
    assert any(not torch.equal(w3[k], w6[k]) for k in w6)          # it trained
    # against plain data-parallel: the same arithmetic up to fp32 summation order
    diff = max_rel_diff(weights(straight, 6), weights(ref, 6))
    print(f"{mode}: 6 steps vs plain data-parallel, max |dw| / max |w| per tensor = {diff:.3g}")
    assert diff < 1e-5, diff
    return {"vs_ddp_max_rel": diff}


def test_fsdp_saves_resumes_and_matches_data_parallel(tmp_path):
    # the full format (gathered to rank 0); the sharded one: tests/test_train_sharded_checkpoint.py
    launch(tmp_path, RUNS_SCRIPT, str(tmp_path), "fsdp", "ddp", *TINY, "checkpoint.format=full")
    check_save_resume(tmp_path, "fsdp")


SF_SCRIPT = """
import sys
import torch
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer
from torch.distributed.fsdp import FSDPModule
trainer = Trainer(load_train_config([], sys.argv[1:]))
assert trainer.parallel.name == "fsdp"
assert all(isinstance(trainer.module(r), FSDPModule) for r in ("generator", "critic", "teacher"))
from torch.distributed.tensor import DTensor
teacher, generator = trainer.module("teacher"), trainer.module("generator")
assert all(isinstance(p, DTensor) for p in teacher.parameters())            # sharded, frozen
assert torch.bfloat16 in {p.dtype for p in teacher.parameters()}            # kept in bf16
assert {p.dtype for p in generator.parameters()} == {torch.float32}         # trainable: fp32 shards
block = list(generator.blocks[0].parameters())
assert sum(p.to_local().numel() for p in block) < sum(p.numel() for p in block)   # each rank holds a part
trainer.run()
# the same run with an fp32 teacher, sharded and not: the 3-role arithmetic is unchanged
for name, parallel in (("fsdp32", "fsdp"), ("ddp32", "ddp")):
    args = [a for a in sys.argv[1:] if not a.startswith(("output_dir=", "logging.sample", "parallel="))]
    out = sys.argv[1:][-1].split("=", 1)[1] + "-" + name
    Trainer(load_train_config([], args + ["roles.teacher.dtype=fp32", f"parallel={parallel}",
                                          f"output_dir={out}"])).run()
from forcelab.train.parallel import exit_processes
exit_processes()   # as the CLI ends a multi-process run (train/parallel.py)
"""


def test_self_forcing_three_roles_under_fsdp(tmp_path):
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    CausalDiT(DiTConfig.preset("toy", dim=32, ffn_dim=64, num_layers=2, num_heads=2, chunk_frames=2)).save_pretrained(teacher)
    args = ["recipe=self_forcing", f"roles.teacher.init={teacher}", "data.batch_size=1", "data.frames=8",
            "algo.frames=4", "algo.min_chunks=1", "algo.max_chunks=2", "logging.wandb=disabled",
            "logging.progress=false", "roles.generator.update_every=2", "roles.generator.ema_decay=0.9",
            "max_steps=2", "parallel=fsdp", "checkpoint.format=full", "logging.sample_every=2", "logging.sample_prompts=[a red ball]",
            f"output_dir={tmp_path / 'run'}"]   # output_dir last: the script derives its other runs from it
    launch(tmp_path, SF_SCRIPT, *args)
    ckpt = tmp_path / "run" / "checkpoint-000002"
    for role in ("generator", "critic", "generator_ema"):
        CausalDiT.from_pretrained(ckpt / role)          # full weights, readable as usual
    assert (tmp_path / "run" / "samples" / "step-000002" / "00.mp4").is_file()   # gathered for sampling
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert "generator/loss" in rows[0] and "critic/loss" in rows[0] and "critic/loss" in rows[1]
    assert all(torch.isfinite(torch.tensor(r["critic/loss"])) for r in rows)
    for role in ("generator", "critic"):
        a, b = (weights(tmp_path / f"run-{n}", 2, role) for n in ("fsdp32", "ddp32"))
        diff = max_rel_diff(a, b)
        print(f"self_forcing {role}: FSDP vs data-parallel after 2 steps, max |dw| / max |w| = {diff:.3g}")
        assert diff < 1e-5, (role, diff)


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install 'forcelab[deepspeed]')")


@needs_deepspeed
def test_zero2_saves_resumes_and_matches_data_parallel(tmp_path):
    launch(tmp_path, RUNS_SCRIPT, str(tmp_path), "zero2", "ddp", *TINY)
    check_save_resume(tmp_path, "zero2")


@needs_deepspeed
def test_zero3_saves_resumes_and_matches_data_parallel(tmp_path):
    launch(tmp_path, RUNS_SCRIPT, str(tmp_path), "zero3", "ddp", *TINY, "checkpoint.format=full")
    check_save_resume(tmp_path, "zero3")


def launch_env(name: str) -> dict:
    """The variables `accelerate launch --config_file configs/accelerate/NAME.yaml` gives each process
    (accelerate's own launcher code, without starting anything)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "2", "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def cpu_accelerator(processes: int = 2):
    """What accelerate's state says on CPU, whatever the launch config: MULTI_CPU, no plugins."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    return SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), num_processes=processes,
                           device=torch.device("cpu"))


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero2", "zero3"])
def test_accelerate_configs_choose_their_strategy_on_cpu(name, monkeypatch):
    """Each file in configs/accelerate/ selects its strategy although accelerate's CPU state
    dropped FSDP and DeepSpeed; the plugin carries the file's settings."""
    from forcelab.train.parallel import launch_strategy

    text = (Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{name}.yaml").read_text()
    assert "--num_machines" in text and "--machine_rank" in text and "--main_process_ip" in text
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in launch_env(name).items():
        monkeypatch.setenv(key, value)
    strategy, plugin = launch_strategy(cpu_accelerator())
    assert strategy == name
    if name == "fsdp":
        assert plugin.reshard_after_forward is True and plugin.fsdp_version == 2
    elif name.startswith("zero"):
        assert plugin.deepspeed_config["zero_optimization"]["stage"] == int(name[-1])
    else:
        assert plugin is None


def test_launch_and_training_config_must_agree(monkeypatch):
    from types import SimpleNamespace

    from forcelab.errors import ConfigError
    from forcelab.train.parallel import make_strategy

    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_", "MASTER_", "WORLD_SIZE"))]:
        monkeypatch.delenv(key)
    for key, value in launch_env("fsdp").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=r"parallel=zero2 in the training config, but the accelerate launch "
                                          r"config asks for fsdp") as e:
        make_strategy(SimpleNamespace(parallel="zero2"), cpu_accelerator())
    assert "\n" not in str(e.value)
    # `accelerate launch --cpu --num_processes 2` starts one process and leaves this behind
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ConfigError, match=r"--cpu .* started ONE process"):
        make_strategy(SimpleNamespace(parallel="auto"), cpu_accelerator(1))
    monkeypatch.delenv("MASTER_PORT")                         # a plain one-process run is fine
    cfg = SimpleNamespace(parallel="auto", data=SimpleNamespace(batch_size=2), gradient_accumulation_steps=3)
    strategy = make_strategy(cfg, cpu_accelerator(1))
    assert strategy.describe().startswith("parallel: ddp (chosen by parallel=auto in the training config) over 1 "
                                          "process(es) on cpu; global batch 2 x 1 x 3 = 6")


@pytest.mark.parametrize("name", ["fsdp", pytest.param("zero2", marks=needs_deepspeed)])
def test_accelerate_launch_with_a_sharding_config_shards_on_cpu(name, tmp_path, free_port):
    """The user's command, two CPU processes: the launch config's strategy is the one that runs."""
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{name}.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
           "--main_process_port", str(free_port), "-m", "forcelab.train", "--dry-run", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert f"parallel: {name} over 2 process(es)" in proc.stdout, proc.stdout[-2000:]


GUARD_SCRIPT = """
import sys
import torch
from forcelab.train.config import load_train_config
from forcelab.train.teacher import TeacherRecipe
from forcelab.train.trainer import Trainer
real = TeacherRecipe.loss
base, poison, modes, args = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
def poisoned(self, role, batch, ctx):
    loss, logs = real(self, role, batch, ctx)
    if ctx.step != 1:
        return loss, logs
    if poison == "loss":
        return loss * float("nan"), logs
    # the same finite loss, an infinite gradient: d sqrt(u) / du at u = 0
    return loss + torch.sqrt(loss - loss.detach()), logs
TeacherRecipe.loss = poisoned
for mode in modes:
    trainer = Trainer(load_train_config([], args + [f"parallel={mode}", f"output_dir={base}/{mode}"]))
    trainer.run()
    assert trainer.roles["generator"].updates == 3, (mode, trainer.roles["generator"].updates)
from forcelab.train.parallel import exit_processes
exit_processes()   # as the CLI ends a multi-process run (train/parallel.py)
"""


def check_guard(tmp_path: Path, modes: list[str]) -> None:
    """Every mode skipped step 2's update alone, and its weights and EMA equal the first mode's."""
    ref = {role: weights(tmp_path / modes[0], 4, role) for role in ("generator", "generator_ema")}
    assert all(torch.isfinite(v).all() for v in ref["generator"].values())
    for mode in modes:
        rows = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        assert [r.get("generator/skipped", 0.0) for r in rows] == [0.0, 1.0, 0.0, 0.0], mode
        for role, w in ref.items():
            assert max_rel_diff(weights(tmp_path / mode, 4, role), w) < 1e-5, (mode, role)


GUARD_ARGS = [a for a in TINY if not a.startswith(("max_steps=", "checkpoint.every=", "roles.generator.ema_start="))] \
    + ["max_steps=4", "roles.generator.ema_start=0", "checkpoint.format=full"]   # the EMA runs through the skipped step


def test_nonfinite_guard_skips_the_same_update_when_sharded(tmp_path):
    """A NaN loss at step 2 skips that update under every strategy; the runs stay equal."""
    modes = ["ddp", "fsdp"] + (["zero2"] if importlib.util.find_spec("deepspeed") else [])
    launch(tmp_path, GUARD_SCRIPT, str(tmp_path), "loss", ",".join(modes), *GUARD_ARGS)
    check_guard(tmp_path, modes)


@needs_deepspeed
def test_deepspeed_skipped_step_counts_as_skipped(tmp_path):
    """A finite loss whose gradient is infinite at step 2: the trainer's guard sees the norm (ddp),
    DeepSpeed's own check inside engine.step sees it under ZeRO; either way the update is
    skipped, logged, not counted (3 updates of 4) and moves neither the LR schedule nor the EMA."""
    modes = ["ddp", "zero2", "zero3"]
    launch(tmp_path, GUARD_SCRIPT, str(tmp_path), "gradient", ",".join(modes), *GUARD_ARGS)
    check_guard(tmp_path, modes)
