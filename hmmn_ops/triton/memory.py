"""memory_read (the STCN / XMem / Cutie / DEVA / AOT read, docs/internals.md) in Triton.

Layouts (views of the inputs, any strides): queries Q and selection e (B, Ck, Nq), memory keys
K (B, Ck, Nm), values V (B, Cv, Nm), shrinkage w (B, Nm). Scores, in the accumulation dtype:

    dot: s = scale * <K_p, Q_q>
    l2:  s = -scale * w_p * d2,   d2 = sum_c e (K - Q)^2 = sum_c e K^2 - 2 <K, e Q> + sum_c e Q^2

so every score block is one or two tl.dot block products (``_scores``), in either orientation
(query rows x memory columns, or memory rows x query columns).

Kernels:
  _fwd       full softmax (topk = 0): one program = (query block, value tile, memory split,
             batch), online softmax over its memory range (read.py's ``_combine`` merges splits).
  _topk      streaming top-k over all Nm positions with the packed rank keys of _common (ties to
             the smaller index), one [BLOCK_Q, KP] block at a time.
  _fwd_topk  the top-k read: per query, gathers only its k selected keys and values (one selected
             position per step, online softmax over the k steps).
  _usage     usage[p] = sum_q P[p, q] of the full read (P recomputed from lse).
  _bwd_kv    full backward, one program = (memory block, value tile, batch): dV, and the tile's
             share of dK and dw (dS is linear in dP); partials summed on the host.
  _bwd_q     full backward, one program = (query block, memory split, batch): dQ and de.
  _bwd_topk  top-k backward, one program = query block: dQ, de in registers; dK, dV, dw
             scattered with atomics into float buffers.
"""
import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    acc_dtype,
    check_supported,
    config,
    device_guard,
    dot,
    dot_precision,
    memory_splits,
    pow2,
    rank_index,
    rank_key,
    scale_tensor,
    tl_acc,
    topk_merge,
    tuning,
)
from .read import _combine

MAX_BLOCK_CV = 16 if INTERPRET else 128
BLOCK_Q = 16 if INTERPRET else 64
# top-k kernels: the [BLOCK_Q, KP] sort (selection) and the per-query gathers (read) dominate.
TOPK_BLOCK_Q = 16
TOPK_MAX = 1024  # KP above this would not fit a program's registers on a GPU

_KEY = ["BLOCK_CK", "BLOCK_CV", "L2", "HAS_W", "HAS_E"]
_FWD_TUNING = tuning(
    [config(BLOCK_P=p, num_warps=w, num_stages=s) for p, w, s in ((32, 4, 2), (64, 4, 2), (64, 8, 3), (128, 8, 2))],
    config(BLOCK_P=16),
    full=[config(BLOCK_P=p, num_warps=w, num_stages=2) for p, w in ((32, 4), (32, 8), (64, 8))],
)
_KV_TUNING = tuning(
    [config(BLOCK_P=p, BLOCK_Q=q, num_warps=w, num_stages=2) for p, q, w in ((32, 32, 4), (64, 32, 8), (32, 64, 8))],
    config(BLOCK_P=16, BLOCK_Q=16),
    full=[config(BLOCK_P=32, BLOCK_Q=32, num_warps=w, num_stages=2) for w in (4, 8)],
)
_Q_TUNING = tuning(
    [config(BLOCK_P=p, BLOCK_CV=64, num_warps=w, num_stages=2) for p, w in ((32, 4), (64, 8))],
    config(BLOCK_P=16, BLOCK_CV=16),
    full=[config(BLOCK_P=32, BLOCK_CV=32, num_warps=w, num_stages=2) for w in (4, 8)],
)


# ---------------------------------------------------------------- @triton.jit helpers


