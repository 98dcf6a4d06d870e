"""VBench scores: the official aggregation into Quality / Semantic / Total, and the one
dimension that needs no model (temporal_flickering), computed natively.

    aggregate({"subject_consistency": 0.95, "dynamic_degree": 0.6, ...})
    -> {"quality": 83.1, "semantic": None, "total": 83.1, "missing": [...], "normalized": {...}}
    temporal_flickering(frames)           # uint8 [T, H, W, 3] -> VBench's per-video score in 0..1

The toolkit scores each dimension in 0..1 but leaves the totals to a script with these
constants (VBench's scripts/constant.py): each dimension is min-max normalised and weighted
(dynamic_degree 0.5, others 1); Quality and Semantic are weighted means over their groups;
Total = (4 Quality + 1 Semantic) / 5. For a subset, each group is the weighted mean over
the dimensions present (the official script would count a missing one as 0) and Total
weights the groups present; the missing dimensions are listed.
The subprocess runner is in vbench_runner.py, clip splitting for VBench-Long in vbench_long.py,
the prompt suite and the dimension names in generate/vbench_suite.py.
"""

from __future__ import annotations

import math

import numpy as np

from ..data.video import read_video
from ..errors import ForcelabError
from ..progress import progress_bar
from ..generate.vbench_suite import DIMENSIONS, QUALITY, SEMANTIC, check_dimensions  # noqa: F401 (re-exported)

# (Min, Max) of the official normalisation; dimensions not listed are 0..1
NORMALIZE = {"subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
             "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975),
             "scene": (0.0, 0.8222), "appearance_style": (0.0009, 0.2855),
             "temporal_style": (0.0, 0.364), "overall_consistency": (0.0, 0.364)}
WEIGHT = {"dynamic_degree": 0.5}                 # others 1
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0
# the dimensions VBench's custom_input mode refuses (they need the suite's auxiliary info)
NEEDS_SUITE = ("object_class", "multiple_objects", "scene", "appearance_style", "color", "spatial_relationship")
NATIVE = ("temporal_flickering",)                # computed here without VBench


def normalized(dimension: str, score: float) -> float:
    """The official normalised and weighted score of one dimension (0..1 times its weight)."""
    lo, hi = NORMALIZE.get(dimension, (0.0, 1.0))
    return (score - lo) / (hi - lo) * WEIGHT.get(dimension, 1.0)


def aggregate(scores: dict[str, float]) -> dict:
    """{dimension: raw score in 0..1} -> {"quality", "semantic", "total"} in percent (None for a
    group with no dimension present), "normalized" {dimension: normalised * weight},
    "missing" [dimensions absent], "partial" (True unless all 16 are present)."""
    check_dimensions(scores)
    for d, s in scores.items():
        if not isinstance(s, (int, float)) or not math.isfinite(s) or not -1e-6 <= s <= 1 + 1e-6:
            raise ForcelabError(f"VBench {d}: score {s!r} is not in 0..1 (VBench reports imaging_quality "
                                f"in 0..100: divide it by 100)")
    norm = {d: normalized(d, float(scores[d])) for d in DIMENSIONS if d in scores}

    def group(dims):
        present = [d for d in dims if d in norm]
        if not present:
            return None
        return sum(norm[d] for d in present) / sum(WEIGHT.get(d, 1.0) for d in present)

    quality, semantic = group(QUALITY), group(SEMANTIC)
    parts = [(w, g) for w, g in ((QUALITY_WEIGHT, quality), (SEMANTIC_WEIGHT, semantic)) if g is not None]
    total = sum(w * g for w, g in parts) / sum(w for w, _ in parts) if parts else None
    pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
    return {"quality": pct(quality), "semantic": pct(semantic), "total": pct(total), "normalized": norm,
            "missing": [d for d in DIMENSIONS if d not in scores], "partial": len(norm) < len(DIMENSIONS)}


def temporal_flickering(frames) -> float:
    """VBench's temporal_flickering of one video, uint8 [T, H, W, 3] (T >= 2):
    (255 - mean over consecutive pairs of the mean absolute pixel difference) / 255.
    VBench scores static-prompt videos that pass its static filter; this is the per-video score."""
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.dtype != np.uint8 or len(frames) < 2:
        raise ForcelabError(f"temporal_flickering needs uint8 [T, H, W, C] with T >= 2, got {frames.dtype} "
                            f"{list(frames.shape)}")
    f = frames.astype(np.float32)
    mae = np.abs(f[1:] - f[:-1]).reshape(len(f) - 1, -1).mean(-1)      # [T-1], one per pair
    return float((255.0 - float(mae.mean())) / 255.0)


def temporal_flickering_files(paths, progress: bool = False) -> tuple[float, list[dict]]:
    """VBench's result for a list of mp4s: (mean over videos, [{video_path, video_results}])."""
    rows = []
    for p in progress_bar(list(paths), desc="temporal_flickering", unit="video", disable=not progress):
        frames = read_video(p).permute(0, 2, 3, 1).numpy()
        rows.append({"video_path": str(p), "video_results": temporal_flickering(frames)})
    if not rows:
        raise ForcelabError("temporal_flickering: no videos to score")
    return float(np.mean([r["video_results"] for r in rows])), rows
