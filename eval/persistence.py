"""Background persistence: how well a video keeps its scene's background, frame after frame.

    image = background_image(world, clip.scene)                  # float32 [H, W, 3]
    free = free_pixels(clip.positions, clip.scene.radius, (H, W))  # bool [T, H, W]: no true ball near
    db = background_psnr(frames, image, free)                    # frames uint8 [T, H, W, 3] -> dB

In the textured toy world (ToyWorldConfig.background_texture) each scene has a static texture
that the caption does not name: a causal model can only keep it by copying it from its
context, so its error measures what copying an imperfect copy again and again does.

background_psnr is the PSNR (dB, capped at toybench.PSNR_CAP) of the frames' background pixels
against the scene's true background (rounded to uint8 as the renderer paints it). Background
pixels are those that are
- farther than r + 1/2 + BALL_MARGIN px from every true ball centre (the renderer's coverage
  clip(r + 1/2 - d, 0, 1) is 0 from r + 1/2 on), and
- not ball-coloured in the frame itself (a generated ball that went elsewhere than the true
  one is a ball, not a background error): a pixel whose colour lies at least CORE_ALPHA of
  the way from the true background towards some palette colour and nearer that segment than
  the background itself (ToyBench's detector's rule, with a per-pixel background), grown by
  one pixel for the anti-aliased rim.
The ground truth scores PSNR_CAP; a blur or colour cast lowers it.
"""

from __future__ import annotations

import math

import numpy as np

from ..data.toyworld import PALETTE, Scene, ToyWorld
from ..errors import ForcelabError
from .toybench import PSNR_CAP
from .toydetect import CORE_ALPHA, dilate

BALL_MARGIN = 1.0        # px beyond a true ball's rim also left out (a near miss of its edge is not the background)


def background_image(world: ToyWorld, scene: Scene) -> np.ndarray:
    """The scene's background as the renderer paints it, float32 [H, W, 3] (the plain colour
    broadcast when the world has no texture)."""
    c = world.config
    if scene.background is not None:
        return scene.background
    return np.broadcast_to(np.array(c.background, np.float32), (c.height, c.width, 3))


def free_pixels(positions: np.ndarray, radius: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool [T, H, W]: pixels farther than r + 1/2 + BALL_MARGIN from every ball centre.
    positions [T, N, 2] (x, y) in pixels, radius [N]."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    free = np.ones((len(positions), h, w), bool)
    for i, r in enumerate(np.asarray(radius, np.float64)):
        d = np.hypot(xs[None] - positions[:, i, 0, None, None], ys[None] - positions[:, i, 1, None, None])
        free &= d > r + 0.5 + BALL_MARGIN
    return free


def ball_coloured(frames: np.ndarray, background: np.ndarray) -> np.ndarray:
    """bool [T, H, W]: pixels of frames uint8 [T, H, W, 3] that a ball's colour covers at least
    CORE_ALPHA against the per-pixel background [H, W, 3], grown by one pixel."""
    bg = np.asarray(background, np.float64)
    d = frames.astype(np.float64) - bg                                     # [T, H, W, 3]
    dirs = np.array(list(PALETTE.values()), np.float64)[:, None, None, :] - bg   # [K, H, W, 3]
    alpha = np.clip(np.einsum("thwc,khwc->tkhw", d, dirs) / (dirs ** 2).sum(-1), 0.0, 1.0)   # [T, K, H, W]
    residual = np.linalg.norm(d[:, None] - alpha[..., None] * dirs, axis=-1)     # [T, K, H, W]
    own = np.linalg.norm(d, axis=-1)[:, None]                                  # distance from the background
    covered = ((alpha >= CORE_ALPHA) & (residual < own)).any(1)
    return np.stack([dilate(m) for m in covered])


def background_psnr(frames: np.ndarray, background: np.ndarray, free: np.ndarray) -> float:
    """PSNR (dB, capped) over the background pixels of frames uint8 [T, H, W, 3] against the
    true background [H, W, 3]; free [T, H, W]: pixels no true ball is near (free_pixels).
    NaN when no pixel qualifies."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1:3] != np.shape(background)[:2] \
            or np.shape(free) != frames.shape[:3]:
        raise ForcelabError(f"background_psnr: need frames [T, H, W, 3], background [H, W, 3] and free [T, H, W] "
                            f"of one size; got {list(frames.shape)}, {list(np.shape(background))}, "
                            f"{list(np.shape(free))}")
    target = np.rint(background).astype(np.float64)
    mask = free & ~ball_coloured(frames, background)
    if not mask.any():
        return math.nan
    mse = float(((frames.astype(np.float64) - target)[mask] ** 2).mean())
    return min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse)) if mse > 0 else PSNR_CAP
