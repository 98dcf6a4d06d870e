"""The stages shared by `forcelab demo` and the ToyBench study: train -> generate -> evaluate on
the toy world, each resumable (a run continues from its latest checkpoint, a finished video
set or score is kept).

    frames = training_frames()                                  # the toy teacher's clip length
    prompts = held_out_prompts(out / "prompts.txt", 32, frames) # written once, read back after
    state = train_stage(TOY_CONFIGS / "self_forcing.yaml", out / "sf", ["roles.teacher.init=..."])
    videos = generate_stage(out / "sf", out / "videos", prompts, plan=Chunkwise(...), frames=80)
    result = toybench_stage(out / "videos", bucket_frames=frames)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .fsio import write_text_atomic

TOY_CONFIGS = Path(__file__).resolve().parent / "configs" / "toy"
COMMITTED_TEACHER = TOY_CONFIGS / "teacher_checkpoint"   # what configs/toy/teacher.yaml makes with seed 0
TOYBENCH_RESULT = "toybench.json"


def training_frames() -> int:
    """The toy teacher's training length in video frames (configs/toy/teacher.yaml)."""
    from .train.config import load_train_config

    return load_train_config([TOY_CONFIGS / "teacher.yaml"]).data.frames


def sampling_plan(recipe: str, overrides: tuple[str, ...] = ()):
    """What the recipe samples with, from its toy config (configs/toy/<recipe>.yaml) with
    overrides (e.g. "algo.sample_steps=4")."""
    from .train.config import load_train_config
    from .train.recipe import recipe_class

    cfg = load_train_config([TOY_CONFIGS / f"{recipe}.yaml"], list(overrides))
    return recipe_class(cfg.recipe).sampling_plan(cfg.algo)


def held_out_prompts(path: Path, count: int, frames: int) -> list[str]:
    """Captions of `count` held-out toy scenes, written to `path` once (kept on a re-run)."""
    from .data.toyworld import HELD_OUT_SCENES, ToyWorld, ToyWorldConfig
    from .generate.prompts import read_prompt_lines

    if not path.exists():
        world = ToyWorld(ToyWorldConfig(frames=frames))
        write_text_atomic(path, "\n".join(world.scene(HELD_OUT_SCENES + i).caption for i in range(count)) + "\n")
    return read_prompt_lines(path, "prompts")


def train_stage(config: Path, out: Path, overrides: list[str], cap: int | None = None) -> dict:
    """Train (or resume) one run of a config; cap: at most this many steps. -> {"steps",
    "seconds", "resumed_at", role losses...}; steps == resumed_at when it had finished."""
    from .train.config import load_train_config
    from .train.trainer import Trainer

    overrides = overrides + [f"output_dir={out}"]
    if cap is not None:
        overrides.append(f"max_steps={min(cap, load_train_config([config], overrides).max_steps)}")
    trainer = Trainer(load_train_config([config], overrides), resume="latest")
    t0, start = time.perf_counter(), trainer.step
    trainer.run()
    latest = {k: v for k, (v, _) in trainer.log.latest.items()}   # every role's latest loss
    return {"steps": trainer.step, "seconds": time.perf_counter() - t0, "resumed_at": start, **latest}


def generate_stage(model: Path, out: Path, prompts: list[str], **options) -> list | None:
    """generate() the prompts into `out` (options: generate's); None when `out` already holds
    videos (a finished stage)."""
    from .generate import generate

    if out.is_dir() and any(out.glob("*.mp4")):
        return None
    return generate(model, prompts, output=out, progress=False, **options)


def toybench_stage(folder: Path, bucket_frames: int, progress: bool = False) -> dict:
    """ToyBench's result for a video set, scored once (kept in folder/toybench.json; scored again
    when the kept result predates one of ToyBench's metrics)."""
    from .eval.toybench import METRICS
    from .eval.toybench_run import run_toybench

    kept = folder / TOYBENCH_RESULT
    if kept.exists():
        result = json.loads(kept.read_text())
        if set(METRICS) <= set(result.get("metrics", ())):
            return result
    run_toybench(folder, bucket_frames=bucket_frames, report=False, progress=progress)
    return json.loads(kept.read_text())
