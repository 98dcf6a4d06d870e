"""`forcelab info`: architecture and parameter count of a preset or a checkpoint directory."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from ..errors import ForcelabError
from ..models.checkpoint import read_config
from ..models.config import PRESETS, DiTConfig
from ..models.dit import CausalDiT
from ..validate import arg, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=f"a preset ({', '.join(sorted(PRESETS))}) or a checkpoint directory")
    parser.add_argument("--height", type=arg(positive_int), default=None, help="latent height, to report tokens per frame")
    parser.add_argument("--width", type=arg(positive_int), default=None, help="latent width, to report tokens per frame")


def run(args: argparse.Namespace) -> int:
    if (args.height is None) != (args.width is None):
        raise ForcelabError("--height and --width go together (the latent size whose tokens per frame to report)")
    if args.model in PRESETS or not Path(args.model).exists():
        config, source = DiTConfig.preset(args.model), "preset"
    else:
        config, source = read_config(args.model)
    with torch.device("meta"):
        n = sum(p.numel() for p in CausalDiT(config).parameters())
    print(f"{args.model} ({source})")
    for field in dataclasses.fields(config):
        print(f"  {field.name:18s} {getattr(config, field.name)}")
    print(f"  {'head_dim':18s} {config.head_dim}")
    print(f"  {'parameters':18s} {n:,}")
    if args.height and args.width:
        _, ph, pw = config.patch_size
        if args.height % ph or args.width % pw:
            raise ForcelabError(f"--height/--width {args.height}x{args.width}: latent sizes must be multiples "
                                f"of the patch size ({ph}x{pw})")
        print(f"  {'tokens_per_frame':18s} {config.tokens_per_frame(args.height, args.width)}")
    return 0
