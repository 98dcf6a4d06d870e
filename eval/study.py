"""The ToyBench study: train every recipe on the toy world with several seeds, generate at 1x
and 10x the training length (students with and without sink + window), score with ToyBench,
and tabulate mean and spread over seeds.

    forcelab eval toybench --suite full --out runs/study [--seeds 3]
    forcelab eval toybench --suite quick --out /tmp/study          # a handful of steps (checks the pipeline)

Everything resumes: runs continue from their checkpoints, finished video sets and scores are
kept. One toy teacher (seed 0: the committed configs/toy/teacher_checkpoint in the full suite)
teaches every distillation recipe and one ODE-init student (seed 0) starts every DMD student,
so the seeds vary each recipe's own stage. --max-steps caps every recipe's steps (recorded). Writes
study.json (every number) and study.md (the table). --out is forcelab's: new, empty or an earlier
study's (a folder of other files is refused), written by one study at a time.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..errors import ForcelabError
from ..fsio import claim_directory, write_text_atomic
from ..locks import lock_folder
from ..validate import choice
from .stats import spread

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "toy"
STUDY_KIND = "study"         # what the --out folder's marker records
METRICS = ("adherence", "identity", "fidelity_psnr", "physics", "dynamics")
# recipe -> (plan arguments of `forcelab generate`, streams?)
DISTILLED = ["--plan", "chunkwise", "--steps", "4"]
PLANS: dict[str, tuple[list[str], bool]] = {
    "teacher": (["--plan", "teacher", "--steps", "20", "--guidance", "3", "--shift", "3", "--solver", "euler"], False),
    "diffusion_forcing": (["--plan", "chunkwise", "--steps", "20", "--shift", "3", "--update", "euler"], True),
    "ar_diffusion": (["--plan", "step_matrix", "--steps", "20", "--shift", "3", "--ar-step", "4", "--chunk", "1"], True),
    "causvid": (DISTILLED, True),
    "self_forcing": (DISTILLED, True),
    "rolling_forcing": (["--plan", "rolling", "--steps", "4"], True),
    "streaming_long": (DISTILLED, True),
    "self_forcing_pp": (DISTILLED, True),
}
NEEDS_TEACHER = {"causvid", "self_forcing", "rolling_forcing", "streaming_long", "self_forcing_pp", "ode_init"}
STARTS_FROM_ODE = {"self_forcing", "rolling_forcing", "streaming_long", "self_forcing_pp"}
QUICK = {"steps": 3, "prompts": 2, "long_factor": 2, "extra": ["data.batch_size=2", "checkpoint.every=0",
                                                               "algo.num_pairs=4", "algo.pairs_per_shard=4"]}
FULL = {"steps": None, "prompts": 16, "long_factor": 10, "extra": []}


def _train(recipe: str, out: Path, seed: int, overrides: list[str], cap: int | None = None) -> None:
    """Train (or resume) one run of the recipe's toy config; cap: at most this many steps."""
    from ..train.config import load_train_config
    from ..train.trainer import Trainer

    files = [CONFIGS / f"{recipe}.yaml"]
    overrides = overrides + [f"seed={seed}", f"output_dir={out}", "logging.wandb=disabled"]
    if cap is not None:
        overrides.append(f"max_steps={min(cap, load_train_config(files, overrides).max_steps)}")
    Trainer(load_train_config(files, overrides), resume="latest").run()


def _extra(recipe: str, overrides: list[str]) -> list[str]:
    """Quick-mode overrides that exist in the recipe's schema (ODE-pair keys only for ode_init)."""
    return [o for o in overrides if not o.startswith("algo.") or recipe == "ode_init"]


def _generate(model: Path, out: Path, prompts: Path, args: list[str]) -> None:
    from ..cli import main as cli_main

    if out.is_dir() and any(out.glob("*.mp4")):
        return
    code = cli_main(["generate", str(model), "--prompts", str(prompts), "--output", str(out), "--quiet", *args])
    if code:
        raise ForcelabError(f"study: generating {out} failed (exit {code})")


def run_study(out, suite: str = "full", seeds: int = 3, window: int = 6, sink: int = 2,
              recipes: list[str] | None = None, max_steps: int | None = None,
              first_seed: int = 0) -> dict:
    if suite not in ("full", "quick"):
        raise ForcelabError(f"--suite must be full or quick, got {suite!r}")
    if seeds < 1:
        raise ForcelabError(f"--seeds must be >= 1, got {seeds}")
    for recipe in recipes or ():
        choice(recipe, "--recipes", PLANS)
    s = FULL if suite == "full" else QUICK
    out = claim_directory(out, "--out", STUDY_KIND)       # new, empty or an earlier study's: never a user's folder
    with lock_folder(out, "--out"):           # one study writes it at a time
        return _study(out, s, suite, seeds, window, sink, recipes, max_steps, first_seed)


