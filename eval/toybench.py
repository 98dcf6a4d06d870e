"""ToyBench: objective metrics of toy-world videos, from their pixels and their caption alone.

    scores = score_video(frames, "a red ball and a blue ball moving quickly")   # frames uint8 [T, H, W, 3]
    summary = score_videos([frames, ...], [caption, ...])    # aggregate with spread, per bucket, per video

No learned model: the balls are found by colour (toydetect.detect_balls), and every metric is
defined so that a ground-truth clip of the toy world scores at (or within a small tolerance
of) its best. Every metric is oriented so that higher is better:

- fidelity_psnr: PSNR (dB, capped at PSNR_CAP) of the frame against its re-render from the
  detections with the toy world's renderer: how much of the frame the world explains.
- fidelity_adherent: fidelity_psnr over the frames whose adherence is 1 (exactly the caption's
  balls; NaN for a video with none): fidelity at equal adherence. fidelity_psnr alone rewards a
  frame that draws fewer balls (a missing ball is missing from the re-render too).
- clean_pixels: 1 - the fraction of stray pixels (any channel off the re-render by > STRAY_LEVEL).
- adherence: per frame, |detected & captioned| / |detected | captioned| over the multisets of
  ball colours (count and colours must match the caption).
- identity: the fraction of frames showing the set of balls the video starts with, its most
  common set over the first bucket (balls that appear, vanish, duplicate or change colour break
  it). Anchored at the start, so that a defect holding most of the frames reads as a loss.
- physics: the fraction of (ball, frame) pairs whose acceleration at t and change of step
  across t -> t+1 (frames t-1..t+2), allowing for an elastic reflection at a wall
  (x = r or W - r, y likewise), are at most PHYSICS_TOL px/frame^2: constant velocity between
  bounces, bounces only at the walls; a ball turning back away from a wall fails at any speed.
- dynamics: per ball step, how well the speed (median over DYN_WINDOW steps) falls in the
  caption's speed range ("slowly" / "quickly", either when unnamed); 1 inside, exp(-d / DYN_SCALE)
  at log-distance d outside. Catches frozen, slowing and stagnant motion.
- background: PSNR (dB, capped at PSNR_CAP) of the frame's background against the background
  the video starts with: the per-pixel median over the first bucket's frames (the frame itself
  left out) of the pixels no detected ball covers (balls from the re-render, grown by one pixel);
  scored over the pixels no ball covers in either. Self-referenced, so it asks for persistence, not for a particular
  background: a scene's texture (ToyWorldConfig.background_texture) that fades, blurs or drifts
  lowers it, a background that is wrong but steady does not. Ground truth scores PSNR_CAP.
- continuation (given first_frame): agreement of frame 0's balls with those of the given frame.
- continuity (given chunk_starts, the pixel frames that open chunks 1..): min(1, mean step
  inside chunks / mean step into a chunk), a step being the mean absolute difference of two
  consecutive frames (eval/continuity.py): 1 when the chunks join seamlessly, lower at seams.
- drift: each metric per time bucket ("{metric}@{b}", bucket_frames frames each; default the
  training clip length) and "{metric}_drift" = min(0, slope per bucket): 0 when a metric does
  not degrade over the rollout, negative when it does.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from ..data.toyworld import ToyWorldConfig, parse_caption
from ..data.video import DEFAULT_FPS, read_video, write_video
from ..errors import ForcelabError
from ..progress import progress_bar
from . import stats
from .continuity import continuity
from .toydetect import Ball, detect_balls, detect_frames, dilate, rerender, touching

PSNR_CAP = 60.0          # dB; a perfect re-render would be infinite
STRAY_LEVEL = 32         # a pixel this far (any channel, 0..255) from the re-render is stray
PHYSICS_TOL = 0.5        # px/frame^2 left after allowing for a wall bounce: under the change of step of
                         # the slowest reversal (2 x 0.4 px/frame, the toy world's least speed), above
                         # the detector's jitter on clean frames (at most 0.11 over 40 clips)
DYN_WINDOW = 5           # steps in the running median of a ball's speed (bounce steps look slow)
DYN_MARGIN = 0.15        # relative slack around the caption's speed range
DYN_SCALE = 0.1          # log-distance outside the range at which the score falls to 1/e

METRICS = ("fidelity_psnr", "fidelity_adherent", "clean_pixels", "adherence", "identity", "physics", "dynamics",
           "background")


def score_video(frames, caption: str, *, first_frame=None, bucket_frames: int | None = None,
                config: ToyWorldConfig | None = None, codec=None, chunk_starts=None) -> dict[str, float]:
    """Metrics of one toy video: frames uint8 [T, H, W, 3] (numpy or torch), its caption.

    Returns a flat dict of floats: the METRICS over the whole video, "continuation" when
    first_frame (uint8 [H, W, 3]) is given, "{metric}@{b}" per bucket of bucket_frames frames
    (default config.frames) and "{metric}_drift". NaN where a metric has nothing to measure
    (e.g. physics with no ball seen in three consecutive frames). codec: the lossy round
    trip the frames went through (uint8 [T, H, W, 3] -> same; e.g. mp4_roundtrip), applied to
    the re-render too, so that fidelity measures the world and not the codec. chunk_starts:
    the pixel frames that open the generator's chunks 1.. (eval.continuity.chunk_starts); with
    them "continuity".
    """
    config = config or ToyWorldConfig()
    frames = _as_frames(frames)
    colors, speed = parse_caption(caption)
    if not colors:
        raise ForcelabError(f"caption {caption!r} names no toy ball (e.g. 'a red ball'); ToyBench scores "
                            f"toy-world videos only")
    bucket_frames = int(bucket_frames or config.frames)
    if bucket_frames < 1:
        raise ForcelabError(f"bucket_frames must be >= 1, got {bucket_frames}")
    per_frame = frame_metrics(frames, colors, speed, config, codec, reference_frames=bucket_frames)
    out = {m: stats.nanmean(v) for m, v in per_frame.items()}
    if first_frame is not None:
        out["continuation"] = continuation(_as_frames(first_frame[None])[0], frames[0], config)
    if chunk_starts:
        out["continuity"] = continuity(frames, chunk_starts)
    starts = range(0, len(frames), bucket_frames)
    for m, v in per_frame.items():
        buckets = [stats.nanmean(v[s:s + bucket_frames]) for s in starts]
        out.update({f"{m}@{b}": x for b, x in enumerate(buckets)})
        out[f"{m}_drift"] = min(0.0, stats.slope(buckets))
    return out


def frame_metrics(frames: np.ndarray, colors: list[str], speed: str | None,
                  config: ToyWorldConfig, codec=None, reference_frames: int | None = None) -> dict[str, np.ndarray]:
    """Each metric per frame, float [T] (NaN where it has nothing to measure). identity and
    background refer to the first reference_frames frames (default: all)."""
    T, H, W, _ = frames.shape
    detections = detect_frames(frames, config, order=colors)
    rendered = np.stack([rerender(balls, (H, W), config) for balls in detections])
    ball_pixels = _ball_pixels(rendered, config)              # before the codec blurs the re-render's edges
    if codec is not None:
        rendered = np.asarray(codec(rendered))
        if rendered.shape != frames.shape:
            raise ForcelabError(f"codec returned {list(rendered.shape)} for frames {list(frames.shape)}")
    psnr, clean = np.empty(T), np.empty(T)
    for t in range(T):
        diff = rendered[t].astype(np.float64) - frames[t]
        mse = float((diff ** 2).mean())
        psnr[t] = min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse)) if mse > 0 else PSNR_CAP
        clean[t] = 1.0 - float((np.abs(diff).max(-1) > STRAY_LEVEL).mean())
    wanted = Counter(colors)
    seen = [Counter(b.color for b in balls) for balls in detections]
    adherence = np.array([_jaccard(s, wanted) for s in seen])
    mode = Counter(frozenset(s.items()) for s in seen[:reference_frames]).most_common(1)[0][0]
    identity = np.array([float(frozenset(s.items()) == mode) for s in seen])
    tracks = _tracks(detections)
    adherent_psnr = np.where(adherence == 1.0, psnr, math.nan)     # NaN: the frame is not adherent
    return {"fidelity_psnr": psnr, "fidelity_adherent": adherent_psnr, "clean_pixels": clean,
            "adherence": adherence, "identity": identity,
            "physics": _physics(tracks, T, (W, H)), "dynamics": _dynamics(tracks, T, speed, config),
            "background": _background(frames, ball_pixels, reference_frames or T)}


def _ball_pixels(rendered: np.ndarray, config: ToyWorldConfig) -> np.ndarray:
    """bool [T, H, W]: the pixels the detected balls cover in their re-render (uint8 [T, H, W, 3]
    on the plain background), grown by one pixel for the anti-aliased rim."""
    covered = (rendered != np.rint(np.asarray(config.background, np.float64)).astype(np.uint8)).any(-1)
    return np.stack([dilate(m) for m in covered])


def _background(frames: np.ndarray, balls: np.ndarray, reference_frames: int) -> np.ndarray:
    """Per frame, PSNR (dB, capped) of the pixels no ball covers (balls bool [T, H, W]) against the
    per-pixel median of the first reference_frames frames where no ball covers them, leaving the
    frame itself out of its own reference (a frame of the first bucket is not compared with
    itself); NaN for a frame with no such pixel."""
    stack = np.where(balls[:reference_frames, ..., None], np.nan, frames[:reference_frames].astype(np.float64))
    shared = _reference(stack)
    out = np.full(len(frames), math.nan)
    for t in range(len(frames)):
        ref = _reference(np.delete(stack, t, 0)) if t < len(stack) and len(stack) > 1 else shared
        m = ~balls[t] & np.isfinite(ref[..., 0])
        if m.any():
            mse = float(((frames[t][m].astype(np.float64) - ref[m]) ** 2).mean())
            out[t] = min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse)) if mse > 0 else PSNR_CAP
    return out


def _reference(stack: np.ndarray) -> np.ndarray:
    """np.nanmedian over axis 0 of [R, H, W, 3]; NaN where no frame saw the pixel."""
    seen = np.isfinite(stack).any(0)
    out = np.full(stack.shape[1:], np.nan)
    out[seen] = np.nanmedian(stack[:, seen], axis=0)
    return out


def _jaccard(a: Counter, b: Counter) -> float:
    union = sum((a | b).values())
    return sum((a & b).values()) / union if union else 1.0


def _tracks(detections: list[list[Ball]]) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """colour -> (positions [T, 2], clear positions [T, 2], median radius). The largest blob of
    a colour is its ball (captions never repeat a colour). Positions are NaN where the ball is
    unseen; clear positions also where it touches another ball (occlusion, not motion, may
    move the measured centre there: physics uses clear positions only)."""
    out = {}
    T = len(detections)
    for color in {b.color for balls in detections for b in balls}:
        pos = np.full((T, 2), np.nan)
        clear = pos.copy()
        radii = []
        for t, balls in enumerate(detections):
            ball = next((b for b in balls if b.color == color), None)
            if ball is None:
                continue
            radii.append(ball.radius)
            pos[t] = ball.x, ball.y
            if not touching([b for b in balls if b is not ball], ball):
                clear[t] = pos[t]
        out[color] = (pos, clear, float(np.median(radii)))
    return out


# Sums of positions p[t-1], p[t], p[t+1] (, p[t+2]) that vanish on a straight path at constant speed:
ACCELERATION = ((1.0, -2.0, 1.0),)                                  # frames t-1 .. t+1
ACCELERATION_AND_STEP_CHANGE = ((1.0, -2.0, 1.0, 0.0),              # frames t-1 .. t+2: the acceleration at t,
                                (1.0, -1.0, -1.0, 1.0))             # and its sum with the one at t+1: step
                                                                    # t+1 -> t+2 minus step t-1 -> t


def _physics(tracks: dict, T: int, size: tuple[int, int]) -> np.ndarray:
    """Per frame t: the fraction of balls seen at t-1, t, t+1 whose acceleration at t and (where
    t+2 is seen) change of step across t -> t+1 are at most PHYSICS_TOL, both for one and the
    same allowance for a wall bounce. A velocity change that falls between two frames splits
    over the accelerations at t and t+1 (a ball of speed v turning back mid-step: |v| at each,
    under PHYSICS_TOL for the slowest balls) and shows whole in their sum, the change of step
    (2 |v|). The acceleration is checked too: a back-and-forth shake keeps the steps two apart
    alike."""
    lawful = np.zeros(T)
    count = np.zeros(T)
    extent = np.asarray(size, np.float64)
    for _, pos, radius in tracks.values():
        walls = (np.full(2, radius), extent - radius)                  # (lo, hi) per axis (x, y)
        residual = np.fmax(_unlawful(pos, ACCELERATION, walls), _unlawful(pos, ACCELERATION_AND_STEP_CHANGE, walls))
        ok = np.isfinite(residual)
        lawful[ok] += residual[ok] <= PHYSICS_TOL
        count[ok] += 1
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, lawful / np.maximum(count, 1), np.nan)


def _unlawful(pos: np.ndarray, stencils: tuple, walls) -> np.ndarray:
    """How far the path pos [T, 2] is from lawful around each frame t, [T] px (NaN where a
    position is unseen or the window runs past the clip): per axis, the largest
    |sum_k stencil[k] p[t - 1 + k]| over the stencils, the least of that over the path as seen
    and the path unfolded at one wall bounce (the positions from some k on mirrored in a
    wall, 2 w - p, as a straight path through the wall would have them); then the norm over
    the axes (each axis bounces on its own)."""
    T, k = len(pos), len(stencils[0])
    out = np.full(T, np.nan)
    if T < k:
        return out
    points = [pos[i:T - k + 1 + i] for i in range(k)]                  # k x [T - k + 1, 2]
    paths = [points] + [[p if i < cut else 2 * w - p for i, p in enumerate(points)]
                        for w in walls for cut in range(1, k)]
    per_axis = np.min([np.max([np.abs(sum(c * p for c, p in zip(stencil, path))) for stencil in stencils], 0)
                       for path in paths], 0)                          # [T - k + 1, 2]
    out[1:T - k + 2] = np.hypot(per_axis[:, 0], per_axis[:, 1])
    return out


def speed_range(speed: str | None, config: ToyWorldConfig) -> tuple[float, float]:
    """(lo, hi) px/frame the caption's speed word allows (either range when it names none)."""
    if speed == "slowly":
        return config.slow_speed
    if speed == "quickly":
        return config.fast_speed
    return min(config.slow_speed[0], config.fast_speed[0]), max(config.slow_speed[1], config.fast_speed[1])


