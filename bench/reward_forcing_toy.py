"""Self-Forcing vs Reward Forcing's Re-DMD on the toy world, from one ODE-init student.

    python bench/reward_forcing_toy.py --out runs/rf_bench                     # 2 seeds, 32 prompts
    python bench/reward_forcing_toy.py --out runs/rf_bench --temperatures 0.3  # and Re-DMD at T = 0.3
    python bench/reward_forcing_toy.py --out runs/rf_bench --seeds 1 --max-steps 100   # quicker

Trains (or resumes) one ODE-init run (configs/toy/ode_init.yaml, seed 0) and, from it, the
toy Self-Forcing and Reward Forcing runs (configs/toy/self_forcing.yaml, reward_forcing.yaml:
the same settings but the reward weights; --temperatures: more Re-DMD runs at those T) for each
seed; generates held-out toy prompts with the ODE-init student and each run's EMA student at
the training length and at long_factor x it with window + sink, and scores them with
ToyBench. Prints the table (mean over prompts, then over seeds) and the ratio Re-DMD /
Self-Forcing per metric. One CPU thread. Everything is kept under --out, so a re-run only
redoes what is missing.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from forcelab.eval.stats import spread
from forcelab.pipeline import (TOY_CONFIGS, generate_stage, held_out_prompts, sampling_plan, toybench_stage,
                               train_stage, training_frames)

RECIPES = ("self_forcing", "reward_forcing")
METRICS = ("adherence", "physics", "identity", "dynamics", "fidelity_psnr")
WINDOW, SINK = 6, 2            # the study's long-rollout attention (latent frames)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap the Self-Forcing / Re-DMD steps (default: the toy configs')")
    p.add_argument("--long-factor", type=int, default=4)
    p.add_argument("--temperatures", type=float, nargs="*", default=[], help="extra Re-DMD runs at these T")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    common = ["logging.wandb=disabled", "logging.progress=false", "threads=1"]
    ode = args.out / "ode_init"
    train_stage(TOY_CONFIGS / "ode_init.yaml", ode, common + ["seed=0"])
    frames = training_frames()
    prompts = held_out_prompts(args.out / "prompts.txt", args.prompts, frames)
    rows: dict[tuple[str, str], list[dict]] = {}

    def evaluate(label: str, recipe: str, run: Path) -> None:
        plan = sampling_plan(recipe)
        variants = {"1x": (plan, frames),
                    f"{args.long_factor}x sink+window": (replace(plan, window_frames=WINDOW, sink_frames=SINK),
                                                         frames * args.long_factor)}
        for name, (vplan, length) in variants.items():
            folder = run / "videos" / name.replace(" ", "_").replace("+", "_")
            generate_stage(run, folder, prompts, plan=vplan, frames=length)
            result = toybench_stage(folder, bucket_frames=frames)
            rows.setdefault((label, name), []).append({m: result["aggregate"].get(m) for m in METRICS})

    evaluate("ode_init (the start)", "ode_init", ode)
    runs = [(r, r, []) for r in RECIPES] + [(f"reward_forcing T={t:g}", "reward_forcing",
                                             [f"algo.reward.temperature={t}"]) for t in args.temperatures]
    for seed in range(args.seeds):
        for label, recipe, extra in runs:
            run = args.out / label.replace(" ", "_").replace("=", "") / f"seed{seed}"
            train_stage(TOY_CONFIGS / f"{recipe}.yaml", run,
                        common + extra + [f"seed={seed}", f"roles.generator.init={ode}"], args.max_steps)
            evaluate(label, recipe, run)
    print(f"ToyBench, {args.prompts} held-out prompts, {args.seeds} seed(s) from one ODE-init run "
          f"({time.perf_counter() - t0:.0f} s)")
    print("| recipe | rollout | " + " | ".join(METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    means = {}
    for (recipe, name), runs in rows.items():
        cells = []
        for m in METRICS:
            values = [r[m] for r in runs if isinstance(r[m], (int, float)) and not math.isnan(r[m])]
            s = spread(values) if values else {"mean": math.nan, "std": math.nan}
            means[recipe, name, m] = s["mean"]
            cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}" if len(values) > 1 else f"{s['mean']:.3f}")
        print(f"| {recipe} | {name} | " + " | ".join(cells) + " |")
    for label in dict.fromkeys(lab for lab, _ in rows if lab.startswith("reward_forcing")):
        for name in dict.fromkeys(n for _, n in rows):
            ratios = [f"{m} {means[label, name, m] / means['self_forcing', name, m]:.3f}" for m in METRICS]
            print(f"ratio {label} / self_forcing, {name}: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
