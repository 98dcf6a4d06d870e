"""The `forcelab` console script: one subcommand per job.

Each subcommand lives beside its concern, in a module with `add_arguments(parser)` and
`run(args) -> int`; it is imported only when chosen so `forcelab --help` stays fast.
A `ForcelabError` (bad input) or an OSError (a full disk, a read-only folder) prints one line
and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import ForcelabError

# name -> (module, one-line help). Only commands that work are listed here.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("forcelab.commands.convert", "convert a DiT checkpoint between Wan and diffusers formats"),
    "info": ("forcelab.commands.info", "show a model preset or checkpoint: shapes and parameter counts"),
    "plan": ("forcelab.commands.plan", "per-GPU memory of a training config under DDP, FSDP, ZeRO-2/3, before launching it"),
    "generate": ("forcelab.generate.cli", "generate videos from prompts with any plan (mp4 + JSON sidecar)"),
    "preprocess": ("forcelab.data.preprocess", "encode videos + captions (or prompts) into webdataset latent shards"),
    "train": ("forcelab.train.cli", "train with a recipe config (teacher, diffusion forcing, AR-diffusion, ...)"),
    "distill": ("forcelab.distill.cli", "distill a causal student (ODE init, CausVid, Self-Forcing, Rolling Forcing, LongLive, ...)"),
    "export": ("forcelab.train.export", "export a run's generator (full or sharded checkpoint) as a diffusers or Wan DiT directory"),
    "demo": ("forcelab.demo", "distill a streaming student on the toy world end to end, with a report (CPU)"),
    "eval": ("forcelab.eval.cli", "evaluate videos: ToyBench, VBench (runner, aggregation), HTML reports"),
}

USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `forcelab CMD: error: argument --x: ...` and exit 2."""

    def error(self, message: str):
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="forcelab", description="Train, distill, generate and evaluate causal video diffusion models.")
    parser.add_argument("--version", action="version", version=f"forcelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        try:
            parser.parse_args(argv)  # prints help / version / the one-line usage error
        except SystemExit as e:
            return int(e.code or 0) if not isinstance(e.code, str) else USER_ERROR
        parser.print_help()
        return USER_ERROR
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = _Parser(prog=f"forcelab {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    # a command may take its flags among its positionals (`train CONFIG --dry-run key=value`)
    parse = cmd_parser.parse_intermixed_args if getattr(module, "INTERMIXED_ARGS", False) else cmd_parser.parse_args
    try:
        args = parse(argv[1:])
    except SystemExit as e:  # --help (0) or a bad flag (2, one line printed): a return value
        return int(e.code or 0) if not isinstance(e.code, str) else USER_ERROR
    try:
        return int(module.run(args) or 0)
    except ForcelabError as e:
        print(f"forcelab {name}: error: {e}", file=sys.stderr)
        return USER_ERROR
    except OSError as e:  # the environment (a full disk, a read-only folder): one line as well
        from .fsio import os_error_message

        print(f"forcelab {name}: error: {os_error_message(e)}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f"forcelab {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
