"""Summaries of per-video numbers: mean with spread, and the slope of a metric over time buckets."""

from __future__ import annotations

import math

import numpy as np

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}   # two-sided Student t quantiles (0.975)


def t95(dof: int) -> float:
    """The 0.975 quantile of Student's t with `dof` degrees of freedom (nearest tabulated below;
    1.96 from 60 on)."""
    if dof >= 60:
        return 1.96
    return T95[max(k for k in T95 if k <= dof)]


def spread(values) -> dict:
    """{mean, std (sample), ci95 (half-width of the t interval of the mean), min, max, n} of the
    finite values; NaN entries are left out (and counted in "missing")."""
    v = np.asarray(list(values), dtype=np.float64)
    finite = v[np.isfinite(v)]
    n = len(finite)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "ci95": math.nan, "min": math.nan, "max": math.nan,
                "n": 0, "missing": int(len(v))}
    std = float(finite.std(ddof=1)) if n > 1 else 0.0
    return {"mean": float(finite.mean()), "std": std, "ci95": t95(n - 1) * std / math.sqrt(n) if n > 1 else 0.0,
            "min": float(finite.min()), "max": float(finite.max()), "n": n, "missing": int(len(v) - n)}


def slope(values) -> float:
    """Least-squares slope of values[b] against the bucket index b (change per bucket); 0 for
    fewer than two finite values."""
    v = np.asarray(list(values), dtype=np.float64)
    b = np.arange(len(v), dtype=np.float64)
    keep = np.isfinite(v)
    if keep.sum() < 2:
        return 0.0
    b, v = b[keep], v[keep]
    b = b - b.mean()
    return float((b * (v - v.mean())).sum() / (b ** 2).sum())


def nanmean(values) -> float:
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


BOOTSTRAP_RESAMPLES = 2000     # resamples of the units (e.g. scenes); the 2.5% tails rest on ~50 draws each


def bootstrap_ci(values, statistic=nanmean, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(values) over resamples of the units: values
    [N, ...] (one row per unit, e.g. per scene), rows drawn with replacement; statistic maps
    such an array to a float. (NaN, NaN) without units."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(v[rng.integers(0, len(v), len(v))]) for _ in range(resamples)])
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2
    return float(np.quantile(draws, tail)), float(np.quantile(draws, 1.0 - tail))


def clustered_bootstrap_ci(groups, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                           level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over units nested in groups (e.g. held-out
    prompts within training seeds): each resample draws the groups with replacement, then the
    units within each drawn group, so the interval carries the spread between groups as well as
    within them. groups: a list of 1-D arrays; NaN units are left out. (NaN, NaN) without units."""
    parts = [np.asarray(g, dtype=np.float64) for g in groups]
    parts = [g[np.isfinite(g)] for g in parts]
    parts = [g for g in parts if len(g)]
    if not parts:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for i in range(resamples):
        chosen = rng.integers(0, len(parts), len(parts))
        draws[i] = np.concatenate([parts[j][rng.integers(0, len(parts[j]), len(parts[j]))] for j in chosen]).mean()
    tail = (1.0 - level) / 2
    return float(np.quantile(draws, tail)), float(np.quantile(draws, 1.0 - tail))
