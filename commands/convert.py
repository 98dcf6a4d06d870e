"""`forcelab convert`: rewrite a DiT checkpoint directory as Wan2.1 or diffusers format."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..dtypes import DTYPES
from ..errors import ForcelabError
from ..fsio import check_new_directory
from ..models.checkpoint import FORMATS
from ..models.dit import CausalDiT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="checkpoint directory (Wan2.1 or diffusers; detected from config.json)")
    parser.add_argument("dest", help="new output directory (written atomically); an existing one is refused "
                                     "unless forcelab wrote it and --overwrite is given")
    parser.add_argument("--format", choices=FORMATS, default="diffusers", help="output format (default: diffusers)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast weights to this dtype (default: fp32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace dest if it is an earlier forcelab output (never any other folder)")


def run(args: argparse.Namespace) -> int:
    source, dest = Path(args.source).expanduser(), Path(args.dest).expanduser()
    if source.resolve() == dest.resolve() or source.resolve() in dest.resolve().parents:
        raise ForcelabError(f"dest {args.dest}: is the source directory or inside it; write to a new folder")
    if dest.resolve() in source.resolve().parents:
        raise ForcelabError(f"dest {args.dest}: contains the source checkpoint; write to a new folder")
    check_new_directory(dest, "dest", overwrite=args.overwrite)  # before loading any weights
    model = CausalDiT.from_pretrained(source, dtype=DTYPES.get(args.dtype))
    out = model.save_pretrained(dest, format=args.format, overwrite=args.overwrite)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({args.format}, {n:,} parameters, {model.dtype})")
    return 0
