"""Why DMD students lose ToyBench fidelity: the teacher's own fidelity against its guidance, and
an ablation of Self-Forcing (and CausVid) DMD settings from one ODE-init student.

    python bench/dmd_fidelity.py --out runs/dmd_fidelity --only teacher           # the guidance sweep (1 min)
    python bench/dmd_fidelity.py --out runs/dmd_fidelity                          # every row, 150 steps (~10 min)
    python bench/dmd_fidelity.py --out runs/dmd_fidelity --dmd-steps 300 --seeds 2 \
        --rows sf_baseline sf_guidance_1 sf_guidance_2 --seeded sf_baseline sf_guidance_1 sf_guidance_2
A re-run with other --dmd-steps keeps the teacher, ODE-init and earlier rows (run folders are
<row>/s<steps>_seed<seed>).

fidelity_psnr is the PSNR of a frame against its re-render from the detected balls (canonical
palette colours on the plain background), so it is split here into where the error sits:
    psnr_bg     over the pixels the re-render shows as background
    psnr_ball   over the pixels it shows as a ball
    contrast    mean |frame - background| / |re-render - background| over ball pixels
                (1: the palette's contrast; > 1: over-saturated balls, < 1: washed out)
    bg_offset   mean (frame - re-render) over background pixels, levels (+: a lifted background)
and fidelity at equal adherence is ToyBench's own fidelity_adherent (fidelity_psnr over the
frames whose adherence is 1: the caption's balls and no other), so that a row that finds more
balls is not scored on other frames.
The re-render goes through the same mp4 round trip as ToyBench's.

Stages, each resumable (a finished run, video set or score is kept under --out):
    teacher g G     the committed teacher (its 20-step sampling plan) at each TEACHER_GUIDANCE
    ode_init        configs/toy/ode_init.yaml, --ode-steps steps on --pairs pairs (seed 0)
    sf ...          configs/toy/self_forcing.yaml from that ODE-init run, --dmd-steps steps, one
                    setting changed per row (SF_VARIANTS); the --seeded rows with --seeds seeds
    ode_init_no_cfg the control: the same ODE init on pairs sampled without CFG, and Self-Forcing
                    at guidance 3 from it (NO_CFG_ROWS)
    causvid ...     configs/toy/causvid.yaml (from the teacher), --dmd-steps steps, its variants
Each row's student generates the held-out prompts at the training length with its config's
sampling plan (seed 0) and is scored with ToyBench.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from forcelab.data.toyworld import ToyWorldConfig, parse_caption
from forcelab.data.video import DEFAULT_FPS, read_video
from forcelab.eval.sidecars import read_sidecar
from forcelab.eval.stats import spread
from forcelab.eval.toybench import mp4_roundtrip
from forcelab.eval.toydetect import detect_frames, rerender
from forcelab.pipeline import (COMMITTED_TEACHER, TOY_CONFIGS, generate_stage, held_out_prompts, sampling_plan,
                               toybench_stage, train_stage, training_frames)

TEACHER_GUIDANCE = (1.0, 2.0, 3.0, 5.0)     # the toy teacher samples at 3 (configs/toy/teacher.yaml)
# row -> overrides of the toy config: one setting changed per row (the last: the two that help, together)
SF_VARIANTS = {
    "sf baseline (g 3)": [],
    "sf guidance 1": ["algo.guidance=1.0"],
    "sf guidance 2": ["algo.guidance=2.0"],
    "sf critic lr x5": ["roles.critic.lr=2.0e-4"],
    "sf update_every 1": ["roles.generator.update_every=1"],
    "sf score shift 1": ["algo.score_shift=1.0"],
    "sf score t_max 500": ["algo.t_max=500.0"],
    "sf guidance 2 + critic lr x5": ["algo.guidance=2.0", "roles.critic.lr=2.0e-4"],
}
# the control: the same DMD from an ODE init whose pairs are sampled without CFG (guidance 1)
NO_CFG_INIT = "ode_init_no_cfg"
NO_CFG_ROWS = {"sf no-CFG init (g 3)": []}
CAUSVID_VARIANTS = {
    "causvid baseline (g 3)": [],
    "causvid guidance 1": ["algo.guidance=1.0"],
    "causvid levels without 0": ["algo.levels=[1000.0,757.0,522.0]"],
}
SEEDED = ("sf_baseline", "sf_guidance_1")    # rows (folder names) run with --seeds seeds, by default
COLUMNS = ("fidelity_psnr", "fidelity_adherent", "clean_pixels", "psnr_bg", "psnr_ball",
           "contrast", "bg_offset", "adherence", "identity", "continuity", "physics")
DIAGNOSIS = "fidelity_split.json"


def fidelity_split(folder: Path, config: ToyWorldConfig) -> dict:
    """The split above: per-video means over the folder's videos (kept in DIAGNOSIS)."""
    path = folder / DIAGNOSIS
    if path.exists():
        return json.loads(path.read_text())
    background = np.asarray(config.background, np.float64)
    rows = []
    for video in sorted(folder.glob("*.mp4")):
        side = read_sidecar(video)
        frames = read_video(video).permute(0, 2, 3, 1).numpy()
        colors, _ = parse_caption(side.get("prompt_text") or side.get("prompt"))
        codec = mp4_roundtrip(side.get("fps") or DEFAULT_FPS)
        detections = detect_frames(frames, config, order=colors)
        H, W = frames.shape[1:3]
        clean = np.stack([rerender(b, (H, W), config) for b in detections])
        rendered = np.asarray(codec(clean), np.float64)
        clean = clean.astype(np.float64)
        is_bg = (clean == background).all(-1)                   # [T, H, W]
        diff = frames.astype(np.float64) - rendered
        row = {"psnr_bg": _psnr(diff[is_bg]), "psnr_ball": _psnr(diff[~is_bg]),
               "bg_offset": float(diff[is_bg].mean()) if is_bg.any() else math.nan}
        if (~is_bg).any():
            made = np.abs(frames.astype(np.float64)[~is_bg] - background).sum(-1)
            meant = np.abs(clean[~is_bg] - background).sum(-1)
            row["contrast"] = float(made.mean() / max(meant.mean(), 1e-9))
        rows.append(row)
    out = {k: spread(r.get(k, math.nan) for r in rows)["mean"] for k in ("psnr_bg", "psnr_ball", "contrast",
                                                                          "bg_offset")}
    path.write_text(json.dumps(out))
    return out


