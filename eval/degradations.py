"""Known degradations of toy-world videos, to check that a metric sees what it should.

    frames = clip.video.permute(0, 2, 3, 1).numpy()           # ground truth, uint8 [T, H, W, 3]
    bad = blur(frames, ramp(len(frames), 1.5))                 # sigma 0 -> 1.5 px over the clip
    flat = blur(frames, constant(len(frames), 0.75))           # the same harm, not growing
    slow = slow_down(clip, final_speed=0.25)                   # motion decelerates to a quarter
    back = reverse(clip, at=20.5, ball=0)                      # ball 0 turns back mid-step
    seamed = seams(clip, starts=[8, 16, 24], skip=3.0)         # balls jump 3 frames ahead at each chunk
    ghost = ghost_ball(clip, range(8, 16), opacity=0.8)        # a faint uncaptioned ball in frames 8..15

Pixel corruptions take decoded frames (uint8 [T, H, W, 3], the space ToyBench measures) and a
strength per frame ([T]; `ramp` grows it, `constant` holds it); a strength of 0 returns the
frame unchanged, bit for bit. Motion and identity corruptions take a ToyClip (its scene is the
ground truth) and re-render it with the toy world's renderer, so that nothing but the named
defect differs from ground truth. Every function is pure: same inputs, same frames.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..data.toyworld import ToyClip, ToyWorld, ToyWorldConfig
from ..errors import ForcelabError

BLUR_TRUNCATE = 3.0               # Gaussian kernel half-width, in sigmas
SHIFT_DIRECTION = (1.0, 0.0, -1.0)   # default colour shift: towards red, away from blue (RGB)


def ramp(frames: int, final: float, initial: float = 0.0) -> np.ndarray:
    """A strength growing linearly from `initial` at frame 0 to `final` at the last frame, [frames]."""
    return np.linspace(initial, final, int(frames)) if frames > 1 else np.full(int(frames), float(final))


def constant(frames: int, level: float) -> np.ndarray:
    """The same strength at every frame, [frames]."""
    return np.full(int(frames), float(level))


def shift_colour(frames, amount, direction=SHIFT_DIRECTION) -> np.ndarray:
    """Every pixel moved by amount[t] RGB levels (0..255) along the unit `direction`, clipped:
    a colour cast (background included) of amount[t] at frame t."""
    frames, amount = _check(frames, amount, "shift_colour amount")
    unit = np.asarray(direction, np.float64)
    if unit.shape != (3,) or not np.linalg.norm(unit) > 0:
        raise ForcelabError(f"shift_colour: direction must be 3 numbers (RGB), not all 0; got {direction!r}")
    unit = unit / np.linalg.norm(unit)
    return _to_uint8(frames + amount[:, None, None, None] * unit)


def saturate(frames, gain) -> np.ndarray:
    """Saturation raised by gain[t] (0: unchanged, 1: twice as saturated): each pixel's
    distance from its grey (the mean of its channels) scaled by 1 + gain[t], clipped. The
    colours drift towards the palette's extremes, as an over-saturating model's do."""
    frames, gain = _check(frames, gain, "saturate gain")
    if (gain < -1).any():
        raise ForcelabError(f"saturate: gain must be >= -1 (-1 is grey), got min {gain.min()}")
    grey = frames.mean(-1, keepdims=True)
    return _to_uint8(grey + (1.0 + gain[:, None, None, None]) * (frames - grey))


def blur(frames, sigma) -> np.ndarray:
    """Each frame t convolved with a Gaussian of standard deviation sigma[t] px (separable,
    kernel half-width ceil(BLUR_TRUNCATE * sigma), edges replicated)."""
    frames, sigma = _check(frames, sigma, "blur sigma")
    if (sigma < 0).any():
        raise ForcelabError(f"blur: sigma must be >= 0 px, got min {sigma.min()}")
    out = frames.copy()
    for t, s in enumerate(sigma):
        if s > 0:
            out[t] = _gaussian(_gaussian(frames[t], s, axis=0), s, axis=1)
    return _to_uint8(out)


def _gaussian(image: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    half = int(np.ceil(BLUR_TRUNCATE * sigma))
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    taps /= taps.sum()
    pad = [(0, 0)] * image.ndim
    pad[axis] = (half, half)
    padded = np.pad(image, pad, mode="edge")
    n = image.shape[axis]
    return sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(taps))


def swap_identities(clip: ToyClip, frame: int, balls: tuple[int, int] = (0, 1),
                    config: ToyWorldConfig | None = None) -> np.ndarray:
    """The clip re-rendered with balls[0] and balls[1] exchanging colours from `frame` on
    (each keeps its own path and size): the set of colours on screen never changes."""
    i, j = balls
    n = len(clip.scene.colors)
    if not (0 <= i < n and 0 <= j < n and i != j):
        raise ForcelabError(f"swap_identities: balls must be two different indices below {n}, got {balls}")
    world = ToyWorld(config)
    swapped = replace(clip.scene, colors=list(clip.scene.colors))
    swapped.colors[i], swapped.colors[j] = swapped.colors[j], swapped.colors[i]
    before = world.render(clip.scene, clip.positions[:frame])
    after = world.render(swapped, clip.positions[frame:])
    return np.concatenate([_frames(before), _frames(after)])


def retime(clip: ToyClip, times, config: ToyWorldConfig | None = None) -> np.ndarray:
    """The clip re-rendered with ball i at time times[t, i] (frames from the clip's first,
    real-valued; [T] for every ball alike) instead of t: the toy world's exact motion on
    another clock. A clock that slows slows the motion; one that runs back reverses it."""
    times = np.asarray(times, np.float64)
    T, n = len(clip.positions), len(clip.scene.colors)
    if times.ndim == 1:
        times = np.repeat(times[:, None], n, 1)
    if times.shape != (T, n):
        raise ForcelabError(f"retime: times must be [T] or [T, N] = [{T}] or [{T}, {n}], got {list(times.shape)}")
    world = ToyWorld(config)
    positions = np.stack([world.positions_at(clip.scene, clip.start + times[:, i])[:, i] for i in range(n)], 1)
    return _frames(world.render(clip.scene, positions))


def slow_down(clip: ToyClip, final_speed: float, config: ToyWorldConfig | None = None) -> np.ndarray:
    """Motion decelerating steadily: every ball's speed falls linearly from its own at frame 0
    to final_speed times it at the last frame (the clock tau(t) = t - (1 - final_speed) t^2 / 2(T-1))."""
    if not 0 <= final_speed <= 1:
        raise ForcelabError(f"slow_down: final_speed is a fraction of the true speed in [0, 1], got {final_speed}")
    t = np.arange(len(clip.positions), dtype=np.float64)
    return retime(clip, t - (1 - final_speed) * t ** 2 / (2 * max(len(t) - 1, 1)), config)


def reverse(clip: ToyClip, at: float, ball: int = 0, config: ToyWorldConfig | None = None) -> np.ndarray:
    """Ball `ball` turning straight back at time `at` (frames, may fall between two frames),
    wherever it is: it retraces its path from there (the clock tau(t) = 2 at - t after `at`).
    Away from a wall no lawful motion does this."""
    n = len(clip.scene.colors)
    if not 0 <= ball < n:
        raise ForcelabError(f"reverse: ball must be an index below {n}, got {ball}")
    t = np.arange(len(clip.positions), dtype=np.float64)
    times = np.repeat(t[:, None], n, 1)
    times[:, ball] = np.where(t <= at, t, 2 * at - t)
    return retime(clip, times, config)


def seams(clip: ToyClip, starts, skip: float, config: ToyWorldConfig | None = None) -> np.ndarray:
    """The clip with its clock jumping `skip` frames forward at every chunk start (pixel frames
    `starts`): inside a chunk the motion is the world's, across a boundary every ball jumps as
    if `skip` frames had passed unseen (the seam a causal student trained on bidirectional ODE
    pairs leaves between chunks)."""
    t = np.arange(len(clip.positions), dtype=np.float64)
    jumps = np.zeros_like(t)
    for s in starts:
        if not 0 < s < len(t):
            raise ForcelabError(f"seams: chunk start {s} is outside frames 1..{len(t) - 1}")
        jumps[s:] += skip
    return retime(clip, t + jumps, config)


def ghost_ball(clip: ToyClip, frames, color: str | None = None, opacity: float = 1.0, radius: float | None = None,
               config: ToyWorldConfig | None = None) -> np.ndarray:
    """The clip with an extra, still ball of `color` (default: the first palette colour the
    scene lacks) drawn over the others in `frames` (pixel frame indices) only, at `opacity` (1:
    the renderer's own ball; less: a faint ghost between its colour and the background), of
    `radius` px (default: the world's largest). It sits in free space: at the whole pixel
    farthest from every ball's edge over those frames, so that (where the frame has room) it
    hides and touches none and the detector sees the other balls as without it. The other
    frames are the clip's, bit for bit."""
    world = ToyWorld(config)
    c = world.config
    color = color or next((k for k in c.colors if k not in clip.scene.colors), None)
    if color is None or color in clip.scene.colors:
        raise ForcelabError(f"ghost_ball: need a colour the scene lacks (it has {clip.scene.colors}), got {color}")
    if not 0 < opacity <= 1:
        raise ForcelabError(f"ghost_ball: opacity must be in (0, 1], got {opacity}")
    T = len(clip.positions)
    chosen = sorted(set(int(t) for t in frames))
    if not chosen or not all(0 <= t < T for t in chosen):
        raise ForcelabError(f"ghost_ball: frames must be indices in 0..{T - 1}, got {list(frames)}")
    radius = max(c.radius) if radius is None else float(radius)
    ys, xs = np.mgrid[math.ceil(radius):int(c.height - radius) + 1, math.ceil(radius):int(c.width - radius) + 1]
    spots = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float64)                # [S, 2] (x, y)
    balls = clip.positions[chosen].reshape(-1, 2)                                     # [F N, 2]
    gap = np.linalg.norm(spots[:, None] - balls[None], axis=-1) - np.tile(clip.scene.radius, len(chosen))
    spot = spots[gap.min(1).argmax()]
    scene = replace(clip.scene, colors=list(clip.scene.colors) + [color], radius=np.append(clip.scene.radius, radius))
    ghosted = _frames(world.render(scene, np.concatenate([clip.positions, np.broadcast_to(spot, (T, 1, 2))], 1)))
    out = _frames(clip.video).copy()
    out[chosen] = _to_uint8(out[chosen] + opacity * (ghosted[chosen].astype(np.float64) - out[chosen]))
    return out


def _frames(video) -> np.ndarray:
    """uint8 [T, 3, H, W] tensor -> uint8 [T, H, W, 3] array."""
    return video.permute(0, 2, 3, 1).numpy()


def _check(frames, strength, what: str) -> tuple[np.ndarray, np.ndarray]:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ForcelabError(f"{what.split()[0]}: frames must be uint8 [T, H, W, 3], got {frames.dtype} "
                            f"{list(frames.shape)}")
    strength = np.asarray(strength, np.float64).reshape(-1)
    if len(strength) != len(frames) or not np.isfinite(strength).all():
        raise ForcelabError(f"{what}: one finite value per frame ({len(frames)}), got {len(strength)} "
                            f"(build it with ramp(T, final) or constant(T, level))")
    return frames.astype(np.float64), strength


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)
