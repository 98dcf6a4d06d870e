"""The shared shape of every DMD-family recipe (CausVid, Self-Forcing, Rolling Forcing,
streaming long tuning, Self-Forcing++): three roles and two losses.

    generator   the causal student (trainable; starts from the teacher or an ODE-init run)
    critic      the fake score: bidirectional, trainable, starts from the teacher
    teacher     the real score: bidirectional, frozen, CFG with the negative prompt

A subclass says only how the generator produces the clip the losses see:

    def generate(self, batch, ctx, grad) -> Generated(x0 [B, C, F, H, W], mask [B, F] | None)

Generator step: DMD (or SiD) on `generate(grad=True)`; critic step: the critic's
flow-matching loss on `generate(grad=False)` (its own rollout on its own prompt batch, as
the public code does). Both draw one timestep per sample (shifted, clamped: ScoreTimesteps)
and the noise from the sample's position, so runs are reproducible across process layouts.
Guidance is forcelab's `uncond + guidance * (cond - uncond)`: the public Self-Forcing
config's w = 3.0 (cond + w (cond - uncond)) is guidance 4.0 here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..models.plans import Chunkwise, warp_timesteps
from ..models.rollout import Noise, rollout
from ..train.recipe import Recipe, RoleSpec, StepContext, mix_seed
from ..train.timesteps import sample_timesteps
from .dmd import critic_loss, dmd_loss, sid_loss, x0_predictor

LOSSES = ("dmd", "sid")


@dataclass
class DMDOptions:
    guidance: float = 4.0               # real score CFG: uncond + guidance (cond - uncond) (Self-Forcing w=3 -> 4)
    loss: str = "dmd"                   # dmd | sid
    sid_alpha: float = 1.0              # SiD's alpha (Self-Forcing's SiD config: 1)
    score_shift: float = 5.0            # DMD / critic timestep draw: shift ...
    t_min: float = 20.0                 # ... clamped to [t_min, t_max]
    t_max: float = 980.0
    snap_shift: float | None = None     # snap drawn timesteps to the shifted 1000-entry table (public code: 5)
    steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])  # student's list, before warp
    warp_shift: float | None = 5.0      # warp the list through the shifted table (None: use as given)
    context_noise: float = 0.0          # timestep of the clean commit pass
    frames: int = 21                    # latent frames the teacher sees (its horizon; DMD window)


@dataclass
class Generated:
    x0: torch.Tensor                    # [B, C, F, H, W] the clip the scores judge
    mask: torch.Tensor | None = None    # [B, F] bool: frames that take part in the loss (None: all)


class DMDRecipe(Recipe):
    roles = {"generator": RoleSpec(causal=True, init_from="teacher"),
             "critic": RoleSpec(init_from="teacher"),
             "teacher": RoleSpec(trainable=False)}
    data = "prompts"
    Options = DMDOptions

    def setup(self) -> None:
        o = self.opt
        if o.loss not in LOSSES:
            raise ConfigError(f"algo.loss must be one of {LOSSES}, got {o.loss!r}")
        if o.frames < 1:
            raise ConfigError(f"algo.frames must be >= 1, got {o.frames}")
        self.timesteps = warp_timesteps(o.steps, o.warp_shift) if o.warp_shift else [float(t) for t in o.steps]
        gen = self.trainer.module("generator").config
        self.chunk = gen.chunk_frames

    # ------------------------------------------------------------------ pieces for subclasses
    def plan(self, **kw) -> Chunkwise:
        return Chunkwise(timesteps=self.timesteps, context_noise=self.opt.context_noise, **kw)

    def noise(self, ctx: StepContext, draw: int) -> Noise:
        """The rollout's noise source: one seed per sample, from its position and the draw."""
        seeds = [mix_seed(ctx.seed, p, draw) for p in ctx.positions]
        return Noise(seeds, self.trainer.module("generator").config.in_channels, *self.latent_hw,
                     device=ctx.device)

    def student_rollout(self, batch, ctx: StepContext, frames: int, training=None, plan=None, **kw):
        model = self.trainer.model("generator")
        return rollout(model, plan or self.plan(), batch["text_emb"], self.noise(ctx, 1), frames,
                       training=training, **kw)

    def generate(self, batch, ctx: StepContext, grad: bool) -> Generated:
        raise NotImplementedError

    # ------------------------------------------------------------------ the losses
    def _scores(self, context):
        t = self.trainer
        real = x0_predictor(t.model("teacher"), context, t.negative.expand(context.shape[0], -1, -1),
                            self.opt.guidance)
        return real, x0_predictor(t.model("critic"), context)

    def _draw(self, ctx: StepContext, x0: torch.Tensor, draw: int):
        o = self.opt
        t = ctx.per_sample(draw, sample_timesteps, shift=o.score_shift, t_min=o.t_min, t_max=o.t_max,
                           snap_shift=o.snap_shift)
        return t, ctx.normal(x0.shape[1:], draw + 1).to(x0.dtype)

    def loss(self, role, batch, ctx):
        context = batch["text_emb"]
        if role == "generator":
            out = self.generate(batch, ctx, grad=True)
            real, fake = self._scores(context)
            t, noise = self._draw(ctx, out.x0, draw=10)
            if self.opt.loss == "sid":
                loss, logs = sid_loss(out.x0, real, fake, alpha=self.opt.sid_alpha, timestep=t, noise=noise,
                                      mask=out.mask)
            else:
                loss, logs = dmd_loss(out.x0, real, fake, timestep=t, noise=noise, mask=out.mask)
        elif role == "critic":
            with torch.no_grad():
                out = self.generate(batch, ctx, grad=False)
            _, fake = self._scores(context)
            t, noise = self._draw(ctx, out.x0, draw=20)
            loss, logs = critic_loss(out.x0, fake, timestep=t, noise=noise, mask=out.mask)
        else:
            raise ConfigError(f"{self.name}: role {role!r} is not trained")
        return loss, {k: float(v) for k, v in logs.items()}

    @torch.no_grad()
    def sample(self, context, seeds, frames):
        return self.sample_with(self.plan(), context, seeds, frames, unit=self.chunk)
