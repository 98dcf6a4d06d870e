"""python -m forcelab.bench.gpu_check --out DIR [--smoke] [--budget S] [--parts ...] (see __init__)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .parts import PARTS
from .report import markdown
from .runner import OVERALL_BUDGET_S, child_main, run_check


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m forcelab.bench.gpu_check",
                                description="Measure forcelab on one GPU within a time budget.")
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder of the report")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: every part end to end in seconds")
    p.add_argument("--budget", type=float, default=OVERALL_BUDGET_S, help="overall seconds")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), help="run only these parts (in the usual order)")
    p.add_argument("--in-process", action="store_true", help="no child processes (no hard stop per part)")
    p.add_argument("--pytest-arg", action="append", default=[], help="an extra argument for pytest (repeatable)")
    p.add_argument("--child", choices=list(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child, args.smoke, args.out, args.t0, args.budget, args.pytest_arg)
    names = [n for n in PARTS if args.parts is None or n in args.parts]
    report = run_check(args.out, smoke=args.smoke, budget_s=args.budget, parts=names,
                       in_process=args.in_process, pytest_args=args.pytest_arg)
    print("\n" + markdown(report), flush=True)      # the report last: what a truncated log keeps
    return 0


if __name__ == "__main__":
    sys.exit(main())
