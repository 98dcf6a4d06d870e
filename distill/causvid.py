"""CausVid: DMD on noised REAL latents, without a self-rollout.

Per clip x0 [B, C, F, H, W] (data kind "latents": the toy world or latent shards; the first
`frames` latent frames of each clip):
each chunk of `chunk_frames` frames picks its own level from `levels` (per sample, from the
sample's position, stream "chunk_levels": train.timesteps.choose_levels), default the student's denoising list plus
0 - CausVid's [1000, 757, 522, 0]; the clip is noised chunk by chunk,
x_t = (1 - sigma) x0 + sigma eps, and the causal student runs ONE block-causal forward over
the whole clip (each chunk sees itself and the earlier chunks, at their own levels), its
flow (v) prediction converted to x0 = x_t - sigma v. DMD (or SiD) and the critic judge that
clip.

Chunks drawn at t = 0 are the real latents, passed through exactly (x0 = x_t = the data):
they are clean context for the later chunks in the forward and part of the clip the scores
see (as in CausVid), but they carry no gradient and are masked out of the generator's and
the critic's loss, so the loss is a mean over generated frames only (a clip whose chunks
all drew 0 adds nothing).

Sampling: the chunk-wise plan over the student's list (without the 0).
Guidance in forcelab's form uncond + g (cond - uncond): CausVid's 3.5 (cond + w (cond -
uncond)) is 4.5 here. The public code shares one batch between generator and critic; here
each role reads its own batch (the trainer's positions), which changes no expectation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..models.rollout import denoise_window
from ..models.schedule import add_noise, timestep_to_sigma
from ..train.timesteps import choose_levels
from ..validate import multiple_of, optional, setting
from ..train.workload import DMDWorkload, ModelPass
from .dmd_recipe import CHUNK, TIMESTEPS, DMDOptions, DMDRecipe, Generated, student_chunk



@dataclass
class CausVidOptions(DMDOptions):
    steps: list[float] = field(default_factory=lambda: [1000.0, 757.0, 522.0])   # CausVid's list (unwarped)
    warp_shift: float | None = None
    guidance: float = 4.5               # CausVid's 3.5 in cond + w (cond - uncond)
    score_shift: float = 8.0            # CausVid's timestep_shift
    levels: list[float] | None = setting(None, optional(TIMESTEPS))   # per-chunk training levels (None: the list + 0)

    def check(self, model=None) -> None:
        super().check(model)
        chunk = student_chunk(model)
        if chunk is not None:       # each chunk of the clip draws its own level
            multiple_of(self.frames, "algo.frames", chunk, CHUNK)


class CausVidRecipe(DMDRecipe):
    name = "causvid"
    Options = CausVidOptions
    data = "latents"

    @classmethod
    def workload(cls, opt, frames, chunk):
        """One block-causal pass of the student over algo.frames (no rollout, no cache)."""
        return DMDWorkload([ModelPass("generator", opt.frames, opt.frames, grad=True, masked=True)],
                           opt.frames).updates()

    def setup(self) -> None:
        super().setup()
        self.levels = self.timesteps + [0.0] if self.opt.levels is None else [float(t) for t in self.opt.levels]

    def chunk_levels(self, ctx, frames: int) -> torch.Tensor:
        """t [B, frames]: one level per chunk per sample (constant within a chunk; algo.check
        made frames whole chunks)."""
        return ctx.stream("chunk_levels").per_sample(lambda n, generator: choose_levels(
            self.levels, n, frames, self.chunk, generator=generator))

    def generate(self, batch, ctx, grad):
        x0, context, F = batch["latent"], batch["text_emb"], self.opt.frames
        if x0.shape[2] < F:
            raise ConfigError(f"causvid: clips have {x0.shape[2]} latent frames, algo.frames asks for {F}; "
                              f"lower algo.frames or use longer clips (data.frames)")
        x0 = x0[:, :, :F]
        t = self.chunk_levels(ctx, F)
        sigma = timestep_to_sigma(t)
        x_t = add_noise(x0, ctx.stream("clip_noise").normal(x0.shape[1:]).to(x0.dtype), sigma)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            _, pred = denoise_window(self.run.model("generator"), x_t, sigma, context, chunk_frames=self.chunk)
        clean = (t == 0).to(x0.device)
        out = torch.where(clean[:, None, :, None, None], x_t, pred)
        return Generated(out, ~clean)
