"""Host side of the Triton attention: kernel configs, autotuning, per-layout plans, launches.

The kernels (and their math) are in `triton_attention.py`. This module imports triton, so
`dispatch.py` imports it lazily, on the first call with backend "triton": that first import
is when TRITON_INTERPRET is read (see `INTERPRETED`). Under the interpreter the kernels run
on CPU tensors, one configuration, 16-bit tiles widened to fp32 before they meet tl.dot.

Configs (tile sizes, warps, stages) and their autotuning: `triton_configs.py`.

Plans. The visit tables depend only on who sees whom (`AttentionLayout.mask_key`) and the
tile sizes, so they are cached on that key: consecutive chunks of a stream, whose frame ids
differ, share them. Tables are built lazily per kernel (inference never builds the two
backward ones) and reach the GPU in one non-blocking copy from pinned memory. Dense layouts
build nothing. Launches run under the tensors' device (`torch.cuda.device(q.device)`).

Triton's own library (tl.sum, tl.max, tl.zeros, ...) is @triton.jit code too, decorated when
triton itself is first imported, which is often earlier and elsewhere: torch._dynamo imports
triton (diffusers and torch.compile do). If that happened before TRITON_INTERPRET=1 was set,
`interpret_triton_library` wraps those functions for the interpreter, as an early variable
would have.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

import torch
import triton

from . import triton_attention as kernels
from .layout import AttentionLayout, TileRuns
# re-exported: callers reach the configs through the lazily imported launch module
from .triton_configs import (AUTOTUNE_ENV, FUSED_DQ_ENV, INTERPRETER_CONFIG,  # noqa: F401
                             TUNING_FILE_ENV, KernelConfig, TileSizes, autotune_enabled,
                             choose_config, fused_dq_enabled, shipped_configs)
from .triton_limits import TRITON_DTYPES, TRITON_HEAD_DIMS

INTERPRETED = kernels.INTERPRETED


def interpret_triton_library() -> None:
    """Re-wrap triton's library functions that were decorated for compilation (TRITON_INTERPRET
    was unset when triton was imported) so that interpreted kernels can call them. Runs only
    under the interpreter, which then owns the process anyway (no compiled kernel runs)."""
    import triton.language as tl
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # another triton layout: nothing to re-wrap; set the variable earlier
        return

    for module in (tl.standard, tl.random):
        for name, fn in list(vars(module).items()):
            if isinstance(fn, JITFunction):
                wrapped = InterpretedFunction(fn.fn)
                setattr(module, name, wrapped)
                if getattr(tl, name, None) is fn:
                    setattr(tl, name, wrapped)


if INTERPRETED:
    interpret_triton_library()
LOG2E = math.log2(math.e)
TABLE_CACHE_SIZE = 256  # (mask, kernel, tile sizes) visit tables kept per process
DELTA_ROWS = 64         # rows per program of the Delta = rowsum(dO * O) pre-pass


# ---------------------------------------------------------------------------- plans
_TABLES: OrderedDict = OrderedDict()


def _upload(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Int32 CPU tensors -> views of ONE device tensor, copied without a host sync (pinned
    source, non-blocking; the caching host allocator keeps it alive until the copy ran)."""
    flat = torch.cat([p.reshape(-1).int() for p in parts])
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    out, offset = [], 0
    for p in parts:
        out.append(flat[offset:offset + p.numel()].view(p.shape))
        offset += p.numel()
    return out


def tile_runs(layout: AttentionLayout, kernel: str, cfg: KernelConfig,
              device: torch.device) -> TileRuns:
    """The run table of `kernel` for `layout` on `device`, cached on the layout's mask."""
    key = (layout.mask_key(), kernel, cfg.block_m, cfg.block_n, str(device))
    if key in _TABLES:
        _TABLES.move_to_end(key)
        return _TABLES[key]
    runs = layout.tile_runs(cfg.block_m, cfg.block_n, "key" if kernel == "dkdv" else "query")
    table = TileRuns(*_upload([runs.start, runs.num_full, runs.runs, runs.order], device))
    _TABLES[key] = table
    if len(_TABLES) > TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return table


