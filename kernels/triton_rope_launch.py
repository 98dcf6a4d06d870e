"""Host side of the fused QK RMSNorm + RoPE: checks, launches, autograd.

Kernels and math in `triton_rope.py`; imported lazily by `rope.qk_norm_rope` (see
`triton_launch.py` for when TRITON_INTERPRET is read).
"""

from __future__ import annotations

import torch
import triton

from . import triton_rope as kernels
from .triton_launch import INTERPRETED, on_device
from .triton_limits import TRITON_DTYPES

TILE_ELEMENTS = 4096             # elements per [rows x columns] tile on a GPU (registers)
INTERPRETER_TILE_ELEMENTS = 16384  # the interpreter's cost is per tile: bigger tiles, fewer
MAX_CHUNK = 1024                 # columns per chunk at most
ELEMENTS_PER_WARP = 512          # warps grow with the tile, up to MAX_WARPS
MAX_WARPS = 8
INTERPRETER_PROGRAMS = 2        # backward row groups under the interpreter (few = fast)
PROGRAMS_PER_SM = 4             # backward row groups per GPU multiprocessor


def _tiles(width: int, num_rows: int) -> dict:
    """Launch constants: BLOCK_C columns (the largest power of two dividing the even width,
    so no lane idles) x BLOCK_R rows, and warps."""
    block_cols = min(width & -width, MAX_CHUNK)
    budget = INTERPRETER_TILE_ELEMENTS if INTERPRETED else TILE_ELEMENTS
    block_rows = max(1, min(budget // block_cols, triton.next_power_of_2(max(num_rows, 1))))
    warps = max(1, min(MAX_WARPS, block_rows * block_cols // ELEMENTS_PER_WARP))
    return dict(BLOCK_R=block_rows, BLOCK_C=block_cols, num_warps=warps)


def check_inputs(x, weight, cos, sin, num_heads: int) -> None:
    """x [B, L, H*D], weight [H*D], cos/sin [L, D/2]; errors name the tensor at fault."""
    if x.ndim != 3:
        raise ValueError(f"qk_norm_rope: x must be [B, L, H*D], got shape {tuple(x.shape)}")
    B, L, C = x.shape
    if C % num_heads or (C // num_heads) % 2:
        raise ValueError(f"qk_norm_rope: width {C} of x must split into {num_heads} heads of "
                         f"an even head dim")
    half = C // num_heads // 2
    if x.dtype not in TRITON_DTYPES or weight.dtype not in TRITON_DTYPES:
        raise ValueError(f"qk_norm_rope (triton): x and weight must be one of "
                         f"{TRITON_DTYPES}, got {x.dtype} and {weight.dtype}")
    if tuple(weight.shape) != (C,):
        raise ValueError(f"qk_norm_rope: weight must be [{C}], got {tuple(weight.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (L, half):
            raise ValueError(f"qk_norm_rope: {name} must be [L, D/2] = [{L}, {half}], got "
                             f"{tuple(t.shape)}")
    for name, t in (("weight", weight), ("cos", cos), ("sin", sin)):
        if t.device != x.device:
            raise ValueError(f"qk_norm_rope: {name} is on {t.device}, x on {x.device}")


class QKNormRope(torch.autograd.Function):
    """x [B, L, H*D] -> [B, L, H, D]; gradients for x and weight (angles are constants)."""

    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps, num_heads):
        B, L, C = x.shape
        head_dim = C // num_heads
        if x.stride(-1) != 1:
            x = x.contiguous()
        weight, cos, sin = weight.contiguous(), cos.contiguous(), sin.contiguous()
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        out = torch.empty(B, L, num_heads, head_dim, dtype=out_dtype, device=x.device)
        rstd = torch.empty(B * L, dtype=torch.float32, device=x.device)
        tiles = _tiles(C, B * L)
        if B * L > 0:
            with on_device(x):
                kernels.qk_norm_rope_fwd[(triton.cdiv(B * L, tiles["BLOCK_R"]),)](
                    x, weight, cos, sin, out, rstd, x.stride(0), x.stride(1), cos.stride(0), L,
                    C, eps, B * L, HALF_D=head_dim // 2, **tiles)
        ctx.save_for_backward(x, weight, cos, sin, rstd)
        ctx.head_dim = head_dim
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, cos, sin, rstd = ctx.saved_tensors
        B, L, C = x.shape
        num_rows = B * L
        dout = dout.contiguous()
        dx = torch.empty(B, L, C, dtype=x.dtype, device=x.device)
        if x.is_cuda and not INTERPRETED:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            programs = PROGRAMS_PER_SM * sms
        else:
            programs = INTERPRETER_PROGRAMS
        programs = max(1, min(programs, num_rows))
        rows_per_program = triton.cdiv(num_rows, programs)
        programs = triton.cdiv(num_rows, rows_per_program) if num_rows else 1
        dw_partial = torch.zeros(programs, C, dtype=torch.float32, device=x.device)
        tiles = _tiles(C, rows_per_program)
        if num_rows > 0:
            with on_device(x):
                kernels.qk_norm_rope_bwd[(programs,)](
                    x, weight, cos, sin, rstd, dout, dx, dw_partial, x.stride(0), x.stride(1),
                    cos.stride(0), L, C, num_rows, rows_per_program, HALF_D=ctx.head_dim // 2,
                    NUM_CHUNKS=triton.next_power_of_2(C // tiles["BLOCK_C"]), **tiles)
        dw = dw_partial.sum(0).to(weight.dtype)
        return dx, dw, None, None, None, None


def triton_qk_norm_rope(x, weight, cos, sin, eps: float, num_heads: int) -> torch.Tensor:
    """The fused kernel behind `qk_norm_rope(..., backend="triton")`."""
    check_inputs(x, weight, cos, sin, num_heads)
    return QKNormRope.apply(x, weight, cos, sin, eps, num_heads)
