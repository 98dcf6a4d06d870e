"""Rank-local loading under FSDP2 on 2 CPU processes (gloo, torchrun, one launch): a role built
on the meta device, sharded, then filled with only each rank's rows of the safetensors files
(models/shard_loading.py) equals the same checkpoint loaded whole by CausalDiT.from_pretrained
(the plain loader, tested against saved tensors in test_dit_checkpoint.py), for Wan and
diffusers layouts, one file and an index of shards, trainable (fp32) and frozen (bf16), and so
does a trainable role whose ZeRO-3 partitions each rank fills (where DeepSpeed is installed);
and a rank's peak memory while loading under FSDP2 stays within its shards + one block + a
fixed overhead. A NaN that only one rank reads stops every rank with the same error.

Memory is the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs
just before loading), which sees torch's allocations and the file pages safetensors maps, less
the resident set at the reset."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from forcelab.models import CausalDiT, DiTConfig
from forcelab.models.checkpoint import INDEX_NAME

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None   # ZeRO-3 is checked where installed
MiB = 2 ** 20
TINY = dict(dim=32, ffn_dim=64, num_layers=2, num_heads=2)
# the memory check's model: 8 blocks of ~7 MB (fp32), ~56 MB in all, so that a rank's half plus
# one block plus the overhead stays well below the whole model the old path held on every rank
MEASURED = dict(dim=384, ffn_dim=768, num_layers=8, num_heads=4, text_dim=384, freq_dim=64)
OVERHEAD = 8 * MiB      # fixed overhead allowed: allocator slack, safetensors headers, mesh state
SHARD_BYTES = 4 * MiB   # shard the measured checkpoint's files (index) like a large model's
DAMAGED_KEY = "blocks.1.ffn.0.weight"

SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from forcelab.errors import CheckpointError
from forcelab.train.config import load_train_config
from forcelab.train.fsdp import FSDP
from forcelab.train.parallel import exit_processes
from forcelab.train.recipe import RoleSpec
from forcelab.train.roles import build_role

out, measured, damaged, zero3 = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "zero3"
checkpoints = [Path(a) for a in sys.argv[5:]]
acc = Accelerator(cpu=True)
torch.set_num_threads(1)
cfg = lambda path, dtype: load_train_config([], ["recipe=teacher", "parallel=fsdp", f"roles.generator.init={path}"]
                                            + ([f"roles.generator.dtype={dtype}"] if dtype else []))

def load(path, trainable, dtype=None):
    c = cfg(path, dtype)
    role = build_role("generator", RoleSpec(trainable=trainable), c, 0, acc.device, path, None, defer_loading=True)
    assert all(p.is_meta for p in role.module.parameters())
    FSDP(acc, c).prepare(role)
    assert role.pending is None
    return role

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

for path in checkpoints:                       # equality: full tensors gathered to rank 0
    for trainable, dtype in ((True, None), (False, "bf16")):
        role = load(path, trainable, dtype)
        full = {k: p.full_tensor() for k, p in role.module.named_parameters()}
        held = sum(p.to_local().numel() for p in role.module.parameters())
        assert held < sum(p.numel() for p in role.module.parameters())
        assert all(p.requires_grad == trainable for p in role.module.parameters())
        if acc.is_main_process:
            torch.save(full, f"{out}/{path.name}-{'trainable' if trainable else 'frozen'}.pt")

try:                                           # a NaN only rank 1 reads: every rank raises it
    load(damaged, True)
    error = None
except CheckpointError as e:
    error = str(e)
with open(f"{out}/damaged-rank{acc.process_index}.json", "w") as f:
    json.dump(error, f)

if os.access("/proc/self/clear_refs", os.W_OK):   # Linux: measure the FSDP2 load's peak memory
    with open("/proc/self/clear_refs", "w") as f:  # peak resident set := current
        f.write("5")
    base = status("VmRSS")
    role = load(measured, True)
    peak = status("VmHWM") - base
    local = lambda p: p.to_local()
    shard = sum(local(p).numel() * local(p).element_size() for p in role.module.parameters())
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in role.module.blocks)
    total = sum(p.numel() * p.element_size() for p in role.module.parameters())
    with open(f"{out}/memory-rank{acc.process_index}.json", "w") as f:
        json.dump({"peak": peak, "shard": shard, "block": block, "total": total}, f)

if zero3:                                      # ZeRO-3: each rank fills its flat partitions
    import deepspeed
    from forcelab.train.zero import ZeRO
    for path in checkpoints[::3]:              # Wan in one file, diffusers with an index
        c = cfg(path, None)
        role = build_role("generator", RoleSpec(trainable=True), c, 0, acc.device, path, None, defer_loading=True)
        ZeRO(acc, c, stage=3).prepare(role)
        assert role.pending is None
        params = list(role.module.parameters())
        assert sum(p.ds_tensor.numel() for p in params) < sum(p.ds_numel for p in params)
        with deepspeed.zero.GatheredParameters(params):
            if acc.is_main_process:
                full = {k: p.detach().clone() for k, p in role.module.named_parameters()}
                torch.save(full, f"{out}/{path.name}-zero3.pt")
exit_processes()
"""


