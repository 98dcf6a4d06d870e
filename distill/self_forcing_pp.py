"""Self-Forcing++: the student rolls out far past the teacher's horizon with a rolling KV
cache, a window of the teacher's length is taken from that long video, re-noised from the
student's own frames (backward-noise initialisation) and re-generated with gradients, and
DMD with the short teacher judges the window.

One generator (or critic) rollout, with L = rollout_frames, T = frames (the teacher's
horizon), c = chunk_frames, S = len(steps):

1. Draws shared by all processes (step, micro-step): the window start s, chunk aligned and
   uniform in {0, c, 2c, ..., L - T} (stream "window_start"), and the entry level e, uniform
   in [0, S) (Self-Forcing's exit step; stream "entry_step").
2. Long rollout, no gradients: the chunk-wise plan with an attention window of
   `window_frames` (a rolling KV cache: constant memory however long the video; no sink by
   default) generates frames [0, s) into the cache C_s, then frames [s, s + T) from a copy of
   C_s -> the window's clean frames x_hat. Frames after s + T cannot influence the window (the
   student is causal), so the rollout stops there: the same window as a rollout of all L
   frames would give, for less work. L only decides where windows may start.
3. Backward-noise initialisation: the window is re-generated from C_s by the rollout engine
   with the chunk-wise plan over the tail timesteps[e:] of the denoising list, each chunk
   entering at level t_e with the latent
        x_{t_e} = (1 - sigma_e) x_hat_chunk + sigma_e eps      (fresh eps: stream "backward_noise")
   instead of pure noise, and stopping at that first pass, which runs WITH gradients
   (`Training(exit_step=0)`): x0 = G(x_{t_e}, t_e | cache). As in Self-Forcing, the chunk's x0
   is both its output and (after the clean pass) the context of the next window chunk. This
   is Self-Forcing's exit pass, whose input at the exit level is the re-noised x0 of an earlier
   estimate; here that estimate is the student's own finished long-video frame, so the
   window starts from content coherent with the preceding frames (e = 0 enters at pure
   noise, sigma = 1). Gradients never cross the cache (commits and the long rollout run
   without them), so memory is that of T frames whatever L is.
4. DMD (or SiD) on the T window frames; the critic's step runs its own such rollout. A
   window that does not start the video gets its first latent replaced by a clip's first
   latent (`reencode_first`, as in Self-Forcing: the latents up to and including it decoded
   together, the last pixel frame encoded alone) and that chunk is left out of the
   generator's loss. The decoded context is the long rollout's last T - 1 frames before the
   window plus the window's first: T latents, as LongLive decodes at most its previous
   window, so the VAE's cost stays that of T frames whatever L is (Self-Forcing decodes
   from frame 0, but its rollouts are never much longer than T).

Samples during training: the same windowed chunk-wise plan (`forcelab generate --window` for
the exported student).
The paper's optional GRPO stage (optical-flow reward) is not part of this recipe.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..models.cache_policy import DEFAULT_POLICY, check_policy
from ..models.plans import Chunkwise
from ..models.rollout import INITIAL, Noise, Training, default_cache, rollout
from ..models.schedule import add_noise, timestep_to_sigma
from ..validate import in_range, multiple_of, non_negative_int, optional, positive_int, setting
from ..train.workload import DMDWorkload, ModelPass, cache_capacity, chunk_keys
from .dmd_recipe import CHUNK, DMDOptions, DMDRecipe, Generated, check_cache, student_chunk

DEFAULT_ROLLOUT_FACTOR = 4      # rollout_frames unset: this many teacher horizons


@dataclass
class SelfForcingPPOptions(DMDOptions):
    # long rollout; windows start in [0, rollout_frames - frames] (None: 4 x frames)
    rollout_frames: int | None = setting(None, optional(positive_int))
    # the student's attention window = rolling KV cache (None: frames; 0: none)
    window_frames: int | None = setting(None, optional(non_negative_int))
    sink_frames: int = setting(0, non_negative_int)   # attention sink frames (Self-Forcing++: none)
    # what the full window keeps, merges or hides (models/cache_policy.py: NAME[:key=value,...])
    cache_policy: str = setting(DEFAULT_POLICY, check_policy)
    reencode_first: bool = True         # windows after the video's start: re-encode the first frame (as Self-Forcing)

    def check(self, model=None) -> None:
        super().check(model)
        long = self.long_frames()
        in_range(long, "algo.rollout_frames", self.frames, None, integer=True, why="algo.frames")
        chunk = student_chunk(model)
        if chunk is not None:
            multiple_of(self.frames, "algo.frames", chunk, CHUNK)
            multiple_of(long, "algo.rollout_frames", chunk, CHUNK)
        check_cache(self.rolling_plan(self.timesteps()), model,
                    "algo.window_frames / algo.sink_frames / algo.cache_policy")

    def long_frames(self) -> int:
        """Frames of the long rollout (rollout_frames, or DEFAULT_ROLLOUT_FACTOR x frames)."""
        return DEFAULT_ROLLOUT_FACTOR * self.frames if self.rollout_frames is None else self.rollout_frames

    def attention_window(self) -> int:
        """The student's attention window = the rolling KV cache (window_frames, or frames)."""
        return self.frames if self.window_frames is None else self.window_frames

    def rolling_plan(self, timesteps: list[float]) -> Chunkwise:
        """The chunk-wise plan over `timesteps` with the rolling cache (window and sink)."""
        return self.plan(timesteps, window_frames=self.attention_window(), sink_frames=self.sink_frames,
                         cache_policy=self.cache_policy)


