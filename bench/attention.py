"""Attention benchmark: forcelab's Triton kernels against SDPA, FlexAttention and flash-attn,
and the torch path's two ways to run a masked layout.

    python bench/attention.py                       # GPU: the kernels at Wan-1.3B shapes; CPU:
                                                    # the torch path
    python bench/attention.py --scale 0.1 --peak-tflops 989
    python bench/attention.py --torch-path          # the torch path on a GPU (fp32)
    python bench/attention.py --torch-path --threads 2 --torch-rep 7

The torch path (`--torch-path`, what `attention` runs on a CPU, and for fp32 on a GPU): for
each masked layout, at the toy DiT's head layout (models/config.py "toy": 3 heads x 32, 16
tokens per frame, batch 16) and Wan-1.3B's (12 heads x 128, 78 and 195 tokens per frame),
three contenders are timed interleaved in one run, forward and forward + backward:
- mask: `attention_reference`, one SDPA call with the dense [Lq, Lk] boolean mask;
- grouped: `attention_grouped`, one unmasked SDPA per group of query frames (no mask);
- full: one unmasked SDPA over the same Lq x Lk, every pair computed (the no-mask bound).
It prints the visible-pair fraction, the ratios mask / grouped and grouped / full (a path
that is cheaper than full attention in proportion to the pairs it skips has grouped / full
= the visible fraction), and which of the two `attention` picks (`grouped.use_groups`).
FlexAttention is not a contender there: on torch 2.13 it has no backward on a CPU, and its
compiled forward was 2.4-2.8x slower than the grouped path at the Wan 78-token shape.

Kernel shapes (Wan2.1-1.3B: 12 heads x 128, 1560 tokens per latent frame, chunks of 3 frames):
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
triton.testing.do_bench. On a CPU the kernels do not run (the Triton interpreter is a test
tool, not a kernel): the script compares the torch path instead (--torch-path does on a GPU too).
Every kernel's output and gradients are compared with SDPA under the layout's mask in
float32 on upcast copies of the same inputs: ||x - ref|| / ||ref||, against
REFERENCE_TOLERANCE of the dtype (`measure_shape` returns it all as a dict).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from forcelab.bench.card import bf16_peak, device_name
from forcelab.dtypes import DTYPES
from forcelab.kernels import AttentionLayout, attention
from forcelab.kernels.grouped import attention_grouped, query_groups, use_groups
from forcelab.kernels.reference import attention_reference
from forcelab.models.config import DiTConfig

WAN_TOKENS_PER_FRAME = 1560   # 30 x 52 latent patches at 480 x 832
WAN_HEADS, WAN_HEAD_DIM = 12, 128
TRAIN_FRAMES, CHUNK_FRAMES = 21, 3
STREAM_KEY_FRAMES = (12, 21)
BACKWARD_FLOP_FACTOR = 2.5
CPU_ONLY = "skipped: CPU run (compiled kernels need CUDA)"
FUSED_DQ_METHOD = "forcelab (fused dQ)"
FUSED_DQ_ENV = "FORCELAB_ATTENTION_FUSED_DQ"
TOY_LATENT_SIZE = 8           # toy codec latents are 8 x 8 (models/autoencoder.py ToyCodec)
TOY_BATCH = 16                # configs/toy/base.yaml data.batch_size
TOY_WINDOW, TOY_SINK = 6, 2   # configs/toy/rolling_forcing.yaml
WAN_SCALES = (0.05, 0.125)    # 78 and 195 tokens per frame on the torch path
WAN_WINDOW, WAN_SINK = 12, 3  # a 4-chunk window plus a 1-chunk sink
SAMPLE_MS = 20.0              # a torch-path sample repeats a call at least this long


def shapes(tokens_per_frame: int) -> dict[str, AttentionLayout]:
    s = tokens_per_frame
    out = {"train": AttentionLayout.block_causal(TRAIN_FRAMES, s, CHUNK_FRAMES)}
    for frames in STREAM_KEY_FRAMES:
        query = list(range(frames - CHUNK_FRAMES, frames))
        out[f"stream {frames}f"] = AttentionLayout.cached(query, list(range(frames)), s,
                                                          CHUNK_FRAMES)
    return out


def time_ms(fn, device: torch.device, warmup: int, rep: int) -> float:
    """Median milliseconds of fn() (a GPU: triton's do_bench; a CPU: the GPU check's smoke mode)."""
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


# ------------------------------------------------------------------------ the torch path
def torch_path_shapes() -> list[tuple[str, AttentionLayout, tuple[int, int, int]]]:
    """(name, layout, (batch, heads, head dim)) of the torch-path comparison."""
    toy = DiTConfig.preset("toy")
    s = toy.tokens_per_frame(TOY_LATENT_SIZE, TOY_LATENT_SIZE)
    c = toy.chunk_frames
    toy_heads = (TOY_BATCH, toy.num_heads, toy.head_dim)
    cache = [0, 1, -1, 7, 8, 9]              # a sink, an empty slot, a window of the cache
    out = [
        ("toy block-causal 8f", AttentionLayout.block_causal(8, s, c), toy_heads),
        ("toy block-causal 8f B=1", AttentionLayout.block_causal(8, s, c),
         (1,) + toy_heads[1:]),
        ("toy block-causal 21f c3", AttentionLayout.block_causal(21, s, 3), toy_heads),
        ("toy window+sink 12f", AttentionLayout.block_causal(12, s, c, TOY_WINDOW, TOY_SINK),
         toy_heads),
        ("toy teacher forcing 8f", AttentionLayout.teacher_forcing(8, s, c), toy_heads),
        ("toy cached chunk", AttentionLayout.cached([10, 11], cache + [10, 11], s, c,
                                                    TOY_WINDOW, TOY_SINK), toy_heads),
    ]
    wan = (1, WAN_HEADS, WAN_HEAD_DIM)
    for scale in WAN_SCALES:
        w = round(WAN_TOKENS_PER_FRAME * scale)
        out += [(f"wan block-causal s={w}", AttentionLayout.block_causal(
                    TRAIN_FRAMES, w, CHUNK_FRAMES), wan),
                (f"wan window+sink s={w}", AttentionLayout.block_causal(
                    TRAIN_FRAMES, w, CHUNK_FRAMES, WAN_WINDOW, WAN_SINK), wan)]
    w = round(WAN_TOKENS_PER_FRAME * WAN_SCALES[0])
    out.append((f"wan teacher forcing s={w}", AttentionLayout.teacher_forcing(
        TRAIN_FRAMES, w, CHUNK_FRAMES), wan))
    return out


def full_attention(q, k, v, layout):
    """Every pair, no mask: the cost of the same Lq x Lk unmasked."""
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    return out.transpose(1, 2)


TORCH_PATH_METHODS = {"mask": attention_reference, "grouped": attention_grouped,
                      "full": full_attention}


def bench_torch_path(args, device, dtype):
    """Median ms of every contender, forward and forward + backward, interleaved per rep."""
    print(f"{'shape':26s} {'Lq x Lk':>11s} {'groups':>6s} {'visible':>7s} {'picks':>7s} "
          + " ".join(f"{m + ' ' + p:>11s}" for p in ("fwd", "f+b") for m in TORCH_PATH_METHODS)
          + f" {'mask/grouped':>12s} {'grouped/full':>12s} {'max err':>8s}")
    for name, layout, (batch, heads, head_dim) in torch_path_shapes():
        if args.shapes is not None and name not in args.shapes:
            continue
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, d_out = (torch.randn(batch, n, heads, head_dim, generator=gen).to(device, dtype)
                          for n in (layout.num_queries, layout.num_keys, layout.num_keys,
                                    layout.num_queries))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        outs = {m: fn(q, k, v, layout) for m, fn in TORCH_PATH_METHODS.items()}  # warm, plans
        err = (outs["grouped"].float() - outs["mask"].float()).abs().max().item()
        runs = {}
        for m, fn in TORCH_PATH_METHODS.items():
            runs[m, "fwd"] = lambda fn=fn: fn(q, k, v, layout)
        for m, fn in TORCH_PATH_METHODS.items():
            runs[m, "f+b"] = lambda fn=fn: torch.autograd.grad(fn(*leaves, layout), leaves, d_out)
        # calls per sample: enough for SAMPLE_MS, from one warm-up call each
        calls = {key: max(1, math.ceil(SAMPLE_MS / max(timed(run, device, 1), 1e-3)))
                 for key, run in runs.items()}
        times = {key: [] for key in runs}
        for _ in range(args.torch_rep):
            for key, run in runs.items():
                times[key].append(timed(run, device, calls[key]))
        ms = {key: statistics.median(t) for key, t in times.items()}
        visible = layout.visible_pairs() / (layout.num_queries * layout.num_keys)
        picks = "grouped" if use_groups(layout, q) else "mask"
        ratios = [f"{ms['mask', p] / ms['grouped', p]:.2f}" for p in ("fwd", "f+b")]
        to_full = [f"{ms['grouped', p] / ms['full', p]:.2f}" for p in ("fwd", "f+b")]
        print(f"{name:26s} {layout.num_queries:5d}x{layout.num_keys:<5d} "
              f"{len(query_groups(layout)):6d} {visible:7.0%} {picks:>7s} "
              + " ".join(f"{ms[key]:11.2f}" for key in runs)      # the header's order
              + f" {' '.join(ratios):>12s} {' '.join(to_full):>12s} {err:8.1e}", flush=True)


def timed(fn, device: torch.device, calls: int) -> float:
    """Milliseconds per call of `calls` calls of fn. CPU: this process's CPU time (all its
    threads), which other load on the machine does not inflate; GPU: wall clock, synchronised."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e3 * (clock() - start) / calls


