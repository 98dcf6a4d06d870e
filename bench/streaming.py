"""Streaming benchmark: per-chunk latency against chunk index, cache vs recompute, and FPS.

    python bench/streaming.py                         # the CPU toy part (a few tens of seconds)
    python bench/streaming.py --device cuda --wan     # + Wan-1.3B shape FPS (random weights, bf16)

1. Latency per chunk along a long toy stream (chunk-wise plan, 4 steps): with a window +
   sink the cache has a fixed size, so latency at chunk 100 / chunk 10 should stay <= 1.1;
   with a full cache every chunk attends to all earlier frames and latency grows.
2. Cached generation against recomputation for 64 frames on the toy model (goal >= 5x). The
   recompute baseline (`FrameCache`) is what a cache-less model does: per denoising step of a
   chunk, one forward over the visible committed frames + the noisy chunk, and no commit pass
   (there is no cache to write). Timed interleaved; min and median over --repeats runs.
3. --wan: frames per second of the Wan2.1-T2V-1.3B shape (480x832 -> 60x104 latents, chunk 3,
   4 steps, full cache over 21 latent frames), DiT alone and with streaming VAE decode
   (diffusers AutoencoderKLWan, Wan2.1 shape, random weights). FPS counts video frames
   (4 per latent frame, 1 for the first), as the published 17 / 20.7 FPS numbers do.
Latencies are the minimum over --repeats runs. On CPU with one thread the clock is the
generating thread's CPU time (torch runs every op inline in that thread), which other
processes on a shared machine do not inflate; wall-clock totals are printed beside it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from forcelab.models import CausalDiT, DiTConfig
from forcelab.models.plans import Chunkwise, default_timesteps
from forcelab.models.rollout import Noise, make_cache, stream


CLOCK = time.perf_counter


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunk_latencies(model, plan, context, noise, frames, device, recompute=False) -> list[float]:
    """Seconds between consecutive committed chunks of one stream."""
    cache = make_cache(model, plan, noise.batch, noise.shape[1], noise.shape[2], frames, recompute)
    out, t = [], CLOCK()
    for _ in stream(model, plan, context, noise, frames, cache=cache):
        sync(device)
        now = CLOCK()
        out.append(now - t)
        t = now
    return out


def around(lat: list[float], index: int, half: int = 2) -> float:
    return statistics.median(lat[max(0, index - half):index + half + 1])


def toy_part(args, device):
    torch.manual_seed(0)
    cfg = DiTConfig.preset("toy")
    model = CausalDiT(cfg).to(device).eval()
    chunk, h = cfg.chunk_frames, 8                      # 32x32 toy frames -> 8x8 latents
    context = torch.randn(1, cfg.text_len, cfg.text_dim, device=device)
    noise = Noise([0], cfg.in_channels, h, h, device=device)
    steps = default_timesteps(args.steps, 5.0)
    frames = args.chunks * chunk
    print(f"toy DiT: {cfg.num_layers} layers, dim {cfg.dim}; latent {cfg.in_channels}x{h}x{h} "
          f"({cfg.tokens_per_frame(h, h)} tokens/frame); chunk {chunk}; {args.steps} steps; "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"clock: {'thread CPU time' if CLOCK is time.thread_time else 'wall'}")
    rows = {}
    with torch.no_grad():
        for name, plan in (("window", Chunkwise(timesteps=steps, window_frames=args.window, sink_frames=args.sink)),
                           ("full cache", Chunkwise(timesteps=steps, window_frames=0))):
            runs = [chunk_latencies(model, plan, context, noise, frames, device) for _ in range(args.repeats)]
            rows[name] = [min(r[i] for r in runs) for i in range(len(runs[0]))]
    print(f"\n1. per-chunk latency (ms; median of 5 chunks around the index, min of {args.repeats} runs); "
          f"window = {args.window} frames incl. a {args.sink}-frame sink")
    marks = [i for i in (1, 10, 25, 50, 75, 100, args.chunks - 3) if i < args.chunks - 2]
    print(f"   {'chunk index':12s}" + "".join(f"{m:>9d}" for m in marks) + f"{'100/10':>9s}")
    ratios = {}
    for name, lat in rows.items():
        ratios[name] = around(lat, 100) / around(lat, 10) if args.chunks > 102 else float("nan")
        print(f"   {name:12s}" + "".join(f"{1000 * around(lat, m):9.2f}" for m in marks) + f"{ratios[name]:9.3f}")
    print(f"   window: latency at chunk 100 / chunk 10 = {ratios['window']:.3f} (goal <= 1.1); "
          f"full cache: {ratios['full cache']:.3f}")

    plan = Chunkwise(timesteps=steps, window_frames=0)
    times: dict[str, list[float]] = {"cached": [], "recompute": []}
    walls: dict[str, list[float]] = {"cached": [], "recompute": []}
    with torch.no_grad():
        for _ in range(args.repeats):                   # interleaved: both see the same machine load
            for name in times:
                t, w = CLOCK(), time.perf_counter()
                chunk_latencies(model, plan, context, noise, args.frames, device, recompute=name == "recompute")
                times[name].append(CLOCK() - t)
                walls[name].append(time.perf_counter() - w)
    low = {name: min(v) for name, v in times.items()}
    mid = {name: statistics.median(v) for name, v in times.items()}
    speedup = low["recompute"] / low["cached"]
    print(f"\n2. {args.frames} frames, chunk-wise, {args.steps} steps, {args.repeats} interleaved runs: "
          f"cached {low['cached']:.3f} s, recompute {low['recompute']:.3f} s (min) -> speed-up {speedup:.2f}x "
          f"(median {mid['recompute'] / mid['cached']:.2f}x; goal >= 5x); wall clock (min): "
          f"{min(walls['cached']):.3f} s vs {min(walls['recompute']):.3f} s = "
          f"{min(walls['recompute']) / min(walls['cached']):.2f}x")
    return ratios, speedup


WAN_STEPS, WAN_SHIFT = 4, 5.0          # the distilled student's 4-step list, shift 5
VIDEO_FRAMES_PER_LATENT = 4            # Wan VAE: 4 video frames per latent frame (1 for the first)
DIFFUSERS_MISSING = "skipped: diffusers missing"


def video_frames(latent_frames: int) -> int:
    return 1 + (latent_frames - 1) * VIDEO_FRAMES_PER_LATENT


def wan_vae(device, dtype, vae_kwargs: dict | None = None):
    """A random AutoencoderKLWan (Wan2.1's shape unless `vae_kwargs`) wrapped as forcelab's
    WanVAE, or None when diffusers is not installed."""
    try:
        from diffusers import AutoencoderKLWan
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        return None
    from forcelab.models.autoencoder import WanVAE
    diffusers_logging.set_verbosity_error()            # the bf16 cast warning is expected here
    return WanVAE(AutoencoderKLWan(**(vae_kwargs or {})).to(device=device, dtype=dtype).eval())


def wan_fps(cfg: DiTConfig, height: int, width: int, latent_frames: int, repeats: int, device,
            dtype, with_vae: bool = True, vae_kwargs: dict | None = None) -> dict:
    """Frames per second of chunk-wise streaming (4 steps, full cache over `latent_frames`)
    with random weights of `cfg`, the DiT alone and with streaming VAE decode; seconds are the
    minimum over `repeats` runs after one warm-up. The VAE entry says why it was skipped."""
    torch.manual_seed(0)
    with torch.device(device):                          # random init on the device: fast on a GPU
        model = CausalDiT(cfg)
    model = model.set_dtype(dtype).eval()
    stride = 8                                          # Wan VAE: 8x spatial compression
    lat_h, lat_w = height // stride, width // stride
    context = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)
    noise = Noise([0], cfg.in_channels, lat_h, lat_w, device=device)
    plan = Chunkwise(timesteps=default_timesteps(WAN_STEPS, WAN_SHIFT), chunk_frames=cfg.chunk_frames,
                     window_frames=0)
    frames = video_frames(latent_frames)
    vae = wan_vae(device, dtype, vae_kwargs) if with_vae else None

    def run(decode: bool) -> float:
        cache = make_cache(model, plan, 1, lat_h, lat_w, latent_frames)
        decoder = vae.decode_stream() if decode else None
        sync(device)
        t = time.perf_counter()
        for chunk in stream(model, plan, context, noise, latent_frames, cache=cache):
            if decoder is not None:
                decoder.push(chunk.x.to(dtype))
        sync(device)
        return time.perf_counter() - t

    out = {"layers": cfg.num_layers, "dim": cfg.dim, "height": height, "width": width,
           "latent": [lat_h, lat_w], "latent_frames": latent_frames, "video_frames": frames,
           "chunk_frames": cfg.chunk_frames, "steps": WAN_STEPS, "dtype": str(dtype).replace("torch.", ""),
           "weights": "random"}
    with torch.no_grad():
        run(False)                                      # warm-up (allocations, kernels)
        dit = min(run(False) for _ in range(repeats))
        out.update(dit_seconds=dit, dit_fps=frames / dit)
        if not with_vae:
            out["vae"] = "skipped: not asked"
        elif vae is None:
            out["vae"] = DIFFUSERS_MISSING
        else:
            run(True)                                   # the decoder's warm-up
            both = min(run(True) for _ in range(repeats))
            out["vae"] = {"seconds": both, "fps": frames / both}
    return out


def wan_part(args, device):
    """FPS of the Wan-1.3B shape; needs a GPU for meaningful numbers."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = DiTConfig.preset("wan2.1-t2v-1.3b", chunk_frames=3, num_layers=args.wan_layers)
    r = wan_fps(cfg, args.height, args.width, args.wan_frames, args.repeats, device, dtype,
                with_vae=not args.no_vae)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\n3. Wan2.1-1.3B shape ({cfg.num_layers} layers, {args.height}x{args.width} -> "
          f"{r['latent'][0]}x{r['latent'][1]} latents, chunk 3, 4 steps, {args.wan_frames} latent = "
          f"{r['video_frames']} video frames, {r['dtype']}, random weights) on {name}:")
    print(f"   DiT alone: {r['dit_seconds']:.2f} s -> {r['dit_fps']:.1f} FPS")
    vae = r["vae"]
    print(f"   DiT + VAE decode: {vae['seconds']:.2f} s -> {vae['fps']:.1f} FPS" if isinstance(vae, dict)
          else f"   DiT + VAE decode: {vae}")
    print("   published (H100): Self-Forcing 17 FPS, LongLive 20.7 FPS; goal >= 30 FPS")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the toy model is latency-bound)")
    p.add_argument("--chunks", type=int, default=110, help="chunks of the long toy stream")
    p.add_argument("--window", type=int, default=6, help="toy attention window in frames")
    p.add_argument("--sink", type=int, default=2, help="toy attention sink in frames")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--frames", type=int, default=64, help="frames of the cached-vs-recompute comparison")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--wan", action="store_true", help="also measure the Wan-1.3B shape (use a GPU)")
    p.add_argument("--wan-layers", type=int, default=30, help="fewer for a smoke test")
    p.add_argument("--wan-frames", type=int, default=21, help="latent frames per measured video")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--no-vae", action="store_true", help="skip the VAE decode measurement")
    p.add_argument("--skip-toy", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    global CLOCK
    CLOCK = time.thread_time if device.type == "cpu" and args.threads == 1 else time.perf_counter
    if not args.skip_toy:
        toy_part(args, device)
    if args.wan:
        wan_part(args, device)


if __name__ == "__main__":
    main()
