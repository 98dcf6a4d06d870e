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
Every method's output and gradients are compared with SDPA under the layout's mask in
float32 on upcast copies of the same inputs: ||x - ref|| / ||ref||, against
REFERENCE_TOLERANCE of the dtype (`measure_shape` returns it all as a dict).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from forcelab.bench.card import bf16_peak, device_name
from forcelab.dtypes import DTYPES
from forcelab.kernels import AttentionLayout, attention
from forcelab.kernels.reference import attention_reference

WAN_TOKENS_PER_FRAME = 1560   # 30 x 52 latent patches at 480 x 832
WAN_HEADS, WAN_HEAD_DIM = 12, 128
TRAIN_FRAMES, CHUNK_FRAMES = 21, 3
STREAM_KEY_FRAMES = (12, 21)
CPU_DEFAULT_SCALE = 0.05      # 78 tokens per frame: a few seconds on a 2-core CPU
BACKWARD_FLOP_FACTOR = 2.5
CPU_ONLY = "skipped: CPU run (compiled kernels need CUDA)"
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
    else:
        out["forcelab (triton)"] = CPU_ONLY
    mask = None if layout.is_dense() else layout.token_mask(device)

    def sdpa(q, k, v):
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                           attn_mask=mask)
        return o.transpose(1, 2)
    out["sdpa (dense mask)" if mask is not None else "sdpa (no mask)"] = sdpa
    if device.type != "cuda":
        out["flex (compiled)"] = out["flash-attn"] = CPU_ONLY
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


