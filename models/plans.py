"""Plans: which frames the rollout engine denoises at each iteration, and at which level.

Every causal plan is AR-Diffusion's step matrix over "units" (a chunk, or a block of frames):
after iteration i, unit u has completed

    level(i, u) = clamp(i + 1 - u * ar_step, 0, S)          S = len(timesteps)

denoising steps (0 = pure noise, S = clean). A unit at level l < S is denoised from
timesteps[l] to timesteps[l + 1] (0 after the last). Units advance one level per iteration,
earlier units are never noisier than later ones, and the units in flight at one iteration
are contiguous, so one DiT pass over them (block-causal among themselves, against the KV
cache of committed frames) does the whole iteration. A unit that reaches S is committed.

    ar_step = S  chunk-wise few-step (Self-Forcing / CausVid): one chunk at a time
    ar_step = 1  rolling window (Rolling Forcing): S chunks in flight, one level apart
    ar_step = 0  synchronous: every unit at the same level (the teacher's schedule)
    otherwise    AR-Diffusion's AD scheduler / diffusion forcing's pyramid

Iterations: S + (units - 1) * ar_step. `segment_frames` cuts long videos into segments
that run one after another (a sliding window over the video: earlier segments are context
in the cache). The teacher plan is the synchronous case over one unit, bidirectional.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import ForcelabError
from .cache_policy import DEFAULT_POLICY, check_policy
from .schedule import NUM_TRAIN_TIMESTEPS, SOLVERS, TEACHER_SIGMA_MAX, sigma_to_timestep, teacher_sigmas, warp_timesteps

UPDATES = ("renoise", "euler")
TEACHER_GUIDANCE = 5.0       # the Teacher plan's default CFG scale (callers without a value of their own use it)
TEACHER_STEPS = 50           # the Teacher plan's default solver steps (Wan2.1's sampler)
STUDENT_STEPS = 4            # the causal plans' default denoising steps (a distilled student)
SAMPLING_SHIFT = 5.0         # the default sigma shift of sampling (Wan2.1's, and the students')
PLANS = ("teacher", "chunkwise", "rolling", "step_matrix")


# ---------------------------------------------------------------------- matrices
def _check_steps(steps: int, ar_step: int) -> None:
    if steps < 1:
        raise ForcelabError(f"a plan needs at least one denoising step, got {steps}")
    if not 0 <= ar_step <= steps:
        raise ForcelabError(f"ar_step must be in [0, steps={steps}] (0 = synchronous, {steps} = "
                            f"fully autoregressive), got {ar_step}")


def ad_iterations(units: int, steps: int, ar_step: int) -> int:
    """Number of iterations of the AD schedule: steps + (units - 1) * ar_step."""
    return steps + (units - 1) * ar_step


def ad_step_matrix(frames: int, steps: int, ar_step: int) -> torch.Tensor:
    """AR-Diffusion's AD scheduler: long [iterations, frames]; entry = steps completed by the
    frame after that iteration (the state before iteration 0 is all zeros = pure noise)."""
    _check_steps(steps, ar_step)
    if frames < 1:
        raise ForcelabError(f"the step matrix needs at least one frame, got {frames}")
    i = torch.arange(ad_iterations(frames, steps, ar_step))[:, None]
    f = torch.arange(frames)[None, :]
    return (i + 1 - f * ar_step).clamp(0, steps)


def pyramid_step_matrix(frames: int, steps: int, ar_step: int, block_frames: int = 1) -> torch.Tensor:
    """Diffusion forcing's pyramid (SkyReels-V2 with causal_block_size): the AD matrix over
    blocks of `block_frames` frames, repeated over each block's frames. [iterations, frames]."""
    if block_frames < 1 or frames % block_frames:
        raise ForcelabError(f"frames ({frames}) must be a positive multiple of block_frames ({block_frames})")
    return ad_step_matrix(frames // block_frames, steps, ar_step).repeat_interleave(block_frames, dim=1)


def iterate_levels(units: int, steps: int, ar_step: int,
                   segment_units: int | None = None) -> Iterator[tuple[int, list[int]]]:
    """The step matrix as a lazy stream (constant memory for any length): per iteration,
    (first unit, levels BEFORE the iteration of units first, first + 1, ...). Every listed
    unit advances one level. With segment_units, segments of that many units run one after
    another, each its own AD schedule."""
    _check_steps(steps, ar_step)
    seg = segment_units or units
    for seg_start in range(0, units, seg):
        n = min(seg, units - seg_start)
        for i in range(ad_iterations(n, steps, ar_step)):
            # unit u is in flight while 0 <= i - u * ar_step < steps
            lo = 0 if ar_step == 0 else max(0, -((steps - 1 - i) // ar_step))
            hi = n - 1 if ar_step == 0 else min(n - 1, i // ar_step)
            yield seg_start + lo, [i - u * ar_step for u in range(lo, hi + 1)]


def levels_matrix(units: int, steps: int, ar_step: int, segment_units: int | None = None) -> torch.Tensor:
    """`iterate_levels` materialised as [iterations, units] levels AFTER each iteration."""
    rows, state = [], torch.zeros(units, dtype=torch.long)
    for first, levels in iterate_levels(units, steps, ar_step, segment_units):
        state[first:first + len(levels)] = torch.tensor(levels) + 1
        rows.append(state.clone())
    return torch.stack(rows)


# ---------------------------------------------------------------------- plans
def default_timesteps(num_steps: int, shift: float) -> list[float]:
    """A few-step denoising list: linspace(1000, 0, N + 1)[:-1] warped by shift
    (4 steps, shift 5 -> [1000, 937.5, 833.3, 625])."""
    if num_steps < 1:
        raise ForcelabError(f"steps must be >= 1, got {num_steps}")
    base = [NUM_TRAIN_TIMESTEPS * (1 - k / num_steps) for k in range(num_steps)]
    return warp_timesteps(base, shift)


@dataclass
class CausalPlan:
    """Shared options of the causal plans (chunk-wise, rolling, step matrix)."""

    timesteps: list[float] = field(default_factory=lambda: default_timesteps(STUDENT_STEPS, SAMPLING_SHIFT))  # denoising list, descending, in (0, 1000]
    chunk_frames: int | None = None      # frames per chunk = block-causal unit (None: the model's config)
    window_frames: int | None = None     # attention window in frames, incl. the current chunk (None: the model's config; 0: none)
    sink_frames: int | None = None       # first frames kept visible forever, attention sink (None: the model's config)
    cache_policy: str = DEFAULT_POLICY   # what a full window keeps, merges or hides (models/cache_policy.py: NAME[:k=v,...])
    context_noise: float = 0.0           # timestep of the clean pass that commits a chunk to the cache
    update: str = "renoise"              # next level: "renoise" x0 with fresh noise (few-step) or "euler" ODE step
    name = "causal"
    finish_at_exit = False               # training: a unit stops at its gradient step (Self-Forcing's exit)

    def __post_init__(self):
        ts = [float(t) for t in self.timesteps]
        if not ts:
            raise ForcelabError(f"{self.name}: the denoising list is empty")
        if any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ForcelabError(f"{self.name}: timesteps must be strictly decreasing within "
                                f"(0, {NUM_TRAIN_TIMESTEPS}], got {ts}")
        self.timesteps = ts
        if self.update not in UPDATES:
            raise ForcelabError(f"{self.name}: update must be one of {UPDATES}, got {self.update!r}")
        if not 0 <= self.context_noise < NUM_TRAIN_TIMESTEPS:
            raise ForcelabError(f"{self.name}: context_noise must be in [0, {NUM_TRAIN_TIMESTEPS}), got {self.context_noise}")
        if self.chunk_frames is not None and self.chunk_frames < 1:
            raise ForcelabError(f"{self.name}: chunk_frames must be >= 1, got {self.chunk_frames}")
        if (self.sink_frames or 0) < 0 or (self.window_frames or 0) < 0:
            raise ForcelabError(f"{self.name}: window_frames and sink_frames must be >= 0")
        self.cache_policy = check_policy(self.cache_policy, f"{self.name}: cache_policy")

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def unit_frames(self, chunk_frames: int) -> int:
        """Frames that advance together (the model's chunk unless the plan says otherwise)."""
        return chunk_frames

    def segment_units(self, chunk_frames: int) -> int | None:
        return None

    def iterations(self, units: int, chunk_frames: int) -> Iterator[tuple[int, list[int]]]:
        return iterate_levels(units, self.steps, self.ar_step, self.segment_units(chunk_frames))

    def describe(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {"plan": self.name, "ar_step": self.ar_step, **out}


@dataclass
class Chunkwise(CausalPlan):
    """Self-Forcing / CausVid: per chunk, the denoising list, then the commit pass."""

    name = "chunkwise"
    finish_at_exit = True

    @property
    def ar_step(self) -> int:
        return self.steps


@dataclass
class Rolling(CausalPlan):
    """Rolling Forcing: a window of S chunks, one per level, denoised jointly; the oldest
    leaves clean (committed) and a pure-noise chunk enters at every iteration."""

    name = "rolling"

    @property
    def ar_step(self) -> int:
        return 1


@dataclass
class StepMatrix(CausalPlan):
    """AR-Diffusion's AD scheduler / diffusion forcing's pyramid, over blocks of frames."""

    ar_step: int = 1                     # levels between consecutive blocks (0 = synchronous, S = autoregressive)
    block_frames: int | None = None      # frames per block (None: chunk_frames); a multiple of chunk_frames
    segment_frames: int | None = None    # long videos: run segments of this many frames one after another
    update: str = "euler"
    name = "step_matrix"

    def __post_init__(self):
        super().__post_init__()
        _check_steps(self.steps, self.ar_step)

    def unit_frames(self, chunk_frames: int) -> int:
        block = self.block_frames or chunk_frames
        if block % chunk_frames:
            raise ForcelabError(f"step_matrix: block_frames ({block}) must be a multiple of the "
                                f"model's chunk_frames ({chunk_frames})")
        return block

    def segment_units(self, chunk_frames: int) -> int | None:
        if self.segment_frames is None:
            return None
        block = self.unit_frames(chunk_frames)
        if self.segment_frames < block or self.segment_frames % block:
            raise ForcelabError(f"step_matrix: segment_frames ({self.segment_frames}) must be a "
                                f"positive multiple of the block ({block} frames)")
        return self.segment_frames // block


@dataclass
class Teacher:
    """Bidirectional sampling of a fixed-length clip with classifier-free guidance.

    CFG convention: v = v_uncond + guidance * (v_cond - v_uncond); guidance 1 = no CFG.
    (Self-Forcing's "cond + w * (cond - uncond)" is guidance = w + 1.) The unconditional
    branch uses the negative prompt (empty prompt if none)."""

    steps: int = TEACHER_STEPS           # solver steps
    shift: float = SAMPLING_SHIFT        # sigma shift of the sampling schedule
    solver: str = "unipc"                # "unipc" or "euler"
    guidance: float = TEACHER_GUIDANCE   # CFG scale (see the convention above)
    sigma_max: float = TEACHER_SIGMA_MAX  # first sampling level before the shift (Wan: 0.999; CausVid's ODE pairs: 1.0)
    name = "teacher"

    def __post_init__(self):
        if self.steps < 1:
            raise ForcelabError(f"teacher: steps must be >= 1, got {self.steps}")
        if self.solver not in SOLVERS:
            raise ForcelabError(f"teacher: unknown solver {self.solver!r}; choose one of {SOLVERS}")
        if self.shift <= 0:
            raise ForcelabError(f"teacher: shift must be > 0, got {self.shift}")
        if not 0 < self.sigma_max <= 1:
            raise ForcelabError(f"teacher: sigma_max must be in (0, 1], got {self.sigma_max}")

    @property
    def timesteps(self) -> list[float]:
        return [float(sigma_to_timestep(s)) for s in teacher_sigmas(self.steps, self.shift, self.sigma_max)[:-1]]

    def iterations(self, units: int = 1, chunk_frames: int | None = None) -> Iterator[tuple[int, list[int]]]:
        return iterate_levels(1, self.steps, 0)

    def describe(self) -> dict:
        return {"plan": self.name, "steps": self.steps, "shift": self.shift, "solver": self.solver,
                "guidance": self.guidance, "sigma_max": self.sigma_max, "cfg": "uncond + guidance * (cond - uncond)"}
