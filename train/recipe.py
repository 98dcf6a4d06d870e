"""A recipe states an algorithm only: which roles it trains, what data it reads, and how a
batch becomes a loss for each role. The Trainer (train/trainer.py) holds everything else.

    class MyRecipe(Recipe):
        name = "my_recipe"                                  # registers it: `recipe: my_recipe`
        roles = {"generator": RoleSpec()}                   # update order; trainable by default
        data = "latents"                                    # latents | prompts | ode_pairs
        @dataclass
        class Options: guidance: float = 4.0                 # the config's `algo:` section
        def loss(self, role, batch, ctx): ...               # -> (scalar loss, {name: 0-d tensor})

`ctx` (StepContext, train/step_context.py) gives the step, the micro-step and named random
streams tied to each sample's global position (`ctx.stream("noise").normal(shape)`), so a
run does not depend on how samples are spread over processes and accumulation steps. What
the recipe may use of the run (its models by role, the encoders, the negative prompt, rank and
world): `self.run` (RunContext, train/run_context.py); a recipe never sees the trainer.

A recipe registers itself by its `name` when its module is imported; `recipe_class(name)`
imports every module of the recipe packages (train/, distill/) once, so adding a recipe
touches only its own module, its toy config and its test.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .run_context import RunContext
from .step_context import StepContext
from .workload import ModelPass, Workload

DATA_KINDS = ("latents", "prompts", "ode_pairs")
RECIPE_PACKAGES = ("train", "distill")     # sub-packages of forcelab whose modules may define recipes
_SKIPPED = ("__main__",)                   # modules that run a command when imported
_REGISTRY: dict[str, type["Recipe"]] = {}
_discovered = False


def _discover() -> None:
    """Import every module of the recipe packages once: each Recipe subclass with a `name`
    registers itself (Recipe.__init_subclass__)."""
    global _discovered
    if _discovered:
        return
    root = __name__.rsplit(".", 2)[0]
    for package in RECIPE_PACKAGES:
        pkg = importlib.import_module(f"{root}.{package}")
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name not in _SKIPPED:
                importlib.import_module(f"{pkg.__name__}.{info.name}")
    _discovered = True


def recipe_names() -> list[str]:
    """The names of every recipe, sorted."""
    _discover()
    return sorted(_REGISTRY)


def recipe_class(name: str) -> type["Recipe"]:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"recipe: unknown recipe {name!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def _register(cls: type["Recipe"]) -> None:
    name = cls.__dict__.get("name")
    if not name:
        return          # a base class (no name of its own): not runnable
    other = _REGISTRY.get(name)
    if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"recipe name {name!r} of {cls.__module__}.{cls.__qualname__} is taken by "
                        f"{other.__module__}.{other.__qualname__}; give the recipe another name")
    _REGISTRY[name] = cls


@dataclass
class RoleSpec:
    """A role's defaults: trainable or frozen, causal (student) or bidirectional."""
    trainable: bool = True
    causal: bool = False
    init_from: str | None = None      # default weights: another role's init (critic <- teacher)


@dataclass
class NoOptions:
    pass


class Recipe:
    name = ""
    roles: dict[str, RoleSpec] = {"generator": RoleSpec()}
    data = "latents"
    Options = NoOptions
    # role -> the recipe whose trained run gives that role its weights when recipes are chained
    # (the ToyBench study, the demo): Self-Forcing's generator starts from an ODE-init run.
    starts_from: dict[str, str] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _register(cls)

    def __init__(self, cfg, run: RunContext):
        self.cfg, self.opt, self.run = cfg, cfg.algo, run

    def data_kind(self) -> str:
        """What the default stream reads: latents | prompts | ode_pairs (see train/data.py)."""
        return self.data

    def make_stream(self):
        """A custom data stream (an object with batch(positions) -> batch dict), or None for
        the default one built from cfg.data for data_kind(); `self.run.data_stream(kind)` builds
        one of those for another kind. Called after the roles exist."""
        return None

    @classmethod
    def workload(cls, opt, frames: int, chunk: int) -> dict[str, Workload]:
        """The DiT passes of one micro-step per trainable role, for the memory planner
        (train/workload.py). opt: the recipe's options; frames: latent frames of a data clip;
        chunk: the student's chunk_frames. Default: one gradient pass of the generator over
        the clip (block-causal for a causal generator)."""
        masked = cls.roles["generator"].causal
        return {"generator": Workload([ModelPass("generator", frames, frames, grad=True, masked=masked)])}

    @classmethod
    def prepare_role(cls, cfg, role) -> None:
        """Adapt a freshly built role before its optimizer exists (e.g. add LoRA adapters and
        leave only them trainable, updating role.params). Called on every start and resume."""

    def setup(self) -> None:
        """Called once the models, encoders and data exist (e.g. prepare a teacher's outputs)."""

    def loss(self, role: str, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The loss to minimise and logs: detached 0-d tensors (the trainer reads them with the
        loss and gradient norm in one host read per update; a float() here would synchronise
        a GPU once per value)."""
        raise NotImplementedError

    @classmethod
    def sampling_plan(cls, opt):
        """The plan (models/plans.py) the trained generator samples with, from the recipe's
        options alone: the trainer's sample videos and every pipeline use it."""
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

        model = self.run.sampling_module("generator")
        noise = Noise(seeds, model.config.in_channels, *self.latent_hw, device=context.device)
        return rollout(model, plan, context, noise, -(-frames // unit) * unit, **kwargs).x0

    # ------------------------------------------------------------------ shared pieces
    @property
    def latent_hw(self) -> tuple[int, int]:
        """Latent height and width of the configured video size under the run's codec."""
        stride = self.run.codec.spatial_stride
        return self.cfg.data.height // stride, self.cfg.data.width // stride

    def drop_captions(self, context: torch.Tensor, ctx: StepContext, prob: float,
                      stream: str = "caption_dropout") -> torch.Tensor:
        """Caption dropout for classifier-free guidance: each sample's prompt embedding
        [B, L, D] becomes the negative prompt's with probability prob (per sample, reproducible)."""
        if prob <= 0:
            return context
        drop = ctx.stream(stream).uniform(()) < prob
        negative = self.run.negative.expand(context.shape[0], -1, -1)
        return torch.where(drop[:, None, None], negative, context)

    # state that must survive a resume besides weights/optimizers/RNG (per rank)
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def shared_state(self, state: dict) -> dict:
        """The part of rank 0's state_dict every process takes when a run resumes at another
        number of processes (the rest belongs to one process's samples and starts fresh)."""
        return {}
