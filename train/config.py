"""The training config: one strict schema for every recipe (train/ and distill/).

    cfg = load_train_config(["configs/toy/teacher.yaml"], ["max_steps=6", "output_dir=runs/a"])

Top-level keys hold the infrastructure (output_dir, seed, max_steps, precision, checkpoints,
logging, data); `roles.<name>` configures each model the recipe uses (generator, critic,
teacher); `algo` holds the recipe's own options, whose schema is the recipe's `Options`
dataclass - chosen by `recipe`, so a typo there is an error naming the key like anywhere else.
Each setting's rule is declared beside it (`setting(default, check)`, forcelab.validate) and
load_train_config applies them all - with the recipe's cross-field rules (`Options.check`,
given the student's architecture as far as the config fixes it) - before a model is built or
a folder written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf

from ..config import holds_settings, load_config
from ..dtypes import DTYPE_NAMES
from ..errors import ConfigError, ForcelabError
from ..models.config import PRESETS, DiTConfig
from ..data.shards import ON_DAMAGE
from ..validate import (check_settings, choice, decay, each, fits_memory, non_negative_float, non_negative_int,
                        optional, positive_float, positive_int, setting, unit_interval)
from ..validate import seed as random_seed

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("no", "bf16")   # fp16 would need loss scaling; bf16 does not
WANDB_MODES = ("offline", "online", "disabled")
RGB, FLOAT_BYTES = 3, 4       # a clip in pixels as the data stream holds it
PARALLEL = ("auto", "ddp", "fsdp", "zero2", "zero3")   # see train/parallel.py
CHECKPOINT_FORMATS = ("auto", "full", "sharded")   # see train/checkpoint.py


@dataclass
class RoleConfig:
    """One model of the recipe: where its weights come from and how it is optimised."""
    init: str | None = None             # weights: a DiT dir (Wan/diffusers), a forcelab run or checkpoint; None = random
    init_role: str | None = None        # which role of a forcelab run to take (default: this role's name)
    preset: str | None = setting(None, optional(choice), PRESETS)   # random init's architecture (None: model_preset)
    trainable: bool | None = None       # None = the recipe's default for this role
    lr: float = setting(1e-4, non_negative_float)
    betas: tuple[float, float] = setting((0.9, 0.999), each(decay))
    weight_decay: float = setting(0.0, non_negative_float)
    eps: float = setting(1e-8, positive_float)
    lr_schedule: str = setting("constant", choice, LR_SCHEDULES)   # constant | cosine (to min_lr_ratio * lr), after warmup
    warmup_steps: int = setting(0, non_negative_int)  # linear warmup over this many of the role's updates
    min_lr_ratio: float = setting(0.0, unit_interval)  # cosine floor as a fraction of lr
    update_every: int = setting(1, positive_int)      # update when step % update_every == 0 (critic 1, generator 5)
    grad_clip: float | None = setting(None, optional(positive_float))   # max global grad norm (None: no clipping)
    ema_decay: float | None = setting(None, optional(decay))   # keep an EMA of the weights (None: no EMA)
    ema_start: int = setting(0, non_negative_int)     # first step that updates the EMA (copied from the weights then)
    dtype: str | None = setting(None, optional(choice), DTYPE_NAMES)   # frozen roles: weight dtype (bf16: half the memory)
    gradient_checkpointing: bool = False  # recompute each block in backward (saves activation memory)


@dataclass
class DataConfig:
    source: str = "toyworld"            # toyworld | a shard folder/manifest | a prompt file | an ODE-pair folder
    batch_size: int = setting(1, positive_int)      # per device, per micro-step
    num_workers: int = setting(0, non_negative_int)  # DataLoader workers for shard sources
    frames: int | None = setting(None, optional(positive_int))   # toy world: frames per clip (None: the world's default)
    shuffle: int = setting(1000, non_negative_int)  # shard sources: shuffle buffer (0: read in order)
    height: int = setting(32, positive_int)         # toy world frame size in pixels
    width: int = setting(32, positive_int)
    background_texture: float = setting(0.0, non_negative_float)   # toy world: per-scene background texture amplitude (0: plain)
    on_damage: str = setting("stop", choice, ON_DAMAGE)   # a sample whose checksum fails: stop, or skip and record it


@dataclass
class CheckpointConfig:
    every: int = setting(500, non_negative_int)     # save every N steps (and at the end); 0 = only at the end
    keep_last: int = setting(3, positive_int)       # keep the newest K checkpoints (older ones forcelab wrote go)
    # full: DiT directories (gathered to rank 0); sharded: each rank writes its shards
    # (FSDP: torch.distributed.checkpoint; ZeRO-3: its partitions); auto: sharded under FSDP
    # and ZeRO-3, else full
    format: str = setting("auto", choice, CHECKPOINT_FORMATS)


@dataclass
class LogConfig:
    every: int = setting(10, positive_int)          # console / JSONL metrics every N steps
    wandb: str = setting("offline", choice, WANDB_MODES)   # offline | online | disabled (WANDB_MODE overrides)
    project: str = "forcelab"
    sample_every: int = setting(0, non_negative_int)   # write sample videos every N steps (0 = never)
    sample_prompts: list[str] = field(default_factory=list)   # default: a few toy captions / dataset captions
    progress: bool = True               # progress on rank 0: a bar on a terminal, lines every 10% in logs
    tensorboard: bool = False           # also write TensorBoard event files to run_dir/tensorboard (pip install tensorboard)


@dataclass
class TrainConfig:
    recipe: str = "teacher"             # which recipe (forcelab.train.recipe.recipe_names())
    output_dir: str = "runs/run"        # the run folder: checkpoints, metrics.jsonl, samples, config.yaml
    seed: int = setting(0, random_seed)   # 63-bit
    max_steps: int = setting(1000, positive_int)
    gradient_accumulation_steps: int = setting(1, positive_int)   # global batch = batch_size x processes x this
    mixed_precision: str = setting("no", choice, PRECISIONS)   # no | bf16 (autocast; weights, optimizer stay fp32)
    # FSDP with mixed_precision bf16: all-gather and compute with bf16 copies of the trainable
    # roles' parameters, reduce gradients in fp32 (shards and optimizer stay fp32)
    fsdp_bf16_params: bool = False
    max_nonfinite_steps: int = setting(10, positive_int)   # abort after this many non-finite steps in a row
    model_preset: str = setting("toy", choice, PRESETS)   # architecture of randomly initialised roles
    model_overrides: dict[str, Any] = field(default_factory=dict)   # DiTConfig fields (chunk_frames, ...)
    vae: str = "toy"                    # "toy" or a local diffusers VAE directory
    text_encoder: str = "toy"           # "toy" or a local umT5 directory
    negative_prompt: str = ""           # the unconditional prompt (CFG dropout, CFG at sampling)
    threads: int | None = setting(None, optional(positive_int))   # CPU threads per process (None: 1 on a CPU device)
    parallel: str = setting("auto", choice, PARALLEL)   # auto (the accelerate launch config) | ddp | fsdp | zero2 | zero3
    data: DataConfig = field(default_factory=DataConfig)
    roles: dict[str, RoleConfig] = field(default_factory=dict)
    # chained pipelines (the ToyBench study): role -> the toy config whose seed-0 run gives the role
    # its weights, over the recipe's own Recipe.starts_from (e.g. {teacher: teacher_forcing}); training ignores it
    starts_from: dict[str, str] = field(default_factory=dict)
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
        if item.lstrip("+").startswith("recipe="):
            name = item.split("=", 1)[1]
        elif item == "~recipe":
            name = TrainConfig.recipe
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
    for f in files:     # an empty training config is a mistake (a wrong file), never "train on the defaults"
        if not holds_settings(f):
            raise ConfigError(f"config {f.expanduser().resolve()}: holds no settings (empty, or comments only); a "
                              f"training config names at least its recipe (recipe: NAME)")
    cfg = load_config(schema_for(_peek_recipe(files, overrides)), files, overrides)
    check_train_config(cfg)
    return cfg


def check_train_config(cfg) -> None:
    """Every setting checked before anything is built or written: each field's rule (declared
    beside it with forcelab.validate.setting; every number finite), the role names against
    the recipe's, model_overrides against the DiT's fields, then the recipe's own cross-field
    rules (`algo.check(model)`, model: the student's DiTConfig when the config or its init
    weights fix it)."""
    from .recipe import recipe_class

    with config_errors():
        check_settings(cfg)
        check_batch_fits(cfg.data)
    if cfg.fsdp_bf16_params and cfg.mixed_precision != "bf16":
        raise ConfigError("fsdp_bf16_params: bf16 parameters in compute belong to a bf16 run; set "
                          "mixed_precision=bf16 (or fsdp_bf16_params=false)")
    roles = recipe_class(cfg.recipe).roles
    unknown = sorted(set(cfg.roles) - set(roles))
    if unknown:
        raise ConfigError(f"roles: recipe '{cfg.recipe}' has no role(s) {unknown}; its roles are {list(roles)}")
    unknown = sorted(set(cfg.starts_from) - set(roles))
    if unknown:
        raise ConfigError(f"starts_from: recipe '{cfg.recipe}' has no role(s) {unknown}; its roles are {list(roles)}")
    check_options(getattr(cfg, "algo", None), check_model(cfg))


def check_batch_fits(data: DataConfig) -> None:
    """A micro-batch of clips as float pixels (a lower bound of what a step holds) must fit in
    the machine's memory: data.batch_size=1e8 is refused here, not after the run folder exists."""
    frames = data.frames or 1
    fits_memory(data.batch_size * frames * RGB * data.height * data.width * FLOAT_BYTES, "cpu",
                f"data.batch_size {data.batch_size} x data.frames {frames} x {data.height}x{data.width} pixels",
                "lower data.batch_size (or the clip size)")


