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
from ..models.schedule import add_noise, timestep_to_sigma
from ..validate import (choice, in_range, non_negative_int, optional, positive_float, positive_int, setting,
                        unit_interval)
from .flow_matching import flow_matching_loss
from .recipe import Recipe, RoleSpec
from .timesteps import FLOW_DISTRIBUTIONS, sample_flow_timesteps
from .workload import ModelPass, Workload

SAMPLE_PLANS = ("chunkwise", "step_matrix")


@dataclass
class DiffusionForcingOptions:
    teacher_forcing: bool = False       # clean context chunks + noisy chunks (else: every chunk noisy)
    shift: float = setting(1.0, positive_float)     # training sigma shift
    sigma_dist: str = setting("uniform", choice, FLOW_DISTRIBUTIONS)   # uniform | logit_normal
    uncond_prob: float = setting(0.0, unit_interval)  # caption dropout (for CFG-free causal models: 0)
    window_frames: int | None = setting(None, optional(positive_int))  # attention window in training (None: all past)
    sink_frames: int = setting(0, non_negative_int)
    sample_plan: str = setting("chunkwise", choice, SAMPLE_PLANS)   # chunkwise | step_matrix
    sample_steps: int = setting(20, positive_int)   # denoising steps per chunk
    sample_shift: float = setting(3.0, positive_float)
    ar_step: int = setting(1, non_negative_int)     # step_matrix: levels between consecutive blocks (0: synchronous)

    def check(self, chunk: int | None = None) -> None:
        """Rules across fields (the loader calls this with the student's chunk when known)."""
        if self.sample_plan == "step_matrix":
            in_range(self.ar_step, "algo.ar_step", 0, self.sample_steps, integer=True, why="algo.sample_steps")


def teacher_forced_flow(model, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                        **kw) -> torch.Tensor:
    """The flow of `noisy` [B, C, F, H, W] at per-frame timesteps t [B, F], each chunk seeing
    the CLEAN copies of the earlier chunks of `clean` (the [clean | noisy] layout, both halves
    at the same RoPE positions, the clean copies at t = 0); kw: chunk_frames, window_frames,
    sink_frames. -> v [B, C, F, H, W] of the noisy half."""
    F = noisy.shape[2]
    both = torch.cat([torch.zeros_like(t), t], dim=1)
    return model(torch.cat([clean, noisy], dim=2), both, context, teacher_forcing=True, **kw)[:, :, F:]


class DiffusionForcingRecipe(Recipe):
    name = "diffusion_forcing"
    roles = {"generator": RoleSpec(causal=True)}
    data = "latents"
    Options = DiffusionForcingOptions

    def setup(self):
        self.chunk = self.run.module("generator").config.chunk_frames

    @classmethod
    def workload(cls, opt, frames, chunk):
        """One block-causal gradient pass; with teacher forcing over [clean | noisy] copies."""
        n = 2 * frames if opt.teacher_forcing else frames
        return {"generator": Workload([ModelPass("generator", n, n, grad=True, masked=True)])}

    def chunk_timesteps(self, ctx, frames: int) -> torch.Tensor:
        """[B, frames]: one timestep per chunk, repeated over its frames."""
        if frames % self.chunk:
            raise ConfigError(f"diffusion forcing: clips of {frames} latent frames are not whole chunks of "
                              f"{self.chunk}; set data.frames so latent frames divide by chunk_frames")
        return ctx.stream("levels").per_sample(sample_flow_timesteps, frames, chunk_frames=self.chunk,
                                               distribution=self.opt.sigma_dist, shift=self.opt.shift)

    def loss(self, role, batch, ctx):
        x0, context = batch["latent"], batch["text_emb"]
        F = x0.shape[2]
        t = self.chunk_timesteps(ctx, F)
        sigma = timestep_to_sigma(t)
        noise = ctx.stream("noise").normal(x0.shape[1:])
        context = self.drop_captions(context, ctx, self.opt.uncond_prob)
        x_t = add_noise(x0, noise, sigma)
        model = self.run.model(role)
        kw = dict(chunk_frames=self.chunk, window_frames=self.opt.window_frames, sink_frames=self.opt.sink_frames)
        if self.opt.teacher_forcing:
            v = teacher_forced_flow(model, x0, x_t, t, context, **kw)
        else:
            v = model(x_t, t, context, **kw)
        return flow_matching_loss(v, x0, noise), {"sigma": sigma.detach().mean()}

    @classmethod
    def sampling_plan(cls, opt):
        steps = default_timesteps(opt.sample_steps, opt.sample_shift)
        if opt.sample_plan == "step_matrix":
            return StepMatrix(timesteps=steps, ar_step=opt.ar_step)
        return Chunkwise(timesteps=steps, update="euler")

    @torch.no_grad()
    def sample(self, context, seeds, frames):
        return self.sample_with(self.sampling_plan(self.opt), context, seeds, frames, unit=self.chunk)
