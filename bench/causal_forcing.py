"""Causal Forcing on the toy world: bidirectional-teacher vs causal-teacher initialisation of the
4-step causal student, measured with ToyBench (boundary continuity, adherence, fidelity).

    python bench/causal_forcing.py --out runs/causal_forcing                    # minutes on one thread
    python bench/causal_forcing.py --out runs/causal_forcing --steps 600 --dmd-steps 300 --prompts 32

Stages (each resumable: a finished run, video set or score is kept), every step count capped
at --steps (reduced from the toy configs' own; printed):
    teacher_forcing   the causal toy teacher, teacher forcing from the committed bidirectional one
    ode_init          the student regresses the bidirectional teacher's ODE pairs (Self-Forcing's init)
    causal_ode_init   ... the causal teacher's pairs (Causal Forcing)
    causal_cd         causal consistency distillation from the causal teacher (Causal Forcing)
    ode_init_no_cfg   the control: bidirectional pairs sampled without CFG, as the causal teacher's are
With --dmd-steps N, the DMD stage (Self-Forcing, the bidirectional teacher as the real score)
from each initialisation: self_forcing, causal_forcing, causal_forcing_cd.

Each student (and the causal teacher, for reference) generates the held-out prompts at
`--factor` times the training length with its toy config's sampling plan; the table gives
ToyBench's mean ± std over the prompts per student.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from forcelab.pipeline import (COMMITTED_TEACHER, TOY_CONFIGS, generate_stage, held_out_prompts, sampling_plan,
                               toybench_stage, train_stage, training_frames)

INITS = ("ode_init", "causal_ode_init", "causal_cd")
DMD = {"self_forcing": "ode_init", "causal_forcing": "causal_ode_init", "causal_forcing_cd": "causal_cd"}
COLUMNS = ("continuity", "adherence", "fidelity_psnr", "identity", "physics")
PAIRS_PER_SHARD = 32          # the toy configs' shard size
NO_CFG = "ode_init_no_cfg"    # the control: ode_init.yaml with teacher_guidance 1 (the causal teacher has no CFG)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300, help="cap on every initialisation stage's steps")
    p.add_argument("--teacher-steps", type=int, default=300, help="steps of the causal teacher (teacher forcing)")
    p.add_argument("--pairs", type=int, default=128, help="ODE pairs per pair set")
    p.add_argument("--dmd-steps", type=int, default=0, help="DMD stage steps from each initialisation (0: none)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--factor", type=int, default=2, help="video length in training lengths")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    frames = training_frames()
    prompts = held_out_prompts(out / "prompts.txt", args.prompts, frames)
    common = ["logging.wandb=disabled", "logging.progress=false", "checkpoint.every=0"]
    pairs = [f"algo.num_pairs={args.pairs}", f"algo.pairs_per_shard={min(args.pairs, PAIRS_PER_SHARD)}"]
    runs, seconds = {"teacher": COMMITTED_TEACHER}, {}

    def train(row: str, cap: int, extra: list[str], config: str | None = None) -> None:
        state = train_stage(TOY_CONFIGS / f"{config or row}.yaml", out / row, common + extra, cap=cap)
        runs[row] = out / row
        if state["steps"] > state["resumed_at"]:          # trained now (not a finished run kept)
            seconds[row] = state["seconds"]

    train("teacher_forcing", args.teacher_steps, [f"roles.generator.init={COMMITTED_TEACHER}"])
    train("ode_init", args.steps, pairs + [f"roles.teacher.init={COMMITTED_TEACHER}"])
    train("causal_ode_init", args.steps, pairs + [f"roles.teacher.init={runs['teacher_forcing']}"])
    train("causal_cd", args.steps, [f"roles.teacher.init={runs['teacher_forcing']}"])
    # the control: bidirectional pairs without CFG, as the causal teacher samples them
    train(NO_CFG, args.steps, pairs + [f"roles.teacher.init={COMMITTED_TEACHER}", "algo.teacher_guidance=1.0"],
          config="ode_init")
    students = ["teacher_forcing", "ode_init", NO_CFG, "causal_ode_init", "causal_cd"]   # the causal teacher first
    if args.dmd_steps:
        for row, init in DMD.items():
            train(row, args.dmd_steps, [f"roles.teacher.init={COMMITTED_TEACHER}", f"roles.generator.init={runs[init]}"])
            students.append(row)
    rows = {}
    for row in students:
        videos = out / row / "videos"
        plan = sampling_plan("ode_init" if row == NO_CFG else row)
        generate_stage(runs[row], videos, prompts, plan=plan, frames=frames * args.factor)
        rows[row] = toybench_stage(videos, bucket_frames=frames)["spread"]
    print(f"ToyBench, {args.prompts} held-out prompts, {frames * args.factor} frames ({args.factor}x the training "
          f"length), chunks of 2 latent frames, 4 steps; init stages capped at {args.steps} steps, the causal "
          f"teacher {args.teacher_steps}, {args.pairs} ODE pairs" +
          (f", DMD {args.dmd_steps} steps" if args.dmd_steps else "") + "; one thread")
    print("| student | teacher of the init | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for row in students:
        init = DMD.get(row, row)
        kind = ("-" if row == "teacher_forcing" else "bidirectional, no CFG" if row == NO_CFG
                else "bidirectional" if init == "ode_init" else "causal")
        cells = [rows[row].get(m) or {"mean": math.nan} for m in COLUMNS]
        print(f"| {row} | {kind} | " + " | ".join("-" if math.isnan(c["mean"]) else f"{c['mean']:.3f} ± {c['std']:.3f}"
                                                  for c in cells) + " |")
    trained = ", ".join(f"{row} {s:.0f} s" for row, s in seconds.items())
    print(f"(mean ± std over the prompts; training time of the stages run now: {trained or 'none'})")


if __name__ == "__main__":
    main()
