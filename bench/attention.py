"""Attention benchmark: forcelab's Triton kernels against SDPA, FlexAttention and flash-attn.

    python bench/attention.py                       # GPU: Wan-1.3B shapes; CPU: scaled down
    python bench/attention.py --scale 0.1 --peak-tflops 989

Shapes (Wan2.1-1.3B: 12 heads x 128, 1560 tokens per latent frame, chunks of 3 frames):
- train:  block-causal self-attention over 21 frames (32,760 tokens), forward and backward.
- stream: one chunk of queries (3 frames, 4,680 tokens) against a KV cache holding 12 and 21
          frames in all (the chunk included): every key visible, the dense case.
--scale multiplies the tokens per frame (frames, chunk and heads stay).

Throughput counts only visible query-key pairs: forward 4 * pairs * D FLOPs per head,
backward 2.5x that. A method that computes more pairs than are visible (flash-attn, which
cannot express "bidirectional inside a chunk", runs the full square) is still credited with
the visible pairs only, so its TFLOP/s is the useful work it delivers. "speedup" is the
other method's time over forcelab's, measured in the same run on the same device.

On a GPU: forcelab (Triton), SDPA with the dense boolean mask, FlexAttention (compiled, its
BlockMask built from the same frame mask) and flash-attn when installed, all timed with
triton.testing.do_bench. On a CPU only the torch reference runs (SDPA with the dense mask;
the Triton interpreter is a test tool, not a kernel) and the numbers are CPU numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from forcelab.dtypes import DTYPES
from forcelab.kernels import AttentionLayout, attention

WAN_TOKENS_PER_FRAME = 1560   # 30 x 52 latent patches at 480 x 832
WAN_HEADS, WAN_HEAD_DIM = 12, 128
TRAIN_FRAMES, CHUNK_FRAMES = 21, 3
STREAM_KEY_FRAMES = (12, 21)
CPU_DEFAULT_SCALE = 0.05      # 78 tokens per frame: a few seconds on a 2-core CPU
H100_SXM_BF16_PEAK = 989.0    # dense TFLOP/s
BACKWARD_FLOP_FACTOR = 2.5
FUSED_DQ_METHOD = "forcelab (fused dQ)"
FUSED_DQ_ENV = "FORCELAB_ATTENTION_FUSED_DQ"


def shapes(tokens_per_frame: int) -> dict[str, AttentionLayout]:
    s = tokens_per_frame
    out = {"train": AttentionLayout.block_causal(TRAIN_FRAMES, s, CHUNK_FRAMES)}
    for frames in STREAM_KEY_FRAMES:
        query = list(range(frames - CHUNK_FRAMES, frames))
        out[f"stream {frames}f"] = AttentionLayout.cached(query, list(range(frames)), s,
                                                          CHUNK_FRAMES)
    return out


def time_ms(fn, device: torch.device, warmup: int, rep: int) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    for _ in range(max(1, warmup // 25)):
        fn()
    times = []
    for _ in range(max(3, rep // 50)):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def methods(layout: AttentionLayout, device: torch.device, with_flex: bool):
    """name -> forward function of (q, k, v) [B, L, H, D]; None where unavailable (why)."""
    out = {}
    if device.type == "cuda":
        out["forcelab (triton)"] = lambda q, k, v: attention(q, k, v, layout, backend="triton")
        # the opt-in backward variant: dQ accumulated by the dK/dV kernel (FUSED_DQ_ENV)
        out[FUSED_DQ_METHOD] = out["forcelab (triton)"]
    mask = None if layout.is_dense() else layout.token_mask(device)

    def sdpa(q, k, v):
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                           attn_mask=mask)
        return o.transpose(1, 2)
    out["sdpa (dense mask)" if mask is not None else "sdpa (no mask)"] = sdpa
    if device.type != "cuda":
        return out
    if with_flex:
        out["flex (compiled)"] = flex_method(layout, device)
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        out["flash-attn"] = "not installed"
    else:
        name = "flash-attn" if mask is None else "flash-attn (full square)"
        out[name] = lambda q, k, v: flash_attn_func(q, k, v)
    return out


def flex_method(layout: AttentionLayout, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    frame_mask = layout.frame_mask().to(device)
    s = layout.tokens_per_frame

    def mask_mod(b, h, q_idx, kv_idx):
        return frame_mask[q_idx // s, kv_idx // s]
    block_mask = create_block_mask(mask_mod, None, None, layout.num_queries, layout.num_keys,
                                   device=device)
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        o = flex(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=block_mask)
        return o.transpose(1, 2)
    return run


def bench_shape(name, layout, args, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    B, H, D = args.batch, WAN_HEADS, WAN_HEAD_DIM
    q, k, v, do = (torch.randn(B, n, H, D, generator=gen).to(device, dtype)
                   for n in (layout.num_queries, layout.num_keys, layout.num_keys,
                             layout.num_queries))
    fwd_flop = 4 * layout.visible_pairs() * D * H * B
    print(f"\n## {name}: {layout.num_queries} queries x {layout.num_keys} keys, "
          f"{layout.visible_pairs() / (layout.num_queries * layout.num_keys):.0%} visible, "
          f"B={B} H={H} D={D} {str(dtype).replace('torch.', '')}")
    print(f"{'method':26s} {'fwd ms':>9s} {'TFLOP/s':>8s} {'peak':>6s} {'speedup':>8s}"
          f" {'bwd ms':>9s} {'TFLOP/s':>8s} {'peak':>6s} {'speedup':>8s}")
    rows, reference = {}, None
    user_fused_dq = os.environ.get(FUSED_DQ_ENV)
    for method, fn in methods(layout, device, not args.no_flex).items():
        if isinstance(fn, str):
            print(f"{method:26s} {fn}")
            continue
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        os.environ[FUSED_DQ_ENV] = "1" if method == FUSED_DQ_METHOD else "0"
        try:
            out = fn(*leaves)
            if reference is None:
                reference = out.detach().float()
            err = (out.detach().float() - reference).abs().max().item()
            fwd = time_ms(lambda: fn(*leaves), device, args.warmup, args.rep)
            torch.autograd.grad(out, leaves, do, retain_graph=True)  # autotune / compile once
            bwd = time_ms(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True),
                          device, args.warmup, args.rep)
        except Exception as e:  # report and go on: one missing backend is not fatal
            print(f"{method:26s} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        rows[method] = (fwd, bwd, err)
    if user_fused_dq is None:
        os.environ.pop(FUSED_DQ_ENV, None)
    else:
        os.environ[FUSED_DQ_ENV] = user_fused_dq
    base = rows.get("forcelab (triton)")
    for method, (fwd, bwd, err) in rows.items():
        cells = []
        for ms, flop, base_ms in ((fwd, fwd_flop, base and base[0]),
                                  (bwd, BACKWARD_FLOP_FACTOR * fwd_flop, base and base[1])):
            tflops = flop / ms / 1e9
            peak = f"{tflops / args.peak_tflops:.0%}" if device.type == "cuda" else "n/a"
            speedup = f"{ms / base_ms:.2f}x" if base_ms else "-"
            cells.append(f"{ms:9.2f} {tflops:8.3g} {peak:>6s} {speedup:>8s}")
        diff = f"   max|out - {next(iter(rows))}| {err:.1e}" if len(rows) > 1 else ""
        print(f"{method:26s} {' '.join(cells)}{diff}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=None,
                        help=f"tokens per frame = {WAN_TOKENS_PER_FRAME} x scale "
                             f"(default 1 on CUDA, {CPU_DEFAULT_SCALE} on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_PEAK,
                        help="dense peak of the GPU in this dtype (default: H100 SXM bf16)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=25, help="milliseconds (GPU)")
    parser.add_argument("--rep", type=int, default=100, help="milliseconds (GPU)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--shapes", nargs="*", default=None, help="subset of shape names")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda"
                                                       else CPU_DEFAULT_SCALE)
    tokens = max(1, round(WAN_TOKENS_PER_FRAME * scale))
    where = (torch.cuda.get_device_name() if device.type == "cuda"
             else f"CPU ({torch.get_num_threads()} threads): torch reference only, CPU numbers")
    print(f"# attention benchmark on {where}")
    print(f"# torch {torch.__version__}, tokens per frame {tokens} (scale {scale:g}), "
          f"peak {args.peak_tflops:g} TFLOP/s" + (" (GPU only)" if device.type != "cuda"
                                                   else ""))
    for name, layout in shapes(tokens).items():
        if args.shapes is None or name.split()[0] in args.shapes or name in args.shapes:
            bench_shape(name, layout, args, device, DTYPES[args.dtype])


if __name__ == "__main__":
    main()
