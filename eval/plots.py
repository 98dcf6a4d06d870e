"""Images for the report, as PNG / GIF bytes: matplotlib charts, frame strips, animated previews."""

from __future__ import annotations

import io
import math

import numpy as np

from ..errors import ForcelabError

PREVIEW_HEIGHT = 96       # px: small toy frames are upscaled (nearest) to at least this height
STRIP_FRAMES = 8          # frames in a strip, evenly spaced over the video
GIF_MAX_FRAMES = 160      # longer videos are subsampled in the animated preview


GRID_COLUMNS, PANEL_HEIGHT = 3, 2.6   # panels per row, inches per panel row
LEGEND_MARGIN = 0.06                   # share of the figure's height kept for the legend below the panels
SPARSE_POINTS = 50   # curves with at most this many points also mark each one (a single point has no line)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ForcelabError("reports need matplotlib: pip install 'forcelab[eval]'") from None
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def bar_chart(metrics: list[str], runs: list[str], values: dict, errors: dict, title: str) -> bytes:
    """One panel per metric, one bar per run; values[(run, metric)], errors[(run, metric)] (or None)."""
    plt = _pyplot()
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes.flat, metrics):
        ys = [values.get((r, m), math.nan) for r in runs]
        es = [errors.get((r, m)) or 0.0 for r in runs]
        ax.bar(range(len(runs)), ys, yerr=es, color=[colors[i % len(colors)] for i in range(len(runs))], capsize=3)
        ax.set_title(m, fontsize=9)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(runs, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _panel_grid(panels: int, panel_width: float):
    """A figure of `panels` small panels, GRID_COLUMNS to a row."""
    cols = min(GRID_COLUMNS, panels)
    rows = math.ceil(panels / cols)
    return _pyplot().subplots(rows, cols, figsize=(panel_width * cols, PANEL_HEIGHT * rows), squeeze=False)


def _finish_grid(fig, axes, titles: list[str], xlabel: str, title: str, legend_from: int) -> bytes:
    """Title and label each panel, blank the unused ones, add one legend below when at least
    `legend_from` runs are drawn, and render."""
    for ax, name in zip(axes.flat, titles):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(titles):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    legend = len(labels) >= legend_from
    if legend:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, LEGEND_MARGIN if legend else 0, 1, 1))
    return _png(fig)


def drift_chart(metrics: list[str], series: dict, bucket_frames: dict) -> bytes:
    """One panel per metric: its mean (band: +- std) per time bucket, one line per run.
    series[run][metric] = (means, stds); bucket_frames[run] places bucket b at its centre frame."""
    fig, axes = _panel_grid(len(metrics), panel_width=3.6)
    for ax, m in zip(axes.flat, metrics):
        for run, per_metric in series.items():
            if m not in per_metric:
                continue
            mean, std = (np.asarray(v, dtype=np.float64) for v in per_metric[m])
            x = (np.arange(len(mean)) + 0.5) * bucket_frames[run]
            ax.plot(x, mean, marker="o", markersize=3, label=run)
            ax.fill_between(x, mean - np.nan_to_num(std), mean + np.nan_to_num(std), alpha=0.15)
    return _finish_grid(fig, axes, metrics, "frame", "metrics over time (drift)", legend_from=1)


def curves_chart(series: dict, title: str = "training curves") -> bytes:
    """One panel per metric (x: training step), one line per run: series[run][metric] = (steps, values).
    Metrics whose name ends in "loss" come first; non-finite values are left as gaps."""
    metrics = list(dict.fromkeys(m for per_run in series.values() for m in per_run))
    metrics.sort(key=lambda m: (not m.endswith("loss"), m))
    fig, axes = _panel_grid(len(metrics), panel_width=3.8)
    for ax, m in zip(axes.flat, metrics):
        for run, per_metric in series.items():
            if m in per_metric:
                steps, values = per_metric[m]
                sparse = len(steps) <= SPARSE_POINTS    # a role updated every 5th step of a short run: points
                ax.plot(steps, np.asarray(values, dtype=np.float64), linewidth=1.2, label=run,
                        marker="o" if sparse else None, markersize=3)
    return _finish_grid(fig, axes, metrics, "step", title, legend_from=2)


def _upscale(frames: np.ndarray) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8 [T, H, W, 3] to at least PREVIEW_HEIGHT rows."""
    k = max(1, math.ceil(PREVIEW_HEIGHT / frames.shape[1]))
    return frames.repeat(k, axis=1).repeat(k, axis=2) if k > 1 else frames


def frame_strip(frames: np.ndarray) -> bytes:
    """PNG of STRIP_FRAMES frames evenly spaced over uint8 [T, H, W, 3], side by side."""
    from PIL import Image

    idx = np.unique(np.linspace(0, len(frames) - 1, min(STRIP_FRAMES, len(frames))).round().astype(int))
    tiles = _upscale(frames[idx])
    gap = np.full((tiles.shape[1], 2, 3), 255, np.uint8)
    row = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
    buf = io.BytesIO()
    Image.fromarray(row).save(buf, format="PNG")
    return buf.getvalue()


def animation(frames: np.ndarray, fps: float) -> bytes:
    """Looping GIF of uint8 [T, H, W, 3] at fps (subsampled to at most GIF_MAX_FRAMES)."""
    from PIL import Image

    step = max(1, math.ceil(len(frames) / GIF_MAX_FRAMES))
    images = [Image.fromarray(f) for f in _upscale(frames[::step])]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, int(round(1000 * step / max(fps, 1e-3)))))
    return buf.getvalue()
