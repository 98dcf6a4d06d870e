"""Runs inside VBench's own Python environment (started by vbench_runner as a subprocess).

Standard library and vbench only (no forcelab import): VBench pins versions forcelab cannot
share.

    python vbench_driver.py probe
        prints {"vbench": ..., "torch": ..., "python": ...} as JSON
    python vbench_driver.py run --info INFO.json --dimension D --output DIR [--device cuda]
        scores one dimension on the videos INFO lists (VBench's full-info format) and writes
        DIR/D_eval_results.json as VBench does: {D: [mean, [{video_path, video_results}, ...]]}
"""

import argparse
import importlib
import json
import os
import platform
import sys


def _version(name):
    try:
        from importlib import metadata
        return metadata.version(name)
    except Exception:  # not installed as a distribution (a source checkout): ask the module
        module = sys.modules.get(name)
        return getattr(module, "__version__", "unknown")


def probe():
    import vbench  # noqa: F401  (the point: fail here when VBench is missing)

    versions = {"vbench": _version("vbench"), "python": platform.python_version()}
    try:
        import torch
        versions["torch"] = torch.__version__
    except ImportError:
        versions["torch"] = None
    print(json.dumps(versions))


def _plain(value):
    """JSON for numpy / torch scalars VBench may return."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def run(info, dimension, output, device):
    from vbench.utils import init_submodules

    compute = getattr(importlib.import_module("vbench." + dimension), "compute_" + dimension)
    try:
        import torch
        device = torch.device(device)
    except ImportError:
        pass
    submodules = init_submodules([dimension])[dimension]
    result = compute(info, device, submodules)
    path = os.path.join(output, dimension + "_eval_results.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({dimension: list(result)}, f, indent=4, default=_plain)
    os.replace(path + ".tmp", path)  # a crash never leaves a half-written result behind
    print("wrote " + path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="vbench_driver")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("probe")
    r = sub.add_parser("run")
    r.add_argument("--info", required=True)
    r.add_argument("--dimension", required=True)
    r.add_argument("--output", required=True)
    r.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.command == "probe":
        probe()
    elif args.command == "run":
        run(args.info, args.dimension, args.output, args.device)
    else:
        parser.error("give probe or run")


if __name__ == "__main__":
    main()
