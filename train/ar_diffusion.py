"""AR-Diffusion: per-frame noise levels constrained non-decreasing along time (earlier frames
are cleaner), drawn by the FoPP scheduler, under temporal-causal attention (each frame sees
itself and earlier frames only - no token sees a future frame, unlike the public code).

Levels are integers in [0, num_levels); level l is sigma (l + 1) / num_levels, shifted. The
loss is flow matching (v-prediction, as every forcelab model) rather than the paper's x0 L2.
Sampling: the AD scheduler (step-matrix plan, frame i sits ar_step levels behind frame i-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..models.plans import StepMatrix, default_timesteps
from ..models.schedule import add_noise, flow_target, sigma_to_timestep
from .recipe import Recipe, RoleSpec
from .timesteps import ar_sigmas, fopp_sample, uniform_nondecreasing_sample

SAMPLERS = ("fopp", "forward")


@dataclass
class ARDiffusionOptions:
    num_levels: int = 1000              # discrete noise levels T of the FoPP scheduler
    sampler: str = "fopp"               # fopp (uniform through a random (frame, level)) | forward (uniform)
    shift: float = 1.0                  # sigma shift applied to the levels
    chunk_frames: int = 1               # attention unit: 1 = temporal-causal per frame
    uncond_prob: float = 0.0
    sample_steps: int = 20              # AD scheduler: levels per frame
    sample_shift: float = 3.0
    ar_step: int = 4                    # AD scheduler: frame i sits ar_step levels behind frame i-1


class ARDiffusionRecipe(Recipe):
    name = "ar_diffusion"
    roles = {"generator": RoleSpec(causal=True)}
    data = "latents"
    Options = ARDiffusionOptions

    def setup(self):
        if self.opt.sampler not in SAMPLERS:
            raise ConfigError(f"algo.sampler must be one of {SAMPLERS}, got {self.opt.sampler!r}")
        if self.opt.num_levels < 2 or self.opt.chunk_frames < 1:
            raise ConfigError("algo.num_levels must be >= 2 and algo.chunk_frames >= 1")

    def levels(self, ctx, frames: int) -> torch.Tensor:
        """[B, F] non-decreasing integer levels, one draw per sample (per attention unit)."""
        sampler = fopp_sample if self.opt.sampler == "fopp" else uniform_nondecreasing_sample
        units = -(-frames // self.opt.chunk_frames)
        levels = ctx.per_sample(0, sampler, units, self.opt.num_levels)
        return levels.repeat_interleave(self.opt.chunk_frames, dim=1)[:, :frames]

    def predict(self, model, x_t, sigma, context):
        return model(x_t, sigma_to_timestep(sigma), context, chunk_frames=self.opt.chunk_frames)

    def loss(self, role, batch, ctx):
        x0, context = batch["latent"], batch["text_emb"]
        F = x0.shape[2]
        sigma = ar_sigmas(self.levels(ctx, F), self.opt.num_levels, self.opt.shift).to(x0.device)
        noise = ctx.normal(x0.shape[1:], draw=1)
        context = self.drop_captions(context, ctx, self.opt.uncond_prob)
        v = self.predict(self.trainer.model(role), add_noise(x0, noise, sigma), sigma, context)
        loss = torch.nn.functional.mse_loss(v.float(), flow_target(x0, noise).float())
        return loss, {"sigma": float(sigma.mean())}

    @torch.no_grad()
    def sample(self, context, seeds, frames):
        o = self.opt
        plan = StepMatrix(timesteps=default_timesteps(o.sample_steps, o.sample_shift), ar_step=o.ar_step,
                          chunk_frames=o.chunk_frames)
        return self.sample_with(plan, context, seeds, frames, unit=o.chunk_frames)
