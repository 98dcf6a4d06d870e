"""Writing generated videos: an mp4 (PyAV, libx264) and its JSON sidecar, each put in place
atomically (a reader sees the old file or the new one, never a partial one).

    names = [video_file_name(prompt, (k, i), vbench) for ...]
    check_existing(out_dir, names, overwrite)      # before any work
    write_video_and_sidecar(out_dir / name, pixels, fps, sidecar, overwrite=overwrite)

Earlier results are never replaced silently (overwrite=False refuses), and a file forcelab
did not write (no sidecar of ours beside it) is never replaced at all. The trainer's sample
videos go through the same writer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import ForcelabError
from ..fsio import atomic_path, write_text_atomic

MAX_NAME_BYTES = 255                        # the longest file name most file systems take
SLUG_CHARS = 60                             # prompt characters kept in a default file name
VIDEO_CONTAINER = "mp4"


def video_file_name(prompt: str, job: tuple[int, int], vbench: bool) -> str:
    """File name of sample i of prompt k: "{prompt}-{i}.mp4" as VBench expects, else
    "{k:04d}-{slug}-{i}.mp4"."""
    k, i = job
    if vbench:
        name = f"{prompt.replace('/', ' ')}-{i}.mp4"
        if len(name.encode()) > MAX_NAME_BYTES:
            raise ForcelabError(f"--vbench: the file name of prompt {k + 1} would exceed {MAX_NAME_BYTES} bytes; "
                                f"name files by the original prompts (--prompts) and condition on the long "
                                f"ones with --extended-prompts")
        return name
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:SLUG_CHARS] or "prompt"
    return f"{k:04d}-{slug}-{i}.mp4"


def sidecar_is_ours(video: Path) -> bool:
    """Whether `video` and its sidecar were written by forcelab generate (the sidecar says so)."""
    try:
        side = json.loads(video.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(side, dict) and "forcelab" in side and side.get("video") == video.name


def check_existing(out_dir: Path, names: list[str], overwrite: bool) -> None:
    """Never replace earlier results silently, and never a file forcelab did not write."""
    taken = [n for n in names if (out_dir / n).exists() or (out_dir / n).with_suffix(".json").exists()]
    if not taken:
        return
    if not overwrite:
        raise ForcelabError(f"--output {out_dir}: already holds {len(taken)} of this run's files (e.g. "
                            f"{taken[0]}); choose a new --output, or pass --overwrite to replace an earlier "
                            f"run's videos")
    foreign = [n for n in taken if not sidecar_is_ours(out_dir / n)]
    if foreign:
        raise ForcelabError(f"--output {out_dir}: {foreign[0]} (or its .json) was not written by forcelab "
                            f"generate; it is never replaced - choose a new --output")


def write_video_and_sidecar(path: Path, pixels: torch.Tensor, fps: float, sidecar: dict, *,
                            overwrite: bool = True, what: str = "--output") -> Path:
    """Write `pixels` [3, F, H, W] in [-1, 1] as the mp4 `path` and `sidecar` as path.json,
    each atomically; overwrite=False refuses an existing file. Returns the sidecar's path."""
    from ..data.video import to_uint8_frames, write_video

    with atomic_path(path, overwrite=overwrite, what=what) as tmp:
        write_video(tmp, to_uint8_frames(pixels.transpose(0, 1)), fps, container_format=VIDEO_CONTAINER)
    side_path = path.with_suffix(".json")
    write_text_atomic(side_path, json.dumps(sidecar, indent=2, default=str) + "\n", overwrite=overwrite, what=what)
    return side_path
