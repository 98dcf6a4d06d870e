"""Causal consistency distillation (Causal Forcing): the few-step causal student learns to be
self-consistent along the causal (autoregressive) teacher's ODE, under teacher-forcing context.
The alternative to causal ODE pairs as the student's initialisation: no pair set to generate.

The teacher is an AR diffusion model trained by teacher forcing (train/diffusion_forcing.py);
the data are real clips x0 [B, C, F, H, W] (data kind "latents"). The ODE is discretised into
N = cd_steps levels t_0 = 1000 > t_1 > ... > t_{N-1} > 0 (sigma_k = shift(1 - k / N), as the
public code's 48-step scheduler with shift 5). Per sample (stream "cd_step"):

    n ~ U{0 .. N - 2},   t = t_n,   t' = t_{n+1}                  (every frame at the same level)
    x_t   = (1 - sigma_t) x0 + sigma_t eps                        (eps: stream "noise")
    v_T   = teacher flow at (x_t, t), each chunk seeing the CLEAN earlier chunks of x0
            ([clean | noisy], teacher_forced_flow), CFG uncond + g (cond - uncond) when g != 1
    x_t'  = x_t + (sigma_t' - sigma_t) v_T                        (one Euler step of the teacher)
    f(x, s) = x - sigma_s v_G(x, s | clean context)               (the student's x0)
    loss  = mean over every element of (f_theta(x_t, t) - stopgrad(f_target(x_t', t')))^2

The target f_target is the generator's EMA (its live weights before ema_start or without EMA),
evaluated without gradient. This is the loss of the public Causal Forcing code's causal CD
(model/naive_consistency.py: discrete_cd_N = 48, scheduler shift 5, one Euler step of the
CFG teacher with clean_x = the clean latents, MSE between the student's x0 at t and the EMA's
at t', all frames at one level). Differences: forcelab draws the level per sample (the public
code: one per batch) from the sample's position, so runs do not depend on the process layout.

Sampling: the chunk-wise few-step plan over the student's list (x0, re-noised to the next
level), as every distilled student; the DMD stage (Self-Forcing with the bidirectional teacher
as the real score) starts from this run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..models.plans import Chunkwise, warp_timesteps
from ..models.schedule import add_noise, euler_step, sigma_to_timestep, teacher_sigmas, timestep_to_sigma, x0_from_v
from ..train.diffusion_forcing import teacher_forced_flow
from ..train.recipe import Recipe, RoleSpec
from ..train.workload import ModelPass, Workload
from ..validate import in_range, non_negative_float, optional, positive_float, positive_int, setting
from .dmd_recipe import TIMESTEPS

CD_SIGMA_MAX = 1.0          # the discretisation starts at pure noise (t = 1000), as the public scheduler
MIN_CD_STEPS = 2            # a level and a next level above 0


@dataclass
class CausalCDOptions:
    cd_steps: int = setting(48, in_range, MIN_CD_STEPS, None, integer=True)   # N: levels of the teacher's ODE (public: 48)
    cd_shift: float = setting(5.0, positive_float)   # sigma shift of those levels (public: 5)
    guidance: float = 1.0               # teacher CFG, uncond + guidance (cond - uncond) (1: none)
    teacher_chunk_frames: int | None = setting(None, optional(positive_int))   # the teacher's chunk (None: its own)
    steps: list[float] = setting([1000.0, 750.0, 500.0, 250.0], TIMESTEPS)   # the student's sampling list, before warp
    warp_shift: float | None = setting(5.0, optional(non_negative_float))   # warp the list (None: use as given)

    def timesteps(self) -> list[float]:
        """The student's denoising list (as the DMD recipes: warped through the shifted table)."""
        return warp_timesteps(self.steps, self.warp_shift) if self.warp_shift else [float(t) for t in self.steps]

    def levels(self) -> torch.Tensor:
        """The N discretisation levels t_0 .. t_{N-1} (all > 0), descending, float64."""
        return sigma_to_timestep(teacher_sigmas(self.cd_steps, self.cd_shift, CD_SIGMA_MAX)[:-1])


