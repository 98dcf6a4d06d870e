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

A row is walked in chunks of BLOCK_C contiguous columns, BLOCK_C the largest power of two
that divides C (512 for Wan's 1536): every lane works, and loads and stores are contiguous
(vectorised); the pairs of a chunk are split in registers ([R, C/2, 2] -> two halves) and
joined back after the rotation. Each kernel makes two passes over a row tile: one for the
row's reduction (sum of squares; mean(dn * n)), one for the outputs (the second read is
served by the cache). The forward runs one program per row tile; the backward gives each
program a run of rows, walked tile by tile, and writes its partial dw (kept in registers
as [NUM_CHUNKS, BLOCK_C]), summed on the host. Host-side code: `triton_rope_launch.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pairs(t, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """[R, C] -> (even columns, odd columns), each [R, C / 2]."""
    return tl.split(tl.reshape(t, [BLOCK_R, BLOCK_C // 2, 2]))


@triton.jit
def _interleave(a, b, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Inverse of _pairs."""
    return tl.reshape(tl.join(a, b), [BLOCK_R, BLOCK_C])


@triton.jit
def _angles(COS, SIN, pos, in_rows, c0, stride_cl, HALF_D: tl.constexpr,
            BLOCK_C: tl.constexpr):
    """cos, sin [R, BLOCK_C / 2] of the pairs of columns [c0, c0 + BLOCK_C) (any head)."""
    pair = (c0 // 2 + tl.arange(0, BLOCK_C // 2)) % HALF_D
    angle = pos[:, None] * stride_cl + pair[None, :]
    cos = tl.load(COS + angle, mask=in_rows[:, None], other=1.0).to(tl.float32)
    sin = tl.load(SIN + angle, mask=in_rows[:, None], other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def qk_norm_rope_fwd(X, W, COS, SIN, OUT, RSTD, stride_xb, stride_xl, stride_cl, L, C, eps,
                     num_rows, HALF_D: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """Program t: rows [t * BLOCK_R, ...) of OUT [B * L, C] (contiguous [B, L, H, D]) and of
    RSTD [B * L] fp32 (kept for the backward)."""
    # int64: row * C may pass 2**31 elements
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    in_rows = rows < num_rows
    pos = rows % L
    x_rows = X + ((rows // L) * stride_xb + pos * stride_xl)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    x_dtype = X.dtype.element_ty
    out_dtype = OUT.dtype.element_ty
    squares = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        x = tl.load(x_rows + c0 + cols, mask=in_rows[:, None], other=0.0).to(tl.float32)
        squares += tl.sum(x * x, 1)
    rstd = 1.0 / tl.sqrt(squares / C + eps)
    for c0 in range(0, C, BLOCK_C):
        x = tl.load(x_rows + c0 + cols, mask=in_rows[:, None], other=0.0).to(tl.float32)
        w = tl.load(W + c0 + cols).to(tl.float32)
        z = ((x * rstd[:, None]).to(x_dtype).to(tl.float32) * w).to(out_dtype).to(tl.float32)
        z0, z1 = _pairs(z, BLOCK_R, BLOCK_C)
        cos, sin = _angles(COS, SIN, pos, in_rows, c0, stride_cl, HALF_D, BLOCK_C)
        out = _interleave(z0 * cos - z1 * sin, z0 * sin + z1 * cos, BLOCK_R, BLOCK_C)
        tl.store(OUT + rows[:, None] * C + c0 + cols, out.to(out_dtype), mask=in_rows[:, None])
    tl.store(RSTD + rows, rstd, mask=in_rows)


@triton.jit
def _dz(DOUT, COS, SIN, rows, pos, in_rows, c0, cols, C, stride_cl, HALF_D: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dout [R, BLOCK_C] of columns [c0, ...) rotated back by the angles: dz."""
    do = tl.load(DOUT + rows[:, None] * C + c0 + cols, mask=in_rows[:, None],
                 other=0.0).to(tl.float32)
    do0, do1 = _pairs(do, BLOCK_R, BLOCK_C)
    cos, sin = _angles(COS, SIN, pos, in_rows, c0, stride_cl, HALF_D, BLOCK_C)
    return _interleave(do0 * cos + do1 * sin, do1 * cos - do0 * sin, BLOCK_R, BLOCK_C)


@triton.jit
def qk_norm_rope_bwd(X, W, COS, SIN, RSTD, DOUT, DX, DW_PARTIAL,
                     stride_xb, stride_xl, stride_cl, L, C, num_rows, rows_per_program,
                     HALF_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     NUM_CHUNKS: tl.constexpr):
    """Program p: rows [p * rows_per_program, ...), BLOCK_R at a time. DOUT, DX [B * L, C]
    contiguous; DW_PARTIAL [programs, C] fp32 (this program's share of dw).
    NUM_CHUNKS: C / BLOCK_C rounded up to a power of two (rows of the dw accumulator)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)[None, :]
    chunk_ids = tl.arange(0, NUM_CHUNKS)[:, None]
    x_dtype = X.dtype.element_ty
    dw = tl.zeros([NUM_CHUNKS, BLOCK_C], tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, num_rows)
    for start in range(first, last, BLOCK_R):
        rows = (start + tl.arange(0, BLOCK_R)).to(tl.int64)  # row * C may pass 2**31
        in_rows = rows < last
        pos = rows % L
        x_rows = X + ((rows // L) * stride_xb + pos * stride_xl)[:, None]
        rstd = tl.load(RSTD + rows, mask=in_rows, other=0.0)[:, None]
        dn_n = tl.zeros([BLOCK_R], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            n = tl.load(x_rows + c0 + cols, mask=in_rows[:, None], other=0.0).to(tl.float32) * rstd
            dz = _dz(DOUT, COS, SIN, rows, pos, in_rows, c0, cols, C, stride_cl, HALF_D,
                     BLOCK_R, BLOCK_C)
            w = tl.load(W + c0 + cols).to(tl.float32)
            dn_n += tl.sum(dz * w * n, 1)
            # dw sees n rounded to x's dtype, exactly what the reference multiplies w with.
            dw_chunk = tl.sum(dz * n.to(x_dtype).to(tl.float32), 0)[None, :]
            dw = tl.where(chunk_ids == c0 // BLOCK_C, dw + dw_chunk, dw)
        mean_dn_n = (dn_n / C)[:, None]
        for c0 in range(0, C, BLOCK_C):
            n = tl.load(x_rows + c0 + cols, mask=in_rows[:, None], other=0.0).to(tl.float32) * rstd
            dz = _dz(DOUT, COS, SIN, rows, pos, in_rows, c0, cols, C, stride_cl, HALF_D,
                     BLOCK_R, BLOCK_C)
            w = tl.load(W + c0 + cols).to(tl.float32)
            tl.store(DX + rows[:, None] * C + c0 + cols,
                     (rstd * (dz * w - n * mean_dn_n)).to(DX.dtype.element_ty),
                     mask=in_rows[:, None])
    dw_cols = chunk_ids * BLOCK_C + cols
    tl.store(DW_PARTIAL + pid * C + dw_cols, dw, mask=dw_cols < C)
