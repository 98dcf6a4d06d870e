"""Distillation benchmark: training-step time and peak memory of the distillation recipes.

    python bench/distill.py                       # every part (CPU toy model)
    python bench/distill.py --part streaming_long
    python bench/distill.py --part self_forcing   # rollouts of 7 vs 14 chunks (goal: activation memory <= 1.3x)

self_forcing: "saved for backward" is the exact size of every tensor autograd keeps for the
backward pass (torch.autograd.graph.saved_tensors_hooks) per step - the activation memory that
gradient truncation keeps flat - beside the process's peak-RSS delta.

streaming_long: one training step (generator + critic update, as at every 5th step of the
LongLive schedule) with the stream at position 10 vs 100 chunks on the toy preset
(models/config.py; 16 tokens/frame, chunks of 2 frames, each loss call adds one chunk; window
6 frames incl. a 2-frame sink). Goal: flat time and peak memory (the window keeps the cache a fixed
size; the recent-frame buffer is bounded). Each position runs in a FRESH process so one
measurement's allocator state cannot hide the other's; the stream is first advanced to the
position with no-grad rollouts, then `--repeats` trainer steps are measured.

Both parts compare two (or more) settings, each in its own child process. The children are
INTERLEAVED: --rounds rounds, each running every setting once in turn (A B A B ...), so load
on a shared machine hits all settings alike; the tables give the min and the median over the
rounds, and the ratios last / first of both.

Memory, said plainly: on CPU torch allocates outside Python's allocator, so tracemalloc sees
nothing of it. We report (a) the exact bytes of the sequence state that persists across steps
(KV cache tensors + recent frames: what could grow with the position), and (b) the process's
peak resident set during the measured steps minus the resident set just before them, from a
thread sampling /proc/self/statm every millisecond (resolution: pages; short-lived peaks under
1 ms can be missed; glibc may keep freed memory mapped, so (b) is an upper bound of the step's
transient allocations). Time: the main thread's CPU time (torch runs inline with 1 thread),
which other load on a shared machine does not inflate; wall time beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from forcelab.bench.train import save_random_dit

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident set (bytes) while the block runs, sampled every `period` seconds."""

    def __init__(self, period: float = 1e-3):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---------------------------------------------------------------------- streaming_long
def streaming_long_child(position: int, repeats: int) -> dict:
    """In this (fresh) process: advance a toy stream to `position` chunks, time trainer steps."""
    from forcelab.models.config import DiTConfig
    from forcelab.train.config import load_train_config
    from forcelab.train.recipe import StepContext
    from forcelab.train.trainer import Trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = save_random_dit(DiTConfig.preset("toy"), Path(tmp) / "teacher", "cpu", torch.float32)
        cfg = load_train_config([], [
            "recipe=streaming_long", f"roles.teacher.init={teacher}", "data.batch_size=1", "threads=1",
            "algo.frames=4", "algo.new_frames=2", f"algo.max_frames={4 * (position + repeats * 2 + 8)}",
            "algo.sink_frames=2", "algo.window_frames=6", "algo.switch=false", "logging.wandb=disabled",
            "logging.progress=false", "roles.generator.update_every=1", f"output_dir={Path(tmp) / 'run'}"])
        trainer = Trainer(cfg)
        recipe = trainer.recipe
        chunk = recipe.chunk
        batch, positions = trainer.next_batch()
        ctx = StepContext(0, 0, cfg.seed, positions, trainer.device)
        recipe.start_sequence(ctx)
        with torch.no_grad():
            while recipe.seq.end < position * chunk:
                recipe.generate(batch, ctx, grad=False)
        assert recipe.seq.end == position * chunk
        trainer.train_step()          # warm-up (allocator, layouts); advances 2 chunks
        trainer.step += 1
        state = sum(t.numel() * t.element_size() for t in recipe.seq.cache.k + recipe.seq.cache.v)
        state += recipe.seq.recent.numel() * recipe.seq.recent.element_size()
        at = recipe.seq.end // chunk
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        with PeakRSS() as mem:
            for _ in range(repeats):
                trainer.train_step()
                trainer.step += 1
        cpu, wall = (time.thread_time() - cpu0) / repeats, (time.perf_counter() - wall0) / repeats
    return {"position": position, "measured_from_chunk": at, "step_cpu_s": cpu, "step_wall_s": wall,
            "state_bytes": state, "peak_rss_delta": mem.peak - mem.start, "rss_before": mem.start,
            "ru_maxrss_kib": __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss}


