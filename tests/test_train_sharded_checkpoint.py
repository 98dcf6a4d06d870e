"""Sharded checkpoints (torch.distributed.checkpoint) on 2 CPU processes (gloo, torchrun):
FSDP writes each rank's own shards (about half the state per rank, nothing gathered), resumes
bit for bit at the same world size and at one process as the same full tensors, exports to a
DiT directory equal to the full weights; FSDP's bf16 mixed-precision policy is applied; and
streaming_long's per-rank stream state continues each rank's stream exactly. Under ZeRO-3 each
rank writes its flat partitions of the weights and EMA (about half per rank, nothing gathered),
resumes bit for bit, and the export reassembles them into the gathered full tensors.

Three torchrun launches (each costs seconds): the FSDP runs, shared by three tests, the
streaming_long runs and the ZeRO-3 runs (skipped without DeepSpeed); the one-process resume,
export and fault checks run in this process."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forcelab.errors import ForcelabError
from forcelab.models.checkpoint import diffusers_to_wan
from forcelab.models.dit import CausalDiT
from forcelab.run_folder import resolve_weights
from forcelab.train.config import load_train_config
from forcelab.train.export import export
from forcelab.train.trainer import Trainer

TINY = ["model_overrides.dim=32", "model_overrides.ffn_dim=64", "model_overrides.num_layers=2",
        "model_overrides.num_heads=2", "data.frames=4", "data.batch_size=2", "logging.wandb=disabled",
        "logging.progress=false", "logging.every=100", "roles.generator.lr=1e-3",
        "roles.generator.ema_decay=0.9", "roles.generator.ema_start=2", "roles.generator.grad_clip=1.0",
        "roles.generator.lr_schedule=cosine", "roles.generator.warmup_steps=2", "recipe=teacher", "max_steps=4",
        "checkpoint.every=2", "gradient_accumulation_steps=2"]
WORLD, STEPS, ACCUMULATION, BATCH = 2, 4, 2, 2
# the tensor data in a rank's shard file: its half of every sharded tensor plus its share of
# the small replicated ones (each written once): well under the whole state
SHARE_BOUND = 0.6

FSDP_SCRIPT = """
import json
import sys
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
import accelerate.utils
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer
base, args = sys.argv[1], sys.argv[2:]
def refuse(*a, **k):
    raise AssertionError("a sharded checkpoint gathered objects to one rank")
accelerate.utils.gather_object = refuse
cfg = lambda name, *extra: load_train_config([], args + ["parallel=fsdp", f"output_dir={base}/{name}", *extra])
straight = Trainer(cfg("straight"))
assert straight.checkpoint_format == "sharded"
straight.run()
role = straight.roles["generator"]     # the full tensors, for the test's references (collective)
full = StateDictOptions(full_state_dict=True, cpu_offload=True)
optim = get_optimizer_state_dict(role.module, role.optimizer, options=full)
weights, ema = (straight.parallel.full_module(role, use_ema=e) for e in (False, True))
if straight.is_main:
    torch.save({"weights": weights.state_dict(), "ema": ema.state_dict(), "optim": optim["state"]}, f"{base}/full.pt")
# a full disk on rank 1 alone while saving again: every rank stops with the same line
from forcelab.errors import CheckpointError
from forcelab.train import checkpoint as ckpt_io
real = ckpt_io._write_rank_state
def full_disk(tmp, rank, state):
    if rank == 1:
        raise OSError(28, "No space left on device")
    return real(tmp, rank, state)
ckpt_io._write_rank_state, error = full_disk, None
try:
    straight.save()
except CheckpointError as e:
    error = str(e)
ckpt_io._write_rank_state = real
with open(f"{base}/fault-rank{straight.rank}.json", "w") as f:
    json.dump(error, f)
Trainer(cfg("split")).run(stop_at=2)
Trainer(cfg("split"), resume="latest").run()
# FSDP's mixed precision: bf16 parameters in forward and backward, fp32 gradient reduction
calls = []
def recording(name, real):
    def call(*a, **k):
        tensor = k.get("input", a[1] if len(a) > 1 else None)
        calls.append((name, str(tensor.dtype)))
        return real(*a, **k)
    return call