def check_options(options, model: DiTConfig | None = None) -> None:
    """The recipe's rules across its options (`Options.check(model)`, if it has one), as
    ConfigErrors. model: the student's architecture (DiTConfig: chunk_frames, window_frames,
    sink_frames ...), None when the config cannot tell it (weights that cannot be read yet)."""
    check = getattr(options, "check", None)
    if check is None:
        return
    with config_errors():
        check(model)


@contextlib.contextmanager
def config_errors():
    """A validator's ForcelabError becomes a ConfigError (the CLI's one line, exit 2)."""
    try:
        yield
    except ConfigError:
        raise
    except ForcelabError as e:
        raise ConfigError(str(e)) from None


_DIT = "DiTConfig: "     # how DiTConfig's errors start


def check_model(cfg) -> DiTConfig | None:
    """Check model_overrides (known DiTConfig fields; values as DiTConfig checks them) and
    return the student's (generator's) architecture as far as the config fixes it: its
    preset with the overrides when every role is built at random; else its init weights'
    config with the runtime overrides (read, not loaded); else (weights not readable now) the
    preset with the overrides when chunk_frames is set there, or None."""
    from .roles import RUNTIME_FIELDS     # (roles imports this module)

    fields = list(DiTConfig.__dataclass_fields__)
    for key in cfg.model_overrides:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"the fields are {', '.join(fields)}"
            raise ConfigError(f"model_overrides.{key}: not a setting of the model; {hint}")
    random = not any(role.init for role in cfg.roles.values())
    # with weights, only the runtime fields apply as given (the rest must match the weights)
    given = {k: v for k, v in cfg.model_overrides.items() if random or k in RUNTIME_FIELDS}
    generator = cfg.roles.get("generator")
    student = (generator.preset if generator is not None else None) or cfg.model_preset
    presets = {cfg.model_preset, student, *(r.preset for r in cfg.roles.values() if r.preset)}
    try:
        configs = {name: DiTConfig.preset(name, **given) for name in sorted(presets)}
    except ForcelabError as e:     # DiTConfig names its field: name the config key instead
        text = str(e)
        raise ConfigError(f"model_overrides.{text[len(_DIT):]}" if text.startswith(_DIT)
                          else f"model_overrides: {text}") from None
    if random:
        return configs[student]
    return weights_config(cfg) or (configs[student] if "chunk_frames" in given else None)


def weights_config(cfg, role: str = "generator") -> DiTConfig | None:
    """The architecture a role's init weights give it (their config.json with the run's runtime
    overrides), or None when the role has no init or its weights cannot be read now (the
    trainer reports that when it builds the role)."""
    from .recipe import recipe_class
    from .roles import _checked_config, resolve_init

    try:
        weights, _ = resolve_init(cfg, recipe_class(cfg.recipe).roles, role)
        if weights is None:
            return None
        return _checked_config(role, weights, cfg.roles.get(role) or RoleConfig(), dict(cfg.model_overrides))
    except ForcelabError:
        return None


def config_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
