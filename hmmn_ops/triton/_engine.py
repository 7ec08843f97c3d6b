"""The Triton read engine: the flash-style kernels that every memory read shares (kernel_guided_read
and memory_read), with the score terms as compile-time options.

Layouts (views of the inputs, any strides): queries Q and selection e (B, Ck, N), memory keys
K (B, Ck, M), values V (B, Cv, M), shrinkage w (B, M), centres c (B, M) and sigma (B, T) with
M = T * HW. Scores, in the accumulation dtype ``ACC``, saturated (docs/reliability.md):

    dot: s = scale * <K_p, Q_q>                                     (+ Gaussian bias)
    l2:  s = -scale * w_p * d2,  d2 = sum_c e K^2 - 2 <K, e Q> + sum_c e Q^2

with the Gaussian bias of kernel_guided_read ``-|pos(q) - c_p|^2 / (2 sigma^2)`` (HAS_CENTERS),
so every score block is one or two tl.dot block products (``_scores``), in either orientation
(query rows x memory columns, or memory rows x query columns). Index vectors are int64: index
times stride passes 2^31 for a view of a larger memory bank.

Kernels:
  _fwd      full softmax: one program = (query block, value tile, memory split, batch), online
            softmax over its memory range; one split writes out/lse, several write normalised
            partials that _combine merges by log-sum-exp (few queries, long memory).
  _topk     streaming top-k over listed frames of HW positions (memory_read: one frame of M),
            packed rank keys of _common (ties to the smaller index), one [BLOCK_Q, KP] block at
            a time.
  _bwd_kv   one program = (memory block, value tile, batch): dV, and the tile's share of dK and
            dw (dS is linear in dP; the -D term goes to tile 0); with USAGE_ONLY, sum_q P.
  _bwd_q    one program = (query block, memory split, batch): dQ and de.
Partials (value tiles, memory splits) are summed on the host: no atomics, deterministic.
"""
import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    acc_dtype,
    center_terms,
    config,
    constant,
    dot,
    dot_precision,
    gaussian_bias,
    memory_splits,
    pow2,
    rank_index,
    rank_key,
    saturate,
    scale_tensor,
    tl_acc,
    topk_merge,
    tuning,
)

MAX_BLOCK_CV = 16 if INTERPRET else 128  # value channels per program (float32: half)
BLOCK_Q = 16 if INTERPRET else 64        # query rows per program; also what sizes memory splits
TOPK_BLOCK_Q = 16  # tl.dot's minimum: the [BLOCK_Q, KP] sort dominates the top-k kernels

_KEY = ["BLOCK_CK", "BLOCK_CV", "L2", "HAS_W", "HAS_E", "HAS_CENTERS"]
# GPU configs: the union of what spills least at HMMN's (Ck 128, Cv 512) and XMem's (Ck 64,
# Cv 512) channels for sm_90 ptxas, float16; the autotuner picks per key.
_FWD_TUNING = tuning(
    [config(BLOCK_P=p, num_warps=w, num_stages=s) for p, w, s in
     ((32, 8, 2), (32, 4, 2), (64, 4, 2), (64, 8, 2), (64, 8, 3), (128, 8, 2))],
    config(BLOCK_P=16),
    full=[config(BLOCK_P=p, num_warps=w, num_stages=2) for p, w in ((32, 4), (32, 8), (64, 8))],
)
_KV_TUNING = tuning(
    [config(BLOCK_P=p, BLOCK_Q=q, num_warps=w, num_stages=2) for p, q, w in
     ((32, 32, 8), (32, 32, 4), (64, 32, 8), (32, 64, 8))],
    config(BLOCK_P=16, BLOCK_Q=16),
    full=[config(BLOCK_P=32, BLOCK_Q=32, num_warps=w, num_stages=2) for w in (4, 8)],
)
# dQ walks the value channels in chunks of BLOCK_CV only to form dP: small chunks, fewer registers.
_Q_TUNING = tuning(
    [config(BLOCK_Q=q, BLOCK_P=p, BLOCK_CV=64, num_warps=w, num_stages=2) for q, p, w in
     ((32, 32, 8), (32, 64, 8), (64, 32, 4), (64, 64, 8))],
    config(BLOCK_Q=16, BLOCK_P=16, BLOCK_CV=16),
    full=[config(BLOCK_Q=32, BLOCK_P=32, BLOCK_CV=32, num_warps=w, num_stages=2) for w in (4, 8)],
)


