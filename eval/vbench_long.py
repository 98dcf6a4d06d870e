"""VBench-Long: long videos are cut at scene changes, then into fixed-length clips, before scoring.

    scene_cuts(frames)                          # frame indices where a new scene starts
    clip_ranges(frames=200, fps=16, seconds=2)  # [(0, 32), (32, 64), ..., (168, 200)]
    split_video("long.mp4", out_dir, seconds=2) # -> clip paths "{stem}_{k:03d}.mp4"

As VBench-Long does: clips of int(fps) * seconds frames (2 s; 10 s for human_action,
temporal_style and overall_consistency); a remainder becomes one more clip that borrows
frames from before it to reach full length; a scene shorter than one clip is kept whole.
Scenes are found in the manner of PySceneDetect's ContentDetector (what VBench-Long uses): a
cut where the mean absolute change of hue, saturation and value between consecutive frames
(OpenCV's 8-bit HSV scale) reaches SCENE_THRESHOLD, at least MIN_SCENE_FRAMES after the last.
A clip's score is per clip; a long video's is the mean of its clips' (vbench_runner).
The clip-to-clip consistency fusion of VBench-Long (DINOv2 / DreamSim) is not done here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.video import probe_video, read_video, write_video

CLIP_SECONDS = 2
LONG_CLIP_SECONDS = {"human_action": 10, "temporal_style": 10, "overall_consistency": 10}
SCENE_THRESHOLD = 27.0       # ContentDetector's default
MIN_SCENE_FRAMES = 15        # ContentDetector's default min_scene_len


def clip_seconds(dimension: str) -> int:
    return LONG_CLIP_SECONDS.get(dimension, CLIP_SECONDS)


def clip_ranges(frames: int, fps: float, seconds: float) -> list[tuple[int, int]]:
    """[start, end) frame ranges of the clips of a scene of `frames` frames."""
    length = int(fps) * int(seconds)
    if length <= 0 or frames <= length:
        return [(0, frames)]
    full, rest = divmod(frames, length)
    ranges = [(k * length, (k + 1) * length) for k in range(full)]
    if rest:
        ranges.append((max(0, frames - length), frames))
    return ranges


def _hsv(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB [T, H, W, 3] -> float HSV on OpenCV's 8-bit scale (H 0..180, S and V 0..255)."""
    rgb = frames.astype(np.float64) / 255.0
    v = rgb.max(-1)
    c = v - rgb.min(-1)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(c, 1e-12)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(c > 0, (h * 60.0) % 360.0, 0.0)
    return np.stack([h / 2.0, s * 255.0, v * 255.0], -1)


def scene_cuts(frames: np.ndarray, threshold: float = SCENE_THRESHOLD,
               min_scene: int = MIN_SCENE_FRAMES) -> list[int]:
    """Frame indices (> 0) where a new scene starts, uint8 [T, H, W, 3]."""
    if len(frames) < 2:
        return []
    hsv = _hsv(frames)
    change = np.abs(hsv[1:] - hsv[:-1]).mean(axis=(1, 2)).mean(-1)       # [T-1], mean of the 3 deltas
    cuts, last = [], 0
    for t, value in enumerate(change, start=1):
        if value >= threshold and t - last >= min_scene:
            cuts.append(t)
            last = t
    return cuts


def split_frames(frames: np.ndarray, fps: float, seconds: float) -> list[np.ndarray]:
    """Clips (views into frames) of a long video: scenes first, then clip_ranges per scene."""
    bounds = [0, *scene_cuts(frames), len(frames)]
    clips = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        clips += [frames[a + s:a + e] for s, e in clip_ranges(b - a, fps, seconds)]
    return clips


def split_video(path: str | Path, out_dir: str | Path, seconds: float) -> list[Path]:
    """Write the clips of one video as "{stem}_{k:03d}.mp4" in out_dir (kept when a finished
    marker says they are complete, so an interrupted split resumes)."""
    path, out_dir = Path(path), Path(out_dir)
    done = out_dir / f".{path.stem}.done"
    if done.is_file():
        return [out_dir / name for name in done.read_text(encoding="utf-8").splitlines() if name]
    fps = probe_video(path).fps
    frames = read_video(path).permute(0, 2, 3, 1).numpy()
    out = []
    for k, clip in enumerate(split_frames(frames, fps, seconds)):
        out.append(write_video(out_dir / f"{path.stem}_{k:03d}.mp4", clip, fps))
    done.write_text("".join(p.name + "\n" for p in out), encoding="utf-8")
    return out