REFERENCE_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-4}
# ||out - ref|| / ||ref|| against SDPA with the layout's mask in float32 on upcast inputs:
# 16-bit operands land between 1e-3 and 1e-2 (bf16 keeps 8 bits), fp32 far under 1e-4.
NOT_THE_SAME_FUNCTION = "n/a: computes the full square, not this mask"


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def reference_outputs(layout, q, k, v, do):
    """The float32 masked-SDPA reference: output and (dq, dk, dv) of upcast copies."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = attention_reference(*leaves, layout)
    grads = torch.autograd.grad(out, leaves, do.float())
    return out.detach(), grads


def measure_shape(layout, device, dtype, batch=1, warmup=25, rep=100, with_flex=True,
                  peak_tflops=None, deadline=None, progress=print, into: dict | None = None) -> dict:
    """Every method on one layout: forward and backward milliseconds (median), TFLOP/s on the
    visible pairs, % of `peak_tflops`, and the relative error of the output and of the
    gradients against the float32 masked reference (`REFERENCE_TOLERANCE`). A method that
    fails or is missing is recorded with its reason; past `deadline` (time.monotonic()) the
    remaining methods are skipped, saying so. Fills `into` (a new dict by default) as it goes
    and calls progress(line) after each method, so a caller can save what is measured so far."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    B, H, D = batch, WAN_HEADS, WAN_HEAD_DIM
    q, k, v, do = (torch.randn(B, n, H, D, generator=gen).to(device, dtype)
                   for n in (layout.num_queries, layout.num_keys, layout.num_keys,
                             layout.num_queries))
    fwd_flop = 4 * layout.visible_pairs() * D * H * B
    tolerance = REFERENCE_TOLERANCE[dtype]
    ref_out, ref_grads = reference_outputs(layout, q, k, v, do)
    result = {} if into is None else into
    result.update({"queries": layout.num_queries, "keys": layout.num_keys, "batch": B, "heads": H,
              "head_dim": D, "dtype": str(dtype).replace("torch.", ""),
              "visible_fraction": layout.visible_pairs() / (layout.num_queries * layout.num_keys),
              "forward_flop": fwd_flop, "backward_flop": BACKWARD_FLOP_FACTOR * fwd_flop,
              "tolerance": tolerance, "methods": {}})
    rows = result["methods"]
    user_fused_dq = os.environ.get(FUSED_DQ_ENV)
    for method, fn in methods(layout, device, with_flex).items():
        if isinstance(fn, str):
            rows[method] = {"status": fn}
            progress(f"{method}: {fn}")
            continue
        if deadline is not None and time.monotonic() > deadline:
            rows[method] = {"status": "skipped: the part's time budget is spent"}
            progress(f"{method}: skipped (time budget)")
            continue
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        os.environ[FUSED_DQ_ENV] = "1" if method == FUSED_DQ_METHOD else "0"
        try:
            out = fn(*leaves)
            grads = torch.autograd.grad(out, leaves, do, retain_graph=True)  # autotune / compile once
            fwd = time_ms(lambda: fn(*leaves), device, warmup, rep)
            bwd = time_ms(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True),
                          device, warmup, rep)
        except Exception as e:  # report and go on: one missing backend is not fatal
            rows[method] = {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            progress(f"{method}: {rows[method]['status']}")
            continue
        row = {"status": "ok", "forward_ms": fwd, "backward_ms": bwd,
               "forward_tflops": fwd_flop / fwd / 1e9,
               "backward_tflops": BACKWARD_FLOP_FACTOR * fwd_flop / bwd / 1e9}
        if peak_tflops:
            row["forward_peak_fraction"] = row["forward_tflops"] / peak_tflops
            row["backward_peak_fraction"] = row["backward_tflops"] / peak_tflops
        if "full square" in method:
            row["correct"] = NOT_THE_SAME_FUNCTION
        else:
            row["output_rel_error"] = relative_error(out.detach(), ref_out)
            row["grad_rel_error"] = max(relative_error(g, r) for g, r in zip(grads, ref_grads))
            row["correct"] = max(row["output_rel_error"], row["grad_rel_error"]) <= tolerance
        rows[method] = row
        progress(f"{method}: forward {fwd:.3f} ms, backward {bwd:.3f} ms")
    if user_fused_dq is None:
        os.environ.pop(FUSED_DQ_ENV, None)
    else:
        os.environ[FUSED_DQ_ENV] = user_fused_dq
    return result


def print_shape(name, result, on_gpu: bool) -> None:
    visible = result["visible_fraction"]
    print(f"\n## {name}: {result['queries']} queries x {result['keys']} keys, {visible:.0%} visible, "
          f"B={result['batch']} H={result['heads']} D={result['head_dim']} {result['dtype']}; "
          f"error vs float32 masked SDPA, tolerance {result['tolerance']:g}")
    print(f"{'method':26s} {'fwd ms':>9s} {'TFLOP/s':>8s} {'peak':>6s} {'speedup':>8s}"
          f" {'bwd ms':>9s} {'TFLOP/s':>8s} {'peak':>6s} {'speedup':>8s}  rel. error out / grads")
    base = result["methods"].get("forcelab (triton)", {})
    for method, row in result["methods"].items():
        if row["status"] != "ok":
            print(f"{method:26s} {row['status']}")
            continue
        cells = []
        for part in ("forward", "backward"):
            ms, base_ms = row[f"{part}_ms"], base.get(f"{part}_ms")
            peak = f"{row[f'{part}_peak_fraction']:.0%}" if on_gpu and f"{part}_peak_fraction" in row else "n/a"
            speedup = f"{ms / base_ms:.2f}x" if base_ms else "-"
            cells.append(f"{ms:9.2f} {row[f'{part}_tflops']:8.3g} {peak:>6s} {speedup:>8s}")
        check = (row["correct"] if isinstance(row["correct"], str) else
                 f"{row['output_rel_error']:.1e} / {row['grad_rel_error']:.1e} "
                 f"{'ok' if row['correct'] else 'OVER TOLERANCE'}")
        print(f"{method:26s} {' '.join(cells)}  {check}")


def main(argv=None):

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=None,
                        help=f"tokens per frame = {WAN_TOKENS_PER_FRAME} x scale "
                             f"(default 1 on CUDA, {CPU_DEFAULT_SCALE} on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak of the GPU in this dtype (default: the card's bf16 "
                             "datasheet figure, bench/card.py)")
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
    peak, basis = ((args.peak_tflops, "given") if args.peak_tflops else
                   bf16_peak(device_name(device)) if device.type == "cuda" else (None, "no GPU"))
    where = (device_name(device) if device.type == "cuda"
             else f"{device_name(device)}: torch reference only, CPU numbers")
    print(f"# attention benchmark on {where}")
    print(f"# torch {torch.__version__}, tokens per frame {tokens} (scale {scale:g}), "
          f"peak {peak} TFLOP/s ({basis})")
    for name, layout in shapes(tokens).items():
        if args.shapes is None or name.split()[0] in args.shapes or name in args.shapes:
            result = measure_shape(layout, device, DTYPES[args.dtype], args.batch, args.warmup,
                                   args.rep, not args.no_flex, peak, progress=lambda line: None)
            print_shape(name, result, device.type == "cuda")


if __name__ == "__main__":
    main()
