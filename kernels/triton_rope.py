"""Fused QK RMSNorm (over the full width C = H * D) + rotary embedding: Triton kernels.

Per token row x [C] (fp32 math), weight w [C], per-token angles cos, sin [D/2]:

    r  = 1 / sqrt(mean(x^2) + eps)
    n  = x * r                       (rounded to x's dtype, as the reference does)
    z  = n * w                       (rounded to the output dtype = promote(x, w))
    out[h, 2i]     = z[h, 2i] cos_i - z[h, 2i+1] sin_i
    out[h, 2i + 1] = z[h, 2i] sin_i + z[h, 2i+1] cos_i

Backward, with dz the rotation of dout by the opposite angle:

    dz[2i] = dout[2i] cos_i + dout[2i+1] sin_i,   dz[2i+1] = -dout[2i] sin_i + dout[2i+1] cos_i
    dw = sum over rows of dz * n,   dn = dz * w,   dx = r * (dn - n * mean(dn * n))

A tile is BLOCK_R rows x BLOCK_P pairs; pairs are handled as two strided halves (the even
and the odd elements of a row), so the rotation never shuffles registers. The forward runs
one program per row tile; the backward gives each program a run of rows, walked tile by
tile, and writes its partial dw, summed on the host. Host-side code: `triton_rope_launch.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_tile(X, COS, SIN, rows, pair, stride_xb, stride_xl, stride_cl, L, num_rows, C,
              HALF_D: tl.constexpr):
    """Pointers and masks of a [BLOCK_R, BLOCK_P] tile: (x pairs, mask, x0, x1, cos, sin)."""
    b = rows // L
    pos = rows % L
    mask = (rows < num_rows)[:, None] & (pair < C // 2)[None, :]
    x_pairs = X + (b * stride_xb + pos * stride_xl)[:, None] + 2 * pair[None, :]
    x0 = tl.load(x_pairs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_pairs + 1, mask=mask, other=0.0).to(tl.float32)
    angle = pos[:, None] * stride_cl + (pair % HALF_D)[None, :]
    cos = tl.load(COS + angle, mask=mask, other=1.0).to(tl.float32)
    sin = tl.load(SIN + angle, mask=mask, other=0.0).to(tl.float32)
    return mask, x0, x1, cos, sin


@triton.jit
def qk_norm_rope_fwd(X, W, COS, SIN, OUT, RSTD, stride_xb, stride_xl, stride_cl, L, C, eps,
                     num_rows, HALF_D: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    """Program t: rows [t * BLOCK_R, ...) of OUT [B * L, C] (contiguous [B, L, H, D]) and of
    RSTD [B * L] fp32 (kept for the backward)."""
    # int64: row * C may pass 2**31 elements
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    pair = tl.arange(0, BLOCK_P)
    mask, x0, x1, cos, sin = _row_tile(X, COS, SIN, rows, pair, stride_xb, stride_xl,
                                       stride_cl, L, num_rows, C, HALF_D)
    rstd = 1.0 / tl.sqrt((tl.sum(x0 * x0, 1) + tl.sum(x1 * x1, 1)) / C + eps)
    x_dtype = X.dtype.element_ty
    out_dtype = OUT.dtype.element_ty
    in_row = pair < C // 2
    w0 = tl.load(W + 2 * pair, mask=in_row, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(W + 2 * pair + 1, mask=in_row, other=0.0).to(tl.float32)[None, :]
    z0 = ((x0 * rstd[:, None]).to(x_dtype).to(tl.float32) * w0).to(out_dtype).to(tl.float32)
    z1 = ((x1 * rstd[:, None]).to(x_dtype).to(tl.float32) * w1).to(out_dtype).to(tl.float32)
    out_pairs = OUT + rows[:, None] * C + 2 * pair[None, :]
    tl.store(out_pairs, (z0 * cos - z1 * sin).to(out_dtype), mask=mask)
    tl.store(out_pairs + 1, (z0 * sin + z1 * cos).to(out_dtype), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < num_rows)


@triton.jit
def qk_norm_rope_bwd(X, W, COS, SIN, RSTD, DOUT, DX, DW_PARTIAL,
                     stride_xb, stride_xl, stride_cl, L, C, num_rows, rows_per_program,
                     HALF_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program p: rows [p * rows_per_program, ...), BLOCK_R at a time. DOUT, DX [B * L, C]
    contiguous; DW_PARTIAL [programs, C] fp32 (this program's share of dw)."""
    pid = tl.program_id(0)
    pair = tl.arange(0, BLOCK_P)
    in_row = pair < C // 2
    x_dtype = X.dtype.element_ty
    w0 = tl.load(W + 2 * pair, mask=in_row, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(W + 2 * pair + 1, mask=in_row, other=0.0).to(tl.float32)[None, :]
    dw0 = tl.zeros([BLOCK_P], tl.float32)
    dw1 = tl.zeros([BLOCK_P], tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, num_rows)
    for start in range(first, last, BLOCK_R):
        rows = (start + tl.arange(0, BLOCK_R)).to(tl.int64)  # row * C may pass 2**31
        mask, x0, x1, cos, sin = _row_tile(X, COS, SIN, rows, pair, stride_xb, stride_xl,
                                           stride_cl, L, last, C, HALF_D)
        rstd = tl.load(RSTD + rows, mask=rows < last, other=0.0)[:, None]
        n0 = x0 * rstd
        n1 = x1 * rstd
        dout_pairs = DOUT + rows[:, None] * C + 2 * pair[None, :]
        do0 = tl.load(dout_pairs, mask=mask, other=0.0).to(tl.float32)
        do1 = tl.load(dout_pairs + 1, mask=mask, other=0.0).to(tl.float32)
        dz0 = do0 * cos + do1 * sin
        dz1 = do1 * cos - do0 * sin
        # dw sees n rounded to x's dtype, exactly what the reference multiplies w with.
        dw0 += tl.sum(dz0 * n0.to(x_dtype).to(tl.float32), 0)
        dw1 += tl.sum(dz1 * n1.to(x_dtype).to(tl.float32), 0)
        dn0 = dz0 * w0
        dn1 = dz1 * w1
        mean_dn_n = ((tl.sum(dn0 * n0, 1) + tl.sum(dn1 * n1, 1)) / C)[:, None]
        dx_pairs = DX + rows[:, None] * C + 2 * pair[None, :]
        tl.store(dx_pairs, (rstd * (dn0 - n0 * mean_dn_n)).to(DX.dtype.element_ty), mask=mask)
        tl.store(dx_pairs + 1, (rstd * (dn1 - n1 * mean_dn_n)).to(DX.dtype.element_ty),
                 mask=mask)
    tl.store(DW_PARTIAL + pid * C + 2 * pair, dw0, mask=in_row)
    tl.store(DW_PARTIAL + pid * C + 2 * pair + 1, dw1, mask=in_row)
