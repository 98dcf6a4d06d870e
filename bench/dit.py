"""DiT latency: full forward (bidirectional and block-causal) and streaming chunk latency.

    python bench/dit.py                      # toy preset on CPU, 1 thread
    python bench/dit.py --preset wan2.1-t2v-1.3b --height 60 --width 104 --device cuda --dtype bf16

Random weights. The four cases are timed interleaved (one run of each in turn, --repeats
rounds after --warmup rounds), so machine load hits them alike; prints min and median
milliseconds per case and the ratios block-causal / bidirectional and commit / denoise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from forcelab.dtypes import DTYPES
from forcelab.models import CausalDiT, DiTConfig


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_interleaved(cases: dict[str, Callable[[], object]], warmup: int, repeats: int,
                      device: str) -> dict[str, list[float]]:
    """Milliseconds of every run of each case; the cases take turns within each round."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + repeats):
        for name, fn in cases.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


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
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the toy model is latency-bound)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

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
    print(f"preset={args.preset} ({cfg.num_layers} layers, dim {cfg.dim}, {cfg.num_heads} heads, "
          f"{cfg.in_channels} latent channels) device={dev} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}")
    print(f"frames={args.frames} latent={args.height}x{args.width} tokens/frame={S} chunk={chunk} window={window}; "
          f"{args.repeats} interleaved rounds after {args.warmup} warm-up")
    with torch.no_grad():
        cache = model.new_cache(B, args.height, args.width, chunk_frames=chunk, window_frames=window)
        model.set_prompt(cache, ctx)
        xc = x[:, :, :chunk]
        tc = torch.full((B,), 500.0, device=dev)
        for _ in range(window // chunk + 1):  # fill the window: every pass below sees a full one
            model(xc, tc, cache=cache, commit=True)
        cases = {
            "full forward, bidirectional": lambda: model(x, t, ctx),
            "full forward, block-causal": lambda: model(x, t, ctx, chunk_frames=chunk),
            "streaming chunk, denoise": lambda: model(xc, tc, cache=cache),
            "streaming chunk, commit": lambda: model(xc, tc * 0, cache=cache, commit=True),
        }
        notes = {"streaming chunk, denoise": "read-only pass, window full",
                 "streaming chunk, commit": "clean pass writing the cache"}
        times = timed_interleaved(cases, args.warmup, args.repeats, dev)
    print(f"{'case':30s} {'min ms':>9s} {'median ms':>10s}")
    for name, ms in times.items():
        note = f"  ({notes[name]})" if name in notes else ""
        print(f"{name:30s} {min(ms):9.2f} {statistics.median(ms):10.2f}{note}")

    def ratio(a: str, b: str) -> str:
        return (f"{min(times[a]) / min(times[b]):.2f} (min) / "
                f"{statistics.median(times[a]) / statistics.median(times[b]):.2f} (median)")

    print(f"block-causal / bidirectional : {ratio('full forward, block-causal', 'full forward, bidirectional')}")
    print(f"commit / denoise             : {ratio('streaming chunk, commit', 'streaming chunk, denoise')}")
    print(f"cache size                   : {cache.nbytes / 2**20:.2f} MiB")

if __name__ == "__main__":
    main()
