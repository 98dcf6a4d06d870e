"""The ToyBench study: train every recipe on a toy world with several seeds, generate at 1x
and 10x the training length (causal students with sink + window, with a window of the same
budget and no sink, and with the full cache), score with ToyBench, and tabulate mean and spread
over seeds; in the textured world also measure exposure bias directly, and test each paper's
claim with paired differences and their intervals (study_claims.py).

    forcelab eval toybench --suite full --world textured --seeds 3 --jobs 2 --out runs/study_textured
    forcelab eval toybench --suite full --out runs/study [--seeds 3]       # the plain world
    forcelab eval toybench --suite quick --out /tmp/study                  # a handful of steps (checks the pipeline)

Worlds:
- plain: the rows are configs/toy/<row>.yaml and framewise/<row>.yaml; each row's runs start
  from the seed-0 run of the rows named by its starts_from (the teacher: the committed
  configs/toy/teacher_checkpoint in the full suite), so the seeds vary each row's own stage.
- textured: the rows are configs/toy/textured/<row>.yaml (the world whose per-scene background
  only the context carries, where exposure bias shows); every stage is trained per seed, the
  teacher included (seed s of a row starts from seed s of its sources), so the seeds vary every
  stage; the DMD rows share one budget (300 steps from the ODE init, the same learning rates);
  64 held-out prompts; the chunk-wise students' exposure (eval/exposure.py, a ground-truth first
  chunk, window + sink) per seed. Seeds are independent chains here, so --jobs runs them in
  parallel processes (one thread each).

Each row says what it samples with (Recipe.sampling_plan, from its config); rows sampled with
more than the students' 4 steps (diffusion forcing, teacher forcing, AR-Diffusion) are also
sampled at 4 ("4 steps" variants). Videos are generated in batches of GENERATE_BATCH (speed_fps
is that batched throughput). Everything resumes: runs continue from their checkpoints, finished
video sets, scores and exposure measurements are kept. --max-steps caps every row's steps
(recorded). Writes study.json (every number, per video) and study.md (the tables). --out is
forcelab's: new, empty or an earlier study's (a folder of other files is refused), written by one
study at a time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from .errors import ForcelabError
from .eval.stats import nanmean as _mean, spread
from .fsio import claim_directory, write_text_atomic
from .locks import lock_folder
from .models.plans import CausalPlan
from .pipeline import (COMMITTED_TEACHER, TOY_CONFIGS, generate_stage, held_out_prompts, sampling_plan, toybench_stage,
                       train_stage, training_frames)
from .train.recipe import recipe_class, recipe_names
from .validate import choice

STUDY_KIND = "study"         # what the --out folder's marker records
METRICS = ("adherence", "identity", "fidelity_psnr", "fidelity_adherent", "physics", "dynamics", "continuity",
           "background")
GENERATE_BATCH = 16          # videos generated together
STUDENT_STEPS = 4            # the distilled students' steps: many-step rows are also sampled at this many


@dataclass(frozen=True)
class World:
    """Where a study's rows come from and how their runs chain."""
    folders: tuple[str, ...]      # config folders under configs/toy/ whose configs are the rows
    committed_teacher: bool       # the full suite's teacher row is the committed checkpoint (seed 0)
    own_seed_sources: bool        # seed s starts from seed s of its sources (else from seed 0)
    prompts: int                  # held-out prompts in the full suite
    exposure: bool                # measure the chunk-wise students' exposure bias per seed


WORLDS = {
    "plain": World(folders=("", "framewise/"), committed_teacher=True, own_seed_sources=False, prompts=16,
                   exposure=False),
    "textured": World(folders=("textured/",), committed_teacher=False, own_seed_sources=True, prompts=64,
                      exposure=True),
}
EXPOSURE = {"scenes": 32, "chunks": 16, "prefix": 1}    # the README's textured protocol


QUICK = {"steps": 3, "prompts": 2, "long_factor": 2, "exposure": {"scenes": 2, "chunks": 3, "prefix": 1},
         "extra": ["data.batch_size=2", "checkpoint.every=0", "algo.num_pairs=4", "algo.pairs_per_shard=4"]}
FULL = {"steps": None, "prompts": None, "long_factor": 10, "exposure": EXPOSURE, "extra": []}


def _extra(row: str, overrides: list[str]) -> list[str]:
    """Quick-mode overrides that exist in the row's schema (ODE-pair keys only for ode_init rows)."""
    return [o for o in overrides if not o.startswith("algo.") or row_config(row).recipe == "ode_init"]


