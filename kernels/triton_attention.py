"""Triton attention kernels for every `AttentionLayout`: forward and FA2-style backward.

Per batch b and head h, with scale = 1/sqrt(D) and vis(i, j) the layout's rule evaluated on
the frame ids (and noisy flags) of query token i and key token j:

    S_ij  = scale * q_i . k_j              (-inf where not vis(i, j))
    m_i   = max_j S_ij,   l_i = sum_j exp(S_ij - m_i)
    O_i   = sum_j exp(S_ij - m_i) v_j / l_i
    LSE_i = m_i + log l_i

The forward streams key tiles with the online softmax (Milakov & Gimelshein; FlashAttention)
in base 2: scores are multiplied by scale * log2(e) so that exp becomes exp2, and LSE is
stored in base 2 as well. The multiply is folded into the exp2 argument (one FMA per score,
the running max is taken on raw scores and scaled once per row); q is not pre-scaled,
because rounding the scaled q to 16 bits would add an error to every score. The backward
recomputes P = exp(S - LSE) tile by tile (FlashAttention-2):

    Delta_i = sum_d dO_id O_id
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - Delta),   dQ = scale dS K,   dK = scale dS^T Q

A query row with no visible key gets l_i = 0: its output is 0 and its LSE is stored as
+inf, so P = exp2(S - inf) = 0 in the backward: zero gradient and no NaN anywhere.

One program owns one tile (BLOCK_M query rows or BLOCK_N key rows) of one (batch, head).
The host gives every tile its visits as RUNS of contiguous tiles of the other sequence
(`AttentionLayout.tile_runs`): block-causal + window + sink visibility is a few runs per
tile. Fully visible runs come first and are looped over without any mask, then the
partially visible runs, where the mask is evaluated from per-frame ids (token t belongs to
layout frame t // S). Fully masked tiles are never visited. Inside a run the tile index is
the loop counter, so no address depends on a load and the software pipeline keeps
num_stages K/V buffers in flight. Programs are launched heaviest tile first (the host's
ORDER permutation), so the long rows of a block-causal layout do not start last.
DENSE layouts (every key visible) skip the runs and the ids altogether.

Dots take the inputs' dtype (P and dS are rounded to it first, as in FlashAttention) and
accumulate in fp32. PRECISION is "ieee" for fp32 inputs, so a GPU never silently uses TF32.
UPCAST (interpreter only) widens 16-bit tiles to fp32 right after loading, because the
interpreter computes 16-bit tl.dot wrongly; the rounding of P and dS is kept.

Host-side launch code and the autograd wrapper live in `triton_launch.py`.
TRITON_INTERPRET is read by @triton.jit when this module is first imported.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRETED = bool(knobs.runtime.interpret)


@triton.jit
def _visible(qf, kf, qn, kn, chunk, window, sink,
             HAS_CHUNK: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINK: tl.constexpr,
             NOISY: tl.constexpr):
    """The rule of `AttentionLayout.frame_mask` on token ids: qf, qn [M, 1]; kf, kn [1, N]
    (or transposed). Empty cache slots and keys past the sequence end carry kf = -1 and are
    never visible (their chunk, computed by truncating division, does not matter)."""
    valid = kf >= 0
    if HAS_CHUNK:
        qc = qf // chunk
        kc = kf // chunk
        if NOISY:
            causal = tl.where(kn != 0, (qn != 0) & (kc == qc),
                              tl.where(qn != 0, kc < qc, kc <= qc))
        else:
            causal = kc <= qc
        vis = causal
        if HAS_WINDOW:
            vis = vis & (kf >= (qc + 1) * chunk - window)
        if HAS_SINK:
            in_sink = kf < sink
            if NOISY:
                in_sink = in_sink & (kn == 0)
            vis = vis | (in_sink & causal)
        vis = vis & valid
    else:
        vis = valid & (qf >= 0)
    return vis


@triton.jit
def _token_ids(FRAMES, NOISY_FLAGS, offs, in_range, tokens_per_frame, missing,
               NOISY: tl.constexpr):
    """(frame id, noisy flag) of tokens offs from the per-frame tables; `missing` past the end."""
    slot = offs // tokens_per_frame
    frame = tl.load(FRAMES + slot, mask=in_range, other=missing)
    noisy = frame
    if NOISY:
        noisy = tl.load(NOISY_FLAGS + slot, mask=in_range, other=0)
    return frame, noisy


@triton.jit
def _program(ORDER, DENSE: tl.constexpr):
    """(tile, b * H + h) of this program; axis 1 walks the tiles heaviest first."""
    pid_bh = tl.program_id(0)
    rank = tl.program_id(1)
    tile = rank
    if not DENSE:
        tile = tl.load(ORDER + rank)
    return tile, pid_bh


@triton.jit
def _runs(RUN_START, RUN_FULL, tile, length, BLOCK: tl.constexpr, DENSE: tl.constexpr):
    """(first run, first partial run, end run) of a tile; a DENSE layout has no table: its
    one full run is [0, length // BLOCK) and the cut-short last tile is masked by bounds."""
    if DENSE:
        first = 0
        partial = 1
        end = 1 + (length % BLOCK != 0).to(tl.int32)
    else:
        first = tl.load(RUN_START + tile)
        partial = first + tl.load(RUN_FULL + tile)
        end = tl.load(RUN_START + tile + 1)
    return first, partial, end


@triton.jit
def _run_bounds(RUNS, r, length, BLOCK: tl.constexpr, DENSE: tl.constexpr):
    """[lo, hi) tile indices of run r (DENSE: run 0 = the full tiles, run 1 = the last one)."""
    if DENSE:
        full = length // BLOCK
        lo = tl.where(r == 0, 0, full)
        hi = tl.where(r == 0, full, full + 1)
    else:
        lo = tl.load(RUNS + 2 * r)
        hi = tl.load(RUNS + 2 * r + 1)
    return lo, hi


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, qf, qn, n_start, K, V, KF, KN, stride_kl, stride_vl, Lk, S,
              qk_scale, chunk, window, sink,
              MASKED: tl.constexpr, DENSE: tl.constexpr, HAS_CHUNK: tl.constexpr,
              HAS_WINDOW: tl.constexpr, HAS_SINK: tl.constexpr, NOISY: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over key tokens [n_start, n_start + BLOCK_N). m_i is the
    running max of the scaled (base-2) scores."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        in_range = offs_n < Lk
        kt = tl.load(K + offs_n[None, :] * stride_kl + offs_d[:, None],
                     mask=in_range[None, :], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vl + offs_d[None, :],
                    mask=in_range[:, None], other=0.0)
    else:
        kt = tl.load(K + offs_n[None, :] * stride_kl + offs_d[:, None])
        v = tl.load(V + offs_n[:, None] * stride_vl + offs_d[None, :])
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kt, input_precision=PRECISION)
    if MASKED:
        if DENSE:
            vis = in_range[None, :]
        else:
            kf, kn = _token_ids(KF, KN, offs_n, in_range, S, -1, NOISY)
            vis = _visible(qf, kf[None, :], qn, kn[None, :], chunk, window, sink,
                           HAS_CHUNK, HAS_WINDOW, HAS_SINK, NOISY)
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    # A row with nothing visible so far keeps m = -inf; subtract 0 instead (no -inf - -inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])  # one FMA per score
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(V.dtype.element_ty)  # P @ V runs in the input dtype, like on a GPU
    if UPCAST:
        p = p.to(tl.float32)
    acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def attention_fwd(Q, K, V, O, LSE, QF, KF, QN, KN, ORDER, RUN_START, RUN_FULL, RUNS,
                  stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                  stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol,
                  H, Lq, Lk, S, qk_scale, chunk, window, sink,
                  DENSE: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_SINK: tl.constexpr, NOISY: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Program (b * H + h, rank): O [B, Lq, H, D] and LSE [B, H, Lq] (base 2)."""
    pid_m, pid_bh = _program(ORDER, DENSE)
    b = (pid_bh // H).to(tl.int64)  # batch offsets may pass 2**31 elements
    h = pid_bh % H
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_in = offs_m < Lq
    q = tl.load(Q + offs_m[:, None] * stride_ql + offs_d[None, :], mask=q_in[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qf = q_in[:, None]
    qn = qf
    if not DENSE:
        qf, qn = _token_ids(QF, QN, offs_m, q_in, S, 0, NOISY)
        qf = qf[:, None]
        qn = qn[:, None]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first, partial, end = _runs(RUN_START, RUN_FULL, pid_m, Lk, BLOCK_N, DENSE)
    for r in range(first, partial):
        lo, hi = _run_bounds(RUNS, r, Lk, BLOCK_N, DENSE)
        for n in range(lo, hi):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, qf, qn, n * BLOCK_N, K, V, KF, KN,
                                      stride_kl, stride_vl, Lk, S, qk_scale, chunk, window,
                                      sink, False, DENSE, HAS_CHUNK, HAS_WINDOW, HAS_SINK,
                                      NOISY, BLOCK_N, HEAD_DIM, UPCAST, PRECISION)
    for r in range(partial, end):
        lo, hi = _run_bounds(RUNS, r, Lk, BLOCK_N, DENSE)
        for n in range(lo, hi):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, qf, qn, n * BLOCK_N, K, V, KF, KN,
                                      stride_kl, stride_vl, Lk, S, qk_scale, chunk, window,
                                      sink, True, DENSE, HAS_CHUNK, HAS_WINDOW, HAS_SINK,
                                      NOISY, BLOCK_N, HEAD_DIM, UPCAST, PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=q_in[:, None])
    tl.store(LSE + pid_bh * Lq + offs_m, lse, mask=q_in)


@triton.jit
def attention_bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_ol,
                        stride_db, stride_dh, stride_dl, H, Lq,
                        BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Program (query tile, b * H + h): DELTA [B, H, Lq] = rowsum(dO * O) in fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # batch offsets may pass 2**31 elements
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_in = offs_m < Lq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
                mask=q_in[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dl
                 + offs_d[None, :], mask=q_in[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * Lq + offs_m, tl.sum(o * do, 1), mask=q_in)


@triton.jit
def _dkdv_tile(dk, dv, k, v, kf, kn, m_start, Q, DO, LSE, DELTA, QF, QN, DQ_ACC, stride_ql,
               stride_dol, stride_dql, Lq, S, qk_scale, chunk, window, sink,
               MASKED: tl.constexpr, DENSE: tl.constexpr, HAS_CHUNK: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_SINK: tl.constexpr, NOISY: tl.constexpr,
               BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr):
    """Accumulate dK, dV [BLOCK_N, D] of one key tile over query tokens [m_start, +BLOCK_M);
    FUSED_DQ: also add this tile's dS K to the fp32 dQ accumulator (atomically: other key
    tiles add to the same rows), sparing the dQ kernel's recomputation of S and dP.

    Works on transposed scores S^T [BLOCK_N, BLOCK_M] so no large tile is transposed."""
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_in = offs_m < Lq
    if MASKED:
        q = tl.load(Q + offs_m[:, None] * stride_ql + offs_d[None, :], mask=q_in[:, None],
                    other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dol + offs_d[None, :], mask=q_in[:, None],
                     other=0.0)
        # Rows past the end get LSE = +inf, hence P = 0: they add nothing.
        lse = tl.load(LSE + offs_m, mask=q_in, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=q_in, other=0.0)
    else:
        q = tl.load(Q + offs_m[:, None] * stride_ql + offs_d[None, :])
        do = tl.load(DO + offs_m[:, None] * stride_dol + offs_d[None, :])
        lse = tl.load(LSE + offs_m)
        delta = tl.load(DELTA + offs_m)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    st = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    if MASKED:
        if DENSE:
            vis = q_in[None, :]
        else:
            qf, qn = _token_ids(QF, QN, offs_m, q_in, S, 0, NOISY)
            vis = _visible(qf[None, :], kf, qn[None, :], kn, chunk, window, sink,
                           HAS_CHUNK, HAS_WINDOW, HAS_SINK, NOISY)
        st = tl.where(vis, st, float("-inf"))
    pt = tl.math.exp2(st * qk_scale - lse[None, :])
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dst = (pt * (dpt - delta[None, :])).to(Q.dtype.element_ty)
    pt = pt.to(DO.dtype.element_ty)
    if UPCAST:
        pt = pt.to(tl.float32)
        dst = dst.to(tl.float32)
    dv = tl.dot(pt, do, dv, input_precision=PRECISION)
    dk = tl.dot(dst, q, dk, input_precision=PRECISION)
    if FUSED_DQ:
        dq = tl.dot(tl.trans(dst), k, input_precision=PRECISION)
        tl.atomic_add(DQ_ACC + offs_m[:, None] * stride_dql + offs_d[None, :], dq,
                      mask=q_in[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def attention_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, QF, KF, QN, KN,
                       ORDER, RUN_START, RUN_FULL, RUNS,
                       stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                       stride_vb, stride_vh, stride_vl, stride_dob, stride_doh, stride_dol,
                       stride_dkb, stride_dkh, stride_dkl, stride_dqb, stride_dqh, stride_dql,
                       H, Lq, Lk, S, sm_scale, qk_scale, chunk, window, sink,
                       DENSE: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_SINK: tl.constexpr, NOISY: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr):
    """Program (b * H + h, rank): dK, dV [B, Lk, H, D] of one key tile (strides stride_dk*,
    shared); FUSED_DQ: dQ / scale summed into DQ_ACC [B, Lq, H, D] fp32 (strides stride_dq*)."""
    pid_n, pid_bh = _program(ORDER, DENSE)
    b = (pid_bh // H).to(tl.int64)  # batch offsets may pass 2**31 elements
    h = pid_bh % H
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    LSE += pid_bh * Lq
    DELTA += pid_bh * Lq
    if FUSED_DQ:
        DQ_ACC += b * stride_dqb + h * stride_dqh
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_in = offs_n < Lk
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :],
                mask=k_in[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :],
                mask=k_in[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kf = k_in[:, None]
    kn = kf
    if not DENSE:
        kf, kn = _token_ids(KF, KN, offs_n, k_in, S, -1, NOISY)
        kf = kf[:, None]
        kn = kn[:, None]

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    first, partial, end = _runs(RUN_START, RUN_FULL, pid_n, Lq, BLOCK_M, DENSE)
    for r in range(first, partial):
        lo, hi = _run_bounds(RUNS, r, Lq, BLOCK_M, DENSE)
        for m in range(lo, hi):
            dk, dv = _dkdv_tile(dk, dv, k, v, kf, kn, m * BLOCK_M, Q, DO, LSE, DELTA, QF, QN,
                                DQ_ACC, stride_ql, stride_dol, stride_dql, Lq, S, qk_scale,
                                chunk, window, sink, False, DENSE, HAS_CHUNK, HAS_WINDOW,
                                HAS_SINK, NOISY, BLOCK_M, HEAD_DIM, UPCAST, PRECISION, FUSED_DQ)
    for r in range(partial, end):
        lo, hi = _run_bounds(RUNS, r, Lq, BLOCK_M, DENSE)
        for m in range(lo, hi):
            dk, dv = _dkdv_tile(dk, dv, k, v, kf, kn, m * BLOCK_M, Q, DO, LSE, DELTA, QF, QN,
                                DQ_ACC, stride_ql, stride_dol, stride_dql, Lq, S, qk_scale,
                                chunk, window, sink, True, DENSE, HAS_CHUNK, HAS_WINDOW,
                                HAS_SINK, NOISY, BLOCK_M, HEAD_DIM, UPCAST, PRECISION, FUSED_DQ)

    out = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkl + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=k_in[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=k_in[:, None])


@triton.jit
def _dq_tile(dq, q, do, lse, delta, qf, qn, n_start, K, V, KF, KN, stride_kl, stride_vl, Lk, S,
             qk_scale, chunk, window, sink,
             MASKED: tl.constexpr, DENSE: tl.constexpr, HAS_CHUNK: tl.constexpr,
             HAS_WINDOW: tl.constexpr, HAS_SINK: tl.constexpr, NOISY: tl.constexpr,
             BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dQ [BLOCK_M, D] of one query tile over key tokens [n_start, +BLOCK_N)."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        in_range = offs_n < Lk
        kt = tl.load(K + offs_n[None, :] * stride_kl + offs_d[:, None], mask=in_range[None, :],
                     other=0.0)
        vt = tl.load(V + offs_n[None, :] * stride_vl + offs_d[:, None], mask=in_range[None, :],
                     other=0.0)
    else:
        kt = tl.load(K + offs_n[None, :] * stride_kl + offs_d[:, None])
        vt = tl.load(V + offs_n[None, :] * stride_vl + offs_d[:, None])
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=PRECISION)
    if MASKED:
        if DENSE:
            vis = in_range[None, :]
        else:
            kf, kn = _token_ids(KF, KN, offs_n, in_range, S, -1, NOISY)
            vis = _visible(qf, kf[None, :], qn, kn[None, :], chunk, window, sink,
                           HAS_CHUNK, HAS_WINDOW, HAS_SINK, NOISY)
        s = tl.where(vis, s, float("-inf"))
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    dp = tl.dot(do, vt, input_precision=PRECISION)
    ds = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
    if UPCAST:
        ds = ds.to(tl.float32)
    return tl.dot(ds, tl.trans(kt), dq, input_precision=PRECISION)


@triton.jit
def attention_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, QF, KF, QN, KN,
                     ORDER, RUN_START, RUN_FULL, RUNS,
                     stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                     stride_vb, stride_vh, stride_vl, stride_dob, stride_doh, stride_dol,
                     stride_dqb, stride_dqh, stride_dql,
                     H, Lq, Lk, S, sm_scale, qk_scale, chunk, window, sink,
                     DENSE: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_SINK: tl.constexpr, NOISY: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Program (b * H + h, rank): dQ [B, Lq, H, D] of one query tile (strides stride_dq*)."""
    pid_m, pid_bh = _program(ORDER, DENSE)
    b = (pid_bh // H).to(tl.int64)  # batch offsets may pass 2**31 elements
    h = pid_bh % H
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_in = offs_m < Lq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=q_in[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol
                 + offs_d[None, :], mask=q_in[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh * Lq + offs_m, mask=q_in, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * Lq + offs_m, mask=q_in, other=0.0)
    qf = q_in[:, None]
    qn = qf
    if not DENSE:
        qf, qn = _token_ids(QF, QN, offs_m, q_in, S, 0, NOISY)
        qf = qf[:, None]
        qn = qn[:, None]

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first, partial, end = _runs(RUN_START, RUN_FULL, pid_m, Lk, BLOCK_N, DENSE)
    for r in range(first, partial):
        lo, hi = _run_bounds(RUNS, r, Lk, BLOCK_N, DENSE)
        for n in range(lo, hi):
            dq = _dq_tile(dq, q, do, lse, delta, qf, qn, n * BLOCK_N, K, V, KF, KN, stride_kl,
                          stride_vl, Lk, S, qk_scale, chunk, window, sink,
                          False, DENSE, HAS_CHUNK, HAS_WINDOW, HAS_SINK, NOISY,
                          BLOCK_N, HEAD_DIM, UPCAST, PRECISION)
    for r in range(partial, end):
        lo, hi = _run_bounds(RUNS, r, Lk, BLOCK_N, DENSE)
        for n in range(lo, hi):
            dq = _dq_tile(dq, q, do, lse, delta, qf, qn, n * BLOCK_N, K, V, KF, KN, stride_kl,
                          stride_vl, Lk, S, qk_scale, chunk, window, sink,
                          True, DENSE, HAS_CHUNK, HAS_WINDOW, HAS_SINK, NOISY,
                          BLOCK_N, HEAD_DIM, UPCAST, PRECISION)
    dq_rows = b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dql + offs_d[None, :]
    tl.store(DQ + dq_rows, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_in[:, None])