# ---------------------------------------------------------------- @triton.jit helpers


@triton.jit
def span(start, BLOCK: tl.constexpr, end):
    """int64 indices start .. start + BLOCK and their mask (< end)."""
    idx = (start + tl.arange(0, BLOCK)).to(tl.int64)
    return idx, idx < end


@triton.jit
def tile_program(pid, length, BLOCK: tl.constexpr, Cv, BLOCK_CV: tl.constexpr):
    """A program id over (row block, value tile): rows, row mask, value channels, their mask, tile."""
    n_blocks = tl.cdiv(length, BLOCK)
    vb = pid // n_blocks
    rows, row_mask = span((pid % n_blocks) * BLOCK, BLOCK, length)
    cv, cv_mask = span(vb * BLOCK_CV, BLOCK_CV, Cv)
    return rows, row_mask, cv, cv_mask, vb


@triton.jit
def tile(ptr, rows, row_mask, row_stride, cols, col_mask, col_stride):
    """[rows, cols] tile of a strided matrix, 0 outside the masks."""
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _shrinkage(w_ptr, p, p_mask, sw_m, scale, HAS_W: tl.constexpr, ACC: tl.constexpr):
    """Shrinkage of memory positions ``p`` (``scale`` when absent: never used then)."""
    w = scale
    if HAS_W:
        w = tl.load(w_ptr + p * sw_m, mask=p_mask, other=1.0).to(ACC)
    return w


@triton.jit
def _queries(q_ptr, e_ptr, q, q_mask, sq_c, sq_n, se_c, se_n, ck, ck_mask, HAS_E: tl.constexpr):
    """Query keys [BQ, CK] and selection (the keys themselves when absent, never used then)."""
    qt = tile(q_ptr, q, q_mask, sq_n, ck, ck_mask, sq_c)
    et = qt
    if HAS_E:
        et = tile(e_ptr, q, q_mask, se_n, ck, ck_mask, se_c)
    return qt, et