def run_children(flag: str, values, repeats: int, rounds: int) -> list[list[dict]]:
    """One fresh single-threaded process per measurement (`flag value`), its JSON line back;
    the values take turns within each round. -> per value, its rows of every round."""
    rows: list[list[dict]] = [[] for _ in values]
    for _ in range(rounds):
        for i, value in enumerate(values):
            out = subprocess.run([sys.executable, __file__, flag, str(value), "--repeats", str(repeats)],
                                 capture_output=True, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            rows[i].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def low_mid(rows: list[dict], key: str) -> tuple[float, float]:
    """(min, median) of one measured quantity over the rounds."""
    values = [r[key] for r in rows]
    return min(values), statistics.median(values)


def ratio_text(first: list[dict], last: list[dict], key: str) -> str:
    """last / first of the minima and of the medians."""
    (a_min, a_mid), (b_min, b_mid) = low_mid(first, key), low_mid(last, key)
    return f"{b_min / max(a_min, 1e-12):.3f} (min) / {b_mid / max(a_mid, 1e-12):.3f} (median)"


def streaming_long_part(args) -> None:
    runs = run_children("--child-streaming-long", args.positions, args.repeats, args.rounds)
    print(f"streaming_long: toy DiT preset, chunk 2, window 6 incl. 2-frame sink, "
          f"batch 1; one step = generator + critic update (2 chunks); mean of {args.repeats} steps after 1 warm-up; "
          f"{args.rounds} interleaved rounds (min / median over them); torch {torch.__version__}, 1 thread")
    print(f"{'position (chunks)':>18} {'step CPU ms':>16} {'step wall ms':>16} {'state KiB':>10} "
          f"{'peak RSS delta MiB':>19} {'RSS before MiB':>15}")
    for rows in runs:
        cpu, wall = low_mid(rows, "step_cpu_s"), low_mid(rows, "step_wall_s")
        rss, before = low_mid(rows, "peak_rss_delta"), low_mid(rows, "rss_before")
        print(f"{rows[0]['position']:>18} {cpu[0] * 1e3:>7.1f} / {cpu[1] * 1e3:>6.1f} "
              f"{wall[0] * 1e3:>7.1f} / {wall[1] * 1e3:>6.1f} {rows[0]['state_bytes'] / 2 ** 10:>10.1f} "
              f"{rss[1] / 2 ** 20:>19.2f} {before[1] / 2 ** 20:>15.1f}")
    if len(runs) >= 2:
        a, b = runs[0], runs[-1]
        print(f"ratio {b[0]['position']}/{a[0]['position']}: step CPU time {ratio_text(a, b, 'step_cpu_s')}, "
              f"sequence state {b[0]['state_bytes'] / a[0]['state_bytes']:.3f}, peak RSS delta (median) "
              f"{low_mid(b, 'peak_rss_delta')[1] / max(low_mid(a, 'peak_rss_delta')[1], 1):.3f} (goal: flat)")


# ---------------------------------------------------------------------- self_forcing
def self_forcing_child(chunks: int, repeats: int) -> dict:
    """In this (fresh) process: Self-Forcing trainer steps whose rollouts have `chunks` chunks;
    the DMD window (the teacher's horizon) stays 7 chunks, so longer rollouts add only no-grad
    passes and cache."""
    from forcelab.models.config import DiTConfig
    from forcelab.train.config import load_train_config
    from forcelab.train.trainer import Trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = save_random_dit(DiTConfig.preset("toy"), Path(tmp) / "teacher", "cpu", torch.float32)
        chunk = DiTConfig.preset("toy").chunk_frames
        cfg = load_train_config([], [
            "recipe=self_forcing", f"roles.teacher.init={teacher}", "data.batch_size=1", "threads=1",
            f"algo.frames={7 * chunk}", f"algo.min_chunks={chunks}", f"algo.max_chunks={chunks}",
            "roles.generator.update_every=1", "logging.wandb=disabled", "logging.progress=false",
            f"output_dir={Path(tmp) / 'run'}"])
        trainer = Trainer(cfg)
        trainer.train_step()          # warm-up
        trainer.step += 1
        saved = [0]

        def pack(t):                  # every tensor autograd keeps for backward (activation memory)
            saved[0] += t.numel() * t.element_size()
            return t

        cpu0, wall0 = time.thread_time(), time.perf_counter()
        with PeakRSS() as mem, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for _ in range(repeats):
                trainer.train_step()
                trainer.step += 1
        cpu, wall = (time.thread_time() - cpu0) / repeats, (time.perf_counter() - wall0) / repeats
    return {"chunks": chunks, "step_cpu_s": cpu, "step_wall_s": wall, "peak_rss_delta": mem.peak - mem.start,
            "rss_before": mem.start, "saved_for_backward": saved[0] / repeats}


def self_forcing_part(args) -> None:
    runs = run_children("--child-self-forcing", args.chunks, args.repeats, args.rounds)
    print(f"self_forcing: toy DiT preset, batch 1, DMD window 7 chunks; one step = generator + critic update "
          f"(two rollouts); mean of {args.repeats} steps after 1 warm-up; {args.rounds} interleaved rounds "
          f"(min / median over them); torch {torch.__version__}, 1 thread")
    print(f"{'chunks per rollout':>18} {'step CPU ms':>16} {'step wall ms':>16} {'saved for backward MiB':>23} "
          f"{'peak RSS delta MiB':>19}")
    for rows in runs:
        cpu, wall = low_mid(rows, "step_cpu_s"), low_mid(rows, "step_wall_s")
        saved, rss = low_mid(rows, "saved_for_backward"), low_mid(rows, "peak_rss_delta")
        print(f"{rows[0]['chunks']:>18} {cpu[0] * 1e3:>7.1f} / {cpu[1] * 1e3:>6.1f} "
              f"{wall[0] * 1e3:>7.1f} / {wall[1] * 1e3:>6.1f} {saved[1] / 2 ** 20:>23.2f} {rss[1] / 2 ** 20:>19.2f}")
    if len(runs) >= 2:
        a, b = runs[0], runs[-1]
        print(f"ratio {b[0]['chunks']}/{a[0]['chunks']} chunks: step CPU time {ratio_text(a, b, 'step_cpu_s')}, "
              f"saved for backward {low_mid(b, 'saved_for_backward')[1] / low_mid(a, 'saved_for_backward')[1]:.2f} "
              f"(goal: <= 1.3), peak RSS delta (median) "
              f"{low_mid(b, 'peak_rss_delta')[1] / max(low_mid(a, 'peak_rss_delta')[1], 1):.2f} (MiB-scale: allocator noise)")


# ---------------------------------------------------------------------- a Wan-sized Self-Forcing step
SELF_FORCING_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "recipes" / "self_forcing.yaml"
ROLES = ("teacher", "generator", "critic")


def wan_self_forcing_step(arch: dict, height: int, width: int, device, warmup: int = 1, steps: int = 1,
                          peak_tflops: float | None = None, progress=print) -> dict:
    """Self-Forcing training steps of configs/recipes/self_forcing.yaml as written (bf16 autocast,
    gradient checkpointing, chunks of 3, 21-frame rollouts, 4-step list, generator + critic
    updates) on a random Wan2.1-T2V-1.3B (`arch`: preset overrides, {} for the real size) for
    all three roles, a prompt stream of toy-world captions through a toy text encoder of
    umT5's width, and a toy codec of the Wan VAE's latent shape (16 channels, 8x spatial,
    4x temporal). Each measured step is a step where both roles update (a multiple of the
    generator's update_every). Returns seconds per step, model FLOPs per step (train.DiTFlops:
    every DiT pass of the step), MFU against `peak_tflops` and, on a GPU, peak memory."""
    from forcelab.models.config import DiTConfig
    from forcelab.train.config import load_train_config
    from forcelab.train.trainer import Trainer

    from forcelab.bench.train import DiTFlops, save_random_dit

    device = torch.device(device)
    cfg_model = DiTConfig.preset("wan2.1-t2v-1.3b", **arch)
    with tempfile.TemporaryDirectory(prefix="forcelab-gpu-check-") as tmp:
        weights = save_random_dit(cfg_model, Path(tmp) / "dit", device, torch.bfloat16)
        progress(f"random weights saved ({sum(f.stat().st_size for f in weights.rglob('*')) / 2 ** 30:.2f} GiB)")
        cfg = load_train_config([SELF_FORCING_RECIPE], [
            *(f"model_overrides.{k}={v}" for k, v in arch.items()),
            *(f"roles.{role}.init={weights}" for role in ROLES),
            f"vae=toy:{cfg_model.in_channels}:8:4", f"text_encoder=toy:{cfg_model.text_dim}",
            "data.source=toyworld", f"data.height={height}", f"data.width={width}",
            "logging.wandb=disabled", "logging.progress=false", "logging.sample_every=0",
            "checkpoint.every=0", f"output_dir={Path(tmp) / 'run'}"])
        trainer = Trainer(cfg)
        every = trainer.roles["generator"].cfg.update_every
        modules = [role.module for role in trainer.roles.values()]
        progress(f"trainer built on {trainer.device}; warm-up step(s)")
        for i in range(warmup):
            trainer.step = i * every
            trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        seconds, flops = [], []
        for i in range(warmup, warmup + steps):
            trainer.step = i * every
            with DiTFlops(modules) as counter:
                start = time.perf_counter()
                metrics = trainer.train_step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - start)
            flops.append(counter.flops)
            progress(f"step: {seconds[-1]:.2f} s, {counter.passes} DiT passes, {counter.flops / 1e12:.3g} TFLOP")
        trainer.release()
    tflops = sum(flops) / sum(seconds) / 1e12
    out = {"layers": cfg_model.num_layers, "dim": cfg_model.dim, "height": height, "width": width,
           "latent_frames": cfg.algo.frames, "chunk_frames": cfg.model_overrides.get("chunk_frames"),
           "gradient_checkpointing": {r: bool(trainer.roles[r].module.gradient_checkpointing) for r in ROLES},
           "mixed_precision": cfg.mixed_precision, "roles_updated": sorted(k.split("/")[0] for k in metrics
                                                                           if k.endswith("/loss")),
           "step_seconds": statistics.median(seconds), "step_seconds_all": seconds,
           "model_flop_per_step": statistics.median(flops), "model_tflops": tflops,
           "flop_formula": "sum over the step's DiT passes of bench/train.py dit_pass_flops "
                           "(x3 for passes with gradients), recomputation not counted"}
    if peak_tflops:
        out["mfu"] = tflops / peak_tflops
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


PARTS = {"streaming_long": streaming_long_part, "self_forcing": self_forcing_part}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=sorted(PARTS), action="append", help="run only these parts")
    p.add_argument("--positions", type=int, nargs="+", default=[10, 100], help="stream positions in chunks")
    p.add_argument("--repeats", type=int, default=5, help="measured trainer steps per child process")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds: each setting once per round")
    p.add_argument("--chunks", type=int, nargs="+", default=[7, 14], help="self_forcing: chunks per rollout")
    p.add_argument("--child-streaming-long", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-self-forcing", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_self_forcing is not None:
        print(json.dumps(self_forcing_child(args.child_self_forcing, args.repeats)))
        return
    if args.child_streaming_long is not None:
        print(json.dumps(streaming_long_child(args.child_streaming_long, args.repeats)))
        return
    for name in args.part or sorted(PARTS):
        PARTS[name](args)


if __name__ == "__main__":
    main()