for name in ("all_gather_single", "reduce_scatter_single"):   # what FSDP2 calls
    setattr(dist, name, recording(name, getattr(dist, name)))
mp = Trainer(cfg("mp", "mixed_precision=bf16", "fsdp_bf16_params=true", "max_steps=1"))
generator = mp.module("generator")
seen = []
generator.blocks[0].register_forward_pre_hook(
    lambda m, a: seen.extend(str(p.dtype) for p in m.parameters(recurse=False)) or
    seen.extend(str(p.dtype) for p in m.ffn.parameters()))
mp.run()
group = generator.blocks[0]._get_fsdp_state()._fsdp_param_group
report = {"forward": sorted(set(seen)), "calls": sorted(set(calls)),
          "param_dtype": sorted({str(p.param_dtype) for p in group.fsdp_params}),
          "reduce_dtype": sorted({str(p.reduce_dtype) for p in group.fsdp_params}),
          "shards": sorted({str(p.dtype) for p in generator.parameters()}),
          "grads_or_none": sorted({str(p.grad.dtype) for p in generator.parameters() if p.grad is not None})}
with open(f"{base}/mp-rank{mp.rank}.json", "w") as f:
    json.dump(report, f)
from forcelab.train.parallel import exit_processes
exit_processes()
"""


def launch(tmp_path: Path, script: str, *args: str, timeout: int = 240) -> None:
    path = tmp_path / "runs.py"
    path.write_text(script)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone",
           str(path), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


def losses(run: Path) -> list:
    return [(r["step"], r["generator/loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def exported(tmp_path: Path, ckpt: Path, name: str, ema: bool) -> dict:
    path = export(ckpt, tmp_path / "exports" / name, ema=ema)
    return {diffusers_to_wan(k): v for k, v in load_file(str(path / "diffusion_pytorch_model.safetensors")).items()}


def tensor_bytes_per_file(folder: Path) -> dict[str, int]:
    """Bytes of tensor data each file of a torch.distributed.checkpoint folder holds, from its
    index: every stored chunk's elements x element size, by the file it lies in."""
    from math import prod

    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(folder).read_metadata()
    out = {}
    for index, where in meta.storage_data.items():
        item = meta.state_dict_metadata[index.fqn]
        if not hasattr(item, "chunks"):                   # a non-tensor entry
            continue
        chunk = next(c for c in item.chunks if tuple(c.offsets) == tuple(index.offset))
        size = prod(chunk.sizes) * torch.empty((), dtype=item.properties.dtype).element_size()
        out[where.relative_path] = out.get(where.relative_path, 0) + size
    return out


def all_tensors(folder: Path, file: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, file)
    return torch.load(file, weights_only=True)