@triton.jit
def _scores(a, b, e, q, p, p_mask, w_ptr, sw_m, c_ptr, sc_m, sig_ptr, ss_t, HW, W, scale,
            L2: tl.constexpr, HAS_E: tl.constexpr, HAS_W: tl.constexpr, HAS_CENTERS: tl.constexpr,
            QUERY_ROWS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """(s, d2, w) of a [R, CK] x [CK, C] block for queries ``q`` and memory positions ``p``.
    QUERY_ROWS: ``a`` = queries [R, CK] and ``e`` is shaped like it, ``b`` = memory keys [CK, C];
    else ``a`` = memory keys, ``b`` = queries and ``e`` [CK, C]. d2 (l2 only; 0 for dot) is
    sum_c e (K - Q)^2 as block products; padded channels are 0 in both operands, so they add
    nothing. ``w`` is the shrinkage of ``p`` (``scale`` when absent). Pointers are per batch."""
    w = _shrinkage(w_ptr, p, p_mask, sw_m, scale, HAS_W, ACC)
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
    if HAS_CENTERS:
        cy, cx, gamma = center_terms(tl.load(c_ptr + p * sc_m, mask=p_mask, other=-1),
                                     tl.load(sig_ptr + (p // HW) * ss_t, mask=p_mask, other=1.0), W, ACC)
        qy = (q // W).to(ACC)
        qx = (q % W).to(ACC)
        if QUERY_ROWS:
            s += gaussian_bias(qy[:, None], qx[:, None], cy[None, :], cx[None, :], gamma[None, :])
        else:
            s += gaussian_bias(qy[None, :], qx[None, :], cy[:, None], cx[:, None], gamma[:, None])
    return saturate(s), d2, w


@triton.jit
def _key_scores(qt, et, q, k_ptr, p, p_mask, sk_c, sk_m, ck, ck_mask, w_ptr, sw_m, c_ptr, sc_m, sig_ptr, ss_t, HW, W,
                scale, L2: tl.constexpr, HAS_E: tl.constexpr, HAS_W: tl.constexpr, HAS_CENTERS: tl.constexpr,
                ACC: tl.constexpr, PRECISION: tl.constexpr):
    """(key tile [CK, BP], scores [BQ, BP], shrinkage) of a query block against memory positions ``p``."""
    kt = tile(k_ptr, ck, ck_mask, sk_c, p, p_mask, sk_m)
    s, _, w = _scores(qt, kt, et, q, p, p_mask, w_ptr, sw_m, c_ptr, sc_m, sig_ptr, ss_t, HW, W, scale,
                      L2, HAS_E, HAS_W, HAS_CENTERS, True, ACC, PRECISION)
    return kt, s, w


# ---------------------------------------------------------------- kernels


@triton.autotune(**_FWD_TUNING, key=_KEY)
@triton.jit
def _fwd(q_ptr, e_ptr, k_ptr, v_ptr, w_ptr, c_ptr, sig_ptr, scale_ptr, o_ptr, lse_ptr,
         sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sv_b, sv_c, sv_m, sw_b, sw_m, sc_b, sc_m, ss_b, ss_t,
         so_b, so_s, so_c, so_n, sl_b, sl_s, sl_n,
         N, M, HW, W, Ck, Cv, split_len,
         L2: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr, HAS_CENTERS: tl.constexpr,
         ACC: tl.constexpr, PRECISION: tl.constexpr,
         BLOCK_Q: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr, BLOCK_P: tl.constexpr):
    q, q_mask, cv, cv_mask, vb = tile_program(tl.program_id(0), N, BLOCK_Q, Cv, BLOCK_CV)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    scale = tl.load(scale_ptr)
    ck, ck_mask = span(0, BLOCK_CK, Ck)
    qt, et = _queries(q_ptr + b * sq_b, e_ptr + b * se_b, q, q_mask, sq_c, sq_n, se_c, se_n, ck, ck_mask, HAS_E)

    m_i = tl.full([BLOCK_Q], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_Q], ACC)
    acc = tl.zeros([BLOCK_Q, BLOCK_CV], ACC)
    start = split * split_len
    end = tl.minimum(start + split_len, M)
    for p0 in range(start, end, BLOCK_P):
        p, p_mask = span(p0, BLOCK_P, end)
        _, s, _ = _key_scores(qt, et, q, k_ptr + b * sk_b, p, p_mask, sk_c, sk_m, ck, ck_mask, w_ptr + b * sw_b, sw_m,
                              c_ptr + b * sc_b, sc_m, sig_ptr + b * ss_b, ss_t, HW, W, scale,
                              L2, HAS_E, HAS_W, HAS_CENTERS, ACC, PRECISION)
        s = tl.where(p_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        vt = tile(v_ptr + b * sv_b, p, p_mask, sv_m, cv, cv_mask, sv_c)                      # [BP, BCV]
        acc = acc * alpha[:, None] + dot(pr, vt, ACC, PRECISION)
        m_i = m_new

    tl.store(o_ptr + b * so_b + split * so_s + cv[None, :] * so_c + q[:, None] * so_n,
             (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=q_mask[:, None] & cv_mask[None, :])
    tl.store(lse_ptr + b * sl_b + split * sl_s + q * sl_n, m_i + tl.log(l_i),
             mask=q < tl.where(vb == 0, N, 0))  # one value tile writes lse


@triton.jit
def _combine(po_ptr, pl_ptr, o_ptr, lse_ptr, S, N, Cv,
             spo_b, spo_s, spo_c, spl_b, spl_s, so_b, so_c,
             BLOCK_Q: tl.constexpr, BLOCK_CV: tl.constexpr):
    """out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s lse_s (partials are (B, S, Cv, N)
    and (B, S, N) contiguous along N; out (B, Cv, N) and lse (B, N) contiguous along N)."""
    q, q_mask = span(tl.program_id(0) * BLOCK_Q, BLOCK_Q, N)
    b = tl.program_id(1).to(tl.int64)
    pl = pl_ptr + b * spl_b + q
    mx = tl.load(pl, mask=q_mask, other=0.0)
    for s in range(1, S):
        mx = tl.maximum(mx, tl.load(pl + s * spl_s, mask=q_mask, other=0.0))
    total = tl.zeros_like(mx)
    for s in range(S):
        total += tl.exp(tl.load(pl + s * spl_s, mask=q_mask, other=0.0) - mx)
    lse = mx + tl.log(total)
    tl.store(lse_ptr + b * N + q, lse, mask=q_mask)
    for c0 in range(0, Cv, BLOCK_CV):
        cv, cv_mask = span(c0, BLOCK_CV, Cv)
        mask = cv_mask[:, None] & q_mask[None, :]
        acc = tl.zeros([BLOCK_CV, BLOCK_Q], lse.dtype)
        for s in range(S):
            w = tl.exp(tl.load(pl + s * spl_s, mask=q_mask, other=0.0) - lse)
            part = tl.load(po_ptr + b * spo_b + s * spo_s + cv[:, None] * spo_c + q[None, :], mask=mask, other=0.0)
            acc += w[None, :] * part
        tl.store(o_ptr + b * so_b + cv[:, None] * so_c + q[None, :], acc.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _topk(q_ptr, e_ptr, k_ptr, w_ptr, c_ptr, sig_ptr, scale_ptr, frames_ptr, idx_ptr,
          sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sw_b, sw_m, sc_b, sc_m, ss_b, ss_t, si_b, si_n,
          N, HW, W, Ck, n_frames, topk,
          L2: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr, HAS_CENTERS: tl.constexpr,
          ACC: tl.constexpr, PRECISION: tl.constexpr,
          IDX_BITS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_CK: tl.constexpr, KP: tl.constexpr):
    """Running top-KP of each query over the listed frames (candidate i of listed frame f_i is
    index f_i * HW + i), in blocks of KP (topk_merge). KP = next power of two >= topk."""
    q, q_mask = span(tl.program_id(0) * BLOCK_Q, BLOCK_Q, N)
    b = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr)
    ck, ck_mask = span(0, BLOCK_CK, Ck)
    qt, et = _queries(q_ptr + b * sq_b, e_ptr + b * se_b, q, q_mask, sq_c, sq_n, se_c, se_n, ck, ck_mask, HAS_E)
    lowest = tl.full([BLOCK_Q, KP], -9223372036854775808, tl.int64)
    best = lowest
    j = tl.arange(0, KP)
    for f_i in range(n_frames):
        frame = tl.load(frames_ptr + f_i).to(tl.int64)
        for s0 in range(0, HW, KP):
            pix, pix_mask = span(s0, KP, HW)
            p = frame * HW + pix
            _, s, _ = _key_scores(qt, et, q, k_ptr + b * sk_b, p, pix_mask, sk_c, sk_m, ck, ck_mask,
                                  w_ptr + b * sw_b, sw_m, c_ptr + b * sc_b, sc_m, sig_ptr + b * ss_b, ss_t, HW, W,
                                  scale, L2, HAS_E, HAS_W, HAS_CENTERS, ACC, PRECISION)
            best = topk_merge(best, tl.where(pix_mask[None, :], rank_key(s, f_i * HW + pix[None, :], IDX_BITS), lowest))
    tl.store(idx_ptr + b * si_b + q[:, None] * si_n + j[None, :], rank_index(best, IDX_BITS),
             mask=q_mask[:, None] & (j[None, :] < topk))


@triton.autotune(**_KV_TUNING, key=_KEY + ["USAGE_ONLY"])
@triton.jit
def _bwd_kv(q_ptr, e_ptr, k_ptr, v_ptr, w_ptr, c_ptr, sig_ptr, scale_ptr, do_ptr, lse_ptr, delta_ptr,
            dk_ptr, dv_ptr, dw_ptr,
            sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sv_b, sv_c, sv_m, sw_b, sw_m, sc_b, sc_m, ss_b, ss_t,
            sdo_b, sdo_c, sdo_n, sdk_b, sdk_s, sdk_c, sdk_m, sdv_b, sdv_c, sdv_m, sdw_b, sdw_s,
            N, M, HW, W, Ck, Cv,
            L2: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr, HAS_CENTERS: tl.constexpr,
            ACC: tl.constexpr, PRECISION: tl.constexpr, USAGE_ONLY: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Memory-side backward; with USAGE_ONLY, usage[p] = sum_q P (written to dw_ptr) and nothing else."""
    p, p_mask, cv, cv_mask, vb = tile_program(tl.program_id(0), M, BLOCK_P, Cv, BLOCK_CV)
    b = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr)
    ck, ck_mask = span(0, BLOCK_CK, Ck)
    kt = tile(k_ptr + b * sk_b, p, p_mask, sk_m, ck, ck_mask, sk_c)                          # [BP, CK]
    # dS = P * (dP - D) is linear in dP = sum over value tiles: tile 0 alone counts the -D term.
    d_weight = (vb == 0).to(ACC)
    dv = tl.zeros([BLOCK_P, BLOCK_CV], ACC)
    g0 = tl.zeros([BLOCK_P, BLOCK_CK], ACC)  # dot: sum_q dS Q;  l2: sum_q dS e Q
    g1 = tl.zeros([BLOCK_P, BLOCK_CK], ACC)  # l2: sum_q dS e  (rows all equal without e)
    dw = tl.zeros([BLOCK_P], ACC)            # l2 with w: sum_q dS d2;  USAGE_ONLY: sum_q P
    w = _shrinkage(w_ptr + b * sw_b, p, p_mask, sw_m, scale, HAS_W, ACC)
    for q0 in range(0, N, BLOCK_Q):
        q, q_mask = span(q0, BLOCK_Q, N)
        qt = tile(q_ptr + b * sq_b, ck, ck_mask, sq_c, q, q_mask, sq_n)                      # [CK, BQ]
        et = qt
        if HAS_E:
            et = tile(e_ptr + b * se_b, ck, ck_mask, se_c, q, q_mask, se_n)
        s, d2, _ = _scores(kt, qt, et, q, p, p_mask, w_ptr + b * sw_b, sw_m, c_ptr + b * sc_b, sc_m,
                           sig_ptr + b * ss_b, ss_t, HW, W, scale, L2, HAS_E, HAS_W, HAS_CENTERS, False, ACC,
                           PRECISION)
        lse = tl.load(lse_ptr + b * N + q, mask=q_mask, other=0.0)
        pr = tl.exp(tl.where(p_mask[:, None] & q_mask[None, :], s - lse[None, :], float("-inf")))
        if USAGE_ONLY:
            dw += tl.sum(pr, axis=1)
        else:
            do = tile(do_ptr + b * sdo_b, q, q_mask, sdo_n, cv, cv_mask, sdo_c)               # [BQ, BCV]
            vt = tile(v_ptr + b * sv_b, p, p_mask, sv_m, cv, cv_mask, sv_c)                   # [BP, BCV]
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


@triton.autotune(**_Q_TUNING, key=["BLOCK_CK", "Cv", "L2", "HAS_W", "HAS_E", "HAS_CENTERS"])
@triton.jit
def _bwd_q(q_ptr, e_ptr, k_ptr, v_ptr, w_ptr, c_ptr, sig_ptr, scale_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, de_ptr,
           sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sv_b, sv_c, sv_m, sw_b, sw_m, sc_b, sc_m, ss_b, ss_t,
           sdo_b, sdo_c, sdo_n, sdq_b, sdq_s, sdq_c, sdq_n,
           N, M, HW, W, Ck, Cv, split_len,
           L2: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr, HAS_CENTERS: tl.constexpr,
           ACC: tl.constexpr, PRECISION: tl.constexpr,
           BLOCK_Q: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr, BLOCK_P: tl.constexpr):
    """dQ (and de) of one query block over one memory split; ``de_ptr`` has dq's strides."""
    q, q_mask = span(tl.program_id(0) * BLOCK_Q, BLOCK_Q, N)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    scale = tl.load(scale_ptr)
    ck, ck_mask = span(0, BLOCK_CK, Ck)
    qt, et = _queries(q_ptr + b * sq_b, e_ptr + b * se_b, q, q_mask, sq_c, sq_n, se_c, se_n, ck, ck_mask, HAS_E)
    lse = tl.load(lse_ptr + b * N + q, mask=q_mask, other=0.0)
    delta = tl.load(delta_ptr + b * N + q, mask=q_mask, other=0.0)
    h1 = tl.zeros([BLOCK_Q, BLOCK_CK], ACC)  # dot: sum_p dS K;  l2: sum_p dS u K
    h2 = tl.zeros([BLOCK_Q, BLOCK_CK], ACC)  # l2 with e: sum_p dS u K^2
    h0 = tl.zeros([BLOCK_Q], ACC)            # l2: sum_p dS u
    start = split * split_len
    end = tl.minimum(start + split_len, M)
    for p0 in range(start, end, BLOCK_P):
        p, p_mask = span(p0, BLOCK_P, end)
        kt, s, w = _key_scores(qt, et, q, k_ptr + b * sk_b, p, p_mask, sk_c, sk_m, ck, ck_mask, w_ptr + b * sw_b,
                               sw_m, c_ptr + b * sc_b, sc_m, sig_ptr + b * ss_b, ss_t, HW, W, scale,
                               L2, HAS_E, HAS_W, HAS_CENTERS, ACC, PRECISION)                 # [CK, BP]
        pr = tl.exp(tl.where(q_mask[:, None] & p_mask[None, :], s - lse[:, None], float("-inf")))
        dp = tl.zeros([BLOCK_Q, BLOCK_P], ACC)
        for c0 in range(0, Cv, BLOCK_CV):
            cv, cv_mask = span(c0, BLOCK_CV, Cv)
            do = tile(do_ptr + b * sdo_b, q, q_mask, sdo_n, cv, cv_mask, sdo_c)               # [BQ, BCV]
            vt = tile(v_ptr + b * sv_b, cv, cv_mask, sv_c, p, p_mask, sv_m)                   # [BCV, BP]
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


# ---------------------------------------------------------------- host side


class Args:
    """Views, strides and launch constants shared by every kernel of one read. Queries (B, Ck, N),
    memory keys (B, Ck, M), values (B, Cv, M); the optional score terms: shrinkage (B, M),
    selection (B, Ck, N), centres (B, M) with sigma (B, T) on frames of HW = H * W positions."""

    def __init__(self, query_key, memory_key, memory_value, scale, shrinkage=None, selection=None, l2=False,
                 centers=None, sigma=None, width=1):
        self.B, self.Ck, self.N = query_key.shape
        self.Cv, self.M = memory_value.shape[1], memory_value.shape[2]
        self.dtype, self.device = query_key.dtype, query_key.device
        self.acc = acc_dtype(self.dtype)
        self.has_w, self.has_e, self.has_c = shrinkage is not None, selection is not None, centers is not None
        self.HW, self.W = self.N, width  # frame size and width of the Gaussian bias (queries are one frame)
        # Placeholders for absent terms are never read.
        dev = self.device
        w = shrinkage if self.has_w else torch.empty(1, 1, dtype=self.dtype, device=dev)
        e = selection if self.has_e else query_key
        c = centers if self.has_c else torch.empty(1, 1, dtype=torch.int64, device=dev)
        sig = sigma.to(self.acc) if self.has_c else torch.empty(1, 1, dtype=self.acc, device=dev)
        self.scale = scale_tensor(scale, self.acc, dev)
        self.tensors = (query_key, e, memory_key, memory_value, w, c, sig, self.scale)
        self.strides = tuple(s for x in (query_key, e, memory_key, memory_value, w, c, sig) for s in x.stride())
        self.meta = dict(L2=l2, HAS_W=self.has_w, HAS_E=self.has_e, HAS_CENTERS=self.has_c, ACC=tl_acc(self.dtype),
                         PRECISION=dot_precision(self.dtype), BLOCK_CK=pow2(self.Ck))
        # float32 tiles take twice the registers: half the value channels per program.
        self.block_cv = min(pow2(self.Cv), MAX_BLOCK_CV if self.dtype.itemsize <= 2 or INTERPRET else MAX_BLOCK_CV // 2)
        self.n_cv = triton.cdiv(self.Cv, self.block_cv)

    def select(self, *names):
        return {key: self.meta[key] for key in names}


def full_forward(a, out, lse):
    """Softmax read of every memory position into ``out`` (B, Cv, N) and ``lse`` (B, N)."""
    B, N, M, Cv = a.B, a.N, a.M, a.Cv
    splits, split_len = memory_splits(triton.cdiv(N, BLOCK_Q) * a.n_cv * B, M, a.device)
    o, l = out, lse.view(B, 1, N)
    if splits > 1:
        o = torch.empty(B, splits, Cv, N, dtype=a.acc, device=a.device)
        l = torch.empty(B, splits, N, dtype=a.acc, device=a.device)
    o_strides = o.stride() if splits > 1 else (o.stride(0), 0, o.stride(1), o.stride(2))
    _fwd[lambda meta: (triton.cdiv(N, BLOCK_Q) * a.n_cv, splits, B)](
        *a.tensors, o, l, *a.strides, *o_strides, *l.stride(), N, M, a.HW, a.W, a.Ck, Cv, split_len,
        BLOCK_Q=BLOCK_Q, BLOCK_CV=a.block_cv, **a.meta)
    if splits > 1:
        _combine[(triton.cdiv(N, BLOCK_Q), B)](
            o, l, out, lse, splits, N, Cv, o.stride(0), o.stride(1), o.stride(2), l.stride(0), l.stride(1),
            out.stride(0), out.stride(1), BLOCK_Q=BLOCK_Q, BLOCK_CV=min(pow2(Cv), 16 if INTERPRET else 64))


def full_usage(a, out, lse, usage):
    """usage[b, p] = sum_q P of the full read (``_bwd_kv`` with USAGE_ONLY)."""
    _bwd_kv[lambda meta: (triton.cdiv(a.M, meta["BLOCK_P"]), a.B)](
        *a.tensors, out, lse, lse, out, out, usage, *a.strides, *((0,) * 10), usage.stride(0), 0,
        a.N, a.M, a.HW, a.W, a.Ck, a.Cv, USAGE_ONLY=True, BLOCK_CV=a.block_cv, **a.meta)


def select_topk(a, indices, topk, frames, frame_len):
    """indices (B, N, topk): each query's top-k positions among the listed frames of ``frame_len``
    positions, numbered along the listed frames (docs/ops.md's index order and tie rule)."""
    q, e, k, _, w, c, sig, scale = a.tensors
    frames_t = constant(tuple(frames), torch.int32, a.device)
    # float32 keys keep every bit; float64 keys give up as few mantissa bits as the indices need.
    idx_bits = max(1, (len(frames) * frame_len - 1).bit_length()) if a.dtype == torch.float64 else 32
    strides = a.strides[:6] + a.strides[6:9] + a.strides[12:]  # all but the values'
    _topk[(triton.cdiv(a.N, TOPK_BLOCK_Q), a.B)](
        q, e, k, w, c, sig, scale, frames_t, indices, *strides, indices.stride(0), indices.stride(1),
        a.N, frame_len, a.W, a.Ck, len(frames), topk, IDX_BITS=idx_bits, BLOCK_Q=TOPK_BLOCK_Q, KP=pow2(topk),
        **a.meta)


def softmax_delta(grad_out, out, acc):
    """D[q] = <dO[:, q], O[:, q]> of (B, Cv, N) tensors, contiguous (B, N)."""
    return (grad_out.to(acc) * out.to(acc)).sum(1).contiguous()


def full_backward(a, grad_out, lse, delta, dq, dk, dv, dw=None, de=None):
    """Gradients of the full read into dq (B, Ck, N), dk (B, Ck, M), dv (B, Cv, M) and, when the
    read has them, dw (B, M) and de (B, Ck, N); ``grad_out`` (B, Cv, N), ``lse`` and ``delta``
    (B, N) contiguous in the accumulation dtype."""
    B, Ck, N, M, dev, acc = a.B, a.Ck, a.N, a.M, a.device, a.acc
    splits, split_len = memory_splits(triton.cdiv(N, BLOCK_Q) * B, M, dev)
    # Partial sums (value tiles for dK and dw, memory splits for dQ and de) go to float buffers.
    dk_part = dk.unsqueeze(1) if a.n_cv == 1 else torch.empty(B, a.n_cv, Ck, M, dtype=acc, device=dev)
    dw_part = torch.empty(B, a.n_cv, M if a.has_w else 1, dtype=acc, device=dev)
    dq_part = dq.unsqueeze(1) if splits == 1 else torch.empty(B, splits, Ck, N, dtype=acc, device=dev)
    de_part = (de.unsqueeze(1) if splits == 1 else torch.empty_like(dq_part)) if a.has_e else dq_part
    _bwd_kv[lambda meta: (triton.cdiv(M, meta["BLOCK_P"]) * a.n_cv, B)](
        *a.tensors, grad_out, lse, delta, dk_part, dv, dw_part, *a.strides, *grad_out.stride(),
        *dk_part.stride(), *dv.stride(), dw_part.stride(0), dw_part.stride(1),
        N, M, a.HW, a.W, Ck, a.Cv, USAGE_ONLY=False, BLOCK_CV=a.block_cv, **a.meta)
    _bwd_q[lambda meta: (triton.cdiv(N, meta["BLOCK_Q"]), splits, B)](
        *a.tensors, grad_out, lse, delta, dq_part, de_part, *a.strides, *grad_out.stride(), *dq_part.stride(),
        N, M, a.HW, a.W, Ck, a.Cv, split_len, **a.meta)
    if a.n_cv > 1:
        dk.copy_(dk_part.sum(1))
    if splits > 1:
        dq.copy_(dq_part.sum(1))
        if a.has_e:
            de.copy_(de_part.sum(1))
    if a.has_w:
        dw.copy_(dw_part.sum(1))