def run_study(out, suite: str = "full", seeds: int = 3, window: int = 6, sink: int = 2,
              recipes: list[str] | None = None, max_steps: int | None = None,
              first_seed: int = 0, world: str = "plain", jobs: int = 1) -> dict:
    if suite not in ("full", "quick"):
        raise ForcelabError(f"--suite must be full or quick, got {suite!r}")
    choice(world, "--world", list(WORLDS))
    if seeds < 1:
        raise ForcelabError(f"--seeds must be >= 1, got {seeds}")
    if jobs < 1:
        raise ForcelabError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1 and not WORLDS[world].own_seed_sources:
        raise ForcelabError(f"--jobs {jobs}: the {world} world's seeds share their seed-0 sources and run in one "
                            f"process; --jobs applies to --world textured (or split with --first-seed and --out)")
    for recipe in recipes or ():
        choice(recipe, "--recipes", study_recipes(world))
    s = FULL if suite == "full" else QUICK
    out = claim_directory(out, "--out", STUDY_KIND)       # new, empty or an earlier study's: never a user's folder
    with lock_folder(out, "--out"):           # one study writes it at a time
        return _study(out, s, suite, world, seeds, window, sink, recipes, max_steps, first_seed, jobs)


def study_recipes(world: str = "plain") -> list[str]:
    """The study's rows in a world: every toy config in its folders that names a known recipe,
    each after the rows its runs start from (row_sources): sources first, then by name."""
    known = set(recipe_names())
    names = [f"{folder}{p.stem}" for folder in WORLDS[world].folders
             for p in sorted((TOY_CONFIGS / folder).glob("*.yaml")) if _named_recipe(p) in known]

    def depth(row: str) -> int:
        sources = row_sources(row).values()
        return 1 + max(map(depth, sources)) if sources else 0

    return sorted(names, key=lambda r: (depth(r), r))


def _named_recipe(path: Path) -> str | None:
    """The recipe a toy config names itself or through its _base_ (None: a shared base such as
    base.yaml, which names none)."""
    from .config import _read_yaml

    return next((str(node["recipe"]) for _, node in _read_yaml(path) if "recipe" in node), None)


@lru_cache(maxsize=None)
def row_config(row: str, overrides: tuple[str, ...] = ()):
    """The loaded toy config of a study row (with overrides)."""
    from .train.config import load_train_config

    return load_train_config([TOY_CONFIGS / f"{row}.yaml"], list(overrides))


def _world_of(row: str) -> World:
    return next((w for w in WORLDS.values() if w.own_seed_sources and any(row.startswith(f) for f in w.folders if f)),
                WORLDS["plain"])


def row_sources(row: str) -> dict[str, str]:
    """role -> the row whose run gives it weights: the recipe's starts_from, then the config's
    own starts_from; in a world of its own (textured/) a source names a row of that folder (a row
    that is no toy config is an error naming it)."""
    cfg = row_config(row)
    out = {**recipe_class(cfg.recipe).starts_from, **cfg.starts_from}
    if _world_of(row).own_seed_sources:
        folder = row.rsplit("/", 1)[0] + "/"
        out = {role: f"{folder}{source}" for role, source in out.items()}
    for role, source in out.items():
        if not (TOY_CONFIGS / f"{source}.yaml").is_file():
            raise ForcelabError(f"configs/toy/{row}.yaml: starts_from.{role} = {source!r} is no toy config "
                                f"(configs/toy/{source}.yaml)")
    return out


