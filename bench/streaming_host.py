"""Host time of the streaming pass: what the CPU does per chunk before any kernel runs.

    python bench/streaming_host.py            # Wan2.1-1.3B shape, no GPU needed

Per chunk a stream runs `--steps` read-only denoising passes and one committing pass; every
pass builds its attention layout and RoPE tables (`CausalDiT._stream_setup`) and then, in
each of the model's layers, asks the attention backend for its launch plan (visit tables of
the Triton kernels, or nothing when the layout is dense and goes to SDPA). The clock covers
exactly that host code (the cache writes of the commit are device copies and are not timed);
it runs at the Wan-1.3B shape (480x832 -> 1560 tokens per frame,
30 layers, 12 heads x 128, chunk 3) with the model and the cache on the `meta` device (no
weights, no memory, no kernels), so the clock sees only Python and the CPU-side tables.
The tile sizes are the ones a GPU would use (`--head-dim` 128).

Two streams: "full cache" (21 latent frames, no window: the FPS benchmark's plan; every
chunk sees a different number of cached frames) and "window + sink" (a 21-frame window with
a 3-frame sink over `--chunks` chunks: the steady state of a long stream).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from forcelab.kernels import dispatch
from forcelab.models import CausalDiT, DiTConfig

CHUNK_FRAMES = 3
LATENT_H, LATENT_W = 60, 104
# RoPE tables land on the meta device: building them is device work on a GPU (a few small
# kernels), not host time; the host part (positions, memo lookups) is still timed.
TABLE_DEVICE = torch.device("meta")


def host_prepare():
    """The per-layer host step of the automatic backend on a GPU: nothing for a dense layout
    (SDPA); the Triton plan (frame ids, the forward's run table) for a masked one."""
    launch = dispatch.triton_backend()
    device = torch.device("cpu")  # where the tables are built; a GPU run adds one async copy
    return lambda layout, grad: launch.host_plan(layout, device, torch.bfloat16, grad)


def run_stream(model, cache, chunks: int, steps: int, prepare) -> list[float]:
    """Seconds of host work per chunk (steps read passes + 1 commit pass)."""
    cfg = model.config
    out = []
    f = cache.chunk_frames
    k_new = torch.empty(1, f * cache.tokens_per_frame, cfg.num_heads, cfg.head_dim, device="meta",
                        dtype=torch.bfloat16)
    for c in range(chunks):
        start = c * f
        spent = 0.0
        for step in range(steps + 1):
            t = time.thread_time()
            layout, rope, _ = model._stream_setup(cache, None, f, LATENT_H // 2, LATENT_W // 2,
                                                  start, TABLE_DEVICE)
            for _ in range(cfg.num_layers):
                prepare(layout, False)
            spent += time.thread_time() - t
            if step == steps:  # the commit itself (cache copies) is device work: not timed
                for layer in range(cfg.num_layers):
                    cache.write(layer, start, k_new, k_new)
        out.append(spent)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--chunks", type=int, default=30, help="chunks of the window + sink stream")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = DiTConfig.preset("wan2.1-t2v-1.3b", chunk_frames=CHUNK_FRAMES)
    with torch.device("meta"):
        model = CausalDiT(cfg)
    prepare = host_prepare()
    print(f"streaming host time per chunk: Wan2.1-1.3B shape ({cfg.num_layers} layers, "
          f"{LATENT_H}x{LATENT_W} latents = {cfg.tokens_per_frame(LATENT_H, LATENT_W)} tokens/frame, "
          f"chunk {CHUNK_FRAMES}), {args.steps} denoising passes + 1 commit per chunk; "
          f"torch {torch.__version__}, clock: thread CPU time, min of {args.repeats} runs")
    streams = {
        "full cache (21 frames)": dict(window_frames=None, sink_frames=0, max_frames=21,
                                       chunks=21 // CHUNK_FRAMES),
        "window 21 + sink 3": dict(window_frames=21, sink_frames=3, max_frames=None,
                                   chunks=args.chunks),
    }
    for name, opts in streams.items():
        chunks = opts.pop("chunks")
        runs = []
        for _ in range(args.repeats):
            cache = model.new_cache(1, LATENT_H, LATENT_W, device="meta", dtype=torch.bfloat16,
                                    **opts)
            cache.set_context([None] * cfg.num_layers)
            runs.append(run_stream(model, cache, chunks, args.steps, prepare))
        per_chunk = [1e3 * min(r[i] for r in runs) for i in range(chunks)]
        steady = per_chunk[len(per_chunk) // 2:]
        print(f"  {name:24s} first chunk {per_chunk[0]:8.2f} ms   mean {statistics.mean(per_chunk):8.2f} ms"
              f"   median of the last {len(steady)} {statistics.median(steady):8.2f} ms")


if __name__ == "__main__":
    main()
