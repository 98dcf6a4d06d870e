"""Host side of the Triton attention: tile sizes, per-layout plans, launches, autograd.

The kernels (and their math) are in `triton_attention.py`. This module imports triton, so
`dispatch.py` imports it lazily, on the first call with backend "triton": that first import
is when TRITON_INTERPRET is read (see `INTERPRETED`). Under the interpreter the kernels run
on CPU tensors, one configuration, 16-bit tiles widened to fp32 before they meet tl.dot.

Triton's own library (tl.sum, tl.max, tl.zeros, ...) is @triton.jit code too, decorated when
triton itself is first imported, which is often earlier and elsewhere: torch._dynamo imports
triton (diffusers and torch.compile do). If that happened before TRITON_INTERPRET=1 was set,
`interpret_triton_library` wraps those functions for the interpreter, as an early variable
would have.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton

from . import triton_attention as kernels
from .dispatch import TRITON_DTYPES as SUPPORTED_DTYPES
from .dispatch import TRITON_HEAD_DIMS as SUPPORTED_HEAD_DIMS
from .layout import AttentionLayout, TileVisits

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
PLAN_CACHE_SIZE = 64  # layouts are rebuilt every call by the DiT; their plans are reused


@dataclass(frozen=True)
class TileSizes:
    """Tile sizes (tokens) of each kernel; the visit tables are built for exactly these, so
    they are chosen on the host and only warps / pipeline stages are autotuned."""

    fwd_m: int
    fwd_n: int
    dkdv_m: int
    dkdv_n: int
    dq_m: int
    dq_n: int


def default_tile_sizes(head_dim: int, device: torch.device) -> TileSizes:
    """Per-device defaults. On a GPU they follow the usual FlashAttention-2 shapes (a wide
    query tile forward; narrow query tiles for dK/dV and narrow key tiles for dQ, halved at
    D = 128 to bound the fp32 accumulators' registers); they are untuned guesses until
    measured. Under the interpreter, small tiles keep frame boundaries inside tiles and
    fully masked tiles present even in small test shapes."""
    if device.type != "cuda" or INTERPRETED:
        return TileSizes(32, 32, 32, 32, 32, 32)
    if head_dim <= 64:
        return TileSizes(128, 64, 32, 128, 128, 32)
    return TileSizes(128, 64, 32, 64, 64, 32)


@dataclass(frozen=True)
class Plan:
    """Everything a launch needs to know about one layout, on the tensors' device."""

    dense: bool
    q_frames: torch.Tensor  # [Lq] int32
    k_frames: torch.Tensor  # [Lk] int32
    q_noisy: torch.Tensor   # [Lq] int32 (a 1-element placeholder unless teacher forcing)
    k_noisy: torch.Tensor
    fwd: TileVisits
    dkdv: TileVisits
    dq: TileVisits
    scalars: dict           # runtime rule parameters and their constexpr flags


_PLANS: OrderedDict = OrderedDict()


def plan_for(layout: AttentionLayout, sizes: TileSizes, device: torch.device) -> Plan:
    """The layout's ids and visit tables, built once per (layout content, sizes, device)."""
    key = (layout.key(), sizes, str(device))
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    q_frames, k_frames = layout.token_frames(device)
    noisy = layout.token_noisy(device)
    placeholder = torch.zeros(1, dtype=torch.int32, device=device)
    q_noisy, k_noisy = noisy if noisy is not None else (placeholder, placeholder)
    scalars = dict(
        chunk=layout.chunk_frames or 1, window=layout.window_frames or 0,
        sink=layout.sink_frames, HAS_CHUNK=layout.chunk_frames is not None,
        HAS_WINDOW=layout.window_frames is not None, HAS_SINK=layout.sink_frames > 0,
        NOISY=noisy is not None)
    plan = Plan(
        dense=layout.is_dense(), q_frames=q_frames, k_frames=k_frames,
        q_noisy=q_noisy, k_noisy=k_noisy,
        fwd=layout.tile_visits(sizes.fwd_m, sizes.fwd_n, "query").to(device),
        dkdv=layout.tile_visits(sizes.dkdv_m, sizes.dkdv_n, "key").to(device),
        dq=layout.tile_visits(sizes.dq_m, sizes.dq_n, "query").to(device),
        scalars=scalars)
    _PLANS[key] = plan
    if len(_PLANS) > PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def _autotuned(kernel):
    """Autotune warps and pipeline stages on a GPU; the interpreter takes one config."""
    if INTERPRETED:
        return kernel
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]
    return triton.autotune(configs, key=["Lq", "Lk", "HEAD_DIM", "BLOCK_M", "BLOCK_N",
                                         "DENSE"])(kernel)


