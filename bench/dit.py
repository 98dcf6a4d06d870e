"""DiT latency: full forward (bidirectional and block-causal) and streaming chunk latency.

    python bench/dit.py                      # toy preset on CPU
    python bench/dit.py --preset wan2.1-t2v-1.3b --height 60 --width 104 --device cuda --dtype bf16

Prints median milliseconds over --repeats runs after --warmup runs (random weights).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from forcelab.config import DTYPES
from forcelab.models import CausalDiT, DiTConfig



def timed(fn, warmup: int, repeats: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="toy")
    p.add_argument("--frames", type=int, default=12, help="latent frames of the full forward")
    p.add_argument("--height", type=int, default=8, help="latent height")
    p.add_argument("--width", type=int, default=8, help="latent width")
    p.add_argument("--chunk", type=int, default=None, help="chunk frames (default: the preset's)")
    p.add_argument("--window", type=int, default=None, help="window frames for streaming (default: 2 chunks + chunk)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = DiTConfig.preset(args.preset)
    chunk = args.chunk or cfg.chunk_frames
    window = args.window or 3 * chunk
    with torch.device(args.device):
        model = CausalDiT(cfg).set_dtype(DTYPES[args.dtype]).eval()
    dev, B = args.device, 1
    x = torch.randn(B, cfg.in_channels, args.frames, args.height, args.width, device=dev)
    ctx = torch.randn(B, cfg.text_len, cfg.text_dim, device=dev)
    t = torch.full((B, args.frames), 500.0, device=dev)
    S = cfg.tokens_per_frame(args.height, args.width)
    print(f"preset={args.preset} device={dev} dtype={args.dtype} frames={args.frames} "
          f"tokens/frame={S} chunk={chunk} window={window}")
    with torch.no_grad():
        bi = timed(lambda: model(x, t, ctx), args.warmup, args.repeats, dev)
        bc = timed(lambda: model(x, t, ctx, chunk_frames=chunk), args.warmup, args.repeats, dev)
        print(f"full forward, bidirectional : {bi:9.2f} ms")
        print(f"full forward, block-causal  : {bc:9.2f} ms")

        cache = model.new_cache(B, args.height, args.width, chunk_frames=chunk, window_frames=window)
        model.set_prompt(cache, ctx)
        xc = x[:, :, :chunk]
        tc = torch.full((B,), 500.0, device=dev)
        for _ in range(window // chunk + 1):  # fill the window
            model(xc, tc, cache=cache, commit=True)
        denoise = timed(lambda: model(xc, tc, cache=cache), args.warmup, args.repeats, dev)

        def step_and_commit():
            model(xc, tc * 0, cache=cache, commit=True)

        commit = timed(step_and_commit, args.warmup, args.repeats, dev)
        print(f"streaming chunk, denoise    : {denoise:9.2f} ms  (read-only pass, window full)")
        print(f"streaming chunk, commit     : {commit:9.2f} ms  (clean pass writing the cache)")
        print(f"cache size                  : {cache.nbytes / 2**20:9.2f} MiB")


if __name__ == "__main__":
    main()