def main(argv=None):

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help=f"tokens per frame = {WAN_TOKENS_PER_FRAME} x scale (kernels)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak of the GPU in this dtype (default: the card's bf16 "
                             "datasheet figure, bench/card.py)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="default: bf16 for the kernels, fp32 for the torch path")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=25, help="milliseconds (GPU)")
    parser.add_argument("--rep", type=int, default=100, help="milliseconds (GPU)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--shapes", nargs="*", default=None, help="subset of shape names")
    parser.add_argument("--torch-path", action="store_true",
                        help="compare the torch path's dense mask, grouped and full attention "
                             "(the default on a CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--torch-rep", type=int, default=5,
                        help="interleaved repetitions of each contender (torch path)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.torch_path or device.type == "cpu":
        dtype = DTYPES[args.dtype or "fp32"]
        where = (device_name(device) if device.type == "cuda"
                 else f"CPU, {torch.get_num_threads()} thread(s)")
        print(f"# the torch path's masked attention on {where}, torch {torch.__version__}, "
              f"{str(dtype).replace('torch.', '')}; ms per call, median of {args.torch_rep} "
              f"interleaved samples (CPU: process CPU time); ratios: fwd f+b")
        bench_torch_path(args, device, dtype)
        return
    tokens = max(1, round(WAN_TOKENS_PER_FRAME * args.scale))
    peak, basis = (args.peak_tflops, "given") if args.peak_tflops else bf16_peak(device_name(device))
    print(f"# attention benchmark on {device_name(device)}")
    print(f"# torch {torch.__version__}, tokens per frame {tokens} (scale {args.scale:g}), "
          f"peak {peak} TFLOP/s ({basis})")
    for name, layout in shapes(tokens).items():
        if args.shapes is None or name.split()[0] in args.shapes or name in args.shapes:
            result = measure_shape(layout, device, DTYPES[args.dtype or "bf16"], args.batch, args.warmup,
                                   args.rep, not args.no_flex, peak, progress=lambda line: None)
            print_shape(name, result, True)


if __name__ == "__main__":
    main()