class CausalCDRecipe(Recipe):
    name = "causal_cd"
    roles = {"generator": RoleSpec(causal=True, init_from="teacher"),
             "teacher": RoleSpec(trainable=False, causal=True)}
    data = "latents"
    Options = CausalCDOptions

    def setup(self) -> None:
        self.levels = self.opt.levels()
        self.chunk = self.run.module("generator").config.chunk_frames

    @classmethod
    def workload(cls, opt, frames, chunk):
        """The student's gradient pass over [clean | noisy] copies; the teacher's (twice under
        CFG) before it and the target's after it run without gradient, the target's next to the
        student's graph."""
        n = 2 * frames
        teacher = ModelPass("teacher", n, n, grad=False, masked=True, count=1 if opt.guidance == 1.0 else 2)
        return {"generator": Workload([teacher, ModelPass("generator", n, n, grad=True, masked=True),
                                       ModelPass("generator", n, n, grad=False, masked=True)])}

    def check_frames(self, frames: int) -> None:
        """Clips must be whole chunks of the student and of the teacher."""
        teacher = self.opt.teacher_chunk_frames or self.run.module("teacher").config.chunk_frames
        for who, chunk in (("the student", self.chunk), ("the teacher", teacher)):
            if frames % chunk:
                raise ConfigError(f"causal_cd: clips of {frames} latent frames are not whole chunks of {who} "
                                  f"({chunk} frames); set data.frames (or algo.teacher_chunk_frames)")

    def student_x0(self, model, clean, noisy, t, context):
        """The student's (or its target's) x0 under teacher forcing, in the student's chunks."""
        c = self.run.module("generator").config
        v = teacher_forced_flow(model, clean, noisy, t, context, chunk_frames=c.chunk_frames,
                                window_frames=c.window_frames, sink_frames=c.sink_frames)
        return x0_from_v(noisy, v, timestep_to_sigma(t))

    def teacher_flow(self, clean, noisy, t, context):
        """The frozen AR teacher's flow under teacher forcing (CFG with the negative prompt when
        guidance != 1), in its own chunks."""
        teacher = self.run.model("teacher")
        cfg = self.run.module("teacher").config
        kw = dict(chunk_frames=self.opt.teacher_chunk_frames or cfg.chunk_frames,
                  window_frames=cfg.window_frames, sink_frames=cfg.sink_frames)
        v = teacher_forced_flow(teacher, clean, noisy, t, context, **kw)
        if self.opt.guidance == 1.0:
            return v
        negative = self.run.negative.expand(context.shape[0], -1, -1)
        v_u = teacher_forced_flow(teacher, clean, noisy, t, negative, **kw)
        return v_u + self.opt.guidance * (v - v_u)

    def loss(self, role, batch, ctx):
        x0, context = batch["latent"], batch["text_emb"]
        B, F = x0.shape[0], x0.shape[2]
        self.check_frames(F)
        n = ctx.stream("cd_step").per_sample(
            lambda b, generator: torch.randint(0, self.opt.cd_steps - 1, (b,), generator=generator))
        levels = self.levels.to(x0.device)
        t = levels[n].float()[:, None].expand(B, F)                     # [B, F]
        t_next = levels[n + 1].float()[:, None].expand(B, F)
        noise = ctx.stream("noise").normal(x0.shape[1:]).to(x0.dtype)
        x_t = add_noise(x0, noise, timestep_to_sigma(t))
        with torch.no_grad():
            v_teacher = self.teacher_flow(x0, x_t, t, context)
            x_next = euler_step(x_t, v_teacher, timestep_to_sigma(t), timestep_to_sigma(t_next))
        student = self.student_x0(self.run.model(role), x0, x_t, t, context)
        with torch.no_grad():
            target = self.student_x0(self.run.sampling_module("generator"), x0, x_next, t_next, context)
        loss = ((student.float() - target.float()) ** 2).mean()
        return loss, {"t": t.detach()[:, 0].mean()}

    @classmethod
    def sampling_plan(cls, opt) -> Chunkwise:
        return Chunkwise(timesteps=opt.timesteps())

    @torch.no_grad()
    def sample(self, context, seeds, frames):
        return self.sample_with(self.sampling_plan(self.opt), context, seeds, frames, unit=self.chunk)
