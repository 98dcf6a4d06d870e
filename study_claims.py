"""The papers' claims, tested on a study's numbers: for each claim a pair of (row, rollout)
cells, a metric, and the paired difference A - B over the same held-out prompts (ToyBench) or
scenes (exposure) within each seed, with a 95% interval that resamples seeds and, within them,
prompts (eval.stats.clustered_bootstrap_ci). The verdict reads the interval: supported (A - B >
0 throughout), not supported (A - B < 0 throughout: the opposite holds) or inconclusive (the
interval spans 0) at this scale.

    claims = claims_for(record)            # record: study.json's; rows missing from it are skipped
    print(claims_markdown(record))

Metrics: a ToyBench metric (per video), or "exposure:<metric>": the per-scene level of the
exposure gap (self-conditioned - teacher-forced over the chunks with context; eval/exposure.py),
where a higher (less negative) gap is less exposure bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .eval.stats import clustered_bootstrap_ci, nanmean as _mean

LONG = "{L}x"          # a rollout name's long factor, filled in from the study's


@dataclass(frozen=True)
class Claim:
    paper: str
    text: str
    metric: str
    a: tuple[str, str]        # (row, rollout): the side the claim says is higher
    b: tuple[str, str]


def _both(paper, text, a, b, metrics=("adherence", "background")):
    return [Claim(paper, text, m, a, b) for m in metrics]


CLAIMS = [
    *[Claim("Self-Forcing", "training on its own rollouts closes the train-test gap of teacher-forced training",
            f"exposure:{m}", ("self_forcing", "exposure"), (other, "exposure"))
      for other in ("diffusion_forcing", "teacher_forcing") for m in ("background", "adherence")],
    Claim("Self-Forcing", "at the same 4 steps, a self-rollout student beats a teacher-forced model",
          "adherence", ("self_forcing", "1x"), ("diffusion_forcing", "1x 4 steps")),
    *_both("Self-Forcing", "... and over long rollouts", ("self_forcing", f"{LONG} sink+window"),
           ("diffusion_forcing", f"{LONG} sink+window 4 steps")),
    Claim("Self-Forcing", "4 steps match the 20-step teacher-forced model",
          "adherence", ("self_forcing", "1x"), ("diffusion_forcing", "1x")),
    Claim("Self-Forcing", "the self-rollout student beats CausVid", "adherence",
          ("self_forcing", "1x"), ("causvid", "1x")),
    Claim("CausVid", "DMD makes a few-step causal student better than the causal model at few steps",
          "adherence", ("causvid", "1x"), ("diffusion_forcing", "1x 4 steps")),
    *_both("Rolling Forcing", "less long-horizon drift than Self-Forcing",
           ("rolling_forcing", f"{LONG} sink+window"), ("self_forcing", f"{LONG} sink+window")),
    *_both("Rolling Forcing", "the attention sink is needed (same cache budget, trained each way)",
           ("rolling_forcing", f"{LONG} sink+window"), ("rolling_forcing_nosink", f"{LONG} window")),
    *_both("LongLive", "streaming long tuning improves long rollouts over Self-Forcing",
           ("streaming_long", f"{LONG} sink+window"), ("self_forcing", f"{LONG} sink+window")),
    *_both("LongLive", "the frame sink keeps long rollouts stable (same cache budget, trained each way)",
           ("streaming_long", f"{LONG} sink+window"), ("streaming_long_nosink", f"{LONG} window")),
    *_both("Self-Forcing++", "training on long self-rollouts extends the horizon (its window, no sink)",
           ("self_forcing_pp", f"{LONG} window"), ("self_forcing", f"{LONG} window")),
    *_both("attention sink", "a sink at inference alone helps a student trained on short clips",
           ("self_forcing", f"{LONG} sink+window"), ("self_forcing", f"{LONG} window")),
    *_both("AR-Diffusion", "age-dependent noise levels beat diffusion forcing's independent ones",
           ("ar_diffusion", f"{LONG} sink+window"), ("diffusion_forcing", f"{LONG} sink+window")),
]


def _prefix(record: dict) -> str:
    """The rows' config folder in the record's world (study.json's row_prefix: textured/ for the
    textured world, empty for the plain one)."""
    return record.get("row_prefix", "")


def _groups(record: dict, side: tuple[str, str], metric: str) -> dict[int, dict]:
    """seed -> {unit: value} of one side: per video (ToyBench) or per scene (exposure:)."""
    row, rollout = side
    if metric.startswith("exposure:"):
        name = metric.split(":", 1)[1]
        return {r["seed"]: dict(enumerate(r["per_scene_gap"][name])) for r in record.get("exposure", {}).get(row, [])}
    return {r["seed"]: {v: s.get(metric) for v, s in r["videos"].items()}
            for r in record["rows"].get(row, {}).get(rollout, [])}


def paired(record: dict, claim: Claim) -> dict | None:
    """The claim's paired difference: {"diff", "ci95", "a_mean", "b_mean", "seeds", "units",
    "verdict"}; None when a side is missing from the record."""
    p, long = _prefix(record), f"{record['long_factor']}x"
    a = _groups(record, (p + claim.a[0], claim.a[1].replace(LONG, long)), claim.metric)
    b = _groups(record, (p + claim.b[0], claim.b[1].replace(LONG, long)), claim.metric)
    seeds = sorted(set(a) & set(b))
    groups, units = [], 0
    for seed in seeds:
        keys = sorted(set(a[seed]) & set(b[seed]))
        d = np.array([_num(a[seed][k]) - _num(b[seed][k]) for k in keys])
        groups.append(d)
        units += int(np.isfinite(d).sum())
    if not units:
        return None
    means = [_mean([_num(v) for s in seeds for v in side[s].values()]) for side in (a, b)]
    diff = _mean(np.concatenate(groups))
    lo, hi = clustered_bootstrap_ci(groups)
    return {"diff": diff, "ci95": [lo, hi], "a_mean": means[0], "b_mean": means[1], "seeds": len(seeds), "units": units,
            "verdict": verdict(lo, hi)}


def verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "supported"
    if hi < 0:
        return "not supported (the opposite holds)"
    return "inconclusive"


def claims_for(record: dict) -> list[dict]:
    """Every claim whose rows the record holds, with its paired difference and verdict."""
    out = []
    long = f"{record['long_factor']}x"
    for claim in CLAIMS:
        result = paired(record, claim)
        if result is not None:
            out.append({"paper": claim.paper, "claim": claim.text, "metric": claim.metric,
                        "a": f"{claim.a[0]} ({claim.a[1].replace(LONG, long)})",
                        "b": f"{claim.b[0]} ({claim.b[1].replace(LONG, long)})", **result})
    return out


def claims_markdown(record: dict) -> str:
    lines = ["| paper | claim | metric | A | B | A | B | A - B [95% CI] | seeds x units | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in record["claims"]:
        lo, hi = c["ci95"]
        lines.append(f"| {c['paper']} | {c['claim']} | {c['metric']} | {c['a']} | {c['b']} | {c['a_mean']:.3f} | "
                     f"{c['b_mean']:.3f} | {c['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {c['seeds']} x "
                     f"{c['units'] // max(c['seeds'], 1)} | {c['verdict']} |")
    return ("Claims: paired differences over the same prompts (scenes) within each seed; 95% interval "
            "resampling seeds, then prompts\n\n" + "\n".join(lines))


def exposure_markdown(record: dict) -> str:
    """Per row: the exposure gap's level and slope per chunk (mean ± std over seeds, and the
    level's clustered interval over seeds and scenes), and the self-conditioned level."""
    lines = ["| row | cache | metric | gap level [95% CI] | gap slope/chunk (mean ± std over seeds) | "
             "self-conditioned level |", "|---|---|---|---|---|---|"]
    for row, seeds in record["exposure"].items():
        cache = f"window {seeds[0]['window']}" + (f" + sink {seeds[0]['sink']}" if seeds[0]["sink"] else "")
        for m in ("background", "psnr", "adherence"):
            groups = [np.array(r["per_scene_gap"][m], dtype=np.float64) for r in seeds]
            lo, hi = clustered_bootstrap_ci(groups)
            slopes = np.array([r["gap"][m]["slope"] for r in seeds], dtype=np.float64)
            own = _mean([r["self_conditioned"][m] for r in seeds])
            level = _mean(np.concatenate(groups))
            std = float(slopes.std(ddof=1)) if len(slopes) > 1 else 0.0
            lines.append(f"| {row} | {cache} | {m} | {level:+.3f} [{lo:+.3f}, {hi:+.3f}] | {slopes.mean():+.3f} ± {std:.3f} | "
                         f"{own:.3f} |")
    p = record.get("exposure_protocol") or {}
    return (f"Exposure (eval/exposure.py): {p.get('scenes')} held-out scenes, {p.get('chunks')} chunks, "
            f"the ground truth of the first {p.get('prefix')} chunk(s) given, each row with the cache it was "
            f"trained with (window {record['window']} + sink {record['sink']} for rows trained on the full clip); "
            f"gap = self-conditioned - teacher-forced\n\n" + "\n".join(lines))


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else math.nan

