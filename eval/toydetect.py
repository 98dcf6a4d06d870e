"""Find the toy world's balls in pixels by colour, and re-render frames from what was found.

    balls = detect_balls(frame)              # frame uint8 [H, W, 3] -> [Ball(color, x, y, radius), ...]
    for color, x, y, radius in balls: ...    # a Ball unpacks like a tuple
    image = rerender(balls, (H, W))          # uint8 [H, W, 3] with the toy world's own renderer

The toy renderer paints pixel = background + alpha * (color - background) per ball, alpha the
disc coverage. So for each palette colour c a pixel's alpha is its projection on the segment
background -> c, and its residual is its distance from that segment. A pixel belongs to the
colour (or the background) with the smallest residual; "core" pixels (alpha >= 1/2) of one
colour form connected blobs, one ball each. A ball's centre is the alpha-weighted centroid of
its blob plus the anti-aliased rim; its radius follows from the covered area: the ramp
coverage clip(r + 1/2 - d, 0, 1) of a disc integrates to pi r^2 + pi / 12.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np

from ..data.toyworld import PALETTE, Scene, ToyWorld, ToyWorldConfig
from ..errors import ForcelabError

REFINE_STEP = 0.5        # px: first step of the occlusion refinement (halved REFINE_LEVELS - 1 times)
REFINE_LEVELS = 4
REFINE_ORDERS_UP_TO = 4   # try every drawing order of at most this many balls (4! = 24)
REFINE_PASSES = 4         # passes over the balls per step size while they still improve
MIN_BLOB_PIXELS = 3      # smaller blobs of one colour are noise (the smallest ball covers ~20 px)
BLEND_MAX_PIXELS = 12    # blobs up to this size are checked for being a blend of two neighbours
MIX_STEPS = 20           # grid steps per weight when fitting a two-colour blend
CORE_ALPHA = 0.5         # a pixel at least half covered by a ball's colour is part of that ball


class Ball(NamedTuple):
    color: str            # palette name
    x: float              # centre in pixels (pixel i spans [i, i + 1)), like ToyClip.positions
    y: float
    radius: float         # pixels


def _colour_maps(frames: np.ndarray, background, palette: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """frames uint8 [..., H, W, 3] -> alpha [..., H, W, K], residual [..., H, W, K], label [..., H, W]
    (label k in 0..K-1 for palette colour k, K for background)."""
    bg = np.asarray(background, np.float32)
    dirs = np.array(list(palette.values()), np.float32) - bg              # [K, 3]
    d = frames.astype(np.float32) - bg                                    # [..., 3]
    alpha = np.clip(d @ dirs.T / (dirs ** 2).sum(-1), 0.0, 1.0)           # [..., K]
    residual = np.linalg.norm(d[..., None, :] - alpha[..., None] * dirs, axis=-1)
    bg_residual = np.linalg.norm(d, axis=-1)[..., None]
    label = np.concatenate([residual, bg_residual], -1).argmin(-1)
    return alpha, residual, label


def _blobs(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (8-neighbourhood) of a bool [H, W] mask, as [n, 2] (row, col) arrays."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        stack, members = [(r0, c0)], []
        while stack:
            r, c = stack.pop()
            members.append((r, c))
            for rr in range(max(r - 1, 0), min(r + 2, h)):
                for cc in range(max(c - 1, 0), min(c + 2, w)):
                    if mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        out.append(np.array(members))
    return out


def dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation of a bool [H, W] mask."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([p[i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)


def _blend_weights() -> np.ndarray:
    """[M, 2] weights (a, b) on a MIX_STEPS grid with a, b >= 0 and a + b <= 1."""
    grid = np.linspace(0.0, 1.0, MIX_STEPS + 1)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    keep = a + b <= 1.0 + 1e-9
    return np.stack([a[keep], b[keep]], -1)


_BLEND_WEIGHTS = _blend_weights()


def _is_blend(frame_rel: np.ndarray, blob: np.ndarray, k: int, cores: list[np.ndarray],
              dirs: np.ndarray) -> bool:
    """Whether a blob of colour k is better explained as the blend bg + a c_i + b c_j of two
    neighbouring balls' colours (anti-aliasing, a codec's chroma subsampling) than as a ball
    of its own; frame_rel and dirs are relative to the background."""
    near = dilate(dilate(blob))
    neighbours = [j for j, core in enumerate(cores) if j != k and (core & near).any()]
    if not neighbours:
        return False
    rows, cols = np.nonzero(blob)
    pix = frame_rel[rows, cols]                                                   # [n, 3]
    alpha = np.clip(pix @ dirs[k] / (dirs[k] ** 2).sum(), 0.0, 1.0)
    own = np.linalg.norm(pix - alpha[:, None] * dirs[k], axis=-1).mean()
    pairs = np.array([(i, j) for n, i in enumerate(neighbours) for j in neighbours[n:]])   # [P, 2]
    mixes = np.einsum("mw,pwc->pmc", _BLEND_WEIGHTS, dirs[pairs])                 # [P, M, 3]
    residual = np.linalg.norm(pix[:, None, None, :] - mixes[None], axis=-1)       # [n, P, M]
    return float(residual.min(-1).mean(0).min()) < own


def _detect(alpha: np.ndarray, label: np.ndarray, names: list[str], frame_rel: np.ndarray,
            dirs: np.ndarray, max_balls: int) -> list[Ball]:
    """Balls in one frame from its colour maps (alpha [H, W, K], label [H, W]); frame_rel
    [H, W, 3] is the frame minus the background, dirs [K, 3] the palette likewise. Blends are
    looked for only when there are at most 2 * max_balls blobs: more is no toy-world frame,
    and the search would only cost time."""
    cores = [(label == k) & (alpha[..., k] >= CORE_ALPHA) for k in range(len(names))]
    blobs = [(k, m) for k in range(len(names)) if cores[k].sum() >= MIN_BLOB_PIXELS
             for m in _blobs(cores[k]) if len(m) >= MIN_BLOB_PIXELS]
    check_blends = len(blobs) <= 2 * max_balls
    balls = []
    for k, members in blobs:
        blob = np.zeros_like(cores[k])
        blob[members[:, 0], members[:, 1]] = True
        if check_blends and len(members) <= BLEND_MAX_PIXELS and _is_blend(frame_rel, blob, k, cores, dirs):
            continue
        support = blob | (dilate(blob) & (label == k))         # the blob plus its anti-aliased rim
        rows, cols = np.nonzero(support)
        weight = alpha[rows, cols, k].astype(np.float64)
        area = weight.sum()
        x = float((weight * (cols + 0.5)).sum() / area)
        y = float((weight * (rows + 0.5)).sum() / area)
        radius = float(np.sqrt(max(area / np.pi - 1.0 / 12.0, 0.0)))
        balls.append(Ball(names[k], x, y, radius))
    return balls


def detect_balls(frame: np.ndarray, config: ToyWorldConfig | None = None,
                 order: list[str] | None = None) -> list[Ball]:
    """The balls visible in one frame, uint8 [H, W, 3] -> [Ball(color, x, y, radius)] (a
    NamedTuple: `for color, x, y, radius in balls`), largest first within each colour, colours
    in palette order. config gives the background (default: the toy world's). With `order` (the caption's colours: the toy world draws later
    balls over earlier ones) the balls come in drawing order, unknown colours last, and in a
    frame where balls touch, the drawing order and each ball are refined against the re-render
    (which undoes the occlusion bias)."""
    return detect_frames(np.asarray(frame)[None], config, order)[0]


def detect_frames(frames: np.ndarray, config: ToyWorldConfig | None = None,
                  order: list[str] | None = None) -> list[list[Ball]]:
    """detect_balls for every frame of uint8 [T, H, W, 3]."""
    config = config or ToyWorldConfig()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ForcelabError(f"toy frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    names = list(PALETTE)
    alpha, _, label = _colour_maps(frames, config.background, PALETTE)
    bg = np.asarray(config.background, np.float32)
    dirs = np.array(list(PALETTE.values()), np.float32) - bg
    out = []
    for t in range(len(frames)):
        balls = _detect(alpha[t], label[t], names, frames[t].astype(np.float32) - bg, dirs, config.max_balls)
        balls.sort(key=lambda b: (names.index(b.color), -b.radius))
        out.append(balls)
    if order is None:
        return out
    # a ball keeps its size: where balls touch, start from each colour's median radius over
    # the frames where it is seen whole (an occluded area undercounts it), then refine
    rank = {c: i for i, c in enumerate(order)}
    whole = {}
    for balls in out:
        for b in balls:
            if not touching([o for o in balls if o is not b], b):
                whole.setdefault(b.color, []).append(b.radius)
    radius = {c: float(np.median(r)) for c, r in whole.items()}
    for t, balls in enumerate(out):
        balls.sort(key=lambda b: rank.get(b.color, len(rank)))
        if touching(balls) and len(balls) <= config.max_balls:   # more than the world shows: not worth it
            start = [b._replace(radius=radius.get(b.color, b.radius)) for b in balls]
            out[t] = refine(frames[t], start, config)
    return out


def touching(balls: list[Ball], ball: Ball | None = None) -> bool:
    """Whether two discs (with their anti-aliased rims) meet, so one may hide the other: any
    two of `balls`, or `ball` and any of `balls`."""
    def meet(a, b):
        return math.hypot(a.x - b.x, a.y - b.y) < a.radius + b.radius + 1.0
    if ball is not None:
        return any(meet(ball, b) for b in balls)
    return any(meet(a, b) for i, a in enumerate(balls) for b in balls[i + 1:])


def refine(frame: np.ndarray, balls: list[Ball], config: ToyWorldConfig) -> list[Ball]:
    """The drawing order (among the first REFINE_ORDERS_UP_TO balls' permutations) and the
    (x, y, radius) of each touching ball that best re-render the frame (coordinate search,
    steps halving from REFINE_STEP): an occluded ball's blob centroid is pulled towards its
    visible part, and its area undercounts it. Returns the balls in drawing order."""
    size = frame.shape[:2]
    target = frame.astype(np.float64)

    def errors(candidates):
        """Squared error of each candidate list of balls (same colours and radii): one render."""
        scene = _scene(candidates[0])
        positions = np.array([[[b.x, b.y] for b in c] for c in candidates], np.float64)
        images = _world(config, size).render(scene, positions).permute(0, 2, 3, 1).numpy().astype(np.float64)
        return ((images - target) ** 2).sum(axis=(1, 2, 3))

    if len(balls) <= REFINE_ORDERS_UP_TO:
        orders = [list(p) for p in itertools.permutations(balls)]
        balls = orders[int(np.argmin([errors([o])[0] for o in orders]))]
    balls = list(balls)
    movable = [i for i, b in enumerate(balls) if touching([o for o in balls if o is not b], b)]
    best = errors([balls])[0]
    step = REFINE_STEP
    for _ in range(REFINE_LEVELS):
        for _ in range(REFINE_PASSES):
            improved = False
            for i in movable:
                b = balls[i]                                           # a move: one render for all 8
                trials = [balls[:i] + [b._replace(x=b.x + dx * step, y=b.y + dy * step)] + balls[i + 1:]
                          for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
                e = errors(trials)
                k = int(np.argmin(e))
                if e[k] < best:
                    best, balls, improved = e[k], trials[k], True
                b = balls[i]
                for r in (b.radius + step, b.radius - step):          # a radius change is another scene
                    trial = balls[:i] + [b._replace(radius=r)] + balls[i + 1:]
                    e = errors([trial])[0]
                    if e < best:
                        best, balls, improved = e, trial, True
                        break
            if not improved:
                break
        step /= 2
    return balls


def _scene(balls: list[Ball]) -> Scene:
    return Scene([b.color for b in balls], np.array([b.radius for b in balls], np.float64),
                 np.zeros((len(balls), 2)), np.zeros((len(balls), 2)), "", "")


def rerender(balls: list[Ball], size: tuple[int, int], config: ToyWorldConfig | None = None) -> np.ndarray:
    """uint8 [H, W, 3]: the toy world's renderer applied to `balls`, drawn in list order
    (later balls over earlier ones; detect_frames with `order` returns them so)."""
    config = config or ToyWorldConfig()
    world = _world(config, size)
    positions = np.array([[[b.x, b.y] for b in balls]], np.float64).reshape(1, len(balls), 2)
    return world.render(_scene(balls), positions)[0].permute(1, 2, 0).numpy()


_WORLDS: dict = {}


def _world(config: ToyWorldConfig, size: tuple[int, int]) -> ToyWorld:
    """A renderer for frames of `size` with config's background (the radius range is not
    checked against the size: detections may be anything)."""
    key = (tuple(size), config.background)
    if key not in _WORLDS:
        world = ToyWorld(config)
        world.config = _SizedConfig(config, size)
        _WORLDS[key] = world
    return _WORLDS[key]


class _SizedConfig:
    """The fields ToyWorld.render reads, for an arbitrary frame size."""

    def __init__(self, config: ToyWorldConfig, size: tuple[int, int]):
        self.height, self.width = int(size[0]), int(size[1])
        self.background = config.background
