"""The teacher recipe: bidirectional flow-matching training (or fine-tuning) of the DiT.

Per sample: sigma from the training distribution, x_t = (1 - sigma) x0 + sigma noise, the
model predicts v = noise - x0 (Wan2.1's objective); the caption is replaced by the negative
prompt with probability `uncond_prob` so the model also learns the unconditional branch that
classifier-free guidance needs. Samples use the Teacher plan (CFG with the negative prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.plans import Teacher
from ..models.schedule import SOLVERS, add_noise, timestep_to_sigma
from ..validate import choice, positive_float, positive_int, setting, unit_interval
from .flow_matching import flow_matching_loss
from .recipe import Recipe, RoleSpec
from .timesteps import FLOW_DISTRIBUTIONS, sample_flow_timesteps


@dataclass
class TeacherOptions:
    shift: float = setting(1.0, positive_float)     # training sigma shift (Wan fine-tuning uses shift-warped sigmas)
    sigma_dist: str = setting("uniform", choice, FLOW_DISTRIBUTIONS)   # uniform | logit_normal (SD3's)
    uncond_prob: float = setting(0.1, unit_interval)  # caption dropout for CFG
    sample_steps: int = setting(20, positive_int)   # sampling: solver steps
    sample_shift: float = setting(3.0, positive_float)   # sampling: sigma shift
    sample_solver: str = setting("euler", choice, SOLVERS)   # sampling: euler | unipc
    guidance: float = 3.0               # sampling CFG, uncond + guidance * (cond - uncond)


class TeacherRecipe(Recipe):
    name = "teacher"
    roles = {"generator": RoleSpec()}
    data = "latents"
    Options = TeacherOptions

    def loss(self, role, batch, ctx):
        x0 = batch["latent"]
        t = ctx.stream("sigma").per_sample(sample_flow_timesteps, distribution=self.opt.sigma_dist,
                                           shift=self.opt.shift)
        sigma = timestep_to_sigma(t)
        noise = ctx.stream("noise").normal(x0.shape[1:])
        context = self.drop_captions(batch["text_emb"], ctx, self.opt.uncond_prob)
        x_t = add_noise(x0, noise, sigma)
        v = self.run.model(role)(x_t, t, context)
        return flow_matching_loss(v, x0, noise), {"sigma": sigma.detach().mean()}

    @classmethod
    def sampling_plan(cls, opt):
        return Teacher(steps=opt.sample_steps, shift=opt.sample_shift, solver=opt.sample_solver, guidance=opt.guidance)

    @torch.no_grad()
    def sample(self, context, seeds, frames):
        negative = self.run.negative.expand(len(seeds), -1, -1)
        return self.sample_with(self.sampling_plan(self.opt), context, seeds, frames, negative=negative)