class BackwardNoise:
    """The window rollout's noise source: the starting latent of a window frame is the long
    rollout's clean frame re-noised to the entry level, (1 - sigma) x_hat + sigma eps with eps
    from `fresh`; every other draw (re-noise, context noise) comes from `base`."""

    def __init__(self, base: Noise, fresh: Noise, clean: torch.Tensor, start: int, sigma: float):
        self.base, self.fresh, self.clean, self.start, self.sigma = base, fresh, clean, start, sigma
        self.shape, self.device, self.dtype = base.shape, base.device, base.dtype

    @property
    def batch(self) -> int:
        return self.base.batch

    def __call__(self, start: int, n: int, draw: int = INITIAL) -> torch.Tensor:
        if draw != INITIAL:
            return self.base(start, n, draw)
        i = start - self.start
        if i < 0 or i + n > self.clean.shape[2]:
            raise RuntimeError(f"backward noise: frames [{start}, {start + n}) are outside the window "
                               f"[{self.start}, {self.start + self.clean.shape[2]})")
        return add_noise(self.clean[:, :, i:i + n], self.fresh(start, n, INITIAL), self.sigma).to(self.dtype)


class SelfForcingPPRecipe(DMDRecipe):
    name = "self_forcing_pp"
    starts_from = {"teacher": "teacher", "generator": "ode_init"}   # Self-Forcing's recipe: the student from ODE init
    Options = SelfForcingPPOptions

    def setup(self) -> None:
        super().setup()
        o = self.opt                    # checked by o.check(chunk)
        self.rollout_frames = o.long_frames()
        self.window_frames = o.attention_window()

    @classmethod
    def sampling_plan(cls, opt) -> Chunkwise:
        return opt.rolling_plan(opt.timesteps())

    def plan(self, timesteps: list[float] | None = None) -> Chunkwise:
        """The student's chunk-wise plan with the rolling cache (over `timesteps`: a tail of its list)."""
        return self.opt.rolling_plan(timesteps or self.timesteps)

    @classmethod
    def workload(cls, opt, frames, chunk):
        """The window of algo.frames re-generated against a full rolling cache (a copy of it
        lives during the clean pass), every chunk's first pass with gradients."""
        window, sink, T = opt.attention_window() or None, opt.sink_frames, opt.frames
        start = opt.long_frames() - T                       # the latest window: a full cache
        passes = []
        for s in range(start, start + T, chunk):
            keys = chunk_keys(s, chunk, window, sink)
            passes += [ModelPass("generator", chunk, keys, grad=False, cached=True, count=2 * len(opt.steps)),
                       ModelPass("generator", chunk, keys, grad=True, cached=True)]
        caches = 2 * cache_capacity(opt.long_frames(), chunk, window, sink)
        return DMDWorkload(passes, T, caches).updates()

    def draw_window(self, ctx) -> tuple[int, int]:
        """(window start frame, entry step): the same on every rank."""
        starts = (self.rollout_frames - self.opt.frames) // self.chunk + 1
        return (self.chunk * ctx.stream("window_start").shared_int(starts),
                ctx.stream("entry_step").shared_int(len(self.timesteps)))

    def generate(self, batch, ctx, grad):
        o, T = self.opt, self.opt.frames
        start, entry = self.draw_window(ctx)
        model, context = self.run.model("generator"), batch["text_emb"]
        noise, plan = self.noise(ctx), self.plan()
        cache = default_cache(self.run.module("generator"), plan, noise, start + T, start_frame=0)
        before = None       # the long rollout's last T - 1 frames before the window
        with torch.no_grad():
            if start:
                long = rollout(model, plan, context, noise, start, cache=cache).x0      # cache C_s
                before = long[:, :, max(0, start - (T - 1)):]
            clean = rollout(model, plan, context, noise, T, cache=copy.deepcopy(cache)).x0   # x_hat of the window
        source = BackwardNoise(noise, self.noise(ctx, "backward_noise"), clean, start, timestep_to_sigma(self.timesteps[entry]))
        training = Training(0, grad_from_frame=start, commit_last=False)   # outer no_grad (critic): no graph
        res = rollout(model, self.plan(self.timesteps[entry:]), context, source, T, cache=cache, training=training)
        x0 = res.x0
        mask = res.grad_frames.clone() if grad else torch.ones(T, dtype=torch.bool)
        if start and o.reencode_first:
            context_latents = torch.cat([before.to(x0.dtype), x0[:, :, :1].detach()], dim=2)
            x0 = self.reencoded(x0, context_latents, mask if grad else None)
        return Generated(x0, mask.to(x0.device)[None].expand(x0.shape[0], -1))