def _study(out: Path, s: dict, suite: str, world_name: str, seeds: int, window: int, sink: int,
           recipes: list[str] | None, max_steps: int | None, first_seed: int, jobs: int) -> dict:
    world = WORLDS[world_name]
    frames = training_frames()
    count = s["prompts"] or world.prompts
    held_out_prompts(out / "prompts.txt", count, frames)          # written once, before any worker reads it
    rows_wanted = recipes or study_recipes(world_name)
    t0 = time.perf_counter()
    task = dict(out=out, s=s, suite=suite, world_name=world_name, window=window, sink=sink, rows_wanted=rows_wanted,
                cap=s["steps"] or max_steps, frames=frames, count=count)
    seed_list = list(range(first_seed, first_seed + seeds))
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(jobs, len(seed_list)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_one_thread) as pool:
            results = list(pool.map(_seed_task, [{**task, "seeds": [seed]} for seed in seed_list]))
    else:
        results = [_seed_task({**task, "seeds": seed_list})]
    rows: dict[str, dict[str, list[dict]]] = {}
    exposure: dict[str, list[dict]] = {}
    for part in results:                           # seed order: the workers' results come back in it
        for row, variants in part["rows"].items():
            for name, records in variants.items():
                rows.setdefault(row, {}).setdefault(name, []).extend(records)
        for row, records in part["exposure"].items():
            exposure.setdefault(row, []).extend(records)
    from .study_claims import claims_for

    record = {"suite": suite, "world": world_name, "row_prefix": world.folders[0] if world.own_seed_sources else "",
              "seeds": seeds, "first_seed": first_seed, "max_steps": task["cap"],
              "window": window, "sink": sink, "training_frames": frames, "long_factor": s["long_factor"],
              "prompts": count, "generate_batch": GENERATE_BATCH, "exposure_protocol": s["exposure"] if world.exposure
              else None, "seconds": time.perf_counter() - t0, "rows": rows, "exposure": exposure,
              "table": summarize(rows, seeds), "trained_attention": {r: trained_attention(r) for r in rows}}
    record["claims"] = claims_for(record)
    write_text_atomic(out / "study.json", json.dumps(record, indent=2, allow_nan=True) + "\n")
    write_text_atomic(out / "study.md", markdown(record) + "\n")
    return record


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _seed_task(task: dict) -> dict:
    """Train, generate, score (and measure exposure) for task["seeds"]: {"rows": row -> variant
    -> [per-seed record], "exposure": row -> [per-seed record]}."""
    out, s, world = task["out"], task["s"], WORLDS[task["world_name"]]
    frames = task["frames"]
    prompts = held_out_prompts(out / "prompts.txt", task["count"], frames)
    names = [f"p{i:03d}" for i in range(len(prompts))]
    runs: dict[tuple[str, int], Path] = {}
    if task["suite"] == "full" and world.committed_teacher:   # what configs/toy/teacher.yaml makes with seed 0
        runs["teacher", 0] = COMMITTED_TEACHER

    def run_of(row: str, seed: int) -> Path:
        """The row's trained run for `seed` (trained or resumed here), from its sources' runs of
        the same seed (a world of its own) or of seed 0."""
        if (row, seed) not in runs:
            path = out / row / f"seed{seed}"
            source_seed = seed if world.own_seed_sources else 0
            extra = _extra(row, s["extra"]) + [f"roles.{role}.init={run_of(source, source_seed)}"
                                               for role, source in row_sources(row).items()]
            _train(row, path, seed, extra, task["cap"])
            runs[row, seed] = path
        return runs[row, seed]

    rows: dict[str, dict[str, list[dict]]] = {}
    exposure: dict[str, list[dict]] = {}
    for row in task["rows_wanted"]:
        for seed in task["seeds"]:
            run = run_of(row, seed)
            for name, (plan, length) in _variants(row, frames, s["long_factor"], task["window"], task["sink"]).items():
                folder = out / row / f"seed{seed}" / "videos" / name.replace(" ", "_").replace("+", "_")
                generate_stage(run, folder, prompts, names=names, plan=plan, frames=length, batch=GENERATE_BATCH)
                result = toybench_stage(folder, bucket_frames=frames)
                rows.setdefault(row, {}).setdefault(name, []).append(_seed_record(result, seed))
            if world.exposure and _exposure_row(row):
                exposure.setdefault(row, []).append(
                    _exposure_stage(run, out / row / f"seed{seed}" / "exposure", s["exposure"],
                                    exposure_cache(row, task["window"], task["sink"]), seed))
    return {"rows": rows, "exposure": exposure}


def _seed_record(result: dict, seed: int) -> dict:
    """One seed's numbers of a variant: the aggregates, the speed, the adherence slope, and each
    metric per video (by file name, for the paired differences)."""
    per_video = {v["video"]: {m: v["scores"].get(m) for m in METRICS} for v in result.get("videos", [])}
    return {"seed": seed, **{m: result["aggregate"].get(m) for m in METRICS}, "speed_fps": result.get("speed_fps"),
            "adherence_slope": result.get("slopes", {}).get("adherence"),
            "background_slope": result.get("slopes", {}).get("background"), "videos": per_video}


def _exposure_row(row: str) -> bool:
    """Exposure is measured for chunk-wise students (eval/exposure.py's plan)."""
    from .models.plans import Chunkwise

    return isinstance(sampling_plan(row), Chunkwise)


def exposure_cache(row: str, window: int, sink: int) -> tuple[int, int]:
    """(window, sink) the row's exposure is measured with: the ones it was trained with, else the
    study's (a row trained on the full clip: at the training length they are the same)."""
    algo = row_config(row).algo
    trained = getattr(algo, "window_frames", None)
    return (trained, getattr(algo, "sink_frames", 0) or 0) if trained else (window, sink)


