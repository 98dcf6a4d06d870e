"""`forcelab plan`: per-GPU memory of a training config under each parallel strategy, before
launching it (train/memory_plan.py holds the estimate and its rules)."""

from __future__ import annotations

import argparse

from ..train.config import load_train_config
from ..train.memory_plan import STRATEGIES, format_plan, parse_memory, plan_memory
from ..validate import arg, positive_int

INTERMIXED_ARGS = True      # `plan CONFIG --gpus 8 key=value ...`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a training config (YAML), as `forcelab train/distill` take it")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (as for train/distill)")
    parser.add_argument("--gpus", type=arg(positive_int), default=1, help="processes (GPUs) of the run (default 1)")
    parser.add_argument("--gpu-memory", type=arg(parse_memory), default=parse_memory("80GB"),
                        help="memory of one GPU, e.g. 80GB, 141GB, 96000MB (default 80GB)")
    parser.add_argument("--global-batch", type=arg(positive_int), default=None,
                        help="samples per optimizer update to reach (default: data.batch_size x "
                             "gradient_accumulation_steps x --gpus)")
    parser.add_argument("--strategy", choices=STRATEGIES, action="append", default=None,
                        help="plan only this strategy (repeatable; default: all)")


def run(args: argparse.Namespace) -> int:
    cfg = load_train_config([args.config], args.overrides)
    plan = plan_memory(cfg, args.gpus, args.gpu_memory, args.global_batch, tuple(args.strategy or STRATEGIES))
    print(f"{args.config} (recipe {cfg.recipe})")
    print(format_plan(plan))
    return 0