def equal(a, b) -> bool:
    """Nested dicts, lists and tensors equal bit for bit."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(equal, a, b))
    return a == b


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sharded")
    launch(base, FSDP_SCRIPT, str(base), *TINY)
    return base


def test_fsdp_sharded_checkpoints_resume_bit_exact_and_export_the_full_weights(fsdp_runs, tmp_path):
    straight, split = fsdp_runs / "straight", fsdp_runs / "split"
    ckpt = straight / f"checkpoint-{STEPS:06d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["format"] == "sharded" and state["world_size"] == WORLD
    assert not (ckpt / "generator").exists() and (ckpt / "architecture" / "generator" / "config.json").is_file()
    assert sorted(p.name for p in ckpt.glob("rng-rank*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]
    # a save that failed on rank 1 alone (full disk): one line on every rank, no leftovers, and
    # the checkpoint it would have replaced intact (the export below reads it)
    errors = [json.loads((fsdp_runs / f"fault-rank{r}.json").read_text()) for r in range(WORLD)]
    assert errors[0] == errors[1] and "No space left" in errors[0] and "\n" not in errors[0], errors
    assert [p.name for p in straight.iterdir() if p.name.startswith(".checkpoint")] == []
    # nothing gathered: each rank's shard file holds about its half of the state
    full = torch.load(fsdp_runs / "full.pt", weights_only=True)
    total = sum(t.numel() * t.element_size() for part in (full["weights"], full["ema"]) for t in part.values()) \
        + sum(t.numel() * t.element_size() for s in full["optim"].values() for t in s.values() if t.dim() > 0)
    written = tensor_bytes_per_file(ckpt / "sharded")
    print(f"tensor bytes per shard file {written}; the full state {total} bytes")
    assert len(written) == WORLD and all(b < SHARE_BOUND * total for b in written.values()), (written, total)
    assert sum(written.values()) >= total                  # every tensor of the state is written (once)
    # resumed bit for bit: losses, weights, EMA (exported) at the same world size
    assert losses(straight) == losses(split)
    split_ckpt = split / f"checkpoint-{STEPS:06d}"
    for ema, held in ((False, full["weights"]), (True, full["ema"])):
        mine = exported(tmp_path, ckpt, f"straight-{ema}", ema)
        assert same(mine, held)                                   # the export equals what the run held
        assert same(exported(tmp_path, split_ckpt, f"split-{ema}", ema), mine)   # the resumed run: bit for bit
    CausalDiT.from_pretrained(tmp_path / "exports" / "straight-True")
    # every tensor of the two checkpoints (weights, EMA, Adam's moments and steps), read with
    # torch.distributed.checkpoint's own offline converter
    a, b = (all_tensors(c / "sharded", tmp_path / f"{c.parent.name}.pt") for c in (ckpt, split_ckpt))
    assert set(a["generator"]) == {"model", "optim", "ema"}
    assert equal(a, b)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ForcelabError, match="not written by forcelab"):   # never replaced
        export(ckpt, user)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    with pytest.raises(ForcelabError, match="forcelab export"):   # generate and init name the export step
        resolve_weights(straight)


def test_a_sharded_checkpoint_resumes_at_one_process_as_the_same_full_tensors(fsdp_runs, tmp_path):
    ckpt = fsdp_runs / "straight" / f"checkpoint-{STEPS:06d}"
    full = torch.load(fsdp_runs / "full.pt", weights_only=True)
    cfg = load_train_config([], TINY + [f"output_dir={tmp_path / 'one'}", f"max_steps={STEPS + 1}"])
    trainer = Trainer(cfg, resume=str(ckpt))
    role = trainer.roles["generator"]
    assert trainer.world == 1 and trainer.step == STEPS
    assert same(role.module.state_dict(), full["weights"])
    assert role.ema.keys() == dict(role.module.named_parameters()).keys()
    assert same(role.ema, {k: full["ema"][k] for k in role.ema})
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    optim = get_optimizer_state_dict(role.module, role.optimizer)["state"]
    assert optim.keys() == full["optim"].keys()
    assert all(same(optim[k], full["optim"][k]) for k in optim)
    assert role.updates == STEPS and role.scheduler.last_epoch == STEPS
    # the data continues at the next global sample: 6 steps x 2 micro-batches x 2 ranks x 2 samples
    _, positions = trainer.next_batch()
    assert positions == [STEPS * ACCUMULATION * WORLD * BATCH + i for i in range(BATCH)]
    trainer.micro_batches -= 1
    trainer.run()                                      # trains on at one process, writing the full format
    assert (tmp_path / "one" / f"checkpoint-{STEPS + 1:06d}" / "generator" / "config.json").is_file()


def test_fsdp_bf16_policy_computes_in_bf16_and_reduces_in_fp32(fsdp_runs):
    for rank in range(WORLD):
        report = json.loads((fsdp_runs / f"mp-rank{rank}.json").read_text())
        assert report["forward"] == ["torch.bfloat16"], report               # parameters seen in forward
        assert report["param_dtype"] == ["torch.bfloat16"] and report["reduce_dtype"] == ["torch.float32"], report
        assert report["shards"] == ["torch.float32"]                         # the optimizer's shards stay fp32
        gathered = {d for name, d in report["calls"] if name == "all_gather_single"}
        reduced = {d for name, d in report["calls"] if name.startswith("reduce_scatter")}
        assert gathered == {"torch.bfloat16"} and reduced == {"torch.float32"}, report["calls"]


def test_a_resharded_resume_reads_every_sample_once():
    """Exact enumeration: a stream read by W processes for m micro-batches, resumed by W'
    processes, reads the samples 0, 1, 2, ... in order of (micro-batch, rank), each once."""
    from forcelab.train.checkpoint import resharded_position

    def read(world, batch, micro_batches, offset=0):   # what Trainer.next_batch reads, rank after rank
        return [offset + (m * world + r) * batch + i for m in micro_batches for r in range(world)
                for i in range(batch)]

    for batch in (1, 2, 3):
        for saved, now in ((2, 1), (2, 3), (2, 4), (3, 2), (4, 3)):
            for done in range(5):
                before = read(saved, batch, range(done))
                m, offset = resharded_position(len(before), now, batch)
                after = read(now, batch, range(m, m + 3), offset)
                assert before + after == list(range(len(before) + len(after))), (batch, saved, now, done)


def test_checkpoint_format_is_validated(tmp_path):
    from forcelab.errors import ConfigError

    with pytest.raises(ConfigError, match="checkpoint.format"):
        load_train_config([], TINY + ["checkpoint.format=gathered"])
    with pytest.raises(ConfigError, match="fsdp_bf16_params"):
        load_train_config([], TINY + ["fsdp_bf16_params=true"])
    from types import SimpleNamespace

    from forcelab.train.checkpoint import checkpoint_format

    auto = load_train_config([], TINY)
    assert [checkpoint_format(auto, SimpleNamespace(name=n)) for n in ("ddp", "fsdp", "zero2", "zero3")] == \
        ["full", "sharded", "full", "sharded"]
    with pytest.raises(ConfigError, match="not written under zero2"):   # its weights are whole on every rank
        checkpoint_format(load_train_config([], TINY + ["checkpoint.format=sharded"]), SimpleNamespace(name="zero2"))


STREAM_SCRIPT = """
import sys
import torch
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer
base, args = sys.argv[1], sys.argv[2:]
cfg = lambda name: load_train_config([], args + [f"output_dir={base}/{name}"])
def stream(trainer):   # this rank's sequence as it stands: what a resume must continue exactly
    seq = trainer.recipe.seq
    return {"cache": seq.cache.state_dict(), "recent": seq.recent, "prompt": seq.prompt, "end": seq.end,
            "seeds": list(seq.seeds), "sequences": trainer.recipe.sequences}