def _frame_ids(layout: AttentionLayout, device: torch.device) -> dict:
    """Per-frame ids and rule parameters of a layout on `device` (memoised on the layout,
    which the DiT shares between all layers of a pass)."""
    def build():
        qf, kf, qn, kn = _upload(list(layout.frame_ids()), device)
        return dict(QF=qf, KF=kf, QN=qn, KN=kn, S=layout.tokens_per_frame,
                    chunk=layout.chunk_frames or 1, window=layout.window_frames or 0,
                    sink=layout.sink_frames, HAS_CHUNK=layout.chunk_frames is not None,
                    HAS_WINDOW=layout.window_frames is not None,
                    HAS_SINK=layout.sink_frames > 0, NOISY=layout.q_noisy is not None)
    return layout._memo(("triton ids", str(device)), build)


def _placeholder(device: torch.device) -> torch.Tensor:
    """A table argument DENSE kernels never read."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _rule_args(layout: AttentionLayout, device: torch.device, dense: bool) -> dict:
    if not dense:
        return _frame_ids(layout, device)
    none = _placeholder(device)
    return dict(QF=none, KF=none, QN=none, KN=none, S=layout.tokens_per_frame, chunk=1,
                window=0, sink=0, HAS_CHUNK=False, HAS_WINDOW=False, HAS_SINK=False,
                NOISY=False)


def _run_args(layout, kernel, cfg, device, dense) -> dict:
    if dense:
        none = _placeholder(device)
        return dict(ORDER=none, RUN_START=none, RUN_FULL=none, RUNS=none)
    t = tile_runs(layout, kernel, cfg, device)
    return dict(ORDER=t.order, RUN_START=t.start, RUN_FULL=t.num_full, RUNS=t.runs)


def host_plan(layout: AttentionLayout, device: torch.device, dtype: torch.dtype,
              grad: bool, head_dim: int = 128) -> None:
    """Build what a launch of `layout` needs on the host (ids, the forward's table; the
    backward's when grad) with the default configs: benchmarks time the host side with it."""
    dense = layout.is_dense()
    if dense:
        return
    _frame_ids(layout, device)
    for kernel in ("fwd", "dkdv", "dq") if grad else ("fwd",):
        base = INTERPRETER_CONFIG if INTERPRETED else shipped_configs(kernel, head_dim, dtype)[0]
        tile_runs(layout, kernel, base, device)


# ---------------------------------------------------------------------------- launches
def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of a [B, L, H, D] tensor with unit stride over D."""
    return t.stride(0), t.stride(2), t.stride(1)


def _precision(dtype: torch.dtype) -> dict:
    """fp32 stays fp32 on a GPU (no TF32: the fp32 tolerance is 1e-5); 16-bit dots use the
    tensor cores; the interpreter widens 16-bit tiles (its 16-bit dot is wrong)."""
    return dict(UPCAST=INTERPRETED and dtype != torch.float32,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not on the current one (multi-GPU without set_device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_options(cfg: KernelConfig) -> dict:
    if INTERPRETED:
        return {}
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Triton-specific limits (shapes were checked by `dispatch.attention`)."""
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"triton attention: q/k/v dtype {q.dtype} is not supported; "
                         f"use one of {TRITON_DTYPES}")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(f"triton attention: head dim {q.shape[-1]} (last dim of q, k, v) is "
                         f"not supported; use one of {TRITON_HEAD_DIMS} or backend='torch'")


def attention_forward(q, k, v, layout: AttentionLayout, sizes: TileSizes | None = None):
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> (out [B, Lq, H, D], lse [B, H, Lq] fp32, base 2)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    out = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    if Lq == 0:
        return out, lse
    dense = layout.is_dense()
    with on_device(q):
        rule = _rule_args(layout, q.device, dense)

        def run(cfg):
            runs = _run_args(layout, "fwd", cfg, q.device, dense)
            kernels.attention_fwd[(B * H, triton.cdiv(Lq, cfg.block_m))](
                q, k, v, out, lse, rule["QF"], rule["KF"], rule["QN"], rule["KN"],
                runs["ORDER"], runs["RUN_START"], runs["RUN_FULL"], runs["RUNS"],
                *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                H, Lq, Lk, rule["S"], LOG2E / math.sqrt(D), rule["chunk"], rule["window"],
                rule["sink"], DENSE=dense, HAS_CHUNK=rule["HAS_CHUNK"],
                HAS_WINDOW=rule["HAS_WINDOW"], HAS_SINK=rule["HAS_SINK"], NOISY=rule["NOISY"],
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=D, **_precision(q.dtype),
                **_launch_options(cfg))

        run(choose_config("fwd", q, Lq, Lk, dense, run, sizes))
    return out, lse


