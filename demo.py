"""`forcelab demo`: distill a streaming student on the toy world, end to end, on a CPU.

    forcelab demo                       # runs/demo: ~15 minutes on 2 CPU cores
    forcelab demo --quick               # the same stages with a handful of steps (a smoke test)

Stages (pipeline.py, run in this process; a finished stage is skipped on re-run, an
interrupted one resumes from its last checkpoint):
  1 teacher       the toy teacher: the committed checkpoint configs/toy/teacher_checkpoint,
                  which configs/toy/teacher.yaml makes (12000 steps, ~40 minutes on one core;
                  --train-teacher trains it here instead)
  2 ode_init      ODE pairs from the teacher, regressed into the causal student
  3 self_forcing  Self-Forcing DMD into a 4-step causal student with a KV cache
  4 generate      the students stream 10x the training length with sink + window; the
                  teacher samples clips of its training length (it cannot stream)
  5 toybench      ToyBench on every set of videos, with frames/s from the same run
  6 report        one HTML page comparing them (runs/demo/report.html)

--out is forcelab's: a new or empty folder, or an earlier demo's (a folder holding other files
is refused before any work), and one demo at a time writes it (locks.lock_folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .fsio import claim_directory, write_text_atomic
from .locks import lock_folder
from .pipeline import (COMMITTED_TEACHER, TOY_CONFIGS as CONFIGS, TOYBENCH_RESULT, generate_stage, held_out_prompts,
                       sampling_plan, toybench_stage, train_stage, training_frames)
from .validate import arg, threads

DEMO_KIND = "demo"          # what the --out folder's marker records
LONG_FACTOR = 10            # streaming length / training length


@dataclass
class Settings:
    """Every knob of the demo; --quick shrinks the step counts, not the stages."""
    teacher_steps: int | None = None     # None: the config's
    ode_pairs: int | None = None
    ode_steps: int | None = None
    sf_steps: int | None = None
    prompts: int = 32                    # evaluation prompts (held-out toy scenes; 8 are too few to rank students)
    long_factor: int = LONG_FACTOR
    window: int = 6                      # student's attention window (latent frames) when streaming
    sink: int = 2                        # attention sink (latent frames)
    teacher_sample_steps: int = 20
    overrides: dict[str, list[str]] = field(default_factory=dict)


QUICK = Settings(teacher_steps=6, ode_pairs=4, ode_steps=4, sf_steps=4, prompts=2, long_factor=2,
                 teacher_sample_steps=4,
                 overrides={"all": ["data.batch_size=2", "checkpoint.every=0", "logging.every=2"],
                            "ode_init": ["algo.teacher_steps=8", "algo.stored_steps=[0,2,4,6,-1]",
                                         "algo.pairs_per_shard=4"]})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder for every stage's output (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a handful of steps per stage (checks the pipeline)")
    p.add_argument("--train-teacher", action="store_true",
                   help="train the toy teacher from configs/toy/teacher.yaml instead of loading the committed one")
    p.add_argument("--threads", type=arg(threads), default=None,
                   help="CPU threads (default: the cores this process may use)")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _train(name: str, config: Path, out: Path, overrides: list[str]) -> dict:
    state = train_stage(config, out, overrides)
    latest = {k: v for k, v in state.items() if k not in ("steps", "seconds", "resumed_at")}
    loss = ", ".join(f"{k} {v:.4f}" for k, v in latest.items())
    new_steps = state["steps"] - state["resumed_at"]
    done = "already finished" if not new_steps else f"{new_steps} steps in {state['seconds']:.0f} s"
    _say(f"[{name}] {done}; {loss or 'no new steps'} -> {out}")
    return state


def _generate(name: str, model: Path, out: Path, prompts: list[str], **options) -> Path:
    t0 = time.perf_counter()
    videos = generate_stage(model, out, prompts, **options)
    if videos is None:
        _say(f"[generate {name}] already done -> {out}")
    else:
        _say(f"[generate {name}] {len(videos)} videos in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


def run(args: argparse.Namespace) -> int:
    # idle OpenMP threads sleep instead of spinning: with the spinning default, one other process
    # on a 2-core machine made a toy step tens of times slower (read when torch first loads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    threads = args.threads or len(os.sched_getaffinity(0))
    out = claim_directory(args.out, "--out", DEMO_KIND)
    with lock_folder(out, "--out"):
        torch.set_num_threads(threads)
        return _stages(args, out, threads)


def _stages(args: argparse.Namespace, out: Path, threads: int) -> int:
    from .eval.report import write_report
    from dataclasses import replace

    s = QUICK if args.quick else Settings()
    t_start = time.perf_counter()
    teacher, ode, sf = _train_students(args, s, out, threads)
    frames = training_frames()
    prompts = held_out_prompts(out / "prompts.txt", s.prompts, frames)
    videos = out / "videos"
    # each recipe's own sampling plan (Recipe.sampling_plan); the students stream with sink + window
    teacher_plan = replace(sampling_plan("teacher"), steps=s.teacher_sample_steps)
    streaming = {name: replace(sampling_plan(name), window_frames=s.window, sink_frames=s.sink)
                 for name in ("ode_init", "self_forcing")}
    long = frames * s.long_factor
    sets = {
        "teacher": _generate("4/6 teacher", teacher, videos / "teacher", prompts, plan=teacher_plan, frames=frames),
        "ode_init": _generate("4/6 ode_init", ode, videos / "ode_init", prompts, plan=streaming["ode_init"],
                              frames=long),
        "self_forcing": _generate("4/6 self_forcing", sf, videos / "self_forcing", prompts,
                                  plan=streaming["self_forcing"], frames=long),
    }
    results = {}
    for name, folder in sets.items():
        results[name] = toybench_stage(folder, bucket_frames=frames, progress=True)
        agg = results[name]["aggregate"]
        _say(f"[5/6 toybench {name}] " + ", ".join(f"{k} {v:.3f}" for k, v in agg.items()
                                                  if isinstance(v, (int, float)) and not k.endswith("_drift"))
             + (f"; {results[name].get('speed_fps', float('nan')):.1f} frames/s"))
    report = write_report([f / TOYBENCH_RESULT for f in sets.values()], out / "report.html")
    _say(f"[6/6 report] {report}")
    summary = headline(results)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _say(f"demo finished in {time.perf_counter() - t_start:.0f} s")
    print(f"report: {report}")
    for line in summary["lines"]:
        print(line)
    return 0


def _train_students(args: argparse.Namespace, s: Settings, out: Path, threads: int) -> tuple[Path, Path, Path]:
    """Stages 1-3: the teacher (committed, or trained here), ODE init, Self-Forcing."""
    common = s.overrides.get("all", [])

    def steps(n):
        return [f"max_steps={n}"] if n else []

    ode, sf = out / "ode_init", out / "self_forcing"
    _say(f"forcelab demo: {threads} thread(s), output in {out}")
    if args.train_teacher or args.quick:
        teacher = out / "teacher"
        _train("1/6 teacher", CONFIGS / "teacher.yaml", teacher, common + steps(s.teacher_steps))
    else:
        teacher = COMMITTED_TEACHER
        _say(f"[1/6 teacher] the committed toy teacher {teacher.relative_to(CONFIGS.parent.parent)} (made by "
             f"configs/toy/teacher.yaml; --train-teacher trains it here)")
    _train("2/6 ode_init", CONFIGS / "ode_init.yaml", ode,
           common + steps(s.ode_steps) + s.overrides.get("ode_init", [])
           + [f"roles.teacher.init={teacher}"] + ([f"algo.num_pairs={s.ode_pairs}"] if s.ode_pairs else []))
    _train("3/6 self_forcing", CONFIGS / "self_forcing.yaml", sf,
           common + steps(s.sf_steps) + [f"roles.teacher.init={teacher}", f"roles.generator.init={ode}",
                                         "roles.generator.init_role=generator"])
    return teacher, ode, sf


def headline(results: dict) -> dict:
    """The three numbers that matter: adherence of the distilled student vs the ODE-init
    student, its streaming speed vs the teacher's sampling, and its drift over 10x length."""
    sf, ode, teacher = results["self_forcing"], results["ode_init"], results["teacher"]

    def metric(r, k):
        return float(r["aggregate"].get(k, float("nan")))

    speed = (sf.get("speed_fps") or float("nan")) / (teacher.get("speed_fps") or float("nan"))
    adherence = ("adherence", metric(sf, "adherence"), metric(ode, "adherence"), metric(teacher, "adherence"))
    drift = sf.get("slopes", {}).get("adherence", float("nan"))
    return {"adherence": {"self_forcing": adherence[1], "ode_init": adherence[2], "teacher": adherence[3]},
            "speedup_vs_teacher": speed, "self_forcing_adherence_slope_per_bucket": drift,
            "lines": [f"1. prompt adherence: self-forcing {adherence[1]:.3f} vs ode-init {adherence[2]:.3f} "
                      f"(teacher {adherence[3]:.3f})",
                      f"2. speed: the student streams {speed:.1f}x the teacher's frames/s",
                      f"3. drift over {LONG_FACTOR}x the training length: adherence slope {drift:+.4f} per bucket"]}
