"""The training config: one strict schema for every recipe (train/ and distill/).

    cfg = load_train_config(["configs/toy/teacher.yaml"], ["max_steps=6", "output_dir=runs/a"])

Top-level keys hold the infrastructure (output_dir, seed, max_steps, precision, checkpoints,
logging, data); `roles.<name>` configures each model the recipe uses (generator, critic,
teacher); `algo` holds the recipe's own options, whose schema is the recipe's `Options`
dataclass - chosen by `recipe`, so a typo there is an error naming the key like anywhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf

from ..config import load_config
from ..errors import ConfigError
from ..validate import choice, non_negative_float, non_negative_int, optional, positive_float, positive_int

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("no", "bf16")   # fp16 would need loss scaling; bf16 does not
WANDB_MODES = ("offline", "online", "disabled")
PARALLEL = ("auto", "ddp", "fsdp", "zero2", "zero3")   # see train/parallel.py


@dataclass
class RoleConfig:
    """One model of the recipe: where its weights come from and how it is optimised."""
    init: str | None = None             # weights: a DiT dir (Wan/diffusers), a forcelab run or checkpoint; None = random
    init_role: str | None = None        # which role of a forcelab run to take (default: this role's name)
    preset: str | None = None           # architecture for random init (default: model_preset)
    trainable: bool | None = None       # None = the recipe's default for this role
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    lr_schedule: str = "constant"       # constant (after warmup) | cosine (to min_lr_ratio * lr at max_steps)
    warmup_steps: int = 0               # linear warmup over this many of the role's updates
    min_lr_ratio: float = 0.0           # cosine floor as a fraction of lr
    update_every: int = 1               # update on steps where step % update_every == 0 (critic 1, generator 5)
    grad_clip: float | None = None      # max global grad norm (None = no clipping)
    ema_decay: float | None = None      # keep an EMA of the weights (None = no EMA)
    ema_start: int = 0                  # first step that updates the EMA (copied from the weights then)
    dtype: str | None = None            # frozen roles: weight dtype (bf16 halves a frozen teacher's memory)
    gradient_checkpointing: bool = False  # recompute each block in backward (saves activation memory)


@dataclass
class DataConfig:
    source: str = "toyworld"            # toyworld | a shard folder/manifest | a prompt file | an ODE-pair folder
    batch_size: int = 1                 # per device, per micro-step
    num_workers: int = 0                # DataLoader workers for shard sources
    frames: int | None = None           # toy world: video frames per clip (None: the world's default)
    shuffle: int = 1000                 # shard sources: shuffle buffer
    height: int = 32                    # toy world frame size in pixels
    width: int = 32


@dataclass
class CheckpointConfig:
    every: int = 500                    # save every N steps (and at the end); 0 = only at the end
    keep_last: int = 3                  # keep the newest K checkpoints (older ones forcelab wrote are removed)


@dataclass
class LogConfig:
    every: int = 10                     # console / JSONL metrics every N steps
    wandb: str = "offline"              # offline | online | disabled (WANDB_MODE overrides)
    project: str = "forcelab"
    sample_every: int = 0               # write sample videos every N steps (0 = never)
    sample_prompts: list[str] = field(default_factory=list)   # default: a few toy captions / dataset captions
    progress: bool = True               # tqdm bar on rank 0


@dataclass
class TrainConfig:
    recipe: str = "teacher"             # which recipe (see forcelab.train.recipe.RECIPES)
    output_dir: str = "runs/run"        # the run folder: checkpoints, metrics.jsonl, samples, config.yaml
    seed: int = 0
    max_steps: int = 1000
    gradient_accumulation_steps: int = 1    # global batch = batch_size x processes x this
    mixed_precision: str = "no"         # no | bf16 (autocast; weights and optimizer stay fp32)
    max_nonfinite_steps: int = 10       # abort after this many non-finite losses/gradients in a row
    model_preset: str = "toy"           # architecture of randomly initialised roles
    model_overrides: dict[str, Any] = field(default_factory=dict)   # DiTConfig fields (chunk_frames, ...)
    vae: str = "toy"                    # "toy" or a local diffusers VAE directory
    text_encoder: str = "toy"           # "toy" or a local umT5 directory
    negative_prompt: str = ""           # the unconditional prompt (CFG dropout, CFG at sampling)
    threads: int | None = None          # CPU threads per process (None: 1 per process when several share a CPU)
    parallel: str = "auto"              # auto (from the accelerate launch config) | ddp | fsdp | zero2 | zero3
    data: DataConfig = field(default_factory=DataConfig)
    roles: dict[str, RoleConfig] = field(default_factory=dict)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LogConfig = field(default_factory=LogConfig)


def _peek_recipe(files: list[Path], overrides: list[str]) -> str:
    """The `recipe` key of the composed files and overrides (the last one set wins)."""
    from ..config import _read_yaml

    name = TrainConfig.recipe
    for f in files:
        for _, node in _read_yaml(Path(f)):
            if "recipe" in node:
                name = node["recipe"]
    for item in overrides:
        if item.startswith("recipe="):
            name = item.split("=", 1)[1]
    return str(name)


def schema_for(recipe_name: str) -> type:
    """TrainConfig with `algo` typed as the recipe's Options dataclass."""
    from .recipe import recipe_class

    options = recipe_class(recipe_name).Options
    return dataclasses.make_dataclass(
        "Config", [("algo", options, field(default_factory=options))], bases=(TrainConfig,))