straight = Trainer(cfg("straight"))
straight.run()
torch.save(stream(straight), f"{base}/straight-rank{straight.rank}.pt")
Trainer(cfg("split")).run(stop_at=3)
resumed = Trainer(cfg("split"), resume="latest")
torch.save(stream(resumed), f"{base}/resumed-rank{resumed.rank}.pt")
resumed.run()
torch.save(stream(resumed), f"{base}/split-rank{resumed.rank}.pt")
from forcelab.train.parallel import exit_processes
exit_processes()
"""


def test_streaming_long_resumes_each_ranks_stream_from_its_own_file(tmp_path, tiny_teacher):
    """2 ranks, FSDP, sharded checkpoints: each rank writes its own sequence state (KV cache,
    recent frames, prompts, seeds) into its own rng-rankR.pt; a resume mid-sequence continues
    every rank's stream bit for bit."""
    args = ["recipe=streaming_long", f"roles.teacher.init={tiny_teacher(layers=2)}", "data.batch_size=1",
            "algo.frames=4", "algo.new_frames=2", "algo.max_frames=9", "algo.sink_frames=2", "algo.window_frames=4",
            "logging.wandb=disabled", "logging.progress=false", "logging.every=1", "roles.generator.update_every=2",
            "roles.generator.lr=1e-3", "roles.critic.lr=1e-3", "max_steps=4", "checkpoint.every=3", "parallel=fsdp"]
    launch(tmp_path, STREAM_SCRIPT, str(tmp_path), *args)
    ckpt = tmp_path / "split" / "checkpoint-000003"
    assert json.loads((ckpt / "trainer_state.json").read_text())["format"] == "sharded"
    saved = [torch.load(ckpt / f"rng-rank{r}.pt", weights_only=True)["recipe"]["sequence"] for r in range(WORLD)]
    for rank in range(WORLD):
        resumed = torch.load(tmp_path / f"resumed-rank{rank}.pt", weights_only=True)
        # 5 advances of 3-step sequences (frames 0-4, 4-6, 6-8) by step 3: mid-sequence at the save
        assert saved[rank]["end"] == resumed["end"] == 6
        assert equal(saved[rank]["cache"], resumed["cache"])                   # from this rank's own file
        a, b = (torch.load(tmp_path / f"{n}-rank{rank}.pt", weights_only=True) for n in ("straight", "split"))
        assert equal(a, b), rank                             # cache, recent frames, prompt, seeds, counts
    assert not torch.equal(saved[0]["prompt"], saved[1]["prompt"])               # two ranks, two streams
    rows = [(tmp_path / n / "metrics.jsonl").read_text().splitlines() for n in ("straight", "split")]
    strip = lambda r: {k: v for k, v in json.loads(r).items() if k not in ("time", "steps_per_s")}  # noqa: E731
    assert [strip(r) for r in rows[0]] == [strip(r) for r in rows[1]] and len(rows[0]) == 4