def attention_backward(do, q, k, v, out, lse, layout: AttentionLayout,
                       sizes: TileSizes | None = None):
    """dO [B, Lq, H, D] -> (dq, dk, dv) in the inputs' dtype."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if Lq == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dense = layout.is_dense()
    sm_scale = 1.0 / math.sqrt(D)
    with on_device(q):
        rule = _rule_args(layout, q.device, dense)
        delta = torch.empty_like(lse)
        kernels.attention_bwd_delta[(triton.cdiv(Lq, DELTA_ROWS), B * H)](
            out, do, delta, *_strides(out), *_strides(do), H, Lq, BLOCK_M=DELTA_ROWS,
            HEAD_DIM=D)
        common = dict(H=H, Lq=Lq, Lk=Lk, S=rule["S"], sm_scale=sm_scale,
                      qk_scale=sm_scale * LOG2E, chunk=rule["chunk"], window=rule["window"],
                      sink=rule["sink"], DENSE=dense, HAS_CHUNK=rule["HAS_CHUNK"],
                      HAS_WINDOW=rule["HAS_WINDOW"], HAS_SINK=rule["HAS_SINK"],
                      NOISY=rule["NOISY"], HEAD_DIM=D, **_precision(q.dtype))
        ids = (rule["QF"], rule["KF"], rule["QN"], rule["KN"])
        fused = fused_dq_enabled()
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if fused else lse

        def run_dkdv(cfg):
            runs = _run_args(layout, "dkdv", cfg, q.device, dense)
            kernels.attention_bwd_dkdv[(B * H, triton.cdiv(Lk, cfg.block_n))](
                q, k, v, do, lse, delta, dk, dv, dq_acc, *ids,
                runs["ORDER"], runs["RUN_START"], runs["RUN_FULL"], runs["RUNS"],
                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
                *(_strides(dq_acc) if fused else (0, 0, 0)),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, FUSED_DQ=fused, **common,
                **_launch_options(cfg))

        def run_dq(cfg):
            runs = _run_args(layout, "dq", cfg, q.device, dense)
            kernels.attention_bwd_dq[(B * H, triton.cdiv(Lq, cfg.block_m))](
                q, k, v, do, lse, delta, dq, *ids,
                runs["ORDER"], runs["RUN_START"], runs["RUN_FULL"], runs["RUNS"],
                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **common, **_launch_options(cfg))

        cfg = choose_config("dkdv", q, Lq, Lk, dense, run_dkdv, sizes, "+dq" if fused else "")
        if fused:
            dq_acc.zero_()  # tuning runs (if any) added to it
        run_dkdv(cfg)
        if fused:
            dq = (dq_acc * sm_scale).to(q.dtype)
        else:
            run_dq(choose_config("dq", q, Lq, Lk, dense, run_dq, sizes))
    return dq, dk, dv


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels index D with stride 1; any other stride is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


class TritonAttention(torch.autograd.Function):
    """Block-sparse attention under an `AttentionLayout`, forward and backward in Triton."""

    @staticmethod
    def forward(ctx, q, k, v, layout, sizes):
        q, k, v = (_unit_stride(t) for t in (q, k, v))
        out, lse = attention_forward(q, k, v, layout, sizes)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.sizes = layout, sizes
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(_unit_stride(do), q, k, v, out, lse,
                                        ctx.layout, ctx.sizes)
        return dq, dk, dv, None, None


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
                     sizes: TileSizes | None = None) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]. `sizes` overrides the tile sizes
    of the configs (tests use it to put frame boundaries and masked tiles where they want)."""
    check_inputs(q, k, v)
    return TritonAttention.apply(q, k, v, layout, sizes)
