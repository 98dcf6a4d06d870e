"""Runs inside VBench's own Python environment (started by vbench_runner as a subprocess).

Standard library and vbench only (no forcelab import): VBench pins versions forcelab cannot
share. Run as a script, Python puts the script's folder first on sys.path, and that folder
(forcelab/eval/) holds forcelab's own vbench.py: the driver takes its folder off sys.path before
anything imports, so `import vbench` finds VBench wherever the interpreter would (its
site-packages, PYTHONPATH), on every Python version (-P / PYTHONSAFEPATH exist from 3.11 only;
-I would also drop PYTHONPATH). Weights come from VBench's cache folder only (VBENCH_CACHE_DIR,
which the runner sets and checks): VBench runs in its local mode.

    python vbench_driver.py probe
        prints {"vbench": ..., "torch": ..., "python": ...} as JSON
    python vbench_driver.py run --info INFO.json --dimension D --output DIR [--device cuda]
        scores one dimension on the videos INFO lists (VBench's full-info format) and writes
        DIR/D_eval_results.json as VBench does: {D: [mean, [{video_path, video_results}, ...]]}
"""

import os
import sys

_HERE = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(os.path.abspath(p or os.curdir)) != _HERE]

import argparse  # noqa: E402  (after the sys.path fix on purpose)
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402


def _version(name):
    try:
        from importlib import metadata
        return metadata.version(name)
    except Exception:  # not installed as a distribution (a source checkout): ask the module
        module = sys.modules.get(name)
        return getattr(module, "__version__", "unknown")


def probe():
    import vbench  # the point: fail here when VBench is missing

    if getattr(vbench, "__file__", None) is None:      # a bare folder named vbench somewhere on sys.path
        raise ImportError(f"'vbench' is a folder without __init__.py ({list(vbench.__path__)}), not VBench")

    versions = {"vbench": _version("vbench"), "python": platform.python_version(),
                "vbench_file": os.path.abspath(vbench.__file__)}
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
    submodules = init_submodules([dimension], local=True)[dimension]   # weights from VBENCH_CACHE_DIR only
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