@triton.jit
def _tile(ptr, rows, row_mask, row_stride, cols, col_mask, col_stride):
    """[rows, cols] tile of a strided matrix, 0 outside the masks."""
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _scores(a, b, e, w, scale, L2: tl.constexpr, HAS_E: tl.constexpr, HAS_W: tl.constexpr,
            QUERY_ROWS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """(s, d2) of a [R, CK] x [CK, C] block. QUERY_ROWS: ``a`` = queries [R, CK] and ``e`` is
    shaped like it, ``b`` = memory keys [CK, C], ``w`` per column; else ``a`` = memory keys,
    ``b`` = queries and ``e`` [CK, C], ``w`` per row. d2 (l2 only; 0 for dot) is sum_c e (K - Q)^2
    as block products; padded channels are 0 in both operands, so they add nothing."""
    if L2:
        if QUERY_ROWS:
            ae = a * e if HAS_E else a
            qq = tl.sum(ae.to(ACC) * a.to(ACC), axis=1)[:, None]
            kk = dot(e, b * b, ACC, PRECISION) if HAS_E else tl.sum(b.to(ACC) * b.to(ACC), axis=0)[None, :]
            d2 = kk + qq - 2.0 * dot(ae, b, ACC, PRECISION)
        else:
            be = b * e if HAS_E else b
            qq = tl.sum(be.to(ACC) * b.to(ACC), axis=0)[None, :]
            kk = dot(a * a, e, ACC, PRECISION) if HAS_E else tl.sum(a.to(ACC) * a.to(ACC), axis=1)[:, None]
            d2 = kk + qq - 2.0 * dot(a, be, ACC, PRECISION)
        s = -scale * d2
        if HAS_W:
            s = s * (w[None, :] if QUERY_ROWS else w[:, None])
    else:
        d2 = tl.zeros([a.shape[0], b.shape[1]], ACC)
        s = dot(a, b, ACC, PRECISION) * scale
    return s, d2


# ---------------------------------------------------------------- forward


@triton.autotune(**_FWD_TUNING, key=_KEY)
@triton.jit
def _fwd(q_ptr, e_ptr, k_ptr, v_ptr, w_ptr, scale_ptr, o_ptr, lse_ptr,
         sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sv_b, sv_c, sv_m, sw_b, sw_m,
         so_b, so_s, so_c, so_n, sl_b, sl_s, sl_n,
         N, M, Ck, Cv, split_len,
         L2: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
         BLOCK_Q: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr, BLOCK_P: tl.constexpr):
    n_qb = tl.cdiv(N, BLOCK_Q)
    qb = tl.program_id(0) % n_qb
    vb = tl.program_id(0) // n_qb
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    scale = tl.load(scale_ptr)
    q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < N
    ck = tl.arange(0, BLOCK_CK)
    ck_mask = ck < Ck
    cv = vb * BLOCK_CV + tl.arange(0, BLOCK_CV)
    cv_mask = cv < Cv
    qt = _tile(q_ptr + b * sq_b, q, q_mask, sq_n, ck, ck_mask, sq_c)                         # [BQ, CK]
    et = qt
    if HAS_E:
        et = _tile(e_ptr + b * se_b, q, q_mask, se_n, ck, ck_mask, se_c)

    m_i = tl.full([BLOCK_Q], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_Q], ACC)
    acc = tl.zeros([BLOCK_Q, BLOCK_CV], ACC)
    start = split * split_len
    end = tl.minimum(start + split_len, M)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < end
        kt = _tile(k_ptr + b * sk_b, ck, ck_mask, sk_c, p, p_mask, sk_m)                     # [CK, BP]
        w = tl.load(w_ptr + b * sw_b + p * sw_m, mask=p_mask, other=1.0).to(ACC) if HAS_W else scale
        s, _ = _scores(qt, kt, et, w, scale, L2, HAS_E, HAS_W, True, ACC, PRECISION)
        s = tl.where(p_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        vt = _tile(v_ptr + b * sv_b, p, p_mask, sv_m, cv, cv_mask, sv_c)                     # [BP, BCV]
        acc = acc * alpha[:, None] + dot(pr, vt, ACC, PRECISION)
        m_i = m_new

    tl.store(o_ptr + b * so_b + split * so_s + cv[None, :] * so_c + q[:, None] * so_n,
             (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=q_mask[:, None] & cv_mask[None, :])
    tl.store(lse_ptr + b * sl_b + split * sl_s + q * sl_n, m_i + tl.log(l_i),
             mask=q < tl.where(vb == 0, N, 0))  # one value tile writes lse


@triton.jit
def _topk(q_ptr, e_ptr, k_ptr, w_ptr, scale_ptr, idx_ptr,
          sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sw_b, sw_m, si_b, si_n,
          N, M, Ck, topk,
          L2: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
          IDX_BITS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_CK: tl.constexpr, KP: tl.constexpr):
    """Running top-KP of each query over all memory positions, in blocks of KP (topk_merge)."""
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < N
    b = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr)
    ck = tl.arange(0, BLOCK_CK)
    ck_mask = ck < Ck
    qt = _tile(q_ptr + b * sq_b, q, q_mask, sq_n, ck, ck_mask, sq_c)
    et = qt
    if HAS_E:
        et = _tile(e_ptr + b * se_b, q, q_mask, se_n, ck, ck_mask, se_c)
    lowest = tl.full([BLOCK_Q, KP], -9223372036854775808, tl.int64)
    best = lowest
    j = tl.arange(0, KP)
    for p0 in range(0, M, KP):
        p = p0 + j
        p_mask = p < M
        kt = _tile(k_ptr + b * sk_b, ck, ck_mask, sk_c, p, p_mask, sk_m)
        w = tl.load(w_ptr + b * sw_b + p * sw_m, mask=p_mask, other=1.0).to(ACC) if HAS_W else scale
        s, _ = _scores(qt, kt, et, w, scale, L2, HAS_E, HAS_W, True, ACC, PRECISION)
        best = topk_merge(best, tl.where(p_mask[None, :], rank_key(s, p[None, :], IDX_BITS), lowest))
    tl.store(idx_ptr + b * si_b + q[:, None] * si_n + j[None, :], rank_index(best, IDX_BITS),
             mask=q_mask[:, None] & (j[None, :] < topk))


@triton.jit
def _gathered(q_ptr, e_ptr, k_ptr, w_ptr, idx_ptr, b, q, q_mask, j, ck, ck_mask, scale,
              sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sw_b, sw_m, si_b, si_n,
              L2: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr, ACC: tl.constexpr):
    """Selected position ``j`` of each query of the block: (index, K rows [BQ, CK], Q, e, w, d2, s).
    The per-query pairs are gathered, so the scores are direct sums (no block product)."""
    pos = tl.load(idx_ptr + b * si_b + q * si_n + j, mask=q_mask, other=0)
    qt = _tile(q_ptr + b * sq_b, q, q_mask, sq_n, ck, ck_mask, sq_c).to(ACC)
    kt = _tile(k_ptr + b * sk_b, pos, q_mask, sk_m, ck, ck_mask, sk_c).to(ACC)
    et = tl.full([1, 1], 1.0, ACC)
    if HAS_E:
        et = _tile(e_ptr + b * se_b, q, q_mask, se_n, ck, ck_mask, se_c).to(ACC)
    w = tl.full([1], 1.0, ACC)
    if HAS_W:
        w = tl.load(w_ptr + b * sw_b + pos * sw_m, mask=q_mask, other=1.0).to(ACC)
    if L2:
        diff = kt - qt
        d2 = tl.sum(et * diff * diff, axis=1)
        s = -scale * w * d2
    else:
        d2 = tl.zeros([q.shape[0]], ACC)
        s = tl.sum(qt * kt, axis=1) * scale
    return pos, kt, qt, et, w, d2, s


@triton.jit
def _fwd_topk(q_ptr, e_ptr, k_ptr, v_ptr, w_ptr, scale_ptr, idx_ptr, o_ptr, lse_ptr, s_ptr,
              sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sv_b, sv_c, sv_m, sw_b, sw_m, si_b, si_n,
              N, Ck, Cv, topk,
              L2: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr, ACC: tl.constexpr,
              SAVE_S: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr):
    """Online softmax over each query's k selected positions; only those k values are read.
    SAVE_S keeps the scores (B, N, topk) for the usage."""
    n_qb = tl.cdiv(N, BLOCK_Q)
    qb = tl.program_id(0) % n_qb
    vb = tl.program_id(0) // n_qb
    b = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr)
    q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < N
    ck = tl.arange(0, BLOCK_CK)
    ck_mask = ck < Ck
    cv = vb * BLOCK_CV + tl.arange(0, BLOCK_CV)
    cv_mask = cv < Cv
    m_i = tl.full([BLOCK_Q], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_Q], ACC)
    acc = tl.zeros([BLOCK_Q, BLOCK_CV], ACC)
    for j in range(topk):
        pos, _, _, _, _, _, s = _gathered(q_ptr, e_ptr, k_ptr, w_ptr, idx_ptr, b, q, q_mask, j, ck, ck_mask, scale,
                                          sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sw_b, sw_m, si_b,
                                          si_n, L2, HAS_W, HAS_E, ACC)
        if SAVE_S:
            tl.store(s_ptr + b * N * topk + q * topk + j, s, mask=q < tl.where(vb == 0, N, 0))
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(s - m_new)
        l_i = l_i * alpha + pr
        vt = _tile(v_ptr + b * sv_b, pos, q_mask, sv_m, cv, cv_mask, sv_c).to(ACC)             # [BQ, BCV]
        acc = acc * alpha[:, None] + pr[:, None] * vt
        m_i = m_new
    tl.store(o_ptr + b * Cv * N + cv[None, :] * N + q[:, None], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
             mask=q_mask[:, None] & cv_mask[None, :])
    tl.store(lse_ptr + b * N + q, m_i + tl.log(l_i), mask=q < tl.where(vb == 0, N, 0))


