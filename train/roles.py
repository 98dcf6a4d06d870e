"""Roles: each model of a recipe (generator, critic, teacher) with its optimizer, LR schedule
and EMA. Weights come from a DiT directory (Wan or diffusers), from a forcelab run or one of
its checkpoints (weights only: never its optimizer, step or schedule), or a seeded random init.
"""

from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ..dtypes import parse_dtype
from ..errors import ConfigError, ForcelabError
from ..models.checkpoint import load_state_into, read_config
from ..models.config import DiTConfig
from ..models.dit import CausalDiT
from ..run_folder import resolve_weights
from .config import RoleConfig
from ..seeds import mix_seed
from .recipe import RoleSpec

@dataclass
class Role:
    name: str
    module: CausalDiT                   # the model itself
    trainable: bool
    causal: bool
    cfg: RoleConfig
    source: str                         # where the weights came from
    model: torch.nn.Module = None       # what recipes call (a distributed wrapper, or the module)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    ema: dict[str, torch.Tensor] | None = None
    updates: int = 0                    # optimizer steps taken
    params: list = field(default_factory=list)
    pending: Path | None = None         # weights not yet read: module built on the meta device

    def ema_module(self) -> SimpleNamespace:
        """An object save_pretrained's writer accepts: the config and the EMA state."""
        return weights_record(self.module.config, ema_state(self.module.state_dict(), self.ema))


