"""Timestep draws for training: the score-distillation draw (DMD / critic), flow-matching
training draws (teacher, diffusion forcing), per-chunk levels from a list (CausVid, ODE init),
and AR-Diffusion's non-decreasing per-frame levels (FoPP).

Units: continuous timesteps t in [0, 1000] = sigma * 1000 (models/schedule.py), float32;
AR-Diffusion's levels are integers in [0, levels). Every draw takes an optional
torch.Generator and makes its tensors on that generator's device (CPU without one).

Non-decreasing sequences (AR-Diffusion, T = levels, F = frames). The number of non-decreasing
completions t_f <= ... <= t_{F-1} in [0, T) with t_f = t is C(T - 1 - t + F - 1 - f, F - 1 - f)
(a multiset of F - 1 - f values from [t, T)); the number of prefixes t_0 <= ... <= t_f = t is
C(t + f, f). These are the paper's mat_s and mat_e in closed form; they overflow int64 for
T = 1000, F = 16, so we keep their logarithms (float64 lgamma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from ..errors import ForcelabError
from ..models.schedule import NUM_TRAIN_TIMESTEPS, shift_sigma, sigma_to_timestep, training_sigmas

FLOW_DISTRIBUTIONS = ("uniform", "logit_normal")
# the DMD / critic timestep draw's defaults (Self-Forcing): shift 5, clamped to [20, 980]
SCORE_SHIFT, SCORE_T_MIN, SCORE_T_MAX = 5.0, 20.0, 980.0


def _device(generator: torch.Generator | None, device=None) -> torch.device:
    return generator.device if generator is not None else torch.device(device or "cpu")


def _check_count(name: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise ForcelabError(f"{name} must be a positive integer, got {value}")


def _check_range(t_min: float, t_max: float) -> None:
    if not 0 <= t_min <= t_max <= NUM_TRAIN_TIMESTEPS:
        raise ForcelabError(f"timestep range [{t_min}, {t_max}] must satisfy 0 <= t_min <= t_max <= "
                            f"{NUM_TRAIN_TIMESTEPS}")


# ---------------------------------------------------------------------- score distillation
def snap_to_table(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Each timestep -> the nearest entry of the 1000-entry shifted training table
    (1000 * training_sigmas(shift)). The public Self-Forcing code noises and converts flow <-> x0
    at these snapped levels (shift 5 for the generator, 8 in the score wrappers)."""
    table = sigma_to_timestep(training_sigmas(shift)).to(t.device)
    return table[(t.double()[..., None] - table).abs().argmin(-1)].to(t.dtype)


