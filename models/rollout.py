"""The rollout engine: ONE primitive and ONE loop for every plan, training and inference.

    denoise_window(model, x, sigma, cond)  run the DiT once on a window of frames, each at
                                           its own noise level, against the KV cache (or a
                                           prompt, bidirectionally); -> (v, x0)
    stream(model, plan, context, noise, frames)   the loop: yields committed chunks, through
                                           causal_stream (every causal plan) or
                                           sample_teacher (the bidirectional Teacher plan)
    rollout(...)                           the same loop, collected (what training calls)

Every plan (models/plans.py) is a stream of iterations "units [first, first + k) advance one
level"; the loop draws noise for entering units, calls `denoise_window` once for the whole
window, moves every unit to its next level (re-noise or an ODE step), and commits finished
units with a clean pass at t = context_noise that writes their K/V into the cache.

Training hooks (`Training`): iterations i with i % S == exit_step (S = len(timesteps)) run
with gradients; every other pass and every commit runs under no_grad (gradients are
truncated between chunks). Any step matrix evaluates each unit at S consecutive iterations,
so each unit gets exactly one gradient pass - the Self-Forcing exit step for chunk-wise
plans (the chunk stops there), Rolling Forcing's tiling windows for the rolling plan.

Noise depends only on (seed, frame, draw): the same frame gets the same noise whatever the
plan, the cache or the starting point, which is what makes runs comparable.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..errors import ForcelabError
from .cache_policy import DEFAULT_POLICY, make_policy
from .kv_cache import KVCache
from .plans import CausalPlan, Teacher
from .schedule import add_noise, euler_step, make_solver, sigma_to_timestep, timestep_to_sigma, x0_from_v

INITIAL, CONTEXT = 0, -1        # Noise draws: the starting noise, the commit pass's context noise
SWITCH_MODES = ("recache", "flush", "keep")
_MASK = (1 << 63) - 1


class Noise:
    """Reproducible Gaussian latents [B, C, n, H, W]: one generator seed per (sample seed,
    frame, draw); draw 0 = starting noise, l = re-noise to level l, -1 = context noise."""

    def __init__(self, seeds: Sequence[int], channels: int, height: int, width: int,
                 device=None, dtype: torch.dtype = torch.float32):
        self.seeds, self.shape = [int(s) for s in seeds], (channels, height, width)
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        self._gen = torch.Generator(device=self.device)

    @property
    def batch(self) -> int:
        return len(self.seeds)

    def __call__(self, start: int, n: int, draw: int = INITIAL) -> torch.Tensor:
        out = torch.empty(len(self.seeds), self.shape[0], n, *self.shape[1:], device=self.device)
        for b, seed in enumerate(self.seeds):
            for j in range(n):
                key = (seed * 0x9E3779B97F4A7C15 + (start + j) * 0xBF58476D1CE4E5B9 + draw * 0x94D049BB133111EB)
                self._gen.manual_seed(key & _MASK)
                out[b, :, j] = torch.randn(self.shape, generator=self._gen, device=self.device)
        return out.to(self.dtype)


class FrameCache:
    """The reference for the KV cache: keeps the committed frames' latents and recomputes the
    whole block-causal sequence at every pass (cost grows with the video). Frames from 0.

    What a cache-less model does: one forward per denoising pass, over the visible committed
    frames + the window being denoised. A commit only stores the frames and their timesteps
    (their keys are recomputed by every later pass), so it runs no forward."""

    def __init__(self, chunk_frames: int, window_frames: int | None = None, sink_frames: int = 0):
        self.chunk_frames, self.window_frames, self.sink_frames = chunk_frames, window_frames, sink_frames
        self.context: torch.Tensor | None = None
        self.x: torch.Tensor | None = None          # committed inputs [B, C, end_frame, H, W]
        self.t: torch.Tensor | None = None          # their timesteps [B, end_frame]

    @property
    def end_frame(self) -> int:
        return 0 if self.x is None else self.x.shape[2]

    def _with_context(self, x: torch.Tensor, t: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[committed frames before start | x] and their timesteps."""
        if start > self.end_frame:
            raise ForcelabError(f"FrameCache: frames [{self.end_frame}, {start}) were never committed")
        if self.context is None:
            raise ForcelabError("FrameCache: no prompt set")
        if self.x is None:
            return x, t
        return torch.cat([self.x[:, :, :start], x], 2), torch.cat([self.t[:, :start], t], 1)

    def forward(self, model, x: torch.Tensor, t: torch.Tensor, start: int) -> torch.Tensor:
        """The flow of frames [start, start + n) against the committed frames before them."""
        xs, ts = self._with_context(x, t, start)
        v = model(xs, ts, self.context, chunk_frames=self.chunk_frames,
                  window_frames=self.window_frames, sink_frames=self.sink_frames)
        return v[:, :, start:]

    def commit(self, x: torch.Tensor, t: torch.Tensor, start: int) -> None:
        """Store frames [start, start + n) at timesteps t; stored frames >= start are replaced."""
        xs, ts = self._with_context(x, t, start)
        self.x, self.t = xs.detach(), ts.detach()


