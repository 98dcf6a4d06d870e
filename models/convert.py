"""`forcelab convert`: rewrite a DiT checkpoint directory as Wan2.1 or diffusers format."""

from __future__ import annotations

import argparse

import torch

from ..config import DTYPES
from ..errors import ForcelabError
from .checkpoint import FORMATS
from .dit import CausalDiT



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="checkpoint directory (Wan2.1 or diffusers; detected from config.json)")
    parser.add_argument("dest", help="output directory (written atomically; replaced if it exists)")
    parser.add_argument("--format", choices=FORMATS, default="diffusers", help="output format (default: diffusers)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast weights to this dtype (default: fp32)")


def run(args: argparse.Namespace) -> int:
    if args.source == args.dest:
        raise ForcelabError("source and dest are the same directory; write to a new one")
    model = CausalDiT.from_pretrained(args.source, dtype=DTYPES.get(args.dtype))
    out = model.save_pretrained(args.dest, format=args.format)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({args.format}, {n:,} parameters, {model.dtype})")
    return 0