_fwd_kernel = _autotuned(kernels.attention_fwd)
_dkdv_kernel = _autotuned(kernels.attention_bwd_dkdv)
_dq_kernel = _autotuned(kernels.attention_bwd_dq)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of a [B, L, H, D] tensor with unit stride over D."""
    return t.stride(0), t.stride(2), t.stride(1)


def _precision(dtype: torch.dtype) -> dict:
    """fp32 stays fp32 on a GPU (no TF32: the fp32 tolerance is 1e-5); 16-bit dots use the
    tensor cores; the interpreter widens 16-bit tiles (its 16-bit dot is wrong)."""
    return dict(UPCAST=INTERPRETED and dtype != torch.float32,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Triton-specific limits (shapes were checked by `dispatch.attention`)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton attention: q/k/v dtype {q.dtype} is not supported; "
                         f"use one of {SUPPORTED_DTYPES}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"triton attention: head dim {q.shape[-1]} (last dim of q, k, v) is "
                         f"not supported; use one of {SUPPORTED_HEAD_DIMS} or backend='torch'")


def attention_forward(q, k, v, layout: AttentionLayout, sizes: TileSizes):
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> (out [B, Lq, H, D], lse [B, H, Lq] fp32, base 2)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    plan = plan_for(layout, sizes, q.device)
    out = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    if Lq == 0:
        return out, lse
    grid = (triton.cdiv(Lq, sizes.fwd_m), B * H)
    _fwd_kernel[grid](
        q, k, v, out, lse, plan.q_frames, plan.k_frames, plan.q_noisy, plan.k_noisy,
        plan.fwd.start, plan.fwd.num_full, plan.fwd.tiles,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, Lq, Lk, LOG2E / math.sqrt(D), **plan.scalars, DENSE=plan.dense,
        BLOCK_M=sizes.fwd_m, BLOCK_N=sizes.fwd_n, HEAD_DIM=D, **_precision(q.dtype))
    return out, lse


def attention_backward(do, q, k, v, out, lse, layout: AttentionLayout, sizes: TileSizes):
    """dO [B, Lq, H, D] -> (dq, dk, dv) in the inputs' dtype."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    plan = plan_for(layout, sizes, q.device)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if Lq == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    kernels.attention_bwd_delta[(triton.cdiv(Lq, sizes.dq_m), B * H)](
        out, do, delta, *_strides(out), *_strides(do), H, Lq, BLOCK_M=sizes.dq_m, HEAD_DIM=D)
    sm_scale = 1.0 / math.sqrt(D)
    common = dict(H=H, Lq=Lq, Lk=Lk, sm_scale=sm_scale, qk_scale=sm_scale * LOG2E,
                  **plan.scalars, DENSE=plan.dense, HEAD_DIM=D, **_precision(q.dtype))
    _dkdv_kernel[(triton.cdiv(Lk, sizes.dkdv_n), B * H)](
        q, k, v, do, lse, delta, dk, dv,
        plan.q_frames, plan.k_frames, plan.q_noisy, plan.k_noisy,
        plan.dkdv.start, plan.dkdv.num_full, plan.dkdv.tiles,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
        BLOCK_M=sizes.dkdv_m, BLOCK_N=sizes.dkdv_n, **common)
    _dq_kernel[(triton.cdiv(Lq, sizes.dq_m), B * H)](
        q, k, v, do, lse, delta, dq,
        plan.q_frames, plan.k_frames, plan.q_noisy, plan.k_noisy,
        plan.dq.start, plan.dq.num_full, plan.dq.tiles,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        BLOCK_M=sizes.dq_m, BLOCK_N=sizes.dq_n, **common)
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
    (tests use it to put frame boundaries and masked tiles where they want them)."""
    check_inputs(q, k, v)
    if sizes is None:
        sizes = default_tile_sizes(q.shape[-1], q.device)
    return TritonAttention.apply(q, k, v, layout, sizes)
