"""`forcelab eval toybench VIDEOS_DIR [--out DIR]`: ToyBench over the mp4s + JSON sidecars
that `forcelab generate` writes; writes DIR/toybench.json and the report (toybench.html, .md).

toybench.json: {"kind": "toybench", "name", "metrics", "bucket_frames", "aggregate" (mean),
"spread" ({mean, std, ci95, min, max, n} per metric), "buckets" (per metric: mean, std and n
per time bucket), "slopes" (per metric, change per bucket), "videos" (per video: file,
caption, frames, scores), "skipped" (file: reason), "generation" (settings, speed_fps)}.
A sidecar may name a conditioning frame, "first_frame": an .npy (uint8 [H, W, 3]) or image
file beside the video, for the continuation metric. The re-render goes through the same
mp4 round trip as the videos (toybench.mp4_roundtrip), so fidelity does not count the codec.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import __version__
from ..data.video import DEFAULT_FPS, read_video
from ..errors import ForcelabError
from ..progress import progress_bar
from . import toybench
from .continuity import chunk_starts
from .report import write_report
from .sidecars import check_writable, generation, read_sidecar

RESULT_NAME = "toybench.json"


def _inside(folder: Path, name: str) -> Path:
    """folder / name, refusing names that leave the folder (paths read from data files)."""
    path = (folder / name).resolve()
    if folder.resolve() not in path.parents:
        raise ForcelabError(f"{name!r} (named in a sidecar in {folder}) points outside that folder")
    return path


def _first_frame(folder: Path, name: str) -> np.ndarray:
    path = _inside(folder, name)
    if not path.is_file():
        raise ForcelabError(f"first frame {path}: not found")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def sidecar_chunk_starts(side: dict, frames: int) -> list[int] | None:
    """The pixel frames that open chunks 1.. of a video, from its sidecar's plan (a causal plan's
    unit: block_frames, chunk_frames or the model's chunk) and frame counts (the codec's temporal
    stride); None for the teacher plan or a sidecar without them."""
    plan, model = side.get("plan") or {}, side.get("model_config") or {}
    if plan.get("plan") in (None, "teacher"):
        return None
    unit = plan.get("block_frames") or plan.get("chunk_frames") or model.get("chunk_frames")
    pixels, latent = side.get("frames"), side.get("latent_frames")
    if not unit or not pixels or not latent:
        return None
    stride = (pixels - 1) // (latent - 1) if latent > 1 else 1
    return chunk_starts(frames, int(unit), max(1, stride)) or None


def run_toybench(videos_dir, out_dir=None, *, bucket_frames: int | None = None, report: bool = True,
                 progress: bool = True) -> dict:
    folder = Path(videos_dir)
    if not folder.is_dir():
        raise ForcelabError(f"{folder}: not a folder of videos")
    videos = sorted(folder.glob("*.mp4"))
    if not videos:
        raise ForcelabError(f"{folder}: no .mp4 videos (write them with `forcelab generate`)")
    if bucket_frames is not None and bucket_frames < 1:
        raise ForcelabError(f"--bucket-frames must be >= 1, got {bucket_frames}")
    out = Path(out_dir) if out_dir else folder
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out / RESULT_NAME, "toybench")
    rows, per_video, skipped, sidecars = [], [], {}, []
    for video in progress_bar(videos, desc="toybench", unit="video", disable=not progress):
        side = read_sidecar(video)
        if side is None:
            skipped[video.name] = "no JSON sidecar (caption unknown)"
            continue
        caption = side.get("prompt_text") or side.get("prompt")
        frames = read_video(video).permute(0, 2, 3, 1).numpy()
        first = _first_frame(folder, side["first_frame"]) if side.get("first_frame") else None
        try:
            scores = toybench.score_video(frames, caption or "", first_frame=first, bucket_frames=bucket_frames,
                                          codec=toybench.mp4_roundtrip(side.get("fps") or DEFAULT_FPS),
                                          chunk_starts=sidecar_chunk_starts(side, len(frames)))
        except ForcelabError as e:
            skipped[video.name] = str(e)
            continue
        sidecars.append(side)
        per_video.append(scores)
        rows.append({"video": video.name, "caption": caption, "frames": int(len(frames)),
                     "fps": side.get("fps"), "seed": side.get("seed"), "scores": scores})
    if not per_video:
        raise ForcelabError(f"{folder}: no video could be scored ({skipped})")
    summary = toybench.summarize(per_video)
    result = {"kind": "toybench", "name": folder.resolve().name, "videos_dir": str(folder.resolve()),
              "forcelab": __version__, "metrics": list(toybench.METRICS),
              "bucket_frames": bucket_frames or toybench.ToyWorldConfig().frames,
              "aggregate": summary["aggregate"], "spread": summary["spread"], "buckets": summary["buckets"],
              "slopes": summary["slopes"], "videos": rows, "skipped": skipped,
              "generation": generation(sidecars)}
    if result["generation"] and "speed_fps" in result["generation"]:
        result["speed_fps"] = result["generation"]["speed_fps"]
    (out / RESULT_NAME).write_text(json.dumps(result, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    if report:
        write_report([out / RESULT_NAME], out / "toybench.html", progress=progress)
    return result