def set_prompt(model, cache, context: torch.Tensor) -> None:
    """Point the cache's cross-attention at a prompt embedding [B, L, text_dim]."""
    if isinstance(cache, FrameCache):
        cache.context = context
    else:
        model.set_prompt(cache, context)


def _forward(model, x, t, cond, start_frame, chunk_frames, commit=False):
    if isinstance(cond, FrameCache):
        start = cond.end_frame if start_frame is None else start_frame
        return cond.commit(x, t, start) if commit else cond.forward(model, x, t, start)
    if isinstance(cond, KVCache):
        return model(x, t, cache=cond, start_frame=start_frame, commit=commit)
    return model(x, t, cond, chunk_frames=chunk_frames)


def denoise_window(model, x: torch.Tensor, sigma: torch.Tensor, cond, *, uncond=None,
                   guidance: float = 1.0, start_frame: int | None = None,
                   chunk_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the DiT once on a window of frames; -> (v, x0), both [B, C, n, H, W].

    x [B, C, n, H, W]: frames [start_frame, start_frame + n) at noise levels sigma ([B, n]
    per frame, [B] or a float). cond: a KVCache / FrameCache (causal, read-only: the frames
    see the committed frames and each other block-causally) or a prompt embedding
    [B, L, text_dim] (the whole clip in one pass: bidirectional, or block-causal with
    chunk_frames). CFG when uncond (same kind as cond) is given:
    v = v_uncond + guidance * (v_cond - v_uncond)  (Self-Forcing's w is guidance - 1)."""
    B, n = x.shape[0], x.shape[2]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    try:
        sigma = (sigma[:, None] if sigma.ndim == 1 else sigma).expand(B, n)   # [B] is per sample
    except RuntimeError:
        raise ValueError(f"denoise_window: sigma {tuple(sigma.shape)} does not fit x {tuple(x.shape)}") from None
    t = sigma_to_timestep(sigma)
    if uncond is None or guidance == 1.0:
        v = _forward(model, x, t, cond, start_frame, chunk_frames)
    elif torch.is_tensor(cond) and torch.is_tensor(uncond) and cond.shape[1] == uncond.shape[1]:
        v_c, v_u = _forward(model, torch.cat([x, x]), torch.cat([t, t]),
                            torch.cat([cond, uncond.expand_as(cond)]), start_frame, chunk_frames).chunk(2)
        v = v_u + guidance * (v_c - v_u)
    else:
        v_c = _forward(model, x, t, cond, start_frame, chunk_frames)
        v_u = _forward(model, x, t, uncond, start_frame, chunk_frames)
        v = v_u + guidance * (v_c - v_u)
    return v, x0_from_v(x, v, sigma)


@torch.no_grad()
def commit_frames(model, cache, x: torch.Tensor, timestep: float, start_frame: int) -> None:
    """The clean pass: write frames [start_frame, start_frame + n) (x [B, C, n, H, W], at
    `timestep`) into the cache. Stored frames >= start_frame are replaced."""
    t = torch.full((x.shape[0], x.shape[2]), float(timestep), device=x.device)
    _forward(model, x.detach(), t, cache, start_frame, None, commit=True)


def commit_context(model, plan: CausalPlan, cache, noise: Noise, x: torch.Tensor, start_frame: int) -> None:
    """Commit clean latents x [B, C, n, H, W] of frames [start_frame, start_frame + n) as the
    plan's context: re-noised to plan.context_noise (draw CONTEXT) when it is > 0, then the
    clean pass at that timestep. What the loop does with every finished chunk and a prefix."""
    if plan.context_noise > 0:
        x = add_noise(x, noise(start_frame, x.shape[2], CONTEXT), timestep_to_sigma(plan.context_noise))
    commit_frames(model, cache, x, plan.context_noise, start_frame)


# ---------------------------------------------------------------------- the loop
@dataclass
class Switch:
    """A prompt switch at a chunk boundary (LongLive / Infinity-RoPE)."""

    frame: int                           # first frame conditioned on the new prompt
    context: torch.Tensor                # the new prompt embedding [B, L, text_dim]
    mode: str = "recache"                # recache (LongLive) | flush (Infinity-RoPE) | keep (old K/V stay)
    recache_frames: int | None = None    # recache: last frames re-run with the new prompt (None: all the cache holds)
    keep_last: int = 1                   # flush: frames kept besides the sink
    rope_jump: int = 0                   # temporal RoPE cut: frames from here sit this many positions further

    def __post_init__(self):
        if self.mode not in SWITCH_MODES:
            raise ForcelabError(f"prompt switch at frame {self.frame}: mode must be one of {SWITCH_MODES}, got {self.mode!r}")
        if self.rope_jump < 0 or self.keep_last < 0 or (self.recache_frames or 0) < 0:
            raise ForcelabError(f"prompt switch at frame {self.frame}: rope_jump, keep_last and recache_frames must be >= 0")


@dataclass
class Training:
    """Which pass carries gradients: iterations i with i % len(timesteps) == exit_step, for
    units starting at or after grad_from_frame (Self-Forcing: the last 21 frames)."""

    exit_step: int
    grad_from_frame: int = 0
    commit_last: bool = True    # False: the caller throws the cache away, so the last units' commit pass is skipped


@dataclass
class Chunk:
    start: int                           # first frame
    x: torch.Tensor                      # [B, C, n, H, W]: clean latents (training: the exit pass's x0)
    timesteps: torch.Tensor              # [n]: the timestep each frame's x was predicted from
    grad: bool = False                   # whether x carries gradients


@dataclass
class RolloutResult:
    x0: torch.Tensor                     # [B, C, F, H, W]
    grad_frames: torch.Tensor            # [F] bool: frames whose x0 carries gradients
    timesteps: torch.Tensor              # [F]: the timestep each x0 was predicted from
    exit_step: int | None = None
    exit_timesteps: tuple[float, float] | None = None   # (from, to) of the exit step in the list
    cache: object = None                 # the state to continue from (LongLive streaming tuning)


def cache_options(plan: CausalPlan, config) -> tuple[int, int | None, int]:
    """(chunk, window, sink) frames for a plan on a model config: the plan's fields, None
    fields from the config, window 0 = none. Checked here, before any work."""
    chunk = plan.chunk_frames or config.chunk_frames
    window = config.window_frames if plan.window_frames is None else (plan.window_frames or None)
    sink = config.sink_frames if plan.sink_frames is None else plan.sink_frames
    if window is None:
        if plan.sink_frames:
            raise ForcelabError(f"{plan.name}: an attention sink needs a window (window_frames); "
                                f"without one every past frame is visible anyway")
        if make_policy(plan.cache_policy).needs_window:
            raise ForcelabError(f"{plan.name}: cache policy {plan.cache_policy!r} decides what a full window "
                                f"keeps; set a window (window_frames)")
        return chunk, None, 0
    if window < chunk or window % chunk:
        raise ForcelabError(f"{plan.name}: window_frames ({window}) must be a positive multiple of "
                            f"chunk_frames ({chunk})")
    return chunk, window, sink


def make_cache(model, plan: CausalPlan, batch: int, height: int, width: int, max_frames: int,
               recompute: bool = False):
    """A cache sized from the plan (see cache_options); a FrameCache when recompute."""
    chunk, window, sink = cache_options(plan, model.config)
    if recompute:
        if plan.cache_policy != DEFAULT_POLICY:
            raise ForcelabError(f"{plan.name}: the recomputing FrameCache has no cache policy; "
                                f"use the KV cache for {plan.cache_policy!r}")
        return FrameCache(chunk, window, sink)
    return model.new_cache(batch, height, width, chunk_frames=chunk, window_frames=window,
                           sink_frames=sink, max_frames=None if window else max_frames,
                           cache_policy=plan.cache_policy)


def default_cache(model, plan: CausalPlan, noise: Noise, frames: int, start_frame: int | None = None,
                  prefix: torch.Tensor | None = None, recompute: bool = False):
    """The cache `stream` makes when none is given: room for the prefix and the frames."""
    end = (start_frame if start_frame is not None else (0 if prefix is None else prefix.shape[2])) + frames
    return make_cache(model, plan, noise.batch, noise.shape[1], noise.shape[2], end, recompute)


def stream(model, plan, context: torch.Tensor, noise: Noise, frames: int, *,
           negative: torch.Tensor | None = None, cache=None, start_frame: int | None = None,
           prefix: torch.Tensor | None = None, switches: Sequence[Switch] = (),
           training: Training | None = None, recompute: bool = False,
           trajectory: Callable[[int, torch.Tensor], None] | None = None) -> Iterator[Chunk]:
    """Generate `frames` latent frames with `plan`, yielding chunks as they are committed:
    `sample_teacher` for the Teacher plan, `causal_stream` for every causal plan.

    context: prompt embedding [B, L, text_dim] (None: keep the given cache's prompt).
    noise: the Noise source (batch, latent shape). cache: continue a stream (default: a new
    one from the plan, or a FrameCache recomputing everything when recompute=True).
    start_frame: first frame to generate (default: the cache's end). prefix: clean latents
    [B, C, p, H, W] of frames [start_frame - p, start_frame), committed first (continuation,
    recached context). Teacher plans: bidirectional over the whole clip, CFG with `negative`.
    trajectory (an ODE solve: the teacher plan, or a causal plan with update "euler"): the
    teacher plan calls trajectory(k, x_k) with the clip's latents at every solver state
    k = 0 .. S, x_0 the starting noise at sigmas[0], x_S the output; a causal plan calls
    trajectory(k, x_k, first_frame) with each unit's latents at every state as the unit passes
    it (x_S: its clean output, the latents committed to the cache). ODE pairs keep a few of
    them (distill/ode_init.py)."""
    _check_frames(frames)
    if isinstance(plan, Teacher):
        if switches or prefix is not None or cache is not None:
            raise ForcelabError("the teacher plan samples one clip bidirectionally: no cache, prefix or prompt switches")
        yield from sample_teacher(model, plan, context, noise, frames, negative=negative, start_frame=start_frame,
                                  training=training, trajectory=trajectory)
        return
    if trajectory is not None and (plan.update != "euler" or training is not None):
        raise ForcelabError(f"{plan.name}: trajectory recording is for ODE solves: the teacher plan, or a causal "
                            f"plan with update 'euler' outside training (this one re-noises or trains)")
    yield from causal_stream(model, plan, context, noise, frames, cache=cache, start_frame=start_frame,
                             prefix=prefix, switches=switches, training=training, recompute=recompute,
                             trajectory=trajectory)


def _check_frames(frames: int) -> None:
    if frames < 1:
        raise ForcelabError(f"frames must be >= 1, got {frames}")


def _sigmas(plan) -> list[float]:
    """The plan's noise levels, then 0 (clean): sigmas[level] is where level `level` starts."""
    return [timestep_to_sigma(t) for t in plan.timesteps] + [0.0]


def _window_sigma(sigmas: list[float], levels: list[int], unit: int, batch: int, device) -> torch.Tensor:
    """[B, n]: each frame of the window at its unit's level."""
    return torch.tensor([sigmas[lv] for lv in levels for _ in range(unit)], device=device).expand(batch, -1)


def sample_teacher(model, plan: Teacher, context: torch.Tensor, noise: Noise, frames: int, *,
                   negative: torch.Tensor | None = None, start_frame: int | None = None,
                   training: Training | None = None,
                   trajectory: Callable[[int, torch.Tensor], None] | None = None) -> Iterator[Chunk]:
    """The bidirectional teacher: the whole clip of `frames` frames, one solver step per level
    with CFG (`negative` is the unconditional prompt), yielded as one chunk. trajectory and
    training: as for `stream` (the exit pass's x0 is the output when training)."""
    _check_frames(frames)
    start = start_frame or 0
    solver = make_solver(plan.solver, plan.steps, plan.shift, plan.sigma_max)
    if plan.guidance != 1.0 and negative is None:
        raise ForcelabError("the teacher plan with guidance != 1 needs a negative prompt embedding "
                            "(encode the negative prompt, or '' for none)")
    sigmas = _sigmas(plan)
    S = len(sigmas) - 1
    grad_allowed = torch.is_grad_enabled()      # an outer no_grad wins over the training hooks
    exit_x0 = None                              # training: (x0 of the gradient pass, its level)
    x = noise(start, frames, INITIAL)
    for i, (_, (level,)) in enumerate(plan.iterations()):
        if trajectory is not None:
            trajectory(level, x)
        sig = _window_sigma(sigmas, [level], frames, noise.batch, x.device)
        grad_pass = training is not None and i % S == training.exit_step
        keep = grad_pass and grad_allowed and start >= training.grad_from_frame
        with torch.set_grad_enabled(keep):
            v, x0 = denoise_window(model, x, sig, context, uncond=negative, start_frame=start,
                                   guidance=plan.guidance)
        if grad_pass:
            exit_x0 = (x0 if keep else x0.detach(), level)
        with torch.no_grad():
            x = solver.step(level, x, v)
    if trajectory is not None:
        trajectory(S, x)
    if training is None:
        yield Chunk(start, x, torch.full((frames,), plan.timesteps[-1], dtype=torch.float64))
    else:
        out, level = exit_x0 or (x, S - 1)
        yield Chunk(start, out, torch.full((frames,), plan.timesteps[level], dtype=torch.float64), out.requires_grad)


def causal_stream(model, plan: CausalPlan, context: torch.Tensor | None, noise: Noise, frames: int, *,
                  cache=None, start_frame: int | None = None, prefix: torch.Tensor | None = None,
                  switches: Sequence[Switch] = (), training: Training | None = None,
                  recompute: bool = False,
                  trajectory: Callable[[int, torch.Tensor, int], None] | None = None) -> Iterator[Chunk]:
    """The causal loop: per iteration of the plan, one `denoise_window` over the units in
    flight, each moved to its next level; finished units are committed to the cache (at the
    plan's context noise) and yielded. Arguments: as for `stream`."""
    _check_frames(frames)
    if cache is None:
        cache = default_cache(model, plan, noise, frames, start_frame, prefix, recompute)
    unit = plan.unit_frames(cache.chunk_frames)
    if frames % unit:
        raise ForcelabError(f"{plan.name}: frames ({frames}) must be a multiple of {unit} (frames per block)")
    if context is not None:
        set_prompt(model, cache, context)
    start_frame = _causal_start(plan, cache, start_frame, prefix)
    switches = sorted(switches, key=lambda s: s.frame)
    _check_switches(switches, start_frame, frames, unit, cache)
    sigmas = _sigmas(plan)
    S = len(sigmas) - 1
    keep = max([_recache_frames(sw, cache) for sw in switches if sw.mode == "recache"], default=0)
    history: deque = deque(maxlen=keep or 1)   # (frame, clean latents [B, C, 1, H, W]) for recache

    def commit(x, f0, record=True):
        commit_context(model, plan, cache, noise, x, f0)
        if keep and record:
            history.extend((f0 + j, x[:, :, j:j + 1].detach()) for j in range(x.shape[2]))

    if prefix is not None:
        commit(prefix.to(noise.dtype), start_frame - prefix.shape[2])

    grad_allowed = torch.is_grad_enabled()     # an outer no_grad wins over the training hooks
    inflight: dict[int, torch.Tensor] = {}     # unit -> its latents at its current level
    exit_x0: dict[int, tuple] = {}              # training: unit -> (x0 of its gradient pass, level)
    done = 0                                    # units [0, done) are committed
    for i, (first, levels) in enumerate(plan.iterations(frames // unit, cache.chunk_frames)):
        skip = max(0, done - first)             # units that already left (training exit)
        first, levels = first + skip, levels[skip:]
        if not levels:
            continue
        f0 = start_frame + first * unit
        starts = [f0 + k * unit for k in range(len(levels))]
        for k, level in enumerate(levels):
            if level == 0:
                while switches and switches[0].frame <= starts[k]:
                    _apply_switch(model, cache, switches.pop(0), history, commit)
                inflight[first + k] = noise(starts[k], unit, INITIAL)
        if trajectory is not None:
            for k, level in enumerate(levels):
                trajectory(level, inflight[first + k], starts[k])
        x = torch.cat([inflight[first + k] for k in range(len(levels))], dim=2)
        sig = _window_sigma(sigmas, levels, unit, noise.batch, x.device)
        grad_pass = training is not None and i % S == training.exit_step
        keeps = [grad_pass and grad_allowed and f >= training.grad_from_frame for f in starts]
        with torch.set_grad_enabled(any(keeps)):
            v, x0 = denoise_window(model, x, sig, cache, start_frame=f0)
        early = grad_pass and plan.finish_at_exit
        finished = []
        for k, level in enumerate(levels):
            u, sl = first + k, slice(k * unit, (k + 1) * unit)
            if grad_pass:
                exit_x0[u] = (x0[:, :, sl] if keeps[k] else x0[:, :, sl].detach(), level)
            nxt = _next_level(plan, noise, x[:, :, sl], v[:, :, sl], x0[:, :, sl], sigmas, level, starts[k], early)
            if level + 1 == S or early:
                inflight.pop(u)
                finished.append((u, nxt))
                if trajectory is not None:
                    trajectory(S, nxt, starts[k])
            else:
                inflight[u] = nxt
        if not finished:
            continue
        if [u for u, _ in finished] != list(range(done, done + len(finished))):
            raise RuntimeError(f"plan finished units {[u for u, _ in finished]} out of order (committed: {done})")
        c0 = start_frame + done * unit
        clean = torch.cat([n for _, n in finished], dim=2)
        done += len(finished)
        if training is None or training.commit_last or done < frames // unit:
            commit(clean, c0)
        yield _committed_chunk(plan, c0, clean, finished, exit_x0, training, unit, S)


def _causal_start(plan: CausalPlan, cache, start_frame: int | None, prefix: torch.Tensor | None) -> int:
    """The first generated frame (default: after the cache's frames and the prefix), checked."""
    p = 0 if prefix is None else prefix.shape[2]
    start = cache.end_frame + p if start_frame is None else start_frame
    if start % cache.chunk_frames:
        raise ForcelabError(f"{plan.name}: start frame {start} is not at a chunk boundary ({cache.chunk_frames} frames)")
    return start


@torch.no_grad()
def _next_level(plan: CausalPlan, noise: Noise, x, v, x0, sigmas: list[float], level: int, start: int,
                early: bool) -> torch.Tensor:
    """One unit's latents at its next level: x0 itself when it leaves at the training exit, an
    Euler step, or x0 re-noised to the next level (fresh noise of draw level + 1)."""
    if early:
        return x0.detach()
    if plan.update == "euler":
        return euler_step(x, v, sigmas[level], sigmas[level + 1])
    return add_noise(x0.detach(), noise(start, x.shape[2], level + 1), sigmas[level + 1])


def _committed_chunk(plan: CausalPlan, c0: int, clean: torch.Tensor, finished: list, exit_x0: dict,
                     training: Training | None, unit: int, S: int) -> Chunk:
    """What the stream yields for units just committed: their clean latents, or in training the
    x0 of each unit's gradient pass (and the timestep it was predicted from)."""
    if training is None:
        return Chunk(c0, clean, torch.full((clean.shape[2],), plan.timesteps[-1], dtype=torch.float64))
    outs = [exit_x0.pop(u, (n, S - 1)) for u, n in finished]
    out = torch.cat([o for o, _ in outs], dim=2)
    t = torch.tensor([plan.timesteps[lv] for _, lv in outs for _ in range(unit)], dtype=torch.float64)
    return Chunk(c0, out, t, out.requires_grad)


def rollout(model, plan, context, noise: Noise, frames: int, *, recompute: bool = False,
            **kwargs) -> RolloutResult:
    """`stream`, collected (what training calls): x0 of every frame [B, C, frames, H, W],
    which frames carry gradients, the timestep each x0 was predicted at, and the cache."""
    if kwargs.get("cache") is None and not isinstance(plan, Teacher):
        kwargs["cache"] = default_cache(model, plan, noise, frames, kwargs.get("start_frame"),
                                        kwargs.get("prefix"), recompute)
    chunks = list(stream(model, plan, context, noise, frames, **kwargs))
    training = kwargs.get("training")
    exit_t = None
    if training is not None:
        ts = list(plan.timesteps) + [0.0]
        exit_t = (ts[training.exit_step], ts[training.exit_step + 1])
    return RolloutResult(
        x0=torch.cat([c.x for c in chunks], dim=2),
        grad_frames=torch.cat([torch.full((c.x.shape[2],), c.grad) for c in chunks]),
        timesteps=torch.cat([c.timesteps for c in chunks]),
        exit_step=None if training is None else training.exit_step,
        exit_timesteps=exit_t, cache=kwargs.get("cache"))


# ---------------------------------------------------------------------- switches
def _recache_frames(sw: Switch, cache) -> int:
    if sw.recache_frames is not None:
        return sw.recache_frames
    return cache.num_slots - cache.sink_frames if isinstance(cache, KVCache) else 0


def _check_switches(switches: list[Switch], start: int, frames: int, unit: int, cache) -> None:
    for sw in switches:
        if not start < sw.frame < start + frames:
            raise ForcelabError(f"prompt switch at frame {sw.frame} is outside the generated frames "
                                f"({start + 1}..{start + frames - 1})")
        if (sw.frame - start) % unit:
            raise ForcelabError(f"prompt switch at frame {sw.frame} is not at a chunk boundary "
                                f"(chunks of {unit} frames from frame {start})")
        if isinstance(cache, FrameCache):
            raise ForcelabError("prompt switches need the KV cache (not the recompute reference)")
    frames_seen = [sw.frame for sw in switches]
    if len(set(frames_seen)) != len(frames_seen):
        raise ForcelabError(f"two prompt switches at the same frame: {frames_seen}")


def _apply_switch(model, cache: KVCache, sw: Switch, history: deque, commit) -> None:
    """New cross-attention prompt; then recache (LongLive: clear all but the sink, re-run the
    last frames with the new prompt), flush (Infinity-RoPE: keep sink + last frames) or keep;
    then the optional RoPE cut (frames from here on sit rope_jump positions further)."""
    if sw.context.shape[0] not in (1, cache.k[0].shape[0]):
        raise ForcelabError(f"prompt switch at frame {sw.frame}: the new prompt has batch "
                            f"{sw.context.shape[0]}, the stream {cache.k[0].shape[0]}")
    model.set_prompt(cache, sw.context.expand(cache.k[0].shape[0], -1, -1))
    if sw.mode == "recache":
        end = cache.end_frame
        lo = max(cache.sink_frames, end - _recache_frames(sw, cache))
        cache.reset(keep_sink=True)
        frames = [(f, x) for f, x in history if lo <= f < end]
        if frames:
            if [f for f, _ in frames] != list(range(frames[0][0], end)):
                raise RuntimeError("recache: the history of committed frames has a gap")
            commit(torch.cat([x for _, x in frames], dim=2), frames[0][0], record=False)
    elif sw.mode == "flush":
        cache.flush(keep_last=sw.keep_last)
    if sw.rope_jump:
        cache.rope_offset += sw.rope_jump