def speed_score(s: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """1 inside [lo, hi] (with DYN_MARGIN slack), exp(-d / DYN_SCALE) at log-distance d outside."""
    with np.errstate(divide="ignore"):
        low = np.log(lo * (1 - DYN_MARGIN) / np.maximum(s, 1e-12))
        high = np.log(np.maximum(s, 1e-12) / (hi * (1 + DYN_MARGIN)))
    return np.exp(-np.maximum(0.0, np.maximum(low, high)) / DYN_SCALE)


def _dynamics(tracks: dict, T: int, speed: str | None, config: ToyWorldConfig) -> np.ndarray:
    """Per frame t: mean over balls of speed_score of the running-median speed of step t -> t+1."""
    lo, hi = speed_range(speed, config)
    total, count = np.zeros(T), np.zeros(T)
    half = DYN_WINDOW // 2
    for pos, _, _ in tracks.values():
        step = np.linalg.norm(pos[1:] - pos[:-1], axis=-1)            # [T-1], NaN where unseen
        for t in range(len(step)):
            window = step[max(0, t - half):t + half + 1]
            window = window[np.isfinite(window)]
            if np.isfinite(step[t]) and len(window):
                total[t] += speed_score(np.median(window), lo, hi)
                count[t] += 1
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def continuation(given: np.ndarray, first: np.ndarray, config: ToyWorldConfig | None = None) -> float:
    """Agreement of a video's first frame with the frame it was conditioned on (uint8 [H, W, 3]
    each): per colour in both, clip(1 - distance / radius, 0, 1); summed over the union of
    colours and divided by its size. 1 when the balls are where the given frame shows them."""
    a = {b.color: b for b in detect_balls(given, config)}
    b = {b.color: b for b in detect_balls(first, config)}
    union = set(a) | set(b)
    if not union:
        return 1.0
    agree = sum(max(0.0, 1.0 - math.hypot(a[c].x - b[c].x, a[c].y - b[c].y) / max(a[c].radius, 1e-6))
                for c in set(a) & set(b))
    return agree / len(union)


def mp4_roundtrip(fps: float = DEFAULT_FPS):
    """A codec for score_video: write_video's mp4 (the settings `forcelab generate` uses) and back."""
    def roundtrip(frames: np.ndarray) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_video(Path(tmp) / "rerender.mp4", frames, fps)
            return read_video(path).permute(0, 2, 3, 1).numpy()
    return roundtrip


def score_videos(videos, captions, *, first_frames=None, bucket_frames: int | None = None,
                 config: ToyWorldConfig | None = None, codec=None, progress: bool = False,
                 chunk_starts=None) -> dict:
    """score_video over a list (frames uint8 [T, H, W, 3] each) and its summary:
    {"aggregate": {metric: mean}, "spread": {metric: stats.spread}, "buckets": {metric:
    {"mean": [...], "std": [...], "n": [...]}}, "slopes": {metric: slope of the bucket means},
    "videos": [flat dict per video]}. Videos of different lengths share bucket b where they have it.
    chunk_starts: as for score_video, shared by every video.
    """
    videos, captions = list(videos), list(captions)
    if len(videos) != len(captions):
        raise ForcelabError(f"score_videos: {len(videos)} videos but {len(captions)} captions")
    firsts = list(first_frames) if first_frames is not None else [None] * len(videos)
    per_video = [score_video(v, c, first_frame=f, bucket_frames=bucket_frames, config=config, codec=codec,
                             chunk_starts=chunk_starts)
                 for v, c, f in progress_bar(list(zip(videos, captions, firsts)), desc="toybench", unit="video",
                                     disable=not progress)]
    return summarize(per_video)


def summarize(per_video: list[dict]) -> dict:
    """The summary of score_videos from the per-video flat dicts."""
    keys = [k for k in dict.fromkeys(k for s in per_video for k in s) if "@" not in k]
    spread = {k: stats.spread(s.get(k, math.nan) for s in per_video) for k in keys}
    buckets = {}
    for m in METRICS:
        n_buckets = max((int(k.split("@")[1]) + 1 for s in per_video for k in s if k.startswith(m + "@")), default=0)
        cols = [stats.spread(s.get(f"{m}@{b}", math.nan) for s in per_video) for b in range(n_buckets)]
        buckets[m] = {"mean": [c["mean"] for c in cols], "std": [c["std"] for c in cols], "n": [c["n"] for c in cols]}
    return {"aggregate": {k: v["mean"] for k, v in spread.items()}, "spread": spread, "buckets": buckets,
            "slopes": {m: stats.slope(b["mean"]) for m, b in buckets.items()}, "videos": per_video}


def _as_frames(frames) -> np.ndarray:
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ForcelabError(f"ToyBench frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} "
                            f"{list(frames.shape)} (a [T, 3, H, W] video needs .permute(0, 2, 3, 1))")
    return frames
