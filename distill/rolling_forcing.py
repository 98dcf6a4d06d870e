"""Rolling Forcing: Self-Forcing whose rollouts denoise a rolling window of chunks jointly.

The rolling plan (models/plans.py, `Rolling`) keeps S chunks in flight, one per level of the
denoising list (S = len(steps): Rolling Forcing's 5 steps -> a window of 5 chunks): each
iteration denoises the whole window one step in ONE pass against the KV cache, re-noises
every chunk to its next level, commits the chunk that became clean (a clean pass at
`context_noise`) and lets a pure-noise chunk enter; the windows are partial while the
rollout ramps up and down. Only finished chunks are ever committed.

Attention: each chunk sees `window_frames` frames back from the end of its own chunk plus
`sink_frames` first frames kept forever (the attention sink); keys are cached before RoPE
and rotated at every pass by positions relative to the window, so new frames never sit at
absolute positions. The sink's RoPE policy is the model's `sink_rope` ("adjacent" = Rolling
Forcing's re-rotation of the sink to just before the working cache; set it with
`model_overrides: {sink_rope: adjacent}`, which the exported generator keeps for inference).
None of these sizes is fixed: the plan takes them from `algo` or, when unset, from the
generator's config.

Gradients (the rollout engine's `Training` hooks): iterations i with i % S == exit run with
gradients. Every chunk is in flight for S consecutive iterations, so exactly one of them is a
gradient pass: the gradient windows are disjoint and tile the video, and every frame's
output is the x0 of its own gradient pass, at whatever level the frame sat in that window
(each frame's x0 from its own level; no frame is left empty). The exit comes from a seed
shared by all processes (the step and micro-step), like the chunk count, so every rank draws
the same one. Chunks before the DMD window (the last `frames` frames) keep their outputs but
carry no gradient.

Each rollout is rolling with probability `rolling_prob` and otherwise a plain chunk-wise
Self-Forcing rollout (the public code mixes them 50/50); the choice is shared across ranks
too (stream "rolling_plan"). Everything else (chunk count, DMD window, re-encoded first frame, first-frame prefix,
the critic's own rollout) is Self-Forcing's.

Compared with the public code: window and sink sizes are configurable (it hard-codes a
21-frame budget with a 3-frame anchor), new frames use window-relative RoPE (it rotates them
by absolute position), only finished chunks are committed (it commits the unfinished first
chunk of every ramp-up window), context noise is an option (disabled there), the exit is the
same on every rank (drawn per rank there) and every frame's output is present (frames outside
gradient windows stay zero there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.cache_policy import DEFAULT_POLICY, check_policy
from ..models.plans import Chunkwise, Rolling
from ..validate import non_negative_int, optional, setting, unit_interval
from ..train.workload import DMDWorkload, ModelPass, cache_capacity, chunk_keys
from .dmd_recipe import check_cache
from .self_forcing import SelfForcingOptions, SelfForcingRecipe

_PROB_RESOLUTION = 1 << 20      # a shared integer draw turned into a Bernoulli(rolling_prob) draw


@dataclass
class RollingForcingOptions(SelfForcingOptions):
    # Rolling Forcing's list (warped): 5 levels -> a rolling window of 5 chunks
    steps: list[float] = field(default_factory=lambda: [1000.0, 800.0, 600.0, 400.0, 200.0])
    rolling_prob: float = setting(0.5, unit_interval)   # share of rolling rollouts; the rest are chunk-wise (public: 0.5)
    # attention window incl. the query chunk (None: the generator's config; 0: none)
    window_frames: int | None = setting(None, optional(non_negative_int))
    # attention sink: first frames kept visible (None: the generator's config)
    sink_frames: int | None = setting(None, optional(non_negative_int))
    # what the full window keeps, merges or hides (models/cache_policy.py: NAME[:key=value,...])
    cache_policy: str = setting(DEFAULT_POLICY, check_policy)

    def check(self, model=None) -> None:
        super().check(model)
        # the plan's own check, reported against the config keys
        check_cache(Rolling(**self.plan_args(self.timesteps())), model,
                    "algo.window_frames / algo.sink_frames / algo.cache_policy")

    def plan_args(self, timesteps: list[float]) -> dict:
        """The arguments of both rollout plans (rolling and chunk-wise) over `timesteps`."""
        return dict(timesteps=timesteps, context_noise=self.context_noise, window_frames=self.window_frames,
                    sink_frames=self.sink_frames, cache_policy=self.cache_policy)


class RollingForcingRecipe(SelfForcingRecipe):
    name = "rolling_forcing"
    Options = RollingForcingOptions

    @classmethod
    def workload(cls, opt, frames, chunk):
        """The longest rollout with the rolling plan: a pass denoises up to len(steps) chunks
        jointly against the cache; the gradient pass reaching the DMD window's start carries
        the window and the chunks in flight before it (one pass: the largest case). A window
        or sink left to the generator's config counts as none here."""
        total = opt.prefix_frames + chunk * opt.chunk_range(chunk)[1]
        span = min(total, chunk * len(opt.steps))           # frames in flight per pass
        window, sink = opt.window_frames or None, opt.sink_frames or 0
        grad_frames = min(total, opt.frames + span - chunk)
        keys = chunk_keys(total - grad_frames, grad_frames, window, sink) if window else total
        passes = [ModelPass("generator", span, keys, grad=False, cached=True, count=total // chunk + len(opt.steps)),
                  ModelPass("generator", grad_frames, keys, grad=True, cached=True)]
        return DMDWorkload(passes, min(opt.frames, total), cache_capacity(total, chunk, window, sink)).updates()

    def _plan_args(self) -> dict:
        return self.opt.plan_args(self.timesteps)

    @classmethod
    def sampling_plan(cls, opt) -> Rolling:
        """Inference (samples, export): the rolling plan with the configured window and sink."""
        return Rolling(**opt.plan_args(opt.timesteps()))

    def plan(self) -> Rolling:
        return self.sampling_plan(self.opt)

    def draw_rolling(self, ctx) -> bool:
        """Whether this rollout uses the rolling plan: the same on every rank."""
        draw = ctx.stream("rolling_plan").shared_int(_PROB_RESOLUTION)
        return draw < round(self.opt.rolling_prob * _PROB_RESOLUTION)

    def rollout_plan(self, ctx):
        return Rolling(**self._plan_args()) if self.draw_rolling(ctx) else Chunkwise(**self._plan_args())
