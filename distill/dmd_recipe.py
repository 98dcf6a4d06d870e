"""The shared shape of every DMD-family recipe (CausVid, Self-Forcing, Rolling Forcing,
streaming long tuning, Self-Forcing++, Reward Forcing): three roles and two losses.

    generator   the causal student (trainable; starts from the teacher or an ODE-init run)
    critic      the fake score: bidirectional, trainable, starts from the teacher
    teacher     the real score: bidirectional, frozen, CFG with the negative prompt

A subclass says only how the generator produces the clip the losses see:

    def generate(self, batch, ctx, grad) -> Generated(x0 [B, C, F, H, W], mask [B, F] | None)

Generator step: DMD (or SiD) on `generate(grad=True)`, each sample's DMD loss weighted by
`sample_weights` (Reward Forcing's Re-DMD; the other recipes return None: unweighted); critic
step: the critic's flow-matching loss on `generate(grad=False)` (its own rollout on its own
prompt batch, as the public code does). Both draw one timestep per sample (shifted, clamped:
ScoreTimesteps) and the noise from the sample's position, so runs are reproducible across
process layouts.

Random streams (StepContext.stream): "dmd_timestep" / "dmd_noise" (generator step),
"critic_timestep" / "critic_noise" (critic step), "rollout_noise" (the student rollout's
per-sample Noise seeds). A subclass names its own streams after what they draw.
Guidance is forcelab's `uncond + guidance * (cond - uncond)`: the public Self-Forcing
config's w = 3.0 (cond + w (cond - uncond)) is guidance 4.0 here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, ForcelabError
from ..models.plans import Chunkwise, warp_timesteps
from ..models.rollout import Noise, cache_options, rollout
from ..train.recipe import Recipe, RoleSpec, StepContext
from ..train.timesteps import SCORE_SHIFT, SCORE_T_MAX, SCORE_T_MIN, sample_timesteps
from ..validate import (choice, each, in_range, non_negative_float, optional, positive_float, positive_int,
                        setting)
from .dmd import critic_loss, dmd_loss, sid_loss, x0_predictor

LOSSES = ("dmd", "sid")
CHUNK = "the student's chunk_frames"      # the unit of frame counts, named in their errors
TIMESTEPS = each(in_range, 0, 1000, min_items=1)    # the rule of a list of timesteps


@dataclass
class DMDOptions:
    guidance: float = 4.0               # real score CFG: uncond + guidance (cond - uncond) (Self-Forcing w=3 -> 4)
    loss: str = setting("dmd", choice, LOSSES)      # dmd | sid
    sid_alpha: float = 1.0              # SiD's alpha (Self-Forcing's SiD config: 1)
    score_shift: float = setting(SCORE_SHIFT, positive_float)   # DMD / critic timestep draw: shift ...
    t_min: float = setting(SCORE_T_MIN, in_range, 0, 1000)      # ... clamped to [t_min, t_max]
    t_max: float = setting(SCORE_T_MAX, in_range, 0, 1000)
    snap_shift: float | None = setting(None, optional(positive_float))   # snap draws to the shifted table (public: 5)
    steps: list[float] = setting([1000.0, 750.0, 500.0, 250.0], TIMESTEPS)   # student's list, before warp
    warp_shift: float | None = setting(5.0, optional(non_negative_float))   # warp the list (None: use as given)
    context_noise: float = setting(0.0, in_range, 0, 1000)   # timestep of the clean commit pass
    frames: int = setting(21, positive_int)         # latent frames the teacher sees (its horizon; DMD window)

    def check(self, model=None) -> None:
        """Rules across fields; `model`: the student's DiTConfig as far as the config fixes it
        (None: not known before its weights load). The loader calls this before anything is built."""
        in_range(self.t_min, "algo.t_min", 0, self.t_max, why="at most algo.t_max")

    def timesteps(self) -> list[float]:
        """The student's denoising list: `steps` warped through the shifted table (or as given)."""
        return warp_timesteps(self.steps, self.warp_shift) if self.warp_shift else [float(t) for t in self.steps]

    def plan(self, timesteps: list[float], **kw) -> Chunkwise:
        """The student's chunk-wise plan over `timesteps`, committing at context_noise."""
        return Chunkwise(timesteps=timesteps, context_noise=self.context_noise, **kw)


def student_chunk(model) -> int | None:
    """The student's chunk_frames from its DiTConfig (None: not known yet)."""
    return None if model is None else model.chunk_frames


def check_cache(plan, model, key: str | None = None) -> None:
    """The plan's attention window and sink on the student (models.rollout.cache_options), when
    its architecture is known; errors name `key` (the config keys that set them)."""
    if model is None:
        return
    try:
        cache_options(plan, model)
    except ForcelabError as e:
        raise ConfigError(f"{key}: {e}" if key else str(e)) from None


@dataclass
class Generated:
    x0: torch.Tensor                    # [B, C, F, H, W] the clip the scores judge
    mask: torch.Tensor | None = None    # [B, F] bool: frames that take part in the loss (None: all)