def save(config: DiTConfig, path: Path, fmt: str, shard_bytes: int | None = None, seed: int = 0) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CausalDiT(config).save_pretrained(path, format=fmt, max_shard_bytes=shard_bytes)
    return path


def test_rank_local_loading_equals_plain_loading_within_the_memory_bound(tmp_path):
    tiny = DiTConfig.preset("toy", **TINY)
    checkpoints = [save(tiny, tmp_path / "wan-single", "wan"),
                   save(tiny, tmp_path / "wan-index", "wan", shard_bytes=8192, seed=1),
                   save(tiny, tmp_path / "diffusers-single", "diffusers", seed=2),
                   save(tiny, tmp_path / "diffusers-index", "diffusers", shard_bytes=8192, seed=3)]
    measured = save(DiTConfig.preset("toy", **MEASURED), tmp_path / "measured", "diffusers", SHARD_BYTES)
    assert all((p / INDEX_NAME).is_file() for p in (checkpoints[1], checkpoints[3], measured))
    damaged = save(tiny, tmp_path / "damaged", "wan")
    weights = damaged / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state[DAMAGED_KEY][-1, 0] = float("nan")    # the last row: rank 1's half of the rows
    save_file(state, str(weights), metadata={"format": "pt"})
    script = tmp_path / "load.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           str(tmp_path), str(measured), str(damaged), "zero3" if HAS_DEEPSPEED else "-", *map(str, checkpoints)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])

    for path in checkpoints:
        kinds = [("trainable", None), ("frozen", torch.bfloat16)]
        kinds += [("zero3", None)] if HAS_DEEPSPEED and path in checkpoints[::3] else []
        for kind, dtype in kinds:
            expected = CausalDiT.from_pretrained(path, dtype=dtype).state_dict()
            got = torch.load(tmp_path / f"{path.name}-{kind}.pt", weights_only=True)
            assert got.keys() == expected.keys(), (path.name, kind)
            for k, v in expected.items():
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), (path.name, kind, k)

    errors = [json.loads((tmp_path / f"damaged-rank{rank}.json").read_text()) for rank in range(2)]
    assert errors[0] == errors[1] and f"weight {DAMAGED_KEY!r} holds NaN or inf values" in errors[0], errors

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("the memory bound is measured through Linux's /proc/self/clear_refs (the loads were checked)")
    for rank in range(2):
        m = json.loads((tmp_path / f"memory-rank{rank}.json").read_text())
        bound = m["shard"] + m["block"] + OVERHEAD
        print(f"rank {rank}: peak {m['peak'] / MiB:.1f} MiB, shard {m['shard'] / MiB:.1f} MiB, "
              f"largest block {m['block'] / MiB:.1f} MiB, bound {bound / MiB:.1f} MiB, "
              f"whole model {m['total'] / MiB:.1f} MiB")
        assert bound < m["total"]          # the check tells rank-local loading from loading everything
        assert 0 < m["peak"] <= bound, m
