"""`forcelab eval`: toybench | vbench | report | exposure.

    forcelab eval toybench VIDEOS_DIR [--out DIR] [--bucket-frames N]
    forcelab eval vbench VIDEOS_DIR --vbench-python PATH [--dimensions D ...] [--long] [--vbench-cache DIR]
    forcelab eval report RESULTS... --out report.html      # RESULTS: toybench.json, vbench.json, run folders
    forcelab eval exposure MODEL --out DIR [--scenes N] [--chunks K] [--window W --sink S] [--background-texture A]
                                  [--prefix P]
"""

from __future__ import annotations

import argparse

from ..errors import ForcelabError
from ..validate import arg, non_negative_float, non_negative_int, positive_int, seed

SUITE_DEFAULTS = {"seeds": 3, "first_seed": 0, "world": "plain", "jobs": 1}   # --suite flags left unset; --recipes, --max-steps: None
SUITE_FLAGS = {"seeds": "--seeds", "recipes": "--recipes", "max_steps": "--max-steps", "first_seed": "--first-seed",
               "world": "--world", "jobs": "--jobs"}


def _command(sub, name: str, text: str):
    """A subcommand whose --help starts with the same line as the list of commands."""
    return sub.add_parser(name, help=text, description=text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="{toybench,vbench,report,exposure}", required=True)
    t = _command(sub, "toybench", "ToyBench metrics of toy-world videos (mp4 + generate's JSON sidecars)")
    t.add_argument("videos", metavar="VIDEOS_DIR", nargs="?", help="videos to score (not with --suite)")
    t.add_argument("--out", default=None, help="folder for toybench.json and the report (default: VIDEOS_DIR; "
                   "with --suite: the study folder, default runs/study)")
    t.add_argument("--suite", choices=("full", "quick"), default=None,
                   help="train and score every recipe (see forcelab.study); quick: a handful of steps")
    t.add_argument("--seeds", type=arg(positive_int), default=None, help="--suite: seeds per recipe (default 3)")
    t.add_argument("--recipes", nargs="+", default=None, help="--suite: only these recipes")
    t.add_argument("--max-steps", type=arg(positive_int), default=None, help="--suite full: cap every recipe's steps")
    t.add_argument("--first-seed", type=arg(seed), default=None,
                   help="--suite: seeds first_seed .. first_seed + seeds - 1 (split a study over processes)")
    t.add_argument("--world", choices=("plain", "textured"), default=None,
                   help="--suite: the toy world and its rows (configs/toy/ or configs/toy/textured/; default plain)")
    t.add_argument("--jobs", type=arg(positive_int), default=None,
                   help="--suite --world textured: seeds trained in parallel processes, one thread each (default 1)")
    t.add_argument("--bucket-frames", type=arg(positive_int), default=None,
                   help="frames per drift bucket (default: the toy world's training clip length)")
    t.add_argument("--no-report", action="store_true", help="write toybench.json only")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    v = _command(sub, "vbench", "VBench in its own Python, dimension by dimension (resumable)")
    v.add_argument("videos", metavar="VIDEOS_DIR")
    v.add_argument("--vbench-python", default=None, help="the python of an environment with VBench installed")
    v.add_argument("--dimensions", nargs="+", default=None, help="VBench dimensions (default: all 16)")
    v.add_argument("--long", action="store_true", help="VBench-Long: split long videos into clips first")
    v.add_argument("--vbench-cache", default=None, help="folder of VBench's weights, read offline (default: "
                   "$VBENCH_CACHE_DIR, else ~/.cache/vbench); missing files are named before anything runs")
    v.add_argument("--out", default=None, help="folder for vbench.json (default: VIDEOS_DIR, beside the videos); "
                   "VBench's per-dimension files and logs go to OUT/vbench/")
    v.add_argument("--device", default="cuda", help="device VBench runs on (default cuda)")
    v.add_argument("--native-flickering", action="store_true",
                   help="compute temporal_flickering here (no model, no VBench static filter)")
    v.add_argument("--quiet", action="store_true", help="no progress bars")

    r = _command(sub, "report", "one self-contained HTML page (+ markdown) comparing runs")
    r.add_argument("results", nargs="+", metavar="RESULTS",
                   help="toybench.json / vbench.json / JSON run records / training run folders (their metrics.jsonl "
                        "gives training curves, config.yaml the config, samples/ the videos)")
    r.add_argument("--out", default="report.html", help="the .html to write (the .md goes beside it)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")

    x = _command(sub, "exposure", "exposure bias of a causal student: each chunk generated from the ground "
                 "truth's context (teacher-forced) and from its own (self-conditioned), on held-out toy scenes")
    x.add_argument("model", metavar="MODEL", help="a forcelab run folder (its generator and sampling plan) or a "
                   "DiT directory (sampled with the default chunk-wise plan)")
    x.add_argument("--out", required=True, help="folder for exposure.json and exposure.md")
    x.add_argument("--scenes", type=arg(positive_int), default=16, help="held-out toy scenes (default 16)")
    x.add_argument("--chunks", type=arg(positive_int), default=12, help="chunks per scene, K >= 2 (default 12)")
    x.add_argument("--window", type=arg(non_negative_int), default=None,
                   help="attention window in latent frames (0: none; default: the plan's)")
    x.add_argument("--sink", type=arg(non_negative_int), default=None, help="sink frames (default: the plan's)")
    x.add_argument("--cache-policy", default=None, metavar="NAME[:k=v,...]",
                   help="what a full window keeps (the policies of `forcelab generate --cache-policy`; "
                   "default: the plan's)")
    x.add_argument("--first-scene", type=arg(seed), default=None,
                   help="first scene seed (default: the toy world's first held-out scene)")
    x.add_argument("--batch", type=arg(positive_int), default=8, help="scenes rolled out together (default 8)")
    x.add_argument("--prefix", type=arg(non_negative_int), default=0,
                   help="ground-truth chunks both modes are given first (a continuation; default 0)")
    x.add_argument("--background-texture", type=arg(non_negative_float), default=None,
                   help="the toy world's background texture amplitude (default: the run's data.background_texture; "
                        "0 for a DiT directory)")
    x.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")