# ---------------------------------------------------------------------- faults (one process)
@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """A one-process run that saved a sharded checkpoint at step 2 (of 4)."""
    out = tmp_path_factory.mktemp("one") / "run"
    cfg = load_train_config([], TINY + [f"output_dir={out}", "checkpoint.format=sharded"])
    Trainer(cfg).run(stop_at=2)
    return cfg, out


def test_a_failed_sharded_save_keeps_the_previous_checkpoint(one_process_run, monkeypatch):
    import errno

    from forcelab.errors import CheckpointError
    from forcelab.train import checkpoint as ckpt_io

    cfg, out = one_process_run
    before = sorted(p.name for p in out.iterdir())
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt_io, "_write_shards", full_disk)
    with pytest.raises(CheckpointError) as e:
        Trainer(cfg, resume="latest").run()
    assert "\n" not in str(e.value) and "--resume latest" in str(e.value), e.value
    assert sorted(p.name for p in out.iterdir() if p.name != "metrics.jsonl") == \
        sorted(n for n in before if n != "metrics.jsonl")                   # no checkpoint-4, no leftovers
    assert Trainer(cfg, resume="latest").step == 2                         # the earlier one resumes


def test_a_damaged_sharded_checkpoint_is_one_clear_line(one_process_run, tmp_path, capsys):
    import shutil

    from forcelab.cli import main
    from forcelab.errors import CheckpointError

    cfg, out = one_process_run
    damaged = tmp_path / "run"
    shutil.copytree(out, damaged)
    (damaged / "checkpoint-000002" / "sharded" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        Trainer(load_train_config([], TINY + [f"output_dir={damaged}"]), resume="latest")
    lost = tmp_path / "lost"
    shutil.copytree(out, lost)
    (lost / "checkpoint-000002" / "sharded" / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"cannot read the shards \(FileNotFoundError"):
        Trainer(load_train_config([], TINY + [f"output_dir={lost}"]), resume="latest")
    for argv in (["export", str(damaged), str(tmp_path / "a")],                          # no shard index
                 ["export", str(lost), str(tmp_path / "b")],                             # a shard file lost
                 ["export", str(out), str(tmp_path / "c"), "--role", "critic"]):         # no such role
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert not (tmp_path / argv[2]).exists()


ZERO3_SCRIPT = """
import json
import shutil
import sys
from pathlib import Path
import torch
from forcelab.errors import CheckpointError
from forcelab.train import checkpoint as ckpt_io
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer
base, args = sys.argv[1], sys.argv[2:]
cfg = lambda name: load_train_config([], args + ["parallel=zero3", f"output_dir={base}/{name}"])
straight = Trainer(cfg("straight"))
assert straight.checkpoint_format == "sharded"
def refuse(*a, **k):
    raise AssertionError("a sharded checkpoint gathered the weights to one rank")
gather, straight.parallel.snapshot = straight.parallel.snapshot, refuse
straight.run()
straight.parallel.snapshot = gather
role = straight.roles["generator"]     # the full tensors, for the test's references (collective)
weights, ema = (straight.parallel.full_module(role, use_ema=e) for e in (False, True))
if straight.is_main:
    torch.save({"weights": weights.state_dict(), "ema": ema.state_dict()}, f"{base}/full.pt")
real = ckpt_io._write_partitions   # a full disk on rank 1 alone: every rank stops with the same line
def full_disk(path, roles):
    if straight.rank == 1:
        raise OSError(28, "No space left on device")
    return real(path, roles)
ckpt_io._write_partitions, error = full_disk, None
try:
    straight.save()
except CheckpointError as e:
    error = str(e)
ckpt_io._write_partitions = real
with open(f"{base}/fault-rank{straight.rank}.json", "w") as f:
    json.dump(error, f)
Trainer(cfg("split")).run(stop_at=2)
Trainer(cfg("split"), resume="latest").run()
if straight.rank == 0:   # rank 1's partitions truncated: every rank refuses the resume with the same line
    shutil.copytree(straight.run_dir, f"{base}/damaged")
    damaged = Path(base) / "damaged" / "checkpoint-000004" / "sharded" / "zero3-rank1.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
torch.distributed.barrier()
try:
    Trainer(cfg("damaged"), resume="latest")
    error = None
except CheckpointError as e:
    error = str(e)
with open(f"{base}/damaged-rank{straight.rank}.json", "w") as f:
    json.dump(error, f)
from forcelab.train.parallel import exit_processes
exit_processes()
"""


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install 'forcelab[deepspeed]')")


