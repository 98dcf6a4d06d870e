"""Host memory per rank while a sharded role loads its pretrained weights, on CPU (gloo).

    python bench/loading.py                      # FSDP2 and ZeRO-3, 2 and 4 processes, ~280M parameters
    python bench/loading.py --worlds 2 --layers 4 --strategies fsdp

Builds a DiT between the toy preset and Wan2.1-1.3B (dim 1024, FFN 4096, 16 blocks: about 280M
parameters, 1.1 GB in fp32), saves it once to a temporary folder as a diffusers checkpoint
sharded into files with an index, then for each world size and strategy launches torchrun
twice, one contender after the other:

    before   every rank loads the whole checkpoint (CausalDiT.from_pretrained), then prepares it
             (FSDP2 shards it; ZeRO-3 leaves it whole until deepspeed.initialize partitions it)
    after    every rank builds the model on the meta device and reads only its part: FSDP2 shards
             it first, ZeRO-3 partitions it block by block (zero.Init); models/shard_loading.py

Each rank measures its peak resident set while building and preparing the role (Linux VmHWM,
reset through /proc/self/clear_refs just before; it sees torch's allocations and the file
pages safetensors maps) minus its resident set at that moment: the process after its imports,
its process group and the same path run once on a tiny checkpoint (FSDP2's or DeepSpeed's
machinery, ~150 MB, initialised). The bound checked is: peak <= the part the rank holds
(shard) + the largest block + OVERHEAD. One intra-op thread per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MiB = 2 ** 20
OVERHEAD = 8 * MiB          # the fixed overhead the bound allows (the test's value)
FILE_BYTES = 256 * MiB      # shard the checkpoint's files like a large release (with an index)
THREADS = 1


def model_config(layers: int):
    from forcelab.models import DiTConfig
    # between the toy preset and Wan2.1-1.3B (dim 1536, FFN 8960, 30 blocks)
    return DiTConfig.preset("toy", dim=1024, ffn_dim=4096, num_heads=8, num_layers=layers, text_dim=4096,
                            freq_dim=256)


def status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(checkpoint: str, warmup: str, strategy_name: str, mode: str, out: str) -> None:
    """One rank: build and prepare the role (mode before | after), write its numbers."""
    from accelerate import Accelerator

    from forcelab.train.config import load_train_config
    from forcelab.train.parallel import FSDP, ZeRO, exit_processes
    from forcelab.train.recipe import RoleSpec
    from forcelab.train.roles import build_role, meta_module

    acc = Accelerator(cpu=True)
    torch.set_num_threads(THREADS)
    cfg = lambda path: load_train_config([], ["recipe=teacher", f"parallel={strategy_name}",  # noqa: E731
                                              f"roles.generator.init={path}"])
    strategy = FSDP(acc, cfg(checkpoint)) if strategy_name == "fsdp" else ZeRO(acc, cfg(checkpoint), stage=3)

    def load(path: str):
        role = build_role("generator", RoleSpec(trainable=True), cfg(path), 0, acc.device, Path(path), None,
                          defer_loading=mode == "after")
        strategy.prepare(role)
        return role

    # the baseline is the process after its imports: the same path on a tiny checkpoint first
    # imports and initialises FSDP2's or DeepSpeed's machinery (~150 MB, whatever the model's size)
    load(warmup)
    torch.distributed.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                          # peak resident set := current
    base, start = status("VmRSS"), time.perf_counter()
    role = load(checkpoint)
    seconds = time.perf_counter() - start
    peak = status("VmHWM") - base
    record = {"peak": peak, "seconds": seconds, "shard": sum(held_bytes(p) for p in role.module.parameters())}
    shapes = meta_module(role.module.config, torch.float32)
    record["block"] = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in shapes.blocks)
    record["total"] = sum(p.numel() * p.element_size() for p in shapes.parameters())
    record["params"] = sum(p.numel() for p in shapes.parameters())
    Path(out, f"{strategy_name}-{mode}-rank{acc.process_index}.json").write_text(json.dumps(record))
    exit_processes()


def held_bytes(param) -> int:
    """Bytes of param this process holds: its FSDP2 shard, its ZeRO-3 partition, or all of it."""
    held = param.to_local() if hasattr(param, "to_local") else getattr(param, "ds_tensor", None)
    held = param if held is None else held
    return held.numel() * held.element_size()


def launch(world: int, files: tuple[Path, Path], strategy: str, mode: str, out: Path) -> list[dict]:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--standalone",
           __file__, "--worker", *map(str, files), strategy, mode, str(out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return [json.loads((out / f"{strategy}-{mode}-rank{r}.json").read_text()) for r in range(world)]


def save(config, path: Path) -> Path:
    from forcelab.models import CausalDiT

    torch.manual_seed(0)
    CausalDiT(config).save_pretrained(path, format="diffusers", max_shard_bytes=FILE_BYTES)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--strategies", nargs="+", default=["fsdp", "zero3"], choices=["fsdp", "zero3"])
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    from forcelab.models import DiTConfig

    with tempfile.TemporaryDirectory(prefix="forcelab-bench-loading-") as tmp:
        files = (save(model_config(args.layers), Path(tmp) / "dit"),
                 save(DiTConfig.preset("toy", num_layers=1), Path(tmp) / "warmup"))
        print(f"checkpoint: {len(list(files[0].glob('*.safetensors')))} safetensors files + index, "
              f"torch {torch.__version__}, {THREADS} thread per rank")
        print(f"{'strategy':>8} {'world':>5} {'rank':>4} {'before MiB':>10} {'after MiB':>9} {'shard MiB':>9} "
              f"{'block MiB':>9} {'bound MiB':>9} {'after/before':>12} {'holds':>5} {'before s':>8} {'after s':>7}")
        for world in args.worlds:
            for strategy in args.strategies:
                out = Path(tmp) / f"{strategy}-{world}"
                out.mkdir()
                before = launch(world, files, strategy, "before", out)
                after = launch(world, files, strategy, "after", out)
                for rank, (b, a) in enumerate(zip(before, after)):
                    bound = a["shard"] + a["block"] + OVERHEAD
                    print(f"{strategy:>8} {world:>5} {rank:>4} {b['peak'] / MiB:>10.1f} {a['peak'] / MiB:>9.1f} "
                          f"{a['shard'] / MiB:>9.1f} {a['block'] / MiB:>9.1f} {bound / MiB:>9.1f} "
                          f"{a['peak'] / b['peak']:>12.3f} {'yes' if a['peak'] <= bound else 'NO':>5} "
                          f"{b['seconds']:>8.2f} {a['seconds']:>7.2f}")
        print(f"model: {after[0]['params'] / 1e6:.1f}M parameters, {after[0]['total'] / MiB:.1f} MiB fp32; "
              f"bound = shard + largest block + {OVERHEAD // MiB} MiB")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:7])
    else:
        main()