def lr_factor(rcfg: RoleConfig, total_updates: int):
    """Multiplier of the base lr after k updates: linear warmup, then constant or cosine."""
    def factor(k: int) -> float:
        if rcfg.warmup_steps and k < rcfg.warmup_steps:
            return (k + 1) / rcfg.warmup_steps
        if rcfg.lr_schedule == "cosine":
            span = max(1, total_updates - rcfg.warmup_steps)
            progress = min(1.0, (k - rcfg.warmup_steps) / span)
            return rcfg.min_lr_ratio + (1 - rcfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0
    return factor


def init_setting(cfg, specs: dict[str, RoleSpec], name: str) -> tuple[str, RoleConfig] | None:
    """(the role whose `init` gives this role's weights, its settings): the role itself, or,
    when its init is unset, the role it starts from (RoleSpec.init_from: the critic from the
    teacher); None: a random init."""
    rcfg, source = cfg.roles.get(name), name
    if (rcfg is None or rcfg.init is None) and specs[name].init_from:
        source = specs[name].init_from
        rcfg = cfg.roles.get(source)
    if rcfg is None or rcfg.init is None:
        return None
    return source, rcfg


def resolve_init(cfg, specs: dict[str, RoleSpec], name: str) -> tuple[Path | None, str | None]:
    """(weights dir, the init as written) for a role; an error names the key the path was
    written under (roles.teacher.init for a generator that starts from the teacher)."""
    found = init_setting(cfg, specs, name)
    if found is None:
        return None, None
    source, rcfg = found
    try:
        return resolve_weights(rcfg.init, rcfg.init_role or source), rcfg.init
    except ForcelabError as e:
        used = "" if source == name else f" (the {name}'s weights as well)"
        raise ConfigError(f"roles.{source}.init{used}: {e}") from None


def build_role(name: str, spec: RoleSpec, cfg, index: int, device, weights: Path | None,
               init_source: str | None, defer_loading: bool = False) -> Role:
    """The role's model on `device`: from `weights` (a DiT dir) or a seeded random init.
    defer_loading: a role with weights is built on the meta device in its dtype and its weights
    are left to read (Role.pending): a sharded strategy reads each process's part of them
    (train/parallel.py), `load_pending` all of them."""
    rcfg = cfg.roles.get(name) or RoleConfig()
    trainable = spec.trainable if rcfg.trainable is None else rcfg.trainable
    overrides = dict(cfg.model_overrides)
    pending = None
    if weights is not None:
        dtype = None if trainable else parse_dtype(rcfg.dtype)
        config = _checked_config(name, weights, rcfg, overrides)
        if defer_loading:
            module, pending = meta_module(config, dtype or torch.float32), weights
        else:
            module = CausalDiT.from_pretrained(weights, config=config, device=device, dtype=dtype or torch.float32)
        source = init_source or str(weights)
    else:
        if not trainable:
            raise ConfigError(f"roles.{name}.init: the frozen {name} needs weights (a DiT directory or a "
                              f"forcelab run); a random frozen model teaches nothing")
        config = DiTConfig.preset(rcfg.preset or cfg.model_preset, **overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(cfg.seed, index, 0x5EED))   # the same weights on every rank
            module = CausalDiT(config)
        module = module.to(device)
        source = f"random:{config_name(rcfg, cfg)}"
    module.gradient_checkpointing = bool(rcfg.gradient_checkpointing) and trainable
    module.train(trainable).requires_grad_(trainable)
    return Role(name, module, trainable, spec.causal, rcfg, source, model=module,
                params=[p for p in module.parameters() if p.requires_grad], pending=pending)


def meta_module(config: DiTConfig, dtype: torch.dtype) -> CausalDiT:
    """A CausalDiT on the meta device (no memory) whose parameters have the dtypes loading gives
    them: dtype, `keeps_fp32` parameters fp32 (as CausalDiT.from_pretrained loads them)."""
    with torch.device("meta"):
        module = CausalDiT(config)
    return module.set_dtype(dtype).eval()


def load_pending(role: Role, device) -> None:
    """Read all of a deferred role's weights on this process (a strategy that does not shard it,
    or a recipe that changes the module before sharding, e.g. LoRA adapters); params are renewed."""
    if role.pending is None:
        return
    _, fmt = read_config(role.pending)
    load_state_into(role.module, role.pending, fmt, device=device)
    role.pending = None
    role.params = [p for p in role.module.parameters() if p.requires_grad]


RUNTIME_FIELDS = {"chunk_frames", "window_frames", "sink_frames", "sink_rope", "attention_backend", "rope_max_len"}


def _checked_config(name: str, weights: Path, rcfg: RoleConfig, overrides: dict) -> DiTConfig:
    """The loaded role's config: the weights' own architecture with the run's runtime fields.
    An architecture the config asks for explicitly (roles.X.preset, model_overrides) must match."""
    file_config, _ = read_config(weights)
    wanted = dict(DiTConfig.preset(rcfg.preset).__dict__) if rcfg.preset else {}
    wanted.update(overrides)
    clash = [f"{k}: weights {getattr(file_config, k)!r}, config {v!r}" for k, v in wanted.items()
             if k not in RUNTIME_FIELDS and k in DiTConfig.__dataclass_fields__
             and _norm(getattr(file_config, k)) != _norm(v)]
    if clash:
        raise ConfigError(f"roles.{name}.init: {weights} is a model of another size ({'; '.join(clash)}); "
                          f"use weights of the configured architecture or drop the preset/overrides")
    return file_config.replace(**{k: v for k, v in overrides.items() if k in RUNTIME_FIELDS})


def _norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def config_name(rcfg: RoleConfig, cfg) -> str:
    return rcfg.preset or cfg.model_preset


def fused_adam(params) -> bool:
    """torch's fused AdamW (one kernel for all parameters, step counts kept on the device: no
    host read per parameter) where it serves the parameters: floating, on CPU or CUDA."""
    return all(p.is_floating_point() and p.device.type in FUSED_ADAM_DEVICES for p in params)


FUSED_ADAM_DEVICES = ("cpu", "cuda")


def make_optimizer(role: Role, max_steps: int) -> None:
    r = role.cfg
    role.optimizer = torch.optim.AdamW(role.params, lr=r.lr, betas=tuple(r.betas), eps=r.eps,
                                       weight_decay=r.weight_decay, fused=fused_adam(role.params))
    total = -(-max_steps // r.update_every)
    role.scheduler = torch.optim.lr_scheduler.LambdaLR(role.optimizer, lr_factor(r, total))


@torch.no_grad()
def update_ema(role: Role, step: int, params: dict[str, torch.Tensor] | None = None) -> None:
    """EMA of the weights from step ema_start on (initialised to the weights at that step).
    `params`: the tensors the EMA follows, by parameter name (default: the module's parameters;
    a sharded strategy hands the part of each that this process holds, and the EMA is that part)."""
    decay = role.cfg.ema_decay
    if decay is None or step < role.cfg.ema_start:
        return
    params = dict(role.module.named_parameters()) if params is None else params
    if role.ema is None:
        role.ema = {k: p.detach().float().clone() for k, p in params.items()}
        return
    for k, e in role.ema.items():
        e.lerp_(params[k].detach().float(), 1.0 - decay)


# ---------------------------------------------------------------------- the EMA as weights
def ema_state(state: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict with the EMA in place of the weights it keeps (buffers as they are)."""
    return {k: ema.get(k, v) for k, v in state.items()}


def weights_record(config, state: dict[str, torch.Tensor]) -> SimpleNamespace:
    """An object save_state writes: a config and a full state dict."""
    return SimpleNamespace(config=config, state_dict=lambda: state)


@torch.no_grad()
def ema_copy(module: torch.nn.Module, ema: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `module` (eval mode, same dtype and device) holding the EMA weights."""
    copy = deepcopy(module)
    for k, p in copy.named_parameters():
        p.copy_(ema[k])
    return copy.eval()


@torch.no_grad()
def plain_module(config: DiTConfig, state: dict[str, torch.Tensor], device) -> CausalDiT:
    """A plain CausalDiT (eval mode, on `device`) holding a full state dict: a sharded role's
    weights gathered for sampling."""
    module = CausalDiT(config)
    module.load_state_dict(state)
    return module.to(device).eval()