@dataclass(frozen=True)
class ScoreTimesteps:
    """The DMD / critic timestep draw: k ~ U{0 .. 999}, t = 1000 * shift(k / 1000) with
    `shift`, clamped to [t_min, t_max]; one timestep per sample (Self-Forcing: shift 5,
    [20, 980]). snap_shift: also snap to the shifted table of that shift, as the public code
    does (None: t is used as drawn, sigma = t / 1000 exactly)."""

    shift: float = SCORE_SHIFT  # >= 1 moves the draw towards high noise
    t_min: float = SCORE_T_MIN  # the clamp (the public code's 0.02 * 1000)
    t_max: float = SCORE_T_MAX  # and 0.98 * 1000
    snap_shift: float | None = None

    def sample(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return sample_timesteps(batch, shift=self.shift, t_min=self.t_min, t_max=self.t_max,
                                snap_shift=self.snap_shift, generator=generator, device=device)


def sample_timesteps(batch: int, *, shift: float = SCORE_SHIFT, t_min: float = SCORE_T_MIN,
                     t_max: float = SCORE_T_MAX, snap_shift: float | None = None,
                     generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """The DMD / critic draw (see ScoreTimesteps), -> t [batch] float32 in [t_min, t_max]."""
    _check_count("batch", batch)
    _check_range(t_min, t_max)
    k = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator, device=_device(generator, device))
    t = sigma_to_timestep(shift_sigma(k.double() / NUM_TRAIN_TIMESTEPS, shift)).clamp(t_min, t_max)
    if snap_shift is not None:
        t = snap_to_table(t, snap_shift)
    return t.float()


# ---------------------------------------------------------------------- flow-matching training
def per_chunk(values: torch.Tensor, chunk_frames: int, frames: int) -> torch.Tensor:
    """[B, chunks] -> [B, frames]: every frame of a chunk takes its chunk's value (a last,
    shorter chunk is allowed: frames <= chunks * chunk_frames)."""
    _check_count("chunk_frames", chunk_frames)
    if values.shape[1] * chunk_frames < frames:
        raise ForcelabError(f"{values.shape[1]} chunks of {chunk_frames} frames do not cover {frames} frames")
    return values.repeat_interleave(chunk_frames, dim=1)[:, :frames]


def sample_flow_timesteps(batch: int, frames: int | None = None, *, chunk_frames: int = 1,
                          distribution: str = "uniform", shift: float = 1.0, logit_mean: float = 0.0,
                          logit_std: float = 1.0, t_min: float = 0.0, t_max: float = float(NUM_TRAIN_TIMESTEPS),
                          generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Flow-matching training draw: u ~ U[0, 1) ("uniform") or sigmoid(N(logit_mean, logit_std^2))
    ("logit_normal", SD3), t = 1000 * shift(u), clamped to [t_min, t_max].

    frames None -> t [batch] (one level per sample: the teacher); otherwise t [batch, frames]
    with one level per chunk of `chunk_frames` frames (diffusion forcing; chunk_frames=1 is
    one level per frame)."""
    _check_count("batch", batch)
    _check_range(t_min, t_max)
    if distribution not in FLOW_DISTRIBUTIONS:
        raise ForcelabError(f"timestep distribution must be one of {FLOW_DISTRIBUTIONS}, got {distribution!r}")
    if distribution == "logit_normal" and logit_std <= 0:
        raise ForcelabError(f"logit_std must be > 0, got {logit_std}")
    chunks = 1 if frames is None else -(-frames // chunk_frames)
    if frames is not None:
        _check_count("frames", frames)
    dev = _device(generator, device)
    if distribution == "uniform":
        u = torch.rand(batch, chunks, generator=generator, device=dev, dtype=torch.float64)
    else:
        z = torch.randn(batch, chunks, generator=generator, device=dev, dtype=torch.float64)
        u = torch.sigmoid(logit_mean + logit_std * z)
    t = sigma_to_timestep(shift_sigma(u, shift)).clamp(t_min, t_max).float()
    return t[:, 0] if frames is None else per_chunk(t, chunk_frames, frames)


def choose_levels(levels: Sequence[float], batch: int, frames: int, chunk_frames: int = 1,
                  generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Each chunk picks one of `levels` uniformly (CausVid's [1000, 757, 522, 0], ODE init's
    stored steps) -> t [batch, frames] float32, constant within a chunk."""
    if len(levels) == 0:
        raise ForcelabError("choose_levels: the list of levels is empty")
    _check_count("batch", batch)
    _check_count("frames", frames)
    dev = _device(generator, device)
    table = torch.tensor([float(x) for x in levels], device=dev)
    idx = torch.randint(0, len(levels), (batch, -(-frames // chunk_frames)), generator=generator, device=dev)
    return per_chunk(table[idx], chunk_frames, frames)


# ---------------------------------------------------------------------- AR-Diffusion (FoPP)
def _log_comb(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


@lru_cache(maxsize=16)
def nondecreasing_log_counts(frames: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_suffix, log_prefix), each [levels, frames] float64 (CPU):
    log_suffix[t, f] = log #{non-decreasing t_f..t_{F-1} with t_f = t}   (AR-Diffusion's mat_s)
    log_prefix[t, f] = log #{non-decreasing t_0..t_f with t_f = t}       (its mat_e)."""
    t = torch.arange(levels, dtype=torch.float64)[:, None]
    f = torch.arange(frames, dtype=torch.float64)[None, :]
    rest = frames - 1 - f
    return _log_comb(levels - 1 - t + rest, rest.expand(levels, frames)), _log_comb(t + f, f.expand(levels, frames))


def _draw_between(log_w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
    """One level per sample, P(t) proportional to exp(log_w[t]) for lo <= t <= hi.
    log_w [T] float64, lo / hi [B] long -> [B] long (inverse CDF, one uniform per sample)."""
    levels = torch.arange(log_w.shape[0], device=lo.device)
    allowed = (levels >= lo[:, None]) & (levels <= hi[:, None])                     # [B, T]
    logits = torch.where(allowed, log_w[None, :], torch.tensor(-math.inf, dtype=torch.float64, device=lo.device))
    cdf = torch.softmax(logits, dim=-1).cumsum(-1)
    u = torch.rand(lo.shape[0], 1, generator=generator, device=lo.device, dtype=torch.float64) * cdf[:, -1:]
    return torch.minimum(torch.maximum((cdf <= u).sum(-1), lo), hi)


def _walk(start_frame: torch.Tensor, start_level: torch.Tensor, frames: int, levels: int,
          generator: torch.Generator | None) -> torch.Tensor:
    """Complete each sample's sequence from (start_frame, start_level) uniformly among the
    non-decreasing sequences through it: backward with prefix counts, forward with suffix
    counts. -> [B, frames] long."""
    log_suffix, log_prefix = (x.to(start_level.device) for x in nondecreasing_log_counts(frames, levels))
    B = start_level.shape[0]
    out = torch.empty(B, frames, dtype=torch.long, device=start_level.device)
    out.scatter_(1, start_frame[:, None], start_level[:, None])
    zero, top = torch.zeros_like(start_level), torch.full_like(start_level, levels - 1)
    for f in range(int(start_frame.max()) - 1, -1, -1):        # backward: t_f <= t_{f+1}
        t = _draw_between(log_prefix[:, f], zero, out[:, f + 1], generator)
        out[:, f] = torch.where(f < start_frame, t, out[:, f])
    for f in range(int(start_frame.min()) + 1, frames):         # forward: t_f >= t_{f-1}
        t = _draw_between(log_suffix[:, f], out[:, f - 1], top, generator)
        out[:, f] = torch.where(f > start_frame, t, out[:, f])
    return out


def fopp_sample(batch: int, frames: int, levels: int, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """AR-Diffusion's FoPP draw -> levels [batch, frames] long in [0, levels), non-decreasing
    along frames (earlier frames are cleaner). Per sample: f* ~ U{0..F-1}, t* ~ U{0..T-1},
    then a sequence uniformly among the non-decreasing sequences with t_{f*} = t*."""
    for name, value in (("batch", batch), ("frames", frames), ("levels", levels)):
        _check_count(name, value)
    dev = _device(generator, device)
    f_star = torch.randint(0, frames, (batch,), generator=generator, device=dev)
    t_star = torch.randint(0, levels, (batch,), generator=generator, device=dev)
    return _walk(f_star, t_star, frames, levels, generator)


def uniform_nondecreasing_sample(batch: int, frames: int, levels: int,
                                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """AR-Diffusion's forward-only draw: uniform over ALL non-decreasing sequences
    -> [batch, frames] long in [0, levels). t_0 is drawn with weight = its number of
    completions, then the forward walk."""
    for name, value in (("batch", batch), ("frames", frames), ("levels", levels)):
        _check_count(name, value)
    dev = _device(generator, device)
    log_suffix = nondecreasing_log_counts(frames, levels)[0].to(dev)
    zero = torch.zeros(batch, dtype=torch.long, device=dev)
    t0 = _draw_between(log_suffix[:, 0], zero, torch.full_like(zero, levels - 1), generator)
    return _walk(zero, t0, frames, levels, generator)


def ar_sigmas(levels: torch.Tensor, num_levels: int, shift: float = 1.0) -> torch.Tensor:
    """AR-Diffusion's integer levels in [0, num_levels) -> flow sigmas in (0, 1]: level l is
    sigma (l + 1) / num_levels (the last level is pure noise), then shifted."""
    return shift_sigma((levels.double() + 1) / num_levels, shift).float()