def _study(out: Path, s: dict, suite: str, seeds: int, window: int, sink: int, recipes: list[str] | None,
           max_steps: int | None, first_seed: int) -> dict:
    from ..data.toyworld import ToyWorld, ToyWorldConfig
    from ..train.config import load_train_config
    from .toybench_run import run_toybench

    cap = s["steps"] or max_steps
    frames = load_train_config([CONFIGS / "teacher.yaml"]).data.frames
    world = ToyWorld(ToyWorldConfig(frames=frames))
    prompts = out / "prompts.txt"
    if not prompts.exists():
        write_text_atomic(prompts, "\n".join(world.scene(10 ** 6 + i).caption for i in range(s["prompts"])) + "\n")
    t0 = time.perf_counter()
    ode = out / "ode_init" / "seed0"
    if suite == "full":        # the committed teacher is what configs/toy/teacher.yaml makes with seed 0
        teacher = CONFIGS / "teacher_checkpoint"
    else:
        teacher = out / "teacher" / "seed0"
        _train("teacher", teacher, 0, _extra("teacher", s["extra"]), cap)
    _train("ode_init", ode, 0, _extra("ode_init", s["extra"]) + [f"roles.teacher.init={teacher}"], cap)
    rows: dict[str, dict[str, list[dict]]] = {}
    for recipe in recipes or list(PLANS):
        plan, streams = PLANS[recipe]
        for seed in range(first_seed, first_seed + seeds):
            run = teacher if recipe == "teacher" and seed == 0 else out / recipe / f"seed{seed}"
            if not (recipe == "teacher" and seed == 0):
                extra = _extra(recipe, s["extra"])
                if recipe in NEEDS_TEACHER:
                    extra.append(f"roles.teacher.init={teacher}")
                if recipe in STARTS_FROM_ODE:
                    extra.append(f"roles.generator.init={ode}")
                _train(recipe, run, seed, extra, cap)
            variants = {"1x": plan + ["--frames", str(frames)]}
            if streams:
                long = ["--frames", str(frames * s["long_factor"])]
                variants[f"{s['long_factor']}x sink+window"] = plan + long + ["--window", str(window), "--sink", str(sink)]
                variants[f"{s['long_factor']}x full cache"] = plan + long + ["--window", "0", "--sink", "0"]
            for name, args in variants.items():
                folder = out / recipe / f"seed{seed}" / "videos" / name.replace(" ", "_").replace("+", "_")
                _generate(run, folder, prompts, args)
                if not (folder / "toybench.json").exists():
                    run_toybench(folder, bucket_frames=frames, report=False, progress=False)
                result = json.loads((folder / "toybench.json").read_text())
                rows.setdefault(recipe, {}).setdefault(name, []).append(
                    {**{m: result["aggregate"].get(m) for m in METRICS}, "speed_fps": result.get("speed_fps"),
                     "adherence_slope": result.get("slopes", {}).get("adherence")})
    table = summarize(rows, seeds)
    record = {"suite": suite, "seeds": seeds, "first_seed": first_seed, "max_steps": cap, "window": window,
              "sink": sink, "training_frames": frames,
              "long_factor": s["long_factor"], "prompts": s["prompts"], "seconds": time.perf_counter() - t0,
              "rows": rows, "table": table}
    write_text_atomic(out / "study.json", json.dumps(record, indent=2) + "\n")
    write_text_atomic(out / "study.md", markdown(record) + "\n")
    return record


def summarize(rows: dict, seeds: int) -> dict:
    """recipe -> variant -> metric -> {mean, std}."""
    out = {}
    for recipe, variants in rows.items():
        for name, runs in variants.items():
            cell = out.setdefault(recipe, {}).setdefault(name, {})
            for m in METRICS + ("speed_fps", "adherence_slope"):
                values = [r[m] for r in runs if isinstance(r.get(m), (int, float)) and not math.isnan(r[m])]
                sp = spread(values) if values else {"mean": math.nan, "std": math.nan}
                cell[m] = {"mean": sp["mean"], "std": sp.get("std", math.nan), "n": len(values)}
    return out


def markdown(record: dict) -> str:
    cols = METRICS + ("adherence_slope", "speed_fps")
    lines = [f"| recipe | rollout | {' | '.join(cols)} |", "|---|---|" + "---|" * len(cols)]
    for recipe, variants in record["table"].items():
        for name, cell in variants.items():
            vals = []
            for m in cols:
                mean, std = cell[m]["mean"], cell[m]["std"]
                vals.append("-" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}" if cell[m]["n"] > 1 else f"{mean:.3f}")
            lines.append(f"| {recipe} | {name} | {' | '.join(vals)} |")
    head = (f"ToyBench over {record['seeds']} seed(s), {record['prompts']} held-out prompts, training length "
            f"{record['training_frames']} frames; long rollouts {record['long_factor']}x with window "
            f"{record['window']} + sink {record['sink']} latent frames or the full cache (mean ± std over seeds)")
    return head + "\n\n" + "\n".join(lines)