@triton.autotune(**_KV_TUNING, key=_KEY + ["USAGE_ONLY"])
@triton.jit
def _bwd_kv(q_ptr, e_ptr, k_ptr, v_ptr, w_ptr, scale_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dw_ptr,
            sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sv_b, sv_c, sv_m, sw_b, sw_m,
            sdo_b, sdo_c, sdo_n, sdk_b, sdk_s, sdk_c, sdk_m, sdv_b, sdv_c, sdv_m, sdw_b, sdw_s,
            N, M, Ck, Cv,
            L2: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
            USAGE_ONLY: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Memory-side backward; with USAGE_ONLY, usage[p] = sum_q P (written to dw_ptr) and nothing else."""
    n_pb = tl.cdiv(M, BLOCK_P)
    pb = tl.program_id(0) % n_pb
    vb = tl.program_id(0) // n_pb
    b = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < M
    ck = tl.arange(0, BLOCK_CK)
    ck_mask = ck < Ck
    cv = vb * BLOCK_CV + tl.arange(0, BLOCK_CV)
    cv_mask = cv < Cv
    kt = _tile(k_ptr + b * sk_b, p, p_mask, sk_m, ck, ck_mask, sk_c)                         # [BP, CK]
    w = tl.load(w_ptr + b * sw_b + p * sw_m, mask=p_mask, other=1.0).to(ACC) if HAS_W else scale
    # dS = P * (dP - D) is linear in dP = sum over value tiles: tile 0 alone counts the -D term.
    d_weight = (vb == 0).to(ACC)
    dv = tl.zeros([BLOCK_P, BLOCK_CV], ACC)
    g0 = tl.zeros([BLOCK_P, BLOCK_CK], ACC)  # dot: sum_q dS Q;  l2: sum_q dS e Q
    g1 = tl.zeros([BLOCK_P, BLOCK_CK], ACC)  # l2: sum_q dS e  (rows all equal without e)
    dw = tl.zeros([BLOCK_P], ACC)            # l2 with w: sum_q dS d2;  USAGE_ONLY: sum_q P
    for q0 in range(0, N, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        q_mask = q < N
        qt = _tile(q_ptr + b * sq_b, ck, ck_mask, sq_c, q, q_mask, sq_n)                     # [CK, BQ]
        et = qt
        if HAS_E:
            et = _tile(e_ptr + b * se_b, ck, ck_mask, se_c, q, q_mask, se_n)
        s, d2 = _scores(kt, qt, et, w, scale, L2, HAS_E, HAS_W, False, ACC, PRECISION)
        lse = tl.load(lse_ptr + b * N + q, mask=q_mask, other=0.0)
        pr = tl.exp(tl.where(p_mask[:, None] & q_mask[None, :], s - lse[None, :], float("-inf")))
        if USAGE_ONLY:
            dw += tl.sum(pr, axis=1)
        else:
            do = _tile(do_ptr + b * sdo_b, q, q_mask, sdo_n, cv, cv_mask, sdo_c)              # [BQ, BCV]
            vt = _tile(v_ptr + b * sv_b, p, p_mask, sv_m, cv, cv_mask, sv_c)                  # [BP, BCV]
            dv += dot(pr, do, ACC, PRECISION)
            dp = dot(vt, tl.trans(do), ACC, PRECISION)                                       # [BP, BQ]
            delta = tl.load(delta_ptr + b * N + q, mask=q_mask, other=0.0) * d_weight
            ds = pr * (dp - delta[None, :])
            if L2:
                eq = qt * et if HAS_E else qt
                g0 += dot(ds, tl.trans(eq), ACC, PRECISION)
                if HAS_E:
                    g1 += dot(ds, tl.trans(et), ACC, PRECISION)
                else:
                    g1 += tl.sum(ds, axis=1)[:, None]
                if HAS_W:
                    dw += tl.sum(ds * d2, axis=1)
            else:
                g0 += dot(ds, tl.trans(qt), ACC, PRECISION)
    if USAGE_ONLY:
        tl.store(dw_ptr + b * sdw_b + p, dw, mask=p < tl.where(vb == 0, M, 0))
    else:
        tl.store(dv_ptr + b * sdv_b + cv[None, :] * sdv_c + p[:, None] * sdv_m, dv.to(dv_ptr.dtype.element_ty),
                 mask=p_mask[:, None] & cv_mask[None, :])
        if L2:
            dk = -2.0 * scale * w[:, None] * (kt.to(ACC) * g1 - g0) if HAS_W else -2.0 * scale * (kt.to(ACC) * g1 - g0)
            if HAS_W:
                tl.store(dw_ptr + b * sdw_b + vb * sdw_s + p, -scale * dw, mask=p_mask)
        else:
            dk = g0 * scale
        tl.store(dk_ptr + b * sdk_b + vb * sdk_s + ck[None, :] * sdk_c + p[:, None] * sdk_m,
                 dk.to(dk_ptr.dtype.element_ty), mask=p_mask[:, None] & ck_mask[None, :])


@triton.autotune(**_Q_TUNING, key=["BLOCK_CK", "Cv", "L2", "HAS_W", "HAS_E"])
@triton.jit
def _bwd_q(q_ptr, e_ptr, k_ptr, v_ptr, w_ptr, scale_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, de_ptr,
           sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sv_b, sv_c, sv_m, sw_b, sw_m,
           sdo_b, sdo_c, sdo_n, sdq_b, sdq_s, sdq_c, sdq_n,
           N, M, Ck, Cv, split_len,
           L2: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
           BLOCK_Q: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr, BLOCK_P: tl.constexpr):
    """dQ (and de) of one query block over one memory split; ``de_ptr`` has dq's strides."""
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < N
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    scale = tl.load(scale_ptr)
    ck = tl.arange(0, BLOCK_CK)
    ck_mask = ck < Ck
    qt = _tile(q_ptr + b * sq_b, q, q_mask, sq_n, ck, ck_mask, sq_c)                         # [BQ, CK]
    et = qt
    if HAS_E:
        et = _tile(e_ptr + b * se_b, q, q_mask, se_n, ck, ck_mask, se_c)
    lse = tl.load(lse_ptr + b * N + q, mask=q_mask, other=0.0)
    delta = tl.load(delta_ptr + b * N + q, mask=q_mask, other=0.0)
    h1 = tl.zeros([BLOCK_Q, BLOCK_CK], ACC)  # dot: sum_p dS K;  l2: sum_p dS u K
    h2 = tl.zeros([BLOCK_Q, BLOCK_CK], ACC)  # l2 with e: sum_p dS u K^2
    h0 = tl.zeros([BLOCK_Q], ACC)            # l2: sum_p dS u
    start = split * split_len
    end = tl.minimum(start + split_len, M)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < end
        kt = _tile(k_ptr + b * sk_b, ck, ck_mask, sk_c, p, p_mask, sk_m)                     # [CK, BP]
        w = tl.load(w_ptr + b * sw_b + p * sw_m, mask=p_mask, other=1.0).to(ACC) if HAS_W else scale
        s, _ = _scores(qt, kt, et, w, scale, L2, HAS_E, HAS_W, True, ACC, PRECISION)
        pr = tl.exp(tl.where(q_mask[:, None] & p_mask[None, :], s - lse[:, None], float("-inf")))
        dp = tl.zeros([BLOCK_Q, BLOCK_P], ACC)
        for c0 in range(0, Cv, BLOCK_CV):
            cv = c0 + tl.arange(0, BLOCK_CV)
            cv_mask = cv < Cv
            do = _tile(do_ptr + b * sdo_b, q, q_mask, sdo_n, cv, cv_mask, sdo_c)              # [BQ, BCV]
            vt = _tile(v_ptr + b * sv_b, cv, cv_mask, sv_c, p, p_mask, sv_m)                  # [BCV, BP]
            dp += dot(do, vt, ACC, PRECISION)
        ds = pr * (dp - delta[:, None])
        if L2:
            if HAS_W:
                ds = ds * w[None, :]
            h1 += dot(ds, tl.trans(kt), ACC, PRECISION)
            h0 += tl.sum(ds, axis=1)
            if HAS_E:
                h2 += dot(ds, tl.trans(kt * kt), ACC, PRECISION)
        else:
            h1 += dot(ds, tl.trans(kt), ACC, PRECISION)
    out = b * sdq_b + split * sdq_s + ck[None, :] * sdq_c + q[:, None] * sdq_n
    mask = q_mask[:, None] & ck_mask[None, :]
    if L2:
        # u = scale * w: dQ = 2 e (sum dS u K - Q sum dS u); de = -sum dS u (K - Q)^2
        qa = qt.to(ACC)
        ea = et.to(ACC) if HAS_E else 1.0
        tl.store(dq_ptr + out, (2.0 * scale * ea * (h1 - qa * h0[:, None])).to(dq_ptr.dtype.element_ty), mask=mask)
        if HAS_E:
            de = -scale * (h2 - 2.0 * qa * h1 + qa * qa * h0[:, None])
            tl.store(de_ptr + out, de.to(de_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dq_ptr + out, (h1 * scale).to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_topk(q_ptr, e_ptr, k_ptr, v_ptr, w_ptr, scale_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr,
              dq_ptr, de_ptr, dk_ptr, dv_ptr, dw_ptr,
              sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sv_b, sv_c, sv_m, sw_b, sw_m, si_b, si_n,
              sdo_b, sdo_c, sdo_n,
              N, M, Ck, Cv, topk,
              L2: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr, ACC: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr):
    """dQ, de (B, Ck, N) written; dK (B, Ck, M), dV (B, Cv, M), dw (B, M): contiguous float buffers
    filled by atomics (a position selected by many queries adds once per query)."""
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < N
    b = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr)
    ck = tl.arange(0, BLOCK_CK)
    ck_mask = ck < Ck
    kmask = q_mask[:, None] & ck_mask[None, :]
    lse = tl.load(lse_ptr + b * N + q, mask=q_mask, other=0.0)
    delta = tl.load(delta_ptr + b * N + q, mask=q_mask, other=0.0)
    dq = tl.zeros([BLOCK_Q, BLOCK_CK], ACC)
    de = tl.zeros([BLOCK_Q, BLOCK_CK], ACC)
    for j in range(topk):
        pos, kt, qt, et, w, d2, s = _gathered(q_ptr, e_ptr, k_ptr, w_ptr, idx_ptr, b, q, q_mask, j, ck, ck_mask,
                                              scale, sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sw_b, sw_m,
                                              si_b, si_n, L2, HAS_W, HAS_E, ACC)
        pr = tl.where(q_mask, tl.exp(s - lse), 0.0)
        dp = tl.zeros([BLOCK_Q], ACC)
        for c0 in range(0, Cv, BLOCK_CV):
            cv = c0 + tl.arange(0, BLOCK_CV)
            vmask = q_mask[:, None] & (cv < Cv)[None, :]
            do = _tile(do_ptr + b * sdo_b, q, q_mask, sdo_n, cv, cv < Cv, sdo_c).to(ACC)       # [BQ, BCV]
            vt = _tile(v_ptr + b * sv_b, pos, q_mask, sv_m, cv, cv < Cv, sv_c).to(ACC)
            dp += tl.sum(do * vt, axis=1)
            tl.atomic_add(dv_ptr + b * Cv * M + cv[None, :] * M + pos[:, None], pr[:, None] * do, mask=vmask)
        ds = pr * (dp - delta)
        if L2:
            u = scale * w
            diff = kt - qt
            g = (ds * u)[:, None] * et * diff                                                 # dS u e (K - Q)
            dq += 2.0 * g
            tl.atomic_add(dk_ptr + b * Ck * M + ck[None, :] * M + pos[:, None], -2.0 * g, mask=kmask)
            if HAS_W:
                tl.atomic_add(dw_ptr + b * M + pos, -scale * ds * d2, mask=q_mask)
            if HAS_E:
                de -= (ds * u)[:, None] * diff * diff
        else:
            dq += (ds * scale)[:, None] * kt
            tl.atomic_add(dk_ptr + b * Ck * M + ck[None, :] * M + pos[:, None], (ds * scale)[:, None] * qt, mask=kmask)
    out = b * Ck * N + ck[None, :] * N + q[:, None]
    tl.store(dq_ptr + out, dq.to(dq_ptr.dtype.element_ty), mask=kmask)
    if HAS_E:
        tl.store(de_ptr + out, de.to(de_ptr.dtype.element_ty), mask=kmask)


# ---------------------------------------------------------------- host side


class _Args:
    """Views, strides and launch constants shared by every kernel of one call."""

    def __init__(self, query_key, memory_key, memory_value, memory_shrinkage, query_selection, similarity, scale):
        self.B, self.Ck, self.N = query_key.shape
        self.Cv, self.M = memory_value.shape[1], memory_value.shape[2]
        self.dtype, self.device = query_key.dtype, query_key.device
        self.acc = acc_dtype(self.dtype)
        self.has_w, self.has_e = memory_shrinkage is not None, query_selection is not None
        # Placeholders for absent terms are never read.
        w = memory_shrinkage if self.has_w else torch.empty(1, 1, dtype=self.dtype, device=self.device)
        e = query_selection if self.has_e else query_key
        self.scale = scale_tensor(scale, self.acc, self.device)
        self.tensors = (query_key, e, memory_key, memory_value, w, self.scale)
        self.strides = (*query_key.stride(), *e.stride(), *memory_key.stride(), *memory_value.stride(), *w.stride())
        self.meta = dict(L2=similarity == "l2", HAS_W=self.has_w, HAS_E=self.has_e, ACC=tl_acc(self.dtype),
                         PRECISION=dot_precision(self.dtype), BLOCK_CK=pow2(self.Ck))
        # float32 tiles take twice the registers: half the value channels per program.
        self.block_cv = min(pow2(self.Cv), MAX_BLOCK_CV if self.dtype.itemsize <= 2 or INTERPRET else MAX_BLOCK_CV // 2)
        self.n_cv = triton.cdiv(self.Cv, self.block_cv)

    def select(self, *names):
        return {key: self.meta[key] for key in names}


def _check_topk(topk):
    if topk > TOPK_MAX and not INTERPRET:
        raise RuntimeError(f"hmmn_ops.triton.memory_read: topk={topk} is above the Triton kernels' limit of "
                           f"{TOPK_MAX}; use topk=0 (the full read) or another backend")


def memory_read(query_key, memory_key, memory_value, memory_shrinkage, query_selection, similarity, scale, topk,
                return_usage):
    check_supported(query_key, "memory_read")
    a = _Args(query_key, memory_key, memory_value, memory_shrinkage, query_selection, similarity, scale)
    B, Ck, N, Cv, M, dev = a.B, a.Ck, a.N, a.Cv, a.M, a.device
    out = torch.empty(B, Cv, N, dtype=a.dtype, device=dev)
    lse = torch.empty(B, N, dtype=a.acc, device=dev)
    indices = torch.empty(B, N, topk, dtype=torch.int64, device=dev)
    usage = torch.zeros(B, M if return_usage else 0, dtype=a.acc, device=dev)
    if B == 0 or N == 0:
        return out, lse, indices, usage
    q, e, k, v, w, scale_t = a.tensors
    sq, se, sk, sv, sw = a.strides[0:3], a.strides[3:6], a.strides[6:9], a.strides[9:12], a.strides[12:14]
    with device_guard(query_key):
        if topk == 0:
            _full_forward(a, out, lse)
            if return_usage:
                _bwd_kv[lambda meta: (triton.cdiv(M, meta["BLOCK_P"]), B)](
                    *a.tensors, out, lse, lse, out, out, usage, *a.strides, *((0,) * 10), usage.stride(0), 0,
                    N, M, Ck, Cv, USAGE_ONLY=True, BLOCK_CV=a.block_cv, **a.meta)
            return out, lse, indices, usage
        _check_topk(topk)
        # float32 keys keep every bit; float64 keys give up as few mantissa bits as the indices need.
        idx_bits = max(1, (M - 1).bit_length()) if a.dtype == torch.float64 else 32
        _topk[(triton.cdiv(N, TOPK_BLOCK_Q), B)](
            q, e, k, w, scale_t, indices, *sq, *se, *sk, *sw, indices.stride(0), indices.stride(1),
            N, M, Ck, topk, IDX_BITS=idx_bits, BLOCK_Q=TOPK_BLOCK_Q, KP=pow2(topk), **a.meta)
        scores = torch.empty(B, N, topk, dtype=a.acc, device=dev) if return_usage else lse  # lse: never written
        _fwd_topk[(triton.cdiv(N, TOPK_BLOCK_Q) * a.n_cv, B)](
            q, e, k, v, w, scale_t, indices, out, lse, scores, *a.strides, indices.stride(0), indices.stride(1),
            N, Ck, Cv, topk, SAVE_S=return_usage, BLOCK_Q=TOPK_BLOCK_Q, BLOCK_CV=a.block_cv,
            **a.select("L2", "HAS_W", "HAS_E", "ACC", "BLOCK_CK"))
    if return_usage:  # P of the selected pairs, scattered: O(B * N * topk) extra
        usage.scatter_add_(1, indices.view(B, -1), (scores - lse[..., None]).exp_().view(B, -1))
    return out, lse, indices, usage


def _full_forward(a, out, lse):
    B, N, M, Cv = a.B, a.N, a.M, a.Cv
    splits, split_len = memory_splits(triton.cdiv(N, BLOCK_Q) * a.n_cv * B, M, a.device)
    o, l = out, lse.view(B, 1, N)
    if splits > 1:
        o = torch.empty(B, splits, Cv, N, dtype=a.acc, device=a.device)
        l = torch.empty(B, splits, N, dtype=a.acc, device=a.device)
    o_strides = o.stride() if splits > 1 else (o.stride(0), 0, o.stride(1), o.stride(2))
    _fwd[lambda meta: (triton.cdiv(N, BLOCK_Q) * a.n_cv, splits, B)](
        *a.tensors, o, l, *a.strides, *o_strides, *l.stride(), N, M, a.Ck, Cv, split_len,
        BLOCK_Q=BLOCK_Q, BLOCK_CV=a.block_cv, **a.meta)
    if splits > 1:
        _combine[(triton.cdiv(N, BLOCK_Q), B)](
            o, l, out, lse, splits, N, Cv, o.stride(0), o.stride(1), o.stride(2), l.stride(0), l.stride(1),
            out.stride(0), out.stride(1), BLOCK_Q=BLOCK_Q, BLOCK_CV=min(pow2(Cv), 16 if INTERPRET else 64))


def memory_read_backward(grad_out, query_key, memory_key, memory_value, memory_shrinkage, query_selection, out, lse,
                         topk_indices, similarity, scale):
    check_supported(query_key, "memory_read_backward")
    a = _Args(query_key, memory_key, memory_value, memory_shrinkage, query_selection, similarity, scale)
    B, Ck, N, Cv, M, dev, acc = a.B, a.Ck, a.N, a.Cv, a.M, a.device, a.acc
    grads = [torch.zeros(x.shape, dtype=x.dtype, device=dev) for x in (query_key, memory_key, memory_value)]
    grads.append(torch.zeros(B, M, dtype=a.dtype, device=dev) if a.has_w else torch.empty(0, dtype=a.dtype, device=dev))
    grads.append(torch.zeros(B, Ck, N, dtype=a.dtype, device=dev) if a.has_e
                 else torch.empty(0, dtype=a.dtype, device=dev))
    if B == 0 or N == 0:
        return tuple(grads)
    delta = (grad_out.to(acc) * out.to(acc)).sum(1).contiguous()  # D[q] = <dO[:, q], O[:, q]>
    lse = lse.to(acc).contiguous()
    with device_guard(query_key):
        if topk_indices.shape[2] > 0:  # the kernels step along k with stride 1
            return _topk_backward(a, grad_out, lse, delta, topk_indices.contiguous(), grads)
        return _full_backward(a, grad_out, lse, delta, grads)


def _full_backward(a, grad_out, lse, delta, grads):
    B, Ck, N, Cv, M, dev, acc = a.B, a.Ck, a.N, a.Cv, a.M, a.device, a.acc
    dq, dk, dv, dw, de = grads
    splits, split_len = memory_splits(triton.cdiv(N, BLOCK_Q) * B, M, dev)
    # Partial sums (value tiles for dK and dw, memory splits for dQ and de) go to float buffers.
    dk_part = dk.unsqueeze(1) if a.n_cv == 1 else torch.empty(B, a.n_cv, Ck, M, dtype=acc, device=dev)
    dw_part = torch.empty(B, a.n_cv, M if a.has_w else 1, dtype=acc, device=dev)
    dq_part = dq.unsqueeze(1) if splits == 1 else torch.empty(B, splits, Ck, N, dtype=acc, device=dev)
    de_part = (de.unsqueeze(1) if splits == 1 else torch.empty_like(dq_part)) if a.has_e else dq_part
    _bwd_kv[lambda meta: (triton.cdiv(M, meta["BLOCK_P"]) * a.n_cv, B)](
        *a.tensors, grad_out, lse, delta, dk_part, dv, dw_part, *a.strides, *grad_out.stride(),
        *dk_part.stride(), *dv.stride(), dw_part.stride(0), dw_part.stride(1),
        N, M, Ck, Cv, USAGE_ONLY=False, BLOCK_CV=a.block_cv, **a.meta)
    _bwd_q[lambda meta: (triton.cdiv(N, BLOCK_Q), splits, B)](
        *a.tensors, grad_out, lse, delta, dq_part, de_part, *a.strides, *grad_out.stride(), *dq_part.stride(),
        N, M, Ck, Cv, split_len, BLOCK_Q=BLOCK_Q, **a.meta)
    if a.n_cv > 1:
        dk.copy_(dk_part.sum(1))
    if splits > 1:
        dq.copy_(dq_part.sum(1))
        if a.has_e:
            de.copy_(de_part.sum(1))
    if a.has_w:
        dw.copy_(dw_part.sum(1))
    return dq, dk, dv, dw, de


def _topk_backward(a, grad_out, lse, delta, topk_indices, grads):
    B, Ck, N, Cv, M, dev, acc = a.B, a.Ck, a.N, a.Cv, a.M, a.device, a.acc
    dq, dk, dv, dw, de = grads
    dk_buf = torch.zeros(B, Ck, M, dtype=acc, device=dev)
    dv_buf = torch.zeros(B, Cv, M, dtype=acc, device=dev)
    dw_buf = torch.zeros(B, M if a.has_w else 1, dtype=acc, device=dev)
    q, e, k, v, w, scale_t = a.tensors
    _bwd_topk[(triton.cdiv(N, TOPK_BLOCK_Q), B)](
        q, e, k, v, w, scale_t, topk_indices, grad_out, lse, delta, dq, de if a.has_e else dq, dk_buf, dv_buf, dw_buf,
        *a.strides, topk_indices.stride(0), topk_indices.stride(1), *grad_out.stride(),
        N, M, Ck, Cv, topk_indices.shape[2], BLOCK_Q=TOPK_BLOCK_Q, BLOCK_CV=a.block_cv,
        **a.select("L2", "HAS_W", "HAS_E", "ACC", "BLOCK_CK"))
    dk.copy_(dk_buf)
    dv.copy_(dv_buf)
    if a.has_w:
        dw.copy_(dw_buf)
    return dq, dk, dv, dw, de