@needs_deepspeed
def test_zero3_sharded_checkpoints_write_each_ranks_partitions_resume_bit_exact_and_export(tmp_path):
    from forcelab.train.checkpoint import verify_checkpoint

    launch(tmp_path, ZERO3_SCRIPT, str(tmp_path), *TINY)
    straight, split = tmp_path / "straight", tmp_path / "split"
    ckpt = straight / f"checkpoint-{STEPS:06d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["format"] == "sharded" and state["world_size"] == WORLD
    assert not (ckpt / "generator").exists() and (ckpt / "architecture" / "generator" / "config.json").is_file()
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == ["zero3-rank0.pt", "zero3-rank1.pt"]
    errors = [json.loads((tmp_path / f"fault-rank{r}.json").read_text()) for r in range(WORLD)]
    assert errors[0] == errors[1] and "No space left" in errors[0] and "\n" not in errors[0], errors
    assert [p.name for p in straight.iterdir() if p.name.startswith(".checkpoint")] == []
    errors = [json.loads((tmp_path / f"damaged-rank{r}.json").read_text()) for r in range(WORLD)]
    assert errors[0] == errors[1] and "zero3-rank1.pt: damaged or truncated" in errors[0], errors
    # nothing gathered: each rank's file holds its partitions, about half of the weights and EMA
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    total = sum(t.numel() * t.element_size() for part in full.values() for t in part.values())
    written = []
    for rank in range(WORLD):
        record = torch.load(ckpt / "sharded" / f"zero3-rank{rank}.pt", weights_only=True)["generator"]
        written.append(sum(t.numel() * t.element_size() for kind in ("model", "ema") for t in record[kind]))
    print(f"tensor bytes per rank file {written}; the full weights and EMA {total} bytes")
    assert all(b < SHARE_BOUND * total for b in written) and sum(written) >= total, (written, total)
    # resumed bit for bit; the export reassembles the partitions into the gathered full tensors
    assert losses(straight) == losses(split)
    for name, run in (("straight", straight), ("split", split)):
        for ema, held in ((False, full["weights"]), (True, full["ema"])):
            assert same(exported(tmp_path, run / f"checkpoint-{STEPS:06d}", f"{name}-{ema}", ema), held), (name, ema)
    # another world size or strategy: one line saying what to do
    for world, parallel in ((1, "zero3"), (WORLD, "fsdp")):
        with pytest.raises(ForcelabError, match="forcelab export") as e:
            verify_checkpoint(ckpt, recipe="teacher", world=world, trainable={}, parallel=parallel)
        assert "\n" not in str(e.value)
