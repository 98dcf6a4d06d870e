"""`forcelab train CONFIG [key=value ...] [--resume latest|PATH] [--dry-run]`

The same as `accelerate launch -m forcelab.train CONFIG ...` (one process per device; see
configs/accelerate/ for DDP, FSDP and DeepSpeed launch configs). key=value overrides any
config key (`max_steps=6 output_dir=runs/a roles.generator.lr=1e-5`).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="+", help="YAML config file(s), later ones win, then key=value overrides")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue a run: 'latest' (the newest checkpoint in output_dir) or a checkpoint folder")
    p.add_argument("--dry-run", action="store_true",
                   help="build everything, run one step, print parameter counts, memory and the config; write nothing")


def split_args(items: list[str]) -> tuple[list[str], list[str]]:
    files = [a for a in items if "=" not in a]
    overrides = [a for a in items if "=" in a]
    return files, overrides


def run(args: argparse.Namespace) -> int:
    from .config import load_train_config
    from .trainer import Trainer

    files, overrides = split_args(args.config)
    cfg = load_train_config(files, overrides)
    trainer = Trainer(cfg, resume=args.resume, dry_run=args.dry_run)
    trainer.run()
    if not args.dry_run and trainer.is_main:
        print(f"run folder: {trainer.run_dir} (step {trainer.step})")
    return 0