def _exposure_stage(run: Path, folder: Path, protocol: dict, cache: tuple[int, int], seed: int) -> dict:
    """eval/exposure.py on one run with cache (window, sink) (kept when measured before): the
    gap's level and slope per metric, and each scene's gap level (for the paired differences)."""
    from .eval.exposure import RESULT_NAME, first_scored, run_exposure

    kept = folder / RESULT_NAME
    if kept.exists():
        result = json.loads(kept.read_text())
    else:
        result = run_exposure(run, folder, scenes=protocol["scenes"], chunks=protocol["chunks"],
                              window_frames=cache[0], sink_frames=cache[1], prefix=protocol["prefix"],
                              batch=GENERATE_BATCH)
    first = first_scored(protocol["prefix"])
    per_scene = {m: [_mean(sc[first:]) - _mean(tf[first:]) for sc, tf in
                     zip(result["per_scene"]["self_conditioned"][m], result["per_scene"]["teacher_forced"][m])]
                 for m in result["metrics"]}
    self_level = {m: _mean([_mean(sc[first:]) for sc in result["per_scene"]["self_conditioned"][m]])
                  for m in result["metrics"]}
    return {"seed": seed, "window": cache[0], "sink": cache[1], "gap": {m: {k: g[k] for k in ("mean", "mean_ci95", "slope", "slope_ci95")}
                                  for m, g in result["gap"].items()},
            "self_conditioned": self_level, "per_scene_gap": per_scene}


def _train(row: str, out: Path, seed: int, overrides: list[str], cap: int | None = None) -> None:
    """Train (or resume) one run of the row's toy config; cap: at most this many steps."""
    train_stage(TOY_CONFIGS / f"{row}.yaml", out, overrides + [f"seed={seed}", "logging.wandb=disabled"], cap)


def trained_attention(row: str) -> str:
    """What the row's generator attended to in training: its config's window and sink, or the
    full clip (which, at the training length, every long-rollout cache of the study also covers)."""
    algo = row_config(row).algo
    window, sink = getattr(algo, "window_frames", None), getattr(algo, "sink_frames", None)
    if window:
        return f"window {window}" + (f" + sink {sink}" if sink else "")
    return "full clip"


def _variants(row: str, frames: int, long_factor: int, window: int, sink: int) -> dict:
    """rollout name -> (plan, video frames): the row's own sampling plan (from its toy config)
    at the training length, and for a causal student long_factor times it with sink + window,
    with a window of the same budget and no sink, and with the full cache; a many-step causal
    row also at STUDENT_STEPS steps (1x and sink + window)."""
    plan = sampling_plan(row)
    variants = {"1x": (plan, frames)}
    if isinstance(plan, CausalPlan):
        long = frames * long_factor
        caches = {"sink+window": (window, sink), "window": (window + sink, 0), "full cache": (0, 0)}
        for name, (w, k) in caches.items():
            variants[f"{long_factor}x {name}"] = (replace(plan, window_frames=w, sink_frames=k), long)
        algo = row_config(row).algo
        if len(plan.timesteps) > STUDENT_STEPS and hasattr(algo, "sample_steps"):
            few = sampling_plan(row, (f"algo.sample_steps={STUDENT_STEPS}",))
            variants[f"1x {STUDENT_STEPS} steps"] = (few, frames)
            variants[f"{long_factor}x sink+window {STUDENT_STEPS} steps"] = (
                replace(few, window_frames=window, sink_frames=sink), long)
    return variants


def summarize(rows: dict, seeds: int) -> dict:
    """row -> variant -> metric -> {mean, std, n} over seeds."""
    out = {}
    for recipe, variants in rows.items():
        for name, runs in variants.items():
            cell = out.setdefault(recipe, {}).setdefault(name, {})
            for m in METRICS + ("speed_fps", "adherence_slope", "background_slope"):
                values = [r[m] for r in runs if isinstance(r.get(m), (int, float)) and not math.isnan(r[m])]
                sp = spread(values) if values else {"mean": math.nan, "std": math.nan}
                cell[m] = {"mean": sp["mean"], "std": sp.get("std", math.nan), "n": len(values)}
    return out


def markdown(record: dict) -> str:
    from .study_claims import claims_markdown, exposure_markdown

    cols = METRICS + ("adherence_slope", "background_slope", "speed_fps")
    lines = [f"| row | trained with | rollout | {' | '.join(cols)} |", "|---|---|---|" + "---|" * len(cols)]
    for recipe, variants in record["table"].items():
        for name, cell in variants.items():
            vals = []
            for m in cols:
                mean, std = cell[m]["mean"], cell[m]["std"]
                vals.append("-" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}" if cell[m]["n"] > 1 else f"{mean:.3f}")
            lines.append(f"| {recipe} | {record['trained_attention'].get(recipe, '')} | {name} | {' | '.join(vals)} |")
    head = (f"ToyBench, {record.get('world', 'plain')} world, over {record['seeds']} seed(s), {record['prompts']} "
            f"held-out prompts, training length {record['training_frames']} frames; long rollouts "
            f"{record['long_factor']}x with window {record['window']} + sink {record['sink']} latent frames, a window "
            f"of {record['window'] + record['sink']} and no sink, or the full cache (mean ± std over seeds)")
    parts = [head, "\n".join(lines)]
    if record.get("exposure"):
        parts.append(exposure_markdown(record))
    if record.get("claims"):
        parts.append(claims_markdown(record))
    return "\n\n".join(parts)
