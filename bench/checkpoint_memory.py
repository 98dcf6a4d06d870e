"""Checkpoint saves under FSDP: each rank's peak host memory and bytes written, full format
(gathered to rank 0) against sharded (each rank writes its own shards).

    python bench/checkpoint_memory.py                   # 2 gloo processes, a ~6.6M-parameter DiT
    python bench/checkpoint_memory.py --processes 4 --rounds 3

One torchrun launch; every process builds the same FSDP teacher run (EMA kept), takes one
step, then saves alternately in the two formats (--rounds times each, interleaved). Before
each save it hands the C heap's free memory back to the system (malloc_trim: what the step
freed would otherwise hide the save's allocations) and resets the peak-RSS counter
(/proc/self/clear_refs); after it, it reads the peak resident memory during the save above the
resident memory before it. "Wrote" is the size of the checkpoint files the rank writes (its
own shard file and rng-rankR.pt; rank 0 also everything else). Prints one line per format and
rank (the minimum over rounds) and the ratios sharded / full.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["model_overrides.dim=256", "model_overrides.ffn_dim=1024", "model_overrides.num_layers=6",
         "model_overrides.num_heads=4", "data.frames=4", "data.batch_size=1"]
RUN = ["recipe=teacher", "parallel=fsdp", "roles.generator.ema_decay=0.99", "logging.wandb=disabled",
       "logging.progress=false", "max_steps=1", "checkpoint.keep_last=1"]
FORMATS = ("full", "sharded")
MIB = 2 ** 20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _written_by(checkpoint: Path, rank: int) -> int:
    """Bytes of the checkpoint's files that `rank` writes (train/checkpoint.py)."""
    own = {f"rng-rank{rank}.pt", f"__{rank}_0.distcp"}
    others = lambda name: name.startswith("rng-rank") or name.endswith(".distcp")   # noqa: E731
    return sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()
               and (f.name in own or (rank == 0 and not others(f.name))))


def worker(out_dir: Path, rounds: int) -> None:
    import torch

    from forcelab.train.config import load_train_config
    from forcelab.train.parallel import exit_processes
    from forcelab.train.roles import update_ema
    from forcelab.train.trainer import Trainer

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    trainer = Trainer(load_train_config([], MODEL + RUN + [f"output_dir={out_dir / 'run'}"]))
    trainer.train_step()
    trainer.step = 1
    role = trainer.roles["generator"]
    update_ema(role, trainer.step, trainer.parallel.ema_source(role))    # what run() does after a step
    params = sum(p.numel() for p in trainer.roles["generator"].module.parameters())   # DTensors: full sizes
    rows = []
    for r in range(rounds):
        for fmt in FORMATS:
            trainer.checkpoint_format = fmt
            torch.distributed.barrier()
            libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")          # the peak starts from now
            before = _status_kib("VmRSS")
            path = trainer.save()
            rows.append({"format": fmt, "round": r, "peak_above_mib": (_status_kib("VmHWM") - before) / 1024,
                         "before_mib": before / 1024, "written_mib": _written_by(path, trainer.rank) / MIB})
    (out_dir / f"rank{trainer.rank}.json").write_text(json.dumps({"params": params, "rows": rows}))
    exit_processes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(Path(args.worker), args.rounds)
    with tempfile.TemporaryDirectory(prefix="forcelab-ckpt-bench-") as tmp:
        env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(args.processes), str(Path(__file__).resolve()), "--worker", tmp, "--rounds", str(args.rounds)]
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.processes)]
    params = ranks[0]["params"]
    state_mib = params * 4 * 4 / MIB   # fp32 weights, EMA, Adam's two moments
    print(f"{args.processes} processes, {params:,} parameters: weights + EMA + Adam state = {state_mib:.1f} MiB; "
          f"min over {args.rounds} rounds")
    best = {}
    for rank, data in enumerate(ranks):
        for fmt in FORMATS:
            rows = [r for r in data["rows"] if r["format"] == fmt]
            best[fmt, rank] = (min(r["peak_above_mib"] for r in rows), min(r["written_mib"] for r in rows))
            peak, written = best[fmt, rank]
            before = min(r["before_mib"] for r in rows)
            print(f"{fmt:>7} rank {rank}: resident {before:6.1f} MiB before the save, peak during it "
                  f"+{peak:6.1f} MiB; wrote {written:6.1f} MiB")
    for rank in range(args.processes):
        (pf, wf), (ps, ws) = best["full", rank], best["sharded", rank]
        print(f"rank {rank}: peak during the save sharded / full {ps / max(pf, 1e-9):.3f}; share of the state "
              f"written: full {wf / state_mib:.2f}, sharded {ws / state_mib:.2f}")


if __name__ == "__main__":
    main()
