"""The claims' paired differences and verdicts (study_claims.py) against a plain computation
on a synthetic study record, and the clustered bootstrap interval against closed forms."""

import math

import numpy as np
import pytest

from forcelab import study_claims as C
from forcelab.eval.stats import clustered_bootstrap_ci


def record_with(a_videos: dict, b_videos: dict, long_factor=10) -> dict:
    """A textured-world record holding Self-Forcing at 1x and diffusion forcing at 1x 4 steps:
    {seed: {video: adherence}} per side."""
    def runs(videos):
        return [{"seed": seed, "videos": {v: {"adherence": x} for v, x in vids.items()}}
                for seed, vids in videos.items()]
    return {"world": "textured", "row_prefix": "textured/", "long_factor": long_factor, "exposure": {},
            "rows": {"textured/self_forcing": {"1x": runs(a_videos)},
                     "textured/diffusion_forcing": {"1x 4 steps": runs(b_videos)}}}


CLAIM = C.Claim("Self-Forcing", "t", "adherence", ("self_forcing", "1x"), ("diffusion_forcing", "1x 4 steps"))


def test_the_difference_pairs_videos_within_seeds():
    rng = np.random.default_rng(0)
    a = {s: {f"p{i:03d}": float(rng.uniform()) for i in range(8)} for s in range(3)}
    b = {s: {f"p{i:03d}": float(rng.uniform()) for i in range(8)} for s in range(3)}
    b[2].pop("p007")                                   # a video one side lacks is not paired
    b[1]["p003"] = math.nan                            # a NaN score is left out
    r = C.paired(record_with(a, b), CLAIM)
    diffs = [a[s][v] - b[s][v] for s in range(3) for v in a[s] if v in b[s] and not math.isnan(b[s][v])]
    assert r["units"] == len(diffs) == 22 and r["seeds"] == 3
    assert r["diff"] == pytest.approx(np.mean(diffs), abs=1e-12)
    assert r["ci95"][0] < r["diff"] < r["ci95"][1]


@pytest.mark.parametrize("shift, verdict", [(0.2, "supported"), (-0.2, "not supported (the opposite holds)"),
                                            (0.0, "inconclusive")])
def test_the_verdict_reads_the_interval(shift, verdict):
    rng = np.random.default_rng(1)
    base = {s: {f"p{i:03d}": float(rng.uniform()) for i in range(32)} for s in range(3)}
    noise = {s: {v: x + shift + float(rng.normal(0, 0.05)) for v, x in vids.items()} for s, vids in base.items()}
    r = C.paired(record_with(noise, base), CLAIM)
    assert r["verdict"] == verdict
    assert r["diff"] == pytest.approx(shift, abs=0.03)


def test_a_claim_whose_rows_did_not_run_is_left_out():
    rec = record_with({0: {"p000": 1.0}}, {0: {"p000": 0.5}})
    names = {(c["a"], c["b"]) for c in C.claims_for(rec)}
    assert names == {("self_forcing (1x)", "diffusion_forcing (1x 4 steps)")}


def test_exposure_claims_pair_scenes():
    rec = {"world": "textured", "row_prefix": "textured/", "long_factor": 10, "rows": {}, "exposure": {
        "textured/self_forcing": [{"seed": 0, "per_scene_gap": {"background": [-1.0, -2.0], "adherence": [0, 0]}}],
        "textured/diffusion_forcing": [{"seed": 0, "per_scene_gap": {"background": [-3.0, -3.0], "adherence": [0, 0]}}]}}
    c = next(c for c in C.claims_for(rec) if c["metric"] == "exposure:background" and "diffusion" in c["b"])
    assert c["diff"] == pytest.approx(1.5) and c["units"] == 2


def test_clustered_interval_of_constant_values_is_the_constant():
    assert clustered_bootstrap_ci([np.full(5, 2.5), np.full(3, 2.5)]) == (2.5, 2.5)
    assert all(math.isnan(v) for v in clustered_bootstrap_ci([]))
    assert all(math.isnan(v) for v in clustered_bootstrap_ci([np.array([math.nan])]))


def test_clustered_interval_carries_the_spread_between_groups():
    """One group: the unit bootstrap's normal interval (half-width 1.96 sd / sqrt(n)). Groups
    whose means differ: wider than an interval that pools their units, about the t interval of
    the group means."""
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, 400)
    lo, hi = clustered_bootstrap_ci([x])
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    groups = [rng.normal(mu, 0.1, 100) for mu in (-1.0, 0.0, 1.0, 0.5, -0.5)]
    lo, hi = clustered_bootstrap_ci(groups)
    pooled = 1.96 * np.concatenate(groups).std(ddof=1) / math.sqrt(500)
    means = np.array([g.mean() for g in groups])
    between = 1.96 * means.std(ddof=0) / math.sqrt(len(means))      # the bootstrap's plug-in spread
    assert (hi - lo) / 2 > 5 * pooled
    assert (hi - lo) / 2 == pytest.approx(between, rel=0.25)
