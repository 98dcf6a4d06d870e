"""A recipe states an algorithm only: which roles it trains, what data it reads, and how a
batch becomes a loss for each role. The Trainer (train/trainer.py) holds everything else.

    class MyRecipe(Recipe):
        name = "my_recipe"
        roles = {"generator": RoleSpec()}                   # update order; trainable by default
        data = "latents"                                    # latents | prompts | ode_pairs
        @dataclass
        class Options: guidance: float = 4.0                 # the config's `algo:` section
        def loss(self, role, batch, ctx): ...               # -> (scalar loss, {name: float})

`ctx` (StepContext) gives the step, the micro-step and reproducible randomness tied to each
sample's global position (so a run does not depend on how samples are spread over
processes and accumulation steps). The trainer's models: `self.trainer.model(role)`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

# recipe name -> "module:Class". Imported only when chosen.
RECIPES: dict[str, str] = {
    "teacher": "forcelab.train.teacher:TeacherRecipe",
    "diffusion_forcing": "forcelab.train.diffusion_forcing:DiffusionForcingRecipe",
    "ar_diffusion": "forcelab.train.ar_diffusion:ARDiffusionRecipe",
    "ode_init": "forcelab.distill.ode_init:ODEInitRecipe",
    "causvid": "forcelab.distill.causvid:CausVidRecipe",
    "self_forcing": "forcelab.distill.self_forcing:SelfForcingRecipe",
    "rolling_forcing": "forcelab.distill.rolling_forcing:RollingForcingRecipe",
    "streaming_long": "forcelab.distill.streaming_long:StreamingLongRecipe",
    "self_forcing_pp": "forcelab.distill.self_forcing_pp:SelfForcingPPRecipe",
}
DATA_KINDS = ("latents", "prompts", "ode_pairs")


def recipe_class(name: str) -> type["Recipe"]:
    if name not in RECIPES:
        raise ConfigError(f"recipe: unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    module, cls = RECIPES[name].split(":")
    return getattr(importlib.import_module(module), cls)


@dataclass
class RoleSpec:
    """A role's defaults: trainable or frozen, causal (student) or bidirectional."""
    trainable: bool = True
    causal: bool = False
    init_from: str | None = None      # default weights: another role's init (critic <- teacher)


@dataclass
class NoOptions:
    pass


_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93)
_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, position, draw ...): distinct parts, distinct streams."""
    key = 0
    for i, p in enumerate(parts):
        key = (key ^ (int(p) * _MIX[i % len(_MIX)] + i)) * _MIX[(i + 1) % len(_MIX)] & _MASK
    return key


@dataclass
class StepContext:
    """Per-micro-batch context: step index, micro-step, and per-sample randomness."""
    step: int
    micro: int
    seed: int
    positions: list[int]                 # global sample positions of this rank's batch
    device: torch.device
    role: str = ""
    _gen: torch.Generator = field(default=None, repr=False)

    def _generator(self, *parts: int) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator()
        self._gen.manual_seed(mix_seed(self.seed, *parts))
        return self._gen

    def sample_generator(self, i: int, draw: int) -> torch.Generator:
        """A fresh generator for sample i's draw (for samplers that take a generator)."""
        return torch.Generator().manual_seed(mix_seed(self.seed, self.positions[i], draw))

    def per_sample(self, draw: int, fn, *args, **kwargs) -> torch.Tensor:
        """fn(1, *args, generator=g_i, **kwargs) for each sample i with its own generator (a draw
        from forcelab.train.timesteps), concatenated along the batch."""
        return torch.cat([fn(1, *args, generator=self.sample_generator(i, draw), **kwargs)
                          for i in range(len(self.positions))]).to(self.device)

    def normal(self, shape, draw: int) -> torch.Tensor:
        """Gaussian [B, *shape]: sample i's draw depends only on (seed, position_i, draw)."""
        out = torch.stack([torch.randn(shape, generator=self._generator(p, draw)) for p in self.positions])
        return out.to(self.device)

    def uniform(self, shape, draw: int) -> torch.Tensor:
        """U[0, 1) [B, *shape], per sample like normal()."""
        out = torch.stack([torch.rand(shape, generator=self._generator(p, draw)) for p in self.positions])
        return out.to(self.device)

    def shared_int(self, high: int, draw: int) -> int:
        """An integer in [0, high) that is the same on every rank (depends on step, micro, draw)."""
        return int(torch.randint(high, (), generator=self._generator(-1, self.step, self.micro, draw)))


class Recipe:
    name = ""
    roles: dict[str, RoleSpec] = {"generator": RoleSpec()}
    data = "latents"
    Options = NoOptions

    def __init__(self, cfg, trainer):
        self.cfg, self.opt, self.trainer = cfg, cfg.algo, trainer

    def data_kind(self) -> str:
        """What the default stream reads: latents | prompts | ode_pairs (see train/data.py)."""
        return self.data

    def make_stream(self):
        """A custom data stream (an object with batch(positions) -> batch dict), or None for
        the default one built from cfg.data for data_kind(). Called after the roles exist."""
        return None

    @classmethod
    def prepare_role(cls, cfg, role) -> None:
        """Adapt a freshly built role before its optimizer exists (e.g. add LoRA adapters and
        leave only them trainable, updating role.params). Called on every start and resume."""

    def setup(self) -> None:
        """Called once the models, encoders and data exist (e.g. prepare a teacher's outputs)."""

    def loss(self, role: str, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, context: torch.Tensor, seeds: list[int], frames: int) -> torch.Tensor:
        """Latents [B, C, F, H, W] from the generator (EMA when kept) for sample videos."""
        raise NotImplementedError

    @torch.no_grad()
    def sample_with(self, plan, context: torch.Tensor, seeds: list[int], frames: int, unit: int = 1,
                    **kwargs) -> torch.Tensor:
        """The generator's (EMA when kept) latents [B, C, F, H, W] under `plan` through the
        rollout engine: noise from `seeds`, frames rounded up to whole units (chunks)."""
        from ..models.rollout import Noise, rollout

        model = self.trainer.sampling_module("generator")
        noise = Noise(seeds, model.config.in_channels, *self.latent_hw, device=context.device)
        return rollout(model, plan, context, noise, -(-frames // unit) * unit, **kwargs).x0

    # ------------------------------------------------------------------ shared pieces
    @property
    def latent_hw(self) -> tuple[int, int]:
        """Latent height and width of the configured video size under the run's codec."""
        stride = self.trainer.codec.spatial_stride
        return self.cfg.data.height // stride, self.cfg.data.width // stride

    def drop_captions(self, context: torch.Tensor, ctx: StepContext, prob: float, draw: int = 2) -> torch.Tensor:
        """Caption dropout for classifier-free guidance: each sample's prompt embedding
        [B, L, D] becomes the negative prompt's with probability prob (per sample, reproducible)."""
        if prob <= 0:
            return context
        drop = ctx.uniform((), draw=draw) < prob
        negative = self.trainer.negative.expand(context.shape[0], -1, -1)
        return torch.where(drop[:, None, None], negative, context)

    # state that must survive a resume besides weights/optimizers/RNG (per rank)
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