def _psnr(diff: np.ndarray) -> float:
    if diff.size == 0:
        return math.nan
    mse = float((diff ** 2).mean())
    return 10 * math.log10(255.0 ** 2 / mse) if mse > 0 else math.inf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ode-steps", type=int, default=300, help="ODE-init steps (the toy config: 600)")
    p.add_argument("--pairs", type=int, default=128, help="ODE pairs (the toy config: 256)")
    p.add_argument("--dmd-steps", type=int, default=150, help="steps of each DMD row (the toy configs: 300)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--only", choices=("teacher", "sf", "all"), default="all",
                   help="teacher: the guidance sweep; sf: and the Self-Forcing rows; all: and CausVid")
    p.add_argument("--rows", nargs="*", default=None, help="only these DMD rows (folder names, e.g. sf_guidance_1)")
    p.add_argument("--seeds", type=int, default=2, help="seeds of the --seeded rows (the others: seed 0)")
    p.add_argument("--seeded", nargs="*", default=list(SEEDED),
                   help="DMD rows (folder names) run with --seeds seeds")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    frames = training_frames()
    world = ToyWorldConfig()
    prompts = held_out_prompts(out / "prompts.txt", args.prompts, frames)
    common = ["logging.wandb=disabled", "logging.progress=false", "checkpoint.every=0", "threads=1"]
    rows: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}

    def score(row: str, model: Path, folder: Path, plan) -> None:
        generate_stage(model, folder, prompts, plan=plan, frames=frames)
        result = toybench_stage(folder, bucket_frames=frames)["aggregate"]
        rows.setdefault(row, []).append({**result, **fidelity_split(folder, world)})
        print(f"  {row}: " + ", ".join(f"{m} {rows[row][-1].get(m, math.nan):.3f}" for m in COLUMNS), flush=True)

    def train(row: str, config: str, run: Path, extra: list[str], cap: int) -> None:
        state = train_stage(TOY_CONFIGS / f"{config}.yaml", run, common + extra, cap=cap)
        if state["steps"] > state["resumed_at"]:
            seconds[row] = seconds.get(row, 0.0) + state["seconds"]
            print(f"  trained {row} ({run.name}): {state['steps']} steps in {state['seconds']:.0f} s", flush=True)

    def wanted(row: str) -> bool:
        return args.rows is None or _folder(row) in args.rows

    teacher = sampling_plan("teacher")
    for g in TEACHER_GUIDANCE:
        score(f"teacher g {g:g}", COMMITTED_TEACHER, out / "teacher" / f"g{g:g}", replace(teacher, guidance=g))
    if args.only != "teacher":
        ode = out / "ode_init"
        train("ode_init", "ode_init", ode, ["seed=0", f"algo.num_pairs={args.pairs}",
                                            f"algo.pairs_per_shard={min(args.pairs, 32)}"], args.ode_steps)
        score("ode_init (the start)", ode, ode / "videos", sampling_plan("ode_init"))
        inits = {row: ode for row in SF_VARIANTS}
        if any(wanted(row) for row in NO_CFG_ROWS):
            no_cfg = out / NO_CFG_INIT
            train(NO_CFG_INIT, "ode_init", no_cfg, ["seed=0", f"algo.num_pairs={args.pairs}",
                                                    f"algo.pairs_per_shard={min(args.pairs, 32)}",
                                                    "algo.teacher_guidance=1.0"], args.ode_steps)
            score("ode_init, pairs without CFG", no_cfg, no_cfg / "videos", sampling_plan("ode_init"))
            inits.update({row: no_cfg for row in NO_CFG_ROWS})
        plan = sampling_plan("self_forcing")
        for seed in range(args.seeds):
            for row, extra in {**SF_VARIANTS, **NO_CFG_ROWS}.items():
                if (seed and _folder(row) not in args.seeded) or not wanted(row) or row not in inits:
                    continue
                run = out / _folder(row) / f"s{args.dmd_steps}_seed{seed}"
                train(row, "self_forcing", run, extra + [f"seed={seed}", f"roles.generator.init={inits[row]}"],
                      args.dmd_steps)
                score(row, run, run / "videos", plan)
    if args.only == "all":
        plan = sampling_plan("causvid")
        for row, extra in CAUSVID_VARIANTS.items():
            if not wanted(row):
                continue
            run = out / _folder(row) / f"s{args.dmd_steps}_seed0"
            train(row, "causvid", run, extra + ["seed=0"], args.dmd_steps)
            score(row, run, run / "videos", plan)
    print(f"\nToyBench, {args.prompts} held-out prompts at the training length ({frames} frames), seed 0 "
          f"(rows marked xN: the mean over seeds 0..N-1); ODE init {args.ode_steps} steps on {args.pairs} pairs, "
          f"DMD rows {args.dmd_steps} steps; one thread; {time.perf_counter() - t0:.0f} s")
    print("| row | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for row, results in rows.items():
        cells = []
        for m in COLUMNS:
            values = [r[m] for r in results if isinstance(r.get(m), (int, float)) and math.isfinite(r[m])]
            cells.append("-" if not values else f"{np.mean(values):.3f}" if len(values) == 1
                         else f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}")
        print(f"| {row}{f' x{len(results)}' if len(results) > 1 else ''} | " + " | ".join(cells) + " |")
    if seconds:
        print("(training time of the stages run now: " + ", ".join(f"{r} {s:.0f} s" for r, s in seconds.items()) + ")")


def _folder(row: str) -> str:
    return row.split(" (")[0].replace(" + ", "_").replace(" ", "_")


if __name__ == "__main__":
    main()
