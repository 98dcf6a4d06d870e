"""Files around an evaluation: the JSON sidecars `forcelab generate` writes beside each mp4
(read, and what the results record from them: generation settings, speed), and the rule for
the result files eval writes (it replaces only its own)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import ForcelabError

# what eval reads from a sidecar, and the values it accepts
POSITIVE = ("fps", "frames", "batch", "seconds_per_batch")
INTEGERS = ("frames", "batch", "seed", "sample")
TEXTS = ("video", "prompt", "prompt_text", "first_frame")
SETTINGS = ("model", "plan", "frames", "height", "width", "fps", "dtype", "device", "samples", "forcelab")


def read_sidecar(video: Path) -> dict | None:
    """The sidecar of `video` (same name, .json), None when there is none."""
    path = Path(video).with_suffix(".json")
    if not path.is_file():
        return None
    try:
        side = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):   # JSONDecodeError is a ValueError
        raise ForcelabError(f"{path}: not valid UTF-8 JSON (a sidecar of `forcelab generate`?); fix or move it") from None
    if not isinstance(side, dict):
        raise ForcelabError(f"{path}: a sidecar is a JSON object (as `forcelab generate` writes), got "
                            f"{type(side).__name__}; fix or move it")
    _check_values(side, path)
    return side


def _check_values(side: dict, path: Path) -> None:
    for key in POSITIVE + INTEGERS:
        value = side.get(key)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or (key in INTEGERS and value != int(value)) or (key in POSITIVE and value <= 0):
            kind = "a positive" if key in POSITIVE else "a"
            kind += " whole number" if key in INTEGERS else " number"
            raise ForcelabError(f"{path}: {key!r} must be {kind}, got {value!r}; fix or move the sidecar")
    for key in TEXTS:
        if key in side and side[key] is not None and not isinstance(side[key], str):
            raise ForcelabError(f"{path}: {key!r} must be text, got {type(side[key]).__name__}; fix or move the sidecar")


def speed_fps(sidecars: list[dict]) -> float | None:
    """Generated frames per second of wall time: each batch of `batch` videos took
    seconds_per_batch (a smaller last batch makes this an upper bound for it)."""
    rows = [s for s in sidecars if s.get("seconds_per_batch") and s.get("frames")]
    if not rows:
        return None
    per_video = [s["frames"] * min(int(s.get("batch", 1)), len(rows)) / s["seconds_per_batch"] for s in rows]
    return float(sum(per_video) / len(per_video))


def generation(sidecars: list[dict]) -> dict | None:
    """The generation settings of the first video (SETTINGS), with speed_fps when recorded."""
    if not sidecars:
        return None
    info = {k: sidecars[0][k] for k in SETTINGS if k in sidecars[0]}
    speed = speed_fps(sidecars)
    if speed is not None:
        info["speed_fps"] = speed
    return info


def check_writable(path: Path, kind: str) -> None:
    """forcelab overwrites only files it wrote: a JSON of its own `kind`."""
    if path.exists():
        try:
            ours = json.loads(path.read_text(encoding="utf-8")).get("kind") == kind
        except (ValueError, AttributeError, OSError):
            ours = False
        if not ours:
            raise ForcelabError(f"{path} exists and was not written by forcelab eval {kind}; move it or pick "
                                f"another --out")