@torch.no_grad()
def reencode_first(codec, context: torch.Tensor) -> torch.Tensor:
    """The latent that replaces a DMD window's first latent: [B, C, n, H, W] -> [B, C, 1, H, W].

    `context`: the video's latents up to AND including the window's first one, in order (all
    of them, or the most recent ones the recipe keeps). They are decoded together, so a
    causal, temporally compressing VAE (Wan: stride 4) decodes the window's first latent in
    its temporal context; the LAST decoded pixel frame (the end of that latent's frames) is
    encoded alone, as a clip's first latent is encoded from one frame. So the teacher, which
    learned on clips, judges a window that starts the way a clip starts.

    This is the public treatment: Self-Forcing's model/base.py decodes pred[:, :-20], every
    latent up to and including the window's first (Rolling Forcing likewise), and LongLive's
    model/streaming_training.py decodes its kept previous window up to that same latent.
    Decoding the window's first latent alone is not the same: the VAE would take a mid-video
    latent for a clip's first (one pixel frame, no context). Only a codec of temporal stride 1
    (the toy codec) makes the two agree.
    """
    pixels = codec.decode(context)[:, :, -1:].clamp(-1, 1)
    return codec.encode(pixels).to(context)


class DMDRecipe(Recipe):
    starts_from = {"teacher": "teacher"}
    roles = {"generator": RoleSpec(causal=True, init_from="teacher"),
             "critic": RoleSpec(init_from="teacher"),
             "teacher": RoleSpec(trainable=False)}
    data = "prompts"
    Options = DMDOptions

    def setup(self) -> None:
        self.timesteps = self.opt.timesteps()          # options checked when the config loaded
        self.chunk = self.run.module("generator").config.chunk_frames

    # ------------------------------------------------------------------ pieces for subclasses
    def plan(self, **kw) -> Chunkwise:
        return self.opt.plan(self.timesteps, **kw)

    def noise(self, ctx: StepContext, stream: str = "rollout_noise") -> Noise:
        """A rollout's noise source: one seed per sample from the named stream (its position)."""
        return Noise(ctx.stream(stream).seeds(), self.run.module("generator").config.in_channels,
                     *self.latent_hw, device=ctx.device)

    def student_rollout(self, batch, ctx: StepContext, frames: int, training=None, plan=None, **kw):
        model = self.run.model("generator")
        return rollout(model, plan or self.plan(), batch["text_emb"], self.noise(ctx), frames,
                       training=training, **kw)

    def reencoded(self, x0: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x0 [B, C, F, H, W] with its first latent replaced by a clip's first latent re-encoded
        from `context` (reencode_first: the latents up to and including it); that latent's chunk
        leaves `mask` [F] (the generator's loss), when given."""
        first = reencode_first(self.run.codec, context)
        if mask is not None:
            mask[:self.chunk] = False
        return torch.cat([first, x0[:, :, 1:]], dim=2)

    def generate(self, batch, ctx: StepContext, grad: bool) -> Generated:
        raise NotImplementedError

    # ------------------------------------------------------------------ the losses
    def _scores(self, context):
        t = self.run
        real = x0_predictor(t.model("teacher"), context, t.negative.expand(context.shape[0], -1, -1),
                            self.opt.guidance)
        return real, x0_predictor(t.model("critic"), context)

    def _draw(self, ctx: StepContext, x0: torch.Tensor, loss: str):
        """The score timestep and noise of the `loss` ("dmd" | "critic"): streams <loss>_timestep, <loss>_noise."""
        o = self.opt
        stream = ctx.stream(f"{loss}_timestep")
        t = stream.per_sample(sample_timesteps, shift=o.score_shift, t_min=o.t_min, t_max=o.t_max,
                              snap_shift=o.snap_shift)
        return t, ctx.stream(f"{loss}_noise").normal(x0.shape[1:]).to(x0.dtype)

    def loss(self, role, batch, ctx):
        context = batch["text_emb"]
        if role == "generator":
            out = self.generate(batch, ctx, grad=True)
            real, fake = self._scores(context)
            t, noise = self._draw(ctx, out.x0, "dmd")
            if self.opt.loss == "sid":
                loss, logs = sid_loss(out.x0, real, fake, alpha=self.opt.sid_alpha, timestep=t, noise=noise,
                                      mask=out.mask)
            else:
                weights, weight_logs = self.sample_weights(out, batch)
                loss, logs = dmd_loss(out.x0, real, fake, timestep=t, noise=noise, mask=out.mask, weights=weights)
                logs.update(weight_logs)
        elif role == "critic":
            with torch.no_grad():
                out = self.generate(batch, ctx, grad=False)
            _, fake = self._scores(context)
            t, noise = self._draw(ctx, out.x0, "critic")
            loss, logs = critic_loss(out.x0, fake, timestep=t, noise=noise, mask=out.mask)
        else:
            raise ConfigError(f"{self.name}: role {role!r} is not trained")
        return loss, logs

    def sample_weights(self, generated: Generated, batch) -> tuple[torch.Tensor | None, dict]:
        """(per-sample weights [B] of the DMD generator loss, their detached logs). None: the
        plain loss (every recipe but Reward Forcing's Re-DMD, distill/reward_forcing.py)."""
        return None, {}

    @torch.no_grad()
    def sample(self, context, seeds, frames):
        return self.sample_with(self.sampling_plan(self.opt), context, seeds, frames, unit=self.chunk)

    @classmethod
    def sampling_plan(cls, opt):
        """The student's chunk-wise plan over its denoising list (subclasses: their own plan)."""
        return opt.plan(opt.timesteps())
