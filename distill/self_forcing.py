"""Self-Forcing: the student rolls out a whole video with its own KV cache exactly as at
inference (the chunk-wise plan), and DMD (or SiD) judges the last `frames` frames.

Per rollout: the chunk count is drawn from [min_chunks, max_chunks] and one exit step from
the denoising list; both come from a seed shared by all processes (the step and micro-step),
so every rank draws the same values without communication (streams "chunk_count" and
"exit_step"; the rollout's noise: the base recipe's "rollout_noise"). Each chunk stops at the exit
step, whose pass carries gradients only for chunks in the DMD window; every other pass and
every commit runs without gradients, so nothing flows back through the cache and memory stays
flat in the video length (the rollout engine's `Training` hooks).

When the rollout is longer than the window, the window's first latent is replaced by a
clip's first latent, as the public code does: every latent up to and including it (the
first-frame prefix too) is decoded together and the last pixel frame is encoded alone
(`reencode_first`); its chunk is left out of the loss.
First-frame conditioning: `prefix_frames` clean frames of a real clip are committed to the
cache before the rollout (image-to-video / video extension training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.rollout import Training
from ..validate import in_range, multiple_of, non_negative_int, optional, positive_int, setting
from ..train.workload import DMDWorkload, cache_capacity, rollout_passes
from .dmd_recipe import CHUNK, DMDOptions, DMDRecipe, Generated, student_chunk


@dataclass
class SelfForcingOptions(DMDOptions):
    min_chunks: int | None = setting(None, optional(positive_int))   # chunks per rollout: [min_chunks, max_chunks]
    max_chunks: int | None = setting(None, optional(positive_int))   # (None: frames / chunk_frames, the public default)
    reencode_first: bool = True         # longer rollouts: re-encode the window's first frame (see above)
    prefix_frames: int = setting(0, non_negative_int)   # first-frame conditioning: clean frames from real clips

    def check(self, model=None) -> None:
        super().check(model)
        chunk = student_chunk(model)
        if chunk is not None:
            multiple_of(self.frames, "algo.frames", chunk, CHUNK)
            multiple_of(self.prefix_frames, "algo.prefix_frames", chunk, CHUNK)
        low = self.min_chunks or (self.frames // chunk if chunk else None)
        if low is not None and self.max_chunks is not None:
            in_range(self.max_chunks, "algo.max_chunks", low, None, integer=True,
                     why="algo.min_chunks" if self.min_chunks else "algo.frames / chunk_frames")

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """(fewest, most) chunks per rollout for the student's chunk_frames (unset: frames / chunk)."""
        low = self.min_chunks or self.frames // chunk
        return low, self.max_chunks or max(low, self.frames // chunk)


class SelfForcingRecipe(DMDRecipe):
    name = "self_forcing"
    starts_from = {"teacher": "teacher", "generator": "ode_init"}   # Self-Forcing's recipe: the student from ODE init
    Options = SelfForcingOptions

    def data_kind(self) -> str:
        return "latents" if self.opt.prefix_frames else "prompts"

    def setup(self) -> None:
        super().setup()
        self.min_chunks, self.max_chunks = self.opt.chunk_range(self.chunk)   # checked by opt.check

    @classmethod
    def workload(cls, opt, frames, chunk):
        """The longest rollout (max_chunks) after the prefix; the window's chunks carry gradients."""
        total = opt.prefix_frames + chunk * opt.chunk_range(chunk)[1]
        window = min(opt.frames, total)
        passes = rollout_passes("generator", total, chunk, len(opt.steps), total - window)
        return DMDWorkload(passes, window, cache_capacity(total, chunk, None, 0)).updates()

    def draw_rollout(self, ctx) -> tuple[int, int]:
        """(frames to generate, exit step): the same on every rank."""
        chunks = self.min_chunks + ctx.stream("chunk_count").shared_int(self.max_chunks - self.min_chunks + 1)
        return chunks * self.chunk, ctx.stream("exit_step").shared_int(len(self.timesteps))

    def rollout_plan(self, ctx):
        """The plan of this rollout (chunk-wise; Rolling Forcing draws one per rollout)."""
        return self.plan()

    def generate(self, batch, ctx, grad):
        o = self.opt
        frames, exit_step = self.draw_rollout(ctx)
        P = o.prefix_frames
        prefix = batch["latent"][:, :, :P] if P else None
        total = P + frames
        window = min(o.frames, total)
        # the critic's rollout (grad=False, under no_grad) stops at the same exit and builds no graph
        # (the cache is thrown away after it: the last chunk is not committed)
        training = Training(exit_step, grad_from_frame=total - window, commit_last=False)
        res = self.student_rollout(batch, ctx, frames, training=training, prefix=prefix, plan=self.rollout_plan(ctx))
        video = res.x0 if prefix is None else torch.cat([prefix.to(res.x0.dtype), res.x0], dim=2)
        generated = torch.arange(total) >= P
        carries_grad = torch.cat([torch.zeros(P, dtype=torch.bool), res.grad_frames.cpu()])
        frame_mask = (carries_grad if grad else generated)[total - window:].clone()
        x0 = video[:, :, total - window:]
        if total > window and o.reencode_first:
            x0 = self.reencoded(x0, video[:, :, :total - window + 1], frame_mask if grad else None)
        return Generated(x0, frame_mask.to(x0.device)[None].expand(x0.shape[0], -1))
