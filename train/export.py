"""`forcelab export RUN_DIR OUT_DIR --format diffusers|wan`: a run's generator as a DiT
directory that CausalDiT.from_pretrained and diffusers read, recording its encoders.

RUN_DIR may be a run folder (its newest checkpoint), a checkpoint folder, or a DiT
directory. The EMA weights are exported when the run kept them (--no-ema for the raw ones).
A sharded checkpoint (torch.distributed.checkpoint, one file per training process; see
train/checkpoint.py) is read here in one process, without a process group, shard file by
shard file into the model: exporting it is the offline step that turns it into the ordinary
DiT directory generate, init and diffusers read. A ZeRO-3 sharded checkpoint (one file of flat
partitions per process) is reassembled the same way: each parameter's partitions concatenated
in rank order, the padding dropped, reshaped. OUT_DIR must not exist, be empty, or be an
earlier forcelab output: a folder forcelab did not write is never replaced.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..dtypes import parse_dtype
from ..errors import ForcelabError
from ..fsio import check_new_directory
from ..models.dit import CausalDiT
from ..run_folder import (RUN_RECORD, TRAINER_STATE, checkpoints, is_sharded, recorded_encoders, resolve_weights,
                          write_encoders_record)
from .checkpoint import read_sharded_role


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a forcelab run folder, one of its checkpoint-NNNNNN folders (full or sharded), "
                               "or a DiT directory")
    p.add_argument("out", help="the directory to write (must not exist, or be an earlier forcelab export)")
    p.add_argument("--format", choices=("diffusers", "wan"), default="diffusers")
    p.add_argument("--role", default="generator", help="which role of the run (default: generator)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even if an EMA was kept")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="cast the weights (default: as stored)")


def sharded_checkpoint(run) -> Path | None:
    """The sharded checkpoint `run` names (itself, or a run folder's newest), else None."""
    p = Path(run).expanduser()
    if (p / RUN_RECORD).is_file() and not (p / TRAINER_STATE).is_file():
        found = checkpoints(p)
        p = found[-1] if found else p
    return p if is_sharded(p) else None


def export(run, out, fmt: str = "diffusers", role: str = "generator", ema: bool = True, dtype=None) -> Path:
    out = Path(out).expanduser()
    ckpt = sharded_checkpoint(run)
    src = ckpt if ckpt is not None else resolve_weights(run, role, ema=ema)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ForcelabError(f"export: the output {out} lies inside the source {src}; choose another folder")
    if ckpt is not None:
        check_new_directory(out, "export output")     # before reading every shard
        encoders = recorded_encoders(ckpt / role)      # (the run's record, two levels up)
        model = read_sharded_role(ckpt, role, ema)
        if dtype is not None:
            model = model.to(parse_dtype(dtype))
    else:
        encoders = recorded_encoders(src)
        model = CausalDiT.from_pretrained(src, dtype=parse_dtype(dtype))
    path = model.save_pretrained(out, format=fmt)
    if encoders is not None:
        write_encoders_record(path, encoders["vae"], encoders["text_encoder"], source=str(src.resolve()))
    return path


def run(args: argparse.Namespace) -> int:
    path = export(args.run, args.out, args.format, args.role, not args.no_ema, args.dtype)
    print(f"wrote {path} ({args.format} format)")
    return 0