def check_toybench_flags(args: argparse.Namespace) -> None:
    """VIDEOS_DIR scores videos, --suite runs the study: a flag of the other mode is an error, never ignored."""
    if args.suite and args.videos:
        raise ForcelabError(f"eval toybench: VIDEOS_DIR ({args.videos}) scores existing videos, --suite trains "
                            f"and scores every recipe; give one or the other")
    if not args.suite:
        given = [flag for key, flag in SUITE_FLAGS.items() if getattr(args, key) is not None]
        if given:
            raise ForcelabError(f"eval toybench: {', '.join(given)} apply to --suite full|quick only")
        if not args.videos:
            raise ForcelabError("eval toybench: give VIDEOS_DIR, or --suite full|quick")
        return
    for key, value in SUITE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    seed(args.first_seed + args.seeds - 1, "--first-seed + --seeds - 1")
    if args.bucket_frames is not None:
        raise ForcelabError("eval toybench: --bucket-frames applies to VIDEOS_DIR scoring; the study uses the "
                            "toy world's clip length")


def run(args: argparse.Namespace) -> int:
    if args.eval_command == "toybench":
        check_toybench_flags(args)
    if args.eval_command == "toybench" and args.suite:
        from ..study import run_study

        record = run_study(args.out or "runs/study", args.suite, args.seeds, recipes=args.recipes,
                           max_steps=args.max_steps, first_seed=args.first_seed, world=args.world, jobs=args.jobs)
        print(f"wrote {args.out or 'runs/study'}/study.md and study.json ({record['seconds']:.0f} s)")
    elif args.eval_command == "toybench":
        from .toybench_run import RESULT_NAME, run_toybench

        result = run_toybench(args.videos, args.out, bucket_frames=args.bucket_frames, report=not args.no_report,
                              progress=not args.quiet)
        agg = result["aggregate"]
        print("  ".join(f"{m}={agg[m]:.4g}" for m in result["metrics"] if m in agg))
        print(f"wrote {(args.out or args.videos)}/{RESULT_NAME} ({len(result['videos'])} videos, "
              f"{len(result['skipped'])} skipped)")
    elif args.eval_command == "vbench":
        from .vbench_runner import run_vbench

        result = run_vbench(args.videos, args.out, python=args.vbench_python, dimensions=args.dimensions,
                            long=args.long, cache=args.vbench_cache, device=args.device,
                            native_flickering=args.native_flickering, progress=not args.quiet)
        agg = result["aggregate"] or {}
        print(f"total {agg.get('total')}  quality {agg.get('quality')}  semantic {agg.get('semantic')}  "
              f"missing {agg.get('missing')}")
        print(f"wrote {(args.out or args.videos)}/vbench.json (VBench's own files: {(args.out or args.videos)}/vbench/)")
    elif args.eval_command == "exposure":
        from ..data.toyworld import HELD_OUT_SCENES
        from ..models.cache_policy import check_policy

        if args.cache_policy is not None:
            check_policy(args.cache_policy, "--cache-policy")       # before the model loads
        from .exposure import RESULT_NAME as EXPOSURE_RESULT, run_exposure

        result = run_exposure(args.model, args.out, scenes=args.scenes, chunks=args.chunks,
                              window_frames=args.window, sink_frames=args.sink,
                              first_scene=HELD_OUT_SCENES if args.first_scene is None else args.first_scene,
                              batch=args.batch, device=args.device, background_texture=args.background_texture,
                              prefix=args.prefix, cache_policy=args.cache_policy)
        for m, g in result["gap"].items():      # self-conditioned - teacher-forced over chunks k >= 2 and > prefix
            (mlo, mhi), (lo, hi) = g["mean_ci95"], g["slope_ci95"]
            print(f"{m}: gap {g['mean']:+.4g} [{mlo:+.4g}, {mhi:+.4g}], slope {g['slope']:+.4g}/chunk "
                  f"[{lo:+.4g}, {hi:+.4g}]")
        print(f"wrote {args.out}/{EXPOSURE_RESULT} and exposure.md")
    else:
        from .report import write_report

        print(f"wrote {write_report(args.results, args.out, progress=not args.quiet)}")
    return 0
