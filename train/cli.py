"""`forcelab train CONFIG [override ...] [--resume latest|PATH] [--dry-run] [--print-config]`

The same as `accelerate launch -m forcelab.train CONFIG ...` (one process per device; see
configs/accelerate/ for DDP, FSDP and DeepSpeed launch configs). Overrides, in any order
with the flags, as Hydra's: `key=value` sets any config key (`max_steps=6 output_dir=runs/a
roles.generator.lr=1e-5`), `+key=value` adds a key the config does not have yet
(`+model_overrides.window_frames=6`), `~key` removes one or puts it back to its default
(`~roles.generator.init`). Every path the config names is checked before anything is built,
all of them in one message.
"""

from __future__ import annotations

import argparse

INTERMIXED_ARGS = True     # flags may come between the config files and the overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="+", metavar="CONFIG|OVERRIDE",
                   help="YAML config file(s), later ones win; then overrides: key=value, +key=value (add), "
                        "~key (remove / default)")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue a run: 'latest' (the newest checkpoint in output_dir) or a checkpoint folder")
    p.add_argument("--dry-run", action="store_true",
                   help="build everything, run one step, print parameter counts, memory and the config; write nothing")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML) and exit; builds nothing, writes nothing")


def is_override(arg: str) -> bool:
    """key=value, +key=value, ~key: an override; anything else (~/x.yaml too) names a config file."""
    return "=" in arg or arg.startswith("+") or (arg.startswith("~") and "/" not in arg)


def split_args(items: list[str]) -> tuple[list[str], list[str]]:
    """(config files, overrides), each in the order given."""
    return [a for a in items if not is_override(a)], [a for a in items if is_override(a)]


def run(args: argparse.Namespace) -> int:
    from .config import config_yaml, load_train_config

    files, overrides = split_args(args.config)
    cfg = load_train_config(files, overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    from .parallel import exit_processes
    from .paths import check_paths
    from .trainer import Trainer

    check_paths(cfg)
    trainer = Trainer(cfg, resume=args.resume, dry_run=args.dry_run)
    trainer.run()
    if not args.dry_run and trainer.is_main:
        print(f"run folder: {trainer.run_dir} (step {trainer.step})")
    if trainer.world > 1:
        exit_processes(0)      # see train/parallel.py: teardown can abort a run that succeeded
    return 0
