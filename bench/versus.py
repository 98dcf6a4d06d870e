"""This tree against another forcelab checkout, on the proving ground's three costs:

    python bench/versus.py --baseline ../forcelab-main        # a checkout of the version to beat
    python bench/versus.py --baseline OLD --parts pass step --rounds 5

- pass: one toy streaming pass (chunk of 2 latent frames against a window + sink cache, no
  gradient), thread CPU time, the minimum over 300 passes after 20 warm-up passes;
- step: one toy Self-Forcing update pair (generator + critic, configs/toy/self_forcing.yaml,
  batch 4), thread CPU time, the mean of 3 steps after one warm-up step;
- generate: a whole `forcelab generate` process over 1600 frames with window 6 + sink 2 (the
  committed toy teacher as a chunk-wise 4-step model), wall time from process start to exit:
  imports, model load, generation, decode, mp4.
Every measurement runs in a fresh process with one thread (OMP_NUM_THREADS=1,
OMP_WAIT_POLICY=PASSIVE); the two trees alternate within each round, so load changes hit both
alike. Printed: per tree min / median over the rounds, and the ratio this / baseline of the
minima and of the medians. --baseline: another checkout (or the folder holding one named forcelab)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent          # this checkout (the package folder)
THREADS = 1
PASS_WARMUP, PASS_REPEATS = 20, 300
STEP_REPEATS = 3
GENERATE_FRAMES, GENERATE_WINDOW, GENERATE_SINK, GENERATE_STEPS = 1600, 6, 2, 4

PASS_CHILD = f"""
import json, time, torch
torch.set_num_threads({THREADS})
from forcelab.models import CausalDiT, DiTConfig
torch.manual_seed(0)
cfg = DiTConfig.preset("toy")
model = CausalDiT(cfg).eval()
ctx = torch.randn(1, 8, cfg.text_dim)
cache = model.new_cache(1, 8, 8, window_frames=6, sink_frames=2)
model.set_prompt(cache, ctx)
x, t, zero = torch.randn(1, cfg.in_channels, 2, 8, 8), torch.full((1,), 500.0), torch.zeros(1)
best = float("inf")
with torch.no_grad():
    for _ in range(5):                      # a cache in steady state: the window is full
        model(x, t, cache=cache); model(x, zero, cache=cache, commit=True)
    for i in range({PASS_WARMUP} + {PASS_REPEATS}):
        t0 = time.thread_time(); model(x, t, cache=cache); dt = time.thread_time() - t0
        if i >= {PASS_WARMUP}:
            best = min(best, dt)
print(json.dumps({{"seconds": best}}))
"""

STEP_CHILD = f"""
import json, sys, tempfile, time, torch
from pathlib import Path
torch.set_num_threads({THREADS})
import forcelab
from forcelab.train.config import load_train_config
from forcelab.train.trainer import Trainer
config = Path(forcelab.__file__).parent / "configs/toy/self_forcing.yaml"
with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(load_train_config([config], ["threads={THREADS}", "roles.generator.update_every=1",
        "logging.wandb=disabled", "logging.progress=false", "output_dir=" + str(Path(tmp) / "run")]))
    trainer.train_step(); trainer.step += 1
    t0 = time.thread_time()
    for _ in range({STEP_REPEATS}):
        trainer.train_step(); trainer.step += 1
    print(json.dumps({{"seconds": (time.thread_time() - t0) / {STEP_REPEATS}}}))
"""


def child_env(tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(THREADS), OMP_WAIT_POLICY="PASSIVE",
               MKL_NUM_THREADS=str(THREADS))
    env.pop("PYTHONSTARTUP", None)
    return env


def run_python(tree: Path, code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], env=child_env(tree), capture_output=True, text=True,
                         check=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def run_generate(tree: Path) -> float:
    teacher = tree / "forcelab" / "configs" / "toy" / "teacher_checkpoint"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "forcelab.cli", "generate", str(teacher), "--prompt", "a red ball bounces",
               "--plan", "chunkwise", "--steps", str(GENERATE_STEPS), "--frames", str(GENERATE_FRAMES),
               "--window", str(GENERATE_WINDOW), "--sink", str(GENERATE_SINK), "--output", str(Path(tmp) / "out"),
               "--quiet"]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=child_env(tree), capture_output=True, text=True, check=True, cwd=tmp)
        return time.perf_counter() - t0


PARTS = {"pass": lambda tree: run_python(tree, PASS_CHILD),
         "step": lambda tree: run_python(tree, STEP_CHILD),
         "generate": run_generate}
UNITS = {"pass": ("ms", 1e3), "step": ("ms", 1e3), "generate": ("s", 1.0)}


def package_parent(path: Path, links: Path) -> Path:
    """A folder to put on PYTHONPATH so that `import forcelab` finds the checkout at path: its
    parent when the checkout's folder is named forcelab, else a folder in `links` holding a
    link named forcelab to it."""
    path = path.resolve()
    if (path / "forcelab" / "__init__.py").exists():
        path = path / "forcelab"
    if not (path / "__init__.py").exists() or not (path / "models").is_dir():
        raise SystemExit(f"versus: {path} holds no forcelab checkout")
    if path.name == "forcelab":
        return path.parent
    holder = Path(tempfile.mkdtemp(dir=links))
    (holder / "forcelab").symlink_to(path, target_is_directory=True)
    return holder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", type=Path, required=True, help="the other checkout (see the module docstring)")
    p.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two trees per part")
    args = p.parse_args(argv)
    if args.baseline.resolve() in (ROOT, ROOT / "forcelab"):
        raise SystemExit("versus: the baseline is this checkout")
    links = Path(tempfile.mkdtemp(prefix="versus-"))
    trees = {"this": package_parent(ROOT, links), "baseline": package_parent(args.baseline, links)}
    print(f"versus: {sys.executable}, {THREADS} thread(s), {args.rounds} rounds, trees alternate within each "
          f"round; load average at start {os.getloadavg()[0]:.2f}")
    for part in args.parts:
        times = {name: [] for name in trees}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for name in order:
                times[name].append(PARTS[part](trees[name]))
        unit, scale = UNITS[part]
        for name, ts in times.items():
            print(f"{part:>8} {name:>8}: min {min(ts) * scale:8.3f} {unit}, median {statistics.median(ts) * scale:8.3f} "
                  f"{unit}  ({', '.join(f'{t * scale:.3f}' for t in ts)})")
        ratio_min = min(times["this"]) / min(times["baseline"])
        ratio_med = statistics.median(times["this"]) / statistics.median(times["baseline"])
        print(f"{part:>8}    ratio this/baseline: {ratio_min:.3f} (minima), {ratio_med:.3f} (medians)")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