def load_train_config(files: Iterable[str | Path] = (), overrides: Iterable[str] = ()):
    """Compose YAML files and key=value overrides into the recipe's config (validated)."""
    files, overrides = [Path(f) for f in files], list(overrides)
    cfg = load_config(schema_for(_peek_recipe(files, overrides)), files, overrides)
    check_train_config(cfg)
    return cfg


def check_train_config(cfg) -> None:
    """Numbers and names the schema's types do not catch, each named by its key (with the
    project's boundary validators, forcelab.validate)."""
    for key, value in (("max_steps", cfg.max_steps), ("gradient_accumulation_steps", cfg.gradient_accumulation_steps),
                       ("max_nonfinite_steps", cfg.max_nonfinite_steps), ("data.batch_size", cfg.data.batch_size),
                       ("checkpoint.keep_last", cfg.checkpoint.keep_last), ("logging.every", cfg.logging.every),
                       ("threads", cfg.threads), ("data.frames", cfg.data.frames)):
        optional(positive_int)(value, key)
    for key, value in (("data.num_workers", cfg.data.num_workers), ("checkpoint.every", cfg.checkpoint.every),
                       ("logging.sample_every", cfg.logging.sample_every)):
        non_negative_int(value, key)
    choice(cfg.mixed_precision, "mixed_precision", PRECISIONS)
    choice(cfg.parallel, "parallel", PARALLEL)
    choice(cfg.logging.wandb, "logging.wandb", WANDB_MODES)
    for name, role in cfg.roles.items():
        key = f"roles.{name}"
        non_negative_float(role.lr, f"{key}.lr")
        choice(role.lr_schedule, f"{key}.lr_schedule", LR_SCHEDULES)
        non_negative_int(role.warmup_steps, f"{key}.warmup_steps")
        positive_int(role.update_every, f"{key}.update_every")
        non_negative_int(role.ema_start, f"{key}.ema_start")
        optional(positive_float)(role.grad_clip, f"{key}.grad_clip")
        if role.ema_decay is not None and not 0.0 <= role.ema_decay < 1.0:
            raise ConfigError(f"{key}.ema_decay must be in [0, 1), got {role.ema_decay}")
        if not all(0.0 <= b < 1.0 for b in role.betas):
            raise ConfigError(f"{key}.betas must each be in [0, 1), got {list(role.betas)}")


def config_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
