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

import torch

from ..dtypes import parse_dtype
from ..errors import CheckpointError, ForcelabError
from ..fsio import check_new_directory
from ..models.checkpoint import read_config
from ..models.dit import CausalDiT
from ..run_folder import (ARCHITECTURE_DIR, RUN_RECORD, SHARDED_DIR, TRAINER_STATE, checkpoints, is_sharded,
                          recorded_encoders, resolve_weights, write_encoders_record)
from .checkpoint import EXPORT_ADVICE, is_partitioned, load_shards, partitions_file, read_shard_index


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


# ---------------------------------------------------------------------- sharded checkpoints, offline
def read_sharded_role(ckpt: Path, role: str, ema: bool = True):
    """A plain CausalDiT holding a sharded checkpoint's role: its EMA when kept and ema=True,
    else its weights. One process, no process group: every shard file is read into the model's
    own tensors (the EMA straight into the parameters), never the whole checkpoint at once."""
    ckpt = Path(ckpt)
    arch = ckpt / ARCHITECTURE_DIR / role
    if not (arch / "config.json").is_file():
        have = sorted(d.name for d in (ckpt / ARCHITECTURE_DIR).iterdir()) if (ckpt / ARCHITECTURE_DIR).is_dir() else []
        raise CheckpointError(f"checkpoint {ckpt}: has no trained role '{role}' (it has {have}); "
                              f"choose one with --role")
    config, _ = read_config(arch)
    if is_partitioned(ckpt):
        return _assemble_partitions(ckpt, role, CausalDiT(config).eval(), ema)
    kept = read_shard_index(ckpt, EXPORT_ADVICE).state_dict_metadata
    use_ema = ema and any(k.startswith(f"{role}.ema.") for k in kept)
    model = CausalDiT(config).eval()
    state = model.state_dict()                # the model's own storage: the load fills it in place
    params = dict(model.named_parameters())
    wanted = {"model": {k: v for k, v in state.items() if not (use_ema and k in params)}}
    if use_ema:
        wanted["ema"] = {k: state[k] for k in params}
    load_shards(ckpt, {role: wanted}, world=1, advice=EXPORT_ADVICE)
    model.load_state_dict(state)
    return model


def _assemble_partitions(ckpt: Path, role: str, model, ema: bool):
    """A ZeRO-3 sharded checkpoint's role in one process: each parameter's partitions
    concatenated in rank order, the padding dropped, reshaped. The rank files are memory-mapped,
    not read whole."""
    files, world = [], 1
    while len(files) < world:
        path = partitions_file(ckpt, len(files))
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt / SHARDED_DIR}: lacks {path.name}; {EXPORT_ADVICE}")
        try:
            record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)[role]
            world = int(record["world_size"])
        except Exception as e:   # truncated or foreign bytes: pickle, zip and torch raise their own errors
            raise CheckpointError(f"{path}: damaged ZeRO-3 partitions of role '{role}' ({type(e).__name__}); "
                                  f"{EXPORT_ADVICE}") from None
        files.append(record)
    first = files[0]
    use_ema = ema and "ema" in first
    params = dict(model.named_parameters())
    if sorted(first["names"]) != sorted(params):
        raise CheckpointError(f"checkpoint {ckpt}: partitions of role '{role}' name other parameters than its "
                              f"architecture; {EXPORT_ADVICE}")
    with torch.no_grad():
        for i, name in enumerate(first["names"]):
            parts = [f["ema" if use_ema else "model"][i] for f in files]
            full = torch.cat([p.reshape(-1) for p in parts])[:first["numel"][i]]
            params[name].copy_(full.view(first["shapes"][i]))
        for k, b in model.named_buffers():
            if k in first["buffers"]:
                b.copy_(first["buffers"][k])
    return model
