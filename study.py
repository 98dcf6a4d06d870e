"""The ToyBench study: train every recipe on the toy world with several seeds, generate at 1x
and 10x the training length (students with and without sink + window), score with ToyBench,
and tabulate mean and spread over seeds.

    forcelab eval toybench --suite full --out runs/study [--seeds 3]
    forcelab eval toybench --suite quick --out /tmp/study          # a handful of steps (checks the pipeline)

The rows are the toy configs (configs/toy/<row>.yaml and framewise/<row>.yaml, each naming its
recipe: one per recipe, and variants such as causal_ode_init: ode_init from the causal teacher,
or framewise/self_forcing_2step: a 2-step student with one latent frame per chunk); each says what it
samples with (Recipe.sampling_plan, from the config's options) and which runs it starts from
(Recipe.starts_from, over which the config's own `starts_from` wins): the seed-0 run of that row
(the teacher: the committed configs/toy/teacher_checkpoint in the full suite; Self-Forcing's
students: an ODE-init run; Causal Forcing's: a causal ODE-init or causal CD run from the
teacher-forcing row), so the seeds vary each row's own stage. Everything resumes: runs continue from their checkpoints,
finished video sets and scores are kept. --max-steps caps every recipe's steps (recorded). Writes
study.json (every number) and study.md (the table). --out is forcelab's: new, empty or an earlier
study's (a folder of other files is refused), written by one study at a time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from .errors import ForcelabError
from .eval.stats import spread
from .fsio import claim_directory, write_text_atomic
from .locks import lock_folder
from .models.plans import CausalPlan
from .pipeline import (COMMITTED_TEACHER, TOY_CONFIGS, generate_stage, held_out_prompts, sampling_plan, toybench_stage,
                       train_stage, training_frames)
from .train.recipe import recipe_class, recipe_names
from .validate import choice

STUDY_KIND = "study"         # what the --out folder's marker records
ROW_FOLDERS = ("", "framewise/")   # configs/toy/ and its frame-wise students (textured/ needs its own teacher)
METRICS = ("adherence", "identity", "fidelity_psnr", "fidelity_adherent", "physics", "dynamics", "continuity")


QUICK = {"steps": 3, "prompts": 2, "long_factor": 2, "extra": ["data.batch_size=2", "checkpoint.every=0",
                                                               "algo.num_pairs=4", "algo.pairs_per_shard=4"]}
FULL = {"steps": None, "prompts": 16, "long_factor": 10, "extra": []}


def _extra(row: str, overrides: list[str]) -> list[str]:
    """Quick-mode overrides that exist in the row's schema (ODE-pair keys only for ode_init rows)."""
    return [o for o in overrides if not o.startswith("algo.") or row_config(row).recipe == "ode_init"]


def run_study(out, suite: str = "full", seeds: int = 3, window: int = 6, sink: int = 2,
              recipes: list[str] | None = None, max_steps: int | None = None,
              first_seed: int = 0) -> dict:
    if suite not in ("full", "quick"):
        raise ForcelabError(f"--suite must be full or quick, got {suite!r}")
    if seeds < 1:
        raise ForcelabError(f"--seeds must be >= 1, got {seeds}")
    for recipe in recipes or ():
        choice(recipe, "--recipes", study_recipes())
    s = FULL if suite == "full" else QUICK
    out = claim_directory(out, "--out", STUDY_KIND)       # new, empty or an earlier study's: never a user's folder
    with lock_folder(out, "--out"):           # one study writes it at a time
        return _study(out, s, suite, seeds, window, sink, recipes, max_steps, first_seed)


def study_recipes() -> list[str]:
    """The study's rows: every toy config (configs/toy/<row>.yaml) that names a known recipe,
    each after the rows its runs start from (row_sources): sources first, then by name."""
    known = set(recipe_names())
    names = [f"{folder}{p.stem}" for folder in ROW_FOLDERS for p in sorted((TOY_CONFIGS / folder).glob("*.yaml"))
             if _named_recipe(p) in known]

    def depth(row: str) -> int:
        sources = row_sources(row).values()
        return 1 + max(map(depth, sources)) if sources else 0

    return sorted(names, key=lambda r: (depth(r), r))


