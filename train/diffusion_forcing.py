"""Diffusion forcing: a causal DiT trained with an independent noise level per chunk under
block-causal attention (Diffusion Forcing, SkyReels-V2); or, with `teacher_forcing`, each
noisy chunk conditioned on the CLEAN copies of the earlier chunks ([clean | noisy] sequence,
one forward: the public teacher-forcing code's layout, with both halves at the same RoPE
positions). Loss: flow matching (v = noise - x0) on every noisy frame.

Sampling: the chunk-wise plan with Euler ODE steps (each chunk from noise to clean against
the cache of earlier chunks), or the step-matrix plan (pyramid / AD scheduler).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..models.plans import Chunkwise, StepMatrix, default_timesteps
from ..models.schedule import add_noise, flow_target, timestep_to_sigma
from .recipe import Recipe, RoleSpec
from .timesteps import sample_flow_timesteps

SAMPLE_PLANS = ("chunkwise", "step_matrix")


@dataclass
class DiffusionForcingOptions:
    teacher_forcing: bool = False       # clean context chunks + noisy chunks (else: every chunk noisy)
    shift: float = 1.0                  # training sigma shift
    sigma_dist: str = "uniform"         # uniform | logit_normal
    uncond_prob: float = 0.0            # caption dropout (for CFG-free causal models: 0)
    window_frames: int | None = None    # attention window in training (None: all past frames)
    sink_frames: int = 0
    sample_plan: str = "chunkwise"      # chunkwise | step_matrix
    sample_steps: int = 20              # denoising steps per chunk
    sample_shift: float = 3.0
    ar_step: int = 1                    # step_matrix: levels between consecutive blocks


class DiffusionForcingRecipe(Recipe):
    name = "diffusion_forcing"
    roles = {"generator": RoleSpec(causal=True)}
    data = "latents"
    Options = DiffusionForcingOptions

    def setup(self):
        if self.opt.sample_plan not in SAMPLE_PLANS:
            raise ConfigError(f"algo.sample_plan must be one of {SAMPLE_PLANS}, got {self.opt.sample_plan!r}")
        self.chunk = self.trainer.module("generator").config.chunk_frames

    def chunk_timesteps(self, ctx, frames: int) -> torch.Tensor:
        """[B, frames]: one timestep per chunk, repeated over its frames."""
        if frames % self.chunk:
            raise ConfigError(f"diffusion forcing: clips of {frames} latent frames are not whole chunks of "
                              f"{self.chunk}; set data.frames so latent frames divide by chunk_frames")
        return ctx.per_sample(0, sample_flow_timesteps, frames, chunk_frames=self.chunk,
                              distribution=self.opt.sigma_dist, shift=self.opt.shift)

    def loss(self, role, batch, ctx):
        x0, context = batch["latent"], batch["text_emb"]
        F = x0.shape[2]
        t = self.chunk_timesteps(ctx, F)
        sigma = timestep_to_sigma(t)
        noise = ctx.normal(x0.shape[1:], draw=1)
        context = self.drop_captions(context, ctx, self.opt.uncond_prob)
        x_t = add_noise(x0, noise, sigma)
        model = self.trainer.model(role)
        kw = dict(chunk_frames=self.chunk, window_frames=self.opt.window_frames, sink_frames=self.opt.sink_frames)
        if self.opt.teacher_forcing:
            both = torch.cat([torch.zeros_like(t), t], dim=1)
            v = model(torch.cat([x0, x_t], dim=2), both, context, teacher_forcing=True, **kw)[:, :, F:]
        else:
            v = model(x_t, t, context, **kw)
        loss = torch.nn.functional.mse_loss(v.float(), flow_target(x0, noise).float())
        return loss, {"sigma": float(sigma.mean())}

    def plan(self):
        o = self.opt
        steps = default_timesteps(o.sample_steps, o.sample_shift)
        if o.sample_plan == "step_matrix":
            return StepMatrix(timesteps=steps, ar_step=o.ar_step)
        return Chunkwise(timesteps=steps, update="euler")

    @torch.no_grad()
    def sample(self, context, seeds, frames):
        return self.sample_with(self.plan(), context, seeds, frames, unit=self.chunk)
