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

from ..models.plans import StepMatrix, default_timesteps
from ..models.schedule import add_noise, sigma_to_timestep
from ..validate import choice, in_range, non_negative_int, positive_float, positive_int, setting, unit_interval
from .flow_matching import flow_matching_loss
from .recipe import Recipe, RoleSpec
from .timesteps import ar_sigmas, fopp_sample, uniform_nondecreasing_sample

SAMPLERS = ("fopp", "forward")


@dataclass
class ARDiffusionOptions:
    num_levels: int = setting(1000, in_range, 2, None, integer=True)   # discrete noise levels T of the FoPP scheduler
    sampler: str = setting("fopp", choice, SAMPLERS)   # fopp (uniform through a random (frame, level)) | forward
    shift: float = setting(1.0, positive_float)     # sigma shift applied to the levels
    chunk_frames: int = setting(1, positive_int)    # attention unit: 1 = temporal-causal per frame
    uncond_prob: float = setting(0.0, unit_interval)
    sample_steps: int = setting(20, positive_int)   # AD scheduler: levels per frame
    sample_shift: float = setting(3.0, positive_float)
    ar_step: int = setting(4, non_negative_int)     # AD scheduler: frame i sits ar_step levels behind frame i-1

    def check(self, chunk: int | None = None) -> None:
        """Rules across fields (the loader calls this with the student's chunk when known)."""
        in_range(self.ar_step, "algo.ar_step", 0, self.sample_steps, integer=True, why="algo.sample_steps")


class ARDiffusionRecipe(Recipe):
    name = "ar_diffusion"
    roles = {"generator": RoleSpec(causal=True)}
    data = "latents"
    Options = ARDiffusionOptions

    def levels(self, ctx, frames: int) -> torch.Tensor:
        """[B, F] non-decreasing integer levels, one draw per sample (per attention unit)."""
        sampler = fopp_sample if self.opt.sampler == "fopp" else uniform_nondecreasing_sample
        units = -(-frames // self.opt.chunk_frames)
        levels = ctx.stream("levels").per_sample(sampler, units, self.opt.num_levels)
        return levels.repeat_interleave(self.opt.chunk_frames, dim=1)[:, :frames]

    def predict(self, model, x_t, sigma, context):
        return model(x_t, sigma_to_timestep(sigma), context, chunk_frames=self.opt.chunk_frames)

    def loss(self, role, batch, ctx):
        x0, context = batch["latent"], batch["text_emb"]
        F = x0.shape[2]
        sigma = ar_sigmas(self.levels(ctx, F), self.opt.num_levels, self.opt.shift).to(x0.device)
        noise = ctx.stream("noise").normal(x0.shape[1:])
        context = self.drop_captions(context, ctx, self.opt.uncond_prob)
        v = self.predict(self.run.model(role), add_noise(x0, noise, sigma), sigma, context)
        return flow_matching_loss(v, x0, noise), {"sigma": sigma.detach().mean()}

    @classmethod
    def sampling_plan(cls, opt):
        return StepMatrix(timesteps=default_timesteps(opt.sample_steps, opt.sample_shift), ar_step=opt.ar_step,
                          chunk_frames=opt.chunk_frames)

    @torch.no_grad()
    def sample(self, context, seeds, frames):
        return self.sample_with(self.sampling_plan(self.opt), context, seeds, frames, unit=self.opt.chunk_frames)