def _named_recipe(path: Path) -> str | None:
    """The recipe a toy config names itself (None: a shared base such as base.yaml)."""
    from .config import _read_yaml

    return next((str(node["recipe"]) for _, node in _read_yaml(path) if "recipe" in node), None)


@lru_cache(maxsize=None)
def row_config(row: str):
    """The loaded toy config of a study row."""
    from .train.config import load_train_config

    return load_train_config([TOY_CONFIGS / f"{row}.yaml"])


def row_sources(row: str) -> dict[str, str]:
    """role -> the row whose seed-0 run gives it weights: the recipe's starts_from, then the
    config's own starts_from (a row that is no toy config is an error naming it)."""
    cfg = row_config(row)
    out = {**recipe_class(cfg.recipe).starts_from, **cfg.starts_from}
    for role, source in out.items():
        if not (TOY_CONFIGS / f"{source}.yaml").is_file():
            raise ForcelabError(f"configs/toy/{row}.yaml: starts_from.{role} = {source!r} is no toy config "
                                f"(configs/toy/{source}.yaml)")
    return out


def _study(out: Path, s: dict, suite: str, seeds: int, window: int, sink: int, recipes: list[str] | None,
           max_steps: int | None, first_seed: int) -> dict:
    cap = s["steps"] or max_steps
    frames = training_frames()
    prompts = held_out_prompts(out / "prompts.txt", s["prompts"], frames)
    t0 = time.perf_counter()
    runs: dict[tuple[str, int], Path] = {}
    if suite == "full":        # the committed teacher is what configs/toy/teacher.yaml makes with seed 0
        runs["teacher", 0] = COMMITTED_TEACHER

    def run_of(recipe: str, seed: int) -> Path:
        """The recipe's trained run for `seed` (trained or resumed here); the runs it starts
        from are every recipe's seed-0 runs, so the seeds vary each recipe's own stage."""
        if (recipe, seed) not in runs:
            path = out / recipe / f"seed{seed}"
            extra = _extra(recipe, s["extra"]) + [f"roles.{role}.init={run_of(source, 0)}"
                                                  for role, source in row_sources(recipe).items()]
            _train(recipe, path, seed, extra, cap)
            runs[recipe, seed] = path
        return runs[recipe, seed]

    rows: dict[str, dict[str, list[dict]]] = {}
    for recipe in recipes or study_recipes():
        for seed in range(first_seed, first_seed + seeds):
            run = run_of(recipe, seed)
            for name, (plan, length) in _variants(recipe, frames, s["long_factor"], window, sink).items():
                folder = out / recipe / f"seed{seed}" / "videos" / name.replace(" ", "_").replace("+", "_")
                generate_stage(run, folder, prompts, plan=plan, frames=length)
                result = toybench_stage(folder, bucket_frames=frames)
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


def _train(recipe: str, out: Path, seed: int, overrides: list[str], cap: int | None = None) -> None:
    """Train (or resume) one run of the recipe's toy config; cap: at most this many steps."""
    train_stage(TOY_CONFIGS / f"{recipe}.yaml", out, overrides + [f"seed={seed}", "logging.wandb=disabled"], cap)


def _variants(recipe: str, frames: int, long_factor: int, window: int, sink: int) -> dict:
    """rollout name -> (plan, video frames): the recipe's own sampling plan (from its toy config)
    at the training length, and for a causal student long_factor times it with sink + window
    and with the full cache."""
    plan = sampling_plan(recipe)
    variants = {"1x": (plan, frames)}
    if isinstance(plan, CausalPlan):
        long = frames * long_factor
        variants[f"{long_factor}x sink+window"] = (replace(plan, window_frames=window, sink_frames=sink), long)
        variants[f"{long_factor}x full cache"] = (replace(plan, window_frames=0, sink_frames=0), long)
    return variants


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
