"""KV-cache policies at one cache budget over long toy streams: memory, speed, ToyBench, drift.

    python bench/cache_policies.py                           # the committed toy teacher, 4 prompts, 10x and 50x
    python bench/cache_policies.py --model runs/toy_sf --prompts 8 --factors 10 50

Every policy of models/cache_policy.py streams the same held-out toy prompts (one batch, the
same noise) to `factor` x the training length (8 frames), with the same number of cache slots
(BUDGET_SLOTS frames: sink + ring); the policies run interleaved, one after another per length.
Per policy: the cache's bytes (KVCache.nbytes: K/V store, a moving sink's keys before RoPE, the
prompt's cross-attention K/V), generated frames per second (DiT only, the generating thread's
CPU time: torch runs every op inline in it with one thread; the best of --rounds), ToyBench's adherence, identity, physics and fidelity (PSNR of the frame
against its re-render) over the whole video, and drift: the slope per training-length bucket of
adherence and fidelity (ToyBench's "slopes"; 0 = no degradation). Adherence and identity are
also given as paired differences to sink_window (per video: same prompt, same noise), mean +-
the 95 % half-width over the prompts.

--model: a forcelab run folder (its generator, its recipe's chunk-wise plan) or a DiT directory;
the default is the committed toy teacher sampled as a causal chunk-wise 4-step model (the
stand-in bench/versus.py uses: no distilled student is committed), so absolute scores are low
and the comparison between policies is the point. One markdown table is printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from forcelab.data.toyworld import HELD_OUT_SCENES, ToyWorld
from forcelab.eval.exposure import load_student, to_frames
from forcelab.eval.stats import spread
from forcelab.eval.toybench import score_videos
from forcelab.models.rollout import Noise, make_cache, stream

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "configs" / "toy" / "teacher_checkpoint"
THREADS = 1
CLOCK = time.thread_time     # one thread: its CPU time, which other processes on the machine do not inflate
TRAINING_FRAMES = 8          # the toy recipes' clip (configs/toy/base.yaml data.frames; toy codec: 1 latent per frame)
BUDGET_SLOTS = 6             # cache slots (frames) of every policy: the study's window 6 + sink 2 with chunks of 2
# policy -> (spec, window_frames, sink_frames); every row keeps sink + window - chunk = BUDGET_SLOTS slots
POLICIES = {
    "sink_window": ("sink_window", 6, 2),
    "deep_forcing": ("deep_forcing", 4, 4),          # the deep sink: 4 of the 6 slots, re-aligned in RoPE
    "dummy_heads": ("dummy_heads", 6, 2),            # 1 of the toy's 3 heads (round(0.25 * 3)) sees sink + itself
    "temporal_merge": ("temporal_merge", 6, 2),
    "similar_merge": ("similar_merge", 6, 2),
}
QUALITY = ("adherence", "identity", "physics", "fidelity_psnr")
DRIFT = ("adherence", "fidelity_psnr")
PAIRED = ("adherence", "identity")    # also as paired differences to sink_window (same prompts, same noise)


def paired(row: dict, base: dict, metric: str) -> str:
    """mean +- 95% half-width of the per-video difference row - base."""
    d = spread(a - b for a, b in zip(row["per_video"][metric], base["per_video"][metric]))
    return f"{d['mean']:+.3f} +- {d['ci95']:.3f}"


def run_policy(student, spec, window, sink, context, captions, latent_hw, frames, rounds):
    plan = replace(student.plan, window_frames=window, sink_frames=sink, cache_policy=spec)
    model = student.model
    B = len(captions)
    best, latents, nbytes, slots = float("inf"), None, 0, 0
    for _ in range(rounds):
        noise = Noise(list(range(B)), model.config.in_channels, *latent_hw, device=student.device)
        cache = make_cache(model, plan, B, *latent_hw, frames)
        t0 = CLOCK()
        with torch.no_grad():
            chunks = [c.x for c in stream(model, plan, context, noise, frames, cache=cache)]
        best = min(best, CLOCK() - t0)
        latents, nbytes, slots = torch.cat(chunks, 2), cache.nbytes, cache.num_slots
    videos = to_frames(latents, student.codec)
    scores = score_videos(list(videos), captions, bucket_frames=TRAINING_FRAMES)
    return {"bytes": nbytes, "slots": slots, "fps": B * frames / best, "seconds": best,
            **{m: scores["aggregate"][m] for m in QUALITY},
            "per_video": {m: [v[m] for v in scores["videos"]] for m in PAIRED},
            **{f"{m}_slope": scores["slopes"][m] for m in DRIFT}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(TEACHER), help="run folder or DiT directory (default: the committed toy teacher)")
    p.add_argument("--prompts", type=int, default=4, help="held-out toy scenes, generated as one batch")
    p.add_argument("--factors", type=int, nargs="+", default=[10, 50], help="lengths in training lengths")
    p.add_argument("--rounds", type=int, default=1, help="timed runs per policy and length (the best counts)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    args = p.parse_args()
    torch.set_num_threads(THREADS)
    student = load_student(args.model)
    world = ToyWorld()
    captions = [world.scene(HELD_OUT_SCENES + i).caption for i in range(args.prompts)]
    context = student.text_encoder.encode(captions)[0].to(student.device)
    latent_hw = tuple(n // student.codec.spatial_stride for n in (world.config.height, world.config.width))
    load = os.getloadavg()[0]
    t_all = time.perf_counter()
    rows = {}
    for factor in args.factors:
        frames = factor * TRAINING_FRAMES
        for name in args.policies:                   # interleaved: every policy at one length, then the next
            spec, window, sink = POLICIES[name]
            rows[(factor, name)] = run_policy(student, spec, window, sink, context, captions, latent_hw, frames,
                                         args.rounds)
    seconds = time.perf_counter() - t_all
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{date}; {platform.processor() or platform.machine()}, torch {torch.__version__}, {THREADS} thread; "
          f"load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; {seconds:.0f} s in all")
    print(f"frames/s: thread CPU time of the stream (no decode, no scoring), best of {args.rounds}")
    print(f"model: {args.model} (plan {student.plan.name}, {student.plan.steps} steps); {args.prompts} held-out "
          f"prompts as one batch; training length {TRAINING_FRAMES} frames; budget {BUDGET_SLOTS} cache slots\n")
    print("| length | policy | window + sink | cache KiB | frames/s | adherence | identity | physics | fidelity dB "
          "| adherence slope | fidelity slope | adherence - sink_window | identity - sink_window |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (factor, name), r in rows.items():
        _, window, sink = POLICIES[name]
        base = rows.get((factor, "sink_window"))
        diffs = [paired(r, base, m) if base is not None and name != "sink_window" else "" for m in PAIRED]
        print(f"| {factor}x ({factor * TRAINING_FRAMES} f) | {name} | {window} + {sink} | {r['bytes'] / 1024:.0f} "
              f"| {r['fps']:.0f} | {r['adherence']:.3f} | {r['identity']:.3f} | {r['physics']:.3f} "
              f"| {r['fidelity_psnr']:.2f} | {r['adherence_slope']:+.4f} | {r['fidelity_psnr_slope']:+.3f} "
              f"| {' | '.join(diffs)} |")


if __name__ == "__main__":
    main()
