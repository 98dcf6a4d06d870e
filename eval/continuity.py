"""Continuity across chunk boundaries: a causal student makes its video chunk by chunk, and a
seam shows as a jump from the last frame of a chunk to the first of the next that is larger
than the steps between frames inside chunks. Bidirectional ODE init is known to leave such
seams (the reason Causal Forcing samples its ODE pairs from a causal teacher).

    starts = chunk_starts(frames=33, chunk_latent=2, temporal_stride=4)   # pixel frames opening chunks 1..
    boundary_jump(frames, starts)     # mean step into a chunk / mean step inside chunks (1: no seam)
    continuity(frames, starts)        # min(1, 1 / boundary_jump): 1 = seamless, lower = seams

A step is the mean absolute difference of two consecutive frames (uint8 [T, H, W, 3], in
0..255 levels). Ratios, not levels: a fast scene and a slow one read alike, and only what
happens AT the boundaries counts.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ForcelabError


def frame_steps(frames) -> np.ndarray:
    """[T - 1]: mean |frame[t + 1] - frame[t]| over pixels and channels."""
    f = np.asarray(frames, np.float64)
    return np.abs(np.diff(f, axis=0)).reshape(len(f) - 1, -1).mean(1)


def chunk_starts(frames: int, chunk_latent: int, temporal_stride: int = 1) -> list[int]:
    """The first pixel frame of every latent chunk after the first, for `frames` pixel frames
    from a causal codec (latent 0 is pixel 0, latent j >= 1 pixels 1 + (j - 1) s .. j s)."""
    if chunk_latent < 1 or temporal_stride < 1:
        raise ForcelabError(f"chunk_starts: chunk_latent and temporal_stride must be >= 1, got {chunk_latent}, "
                            f"{temporal_stride}")
    latent = 1 + (frames - 1) // temporal_stride
    return [1 + (b - 1) * temporal_stride for b in range(chunk_latent, latent, chunk_latent)]


def boundary_jump(frames, starts) -> float:
    """Mean step into a chunk (frame s - 1 -> s, s in starts) over the mean step inside chunks;
    NaN when there is no boundary or no step inside a chunk; 1 when nothing moves at all."""
    steps = frame_steps(frames)
    at = np.zeros(len(steps), bool)
    for s in starts:
        if not 1 <= s < len(steps) + 1:
            raise ForcelabError(f"boundary_jump: chunk start {s} is outside frames 1..{len(steps)}")
        at[s - 1] = True
    if not at.any() or at.all():
        return math.nan
    across, inside = float(steps[at].mean()), float(steps[~at].mean())
    if inside == 0:
        return 1.0 if across == 0 else math.inf
    return across / inside


def continuity(frames, starts) -> float:
    """min(1, 1 / boundary_jump): 1 when the steps into chunks are no larger than those inside."""
    jump = boundary_jump(frames, starts)
    return jump if math.isnan(jump) else min(1.0, 1.0 / jump)
