"""kernel_guided_read (SPEC 1) in Triton: flash-style forward with the Gaussian bias, top-k,
and the flash-style backward (P recomputed from lse).

Layouts (views of the inputs, any strides): queries (B, Ck, N) with N = H*W, memory keys
(B, Ck, M) and values (B, Cv, M) with M = T*H*W, centres (B, M). Logits are
``scale * <k_p, q_q> + bias(p, q)``, computed in the accumulation dtype ``ACC``.

Kernels:
  _fwd      one program = (query block, value tile, memory split, batch); online softmax over
            its memory range. With one split it writes ``out``/``lse`` directly; otherwise
            normalised partials that _combine merges by log-sum-exp (few queries, long memory).
  _topk     one program = (query block, batch); streams the listed frames' logits block by
            block and keeps a running top-k per query (packed rank keys, bitonic merge), so no
            score matrix beyond one [BLOCK_Q, KP] block ever exists.
  _bwd_kv   one program = (memory block, value tile, batch): dV of the tile and the part of dK
            that tile's dP contributes (dS is linear in dP; the -D term goes to tile 0), summed
            over tiles on the host. No atomics: the backward is deterministic.
  _bwd_q    one program = (query block, memory split, batch): dQ, summed over splits on the host.
"""
import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    acc_dtype,
    center_terms,
    check_supported,
    config,
    constant,
    device_guard,
    dot,
    dot_precision,
    flat,
    gaussian_bias,
    memory_splits,
    pow2,
    rank_index,
    rank_key,
    scale_tensor,
    tl_acc,
    topk_merge,
    tuning,
)

# Value channels one program keeps in registers; wider values are tiled over programs.
MAX_BLOCK_CV = 16 if INTERPRET else 256
# Query rows per forward program; also the block the host assumes when it sizes memory splits.
BLOCK_Q = 16 if INTERPRET else 64

# GPU configs: the ones that do not spill (much) at Ck = 128, Cv = 512 (sm_90 ptxas, float16).
_FWD_TUNING = tuning(
    [config(BLOCK_P=p, num_warps=w, num_stages=s) for p, w, s in ((32, 8, 2), (32, 8, 3), (64, 8, 2), (32, 4, 2))],
    config(BLOCK_P=16),
    full=[config(BLOCK_P=32, num_warps=w, num_stages=2) for w in (4, 8)],
)
_KV_TUNING = tuning(
    [config(BLOCK_P=p, BLOCK_Q=q, num_warps=w, num_stages=2) for p, q, w in
     ((32, 32, 8), (32, 64, 8), (64, 32, 8), (32, 32, 4))],
    config(BLOCK_P=16, BLOCK_Q=16),
    full=[config(BLOCK_P=32, BLOCK_Q=32, num_warps=w, num_stages=2) for w in (4, 8)],
)
# dQ walks the value channels in chunks of BLOCK_CV only to form dP: small chunks, fewer registers.
_Q_TUNING = tuning(
    [config(BLOCK_Q=q, BLOCK_P=p, BLOCK_CV=64, num_warps=8, num_stages=2) for q, p in ((32, 32), (32, 64), (64, 32),
                                                                                       (64, 64))],
    config(BLOCK_Q=16, BLOCK_P=16, BLOCK_CV=16),
    full=[config(BLOCK_Q=32, BLOCK_P=32, BLOCK_CV=32, num_warps=w, num_stages=2) for w in (4, 8)],
)


@triton.jit
def _load_centers(c_ptr, sig_ptr, p, p_mask, sc_m, ss_t, HW, W, ACC: tl.constexpr):
    c = tl.load(c_ptr + p * sc_m, mask=p_mask, other=-1)
    s = tl.load(sig_ptr + (p // HW) * ss_t, mask=p_mask, other=1.0)
    return center_terms(c, s, W, ACC)


@triton.autotune(**_FWD_TUNING, key=["BLOCK_CK", "BLOCK_CV", "HAS_CENTERS"])
@triton.jit
def _fwd(q_ptr, k_ptr, v_ptr, c_ptr, sig_ptr, scale_ptr, o_ptr, lse_ptr,
         sq_b, sq_c, sq_n, sk_b, sk_c, sk_m, sv_b, sv_c, sv_m, sc_b, sc_m, ss_b, ss_t,
         so_b, so_s, so_c, so_n, sl_b, sl_s, sl_n,
         N, M, HW, W, Ck, Cv, split_len,
         HAS_CENTERS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
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
    qt = tl.load(q_ptr + b * sq_b + q[:, None] * sq_n + ck[None, :] * sq_c,
                 mask=q_mask[:, None] & ck_mask[None, :], other=0.0)                       # [BQ, CK]
    qy = (q // W).to(ACC)
    qx = (q % W).to(ACC)

    m_i = tl.full([BLOCK_Q], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_Q], ACC)
    acc = tl.zeros([BLOCK_Q, BLOCK_CV], ACC)
    start = split * split_len
    end = tl.minimum(start + split_len, M)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < end
        kt = tl.load(k_ptr + b * sk_b + ck[:, None] * sk_c + p[None, :] * sk_m,
                     mask=ck_mask[:, None] & p_mask[None, :], other=0.0)                   # [CK, BP]
        s = dot(qt, kt, ACC, PRECISION) * scale
        if HAS_CENTERS:
            cy, cx, gamma = _load_centers(c_ptr + b * sc_b, sig_ptr + b * ss_b, p, p_mask, sc_m, ss_t, HW, W, ACC)
            s += gaussian_bias(qy[:, None], qx[:, None], cy[None, :], cx[None, :], gamma[None, :])
        s = tl.where(p_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(e, axis=1)
        vt = tl.load(v_ptr + b * sv_b + p[:, None] * sv_m + cv[None, :] * sv_c,
                     mask=p_mask[:, None] & cv_mask[None, :], other=0.0)                   # [BP, BCV]
        acc = acc * alpha[:, None] + dot(e, vt, ACC, PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + split * so_s + cv[None, :] * so_c + q[:, None] * so_n,
             out.to(o_ptr.dtype.element_ty), mask=q_mask[:, None] & cv_mask[None, :])
    tl.store(lse_ptr + b * sl_b + split * sl_s + q * sl_n, m_i + tl.log(l_i),
             mask=q < tl.where(vb == 0, N, 0))  # one value tile writes lse


@triton.jit
def _combine(po_ptr, pl_ptr, o_ptr, lse_ptr, S, N, Cv,
             spo_b, spo_s, spo_c, spl_b, spl_s, so_b, so_c,
             BLOCK_Q: tl.constexpr, BLOCK_CV: tl.constexpr):
    """out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s lse_s (partials are (B, S, Cv, N)
    and (B, S, N) contiguous along N; out (B, Cv, N) and lse (B, N) contiguous along N)."""
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < N
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
        cv = c0 + tl.arange(0, BLOCK_CV)
        mask = cv[:, None] < Cv
        mask = mask & q_mask[None, :]
        acc = tl.zeros([BLOCK_CV, BLOCK_Q], lse.dtype)
        for s in range(S):
            w = tl.exp(tl.load(pl + s * spl_s, mask=q_mask, other=0.0) - lse)
            part = tl.load(po_ptr + b * spo_b + s * spo_s + cv[:, None] * spo_c + q[None, :], mask=mask, other=0.0)
            acc += w[None, :] * part
        tl.store(o_ptr + b * so_b + cv[:, None] * so_c + q[None, :], acc.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _topk(q_ptr, k_ptr, c_ptr, sig_ptr, scale_ptr, frames_ptr, idx_ptr,
          sq_b, sq_c, sq_n, sk_b, sk_c, sk_m, sc_b, sc_m, ss_b, ss_t, si_b, si_n,
          N, HW, W, Ck, n_frames, topk,
          HAS_CENTERS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, IDX_BITS: tl.constexpr,
          BLOCK_Q: tl.constexpr, BLOCK_CK: tl.constexpr, KP: tl.constexpr):
    """Running top-KP per query: each block of KP logits is sorted ascending, max'ed element-wise
    with the descending running list (a bitonic merge step that keeps the KP largest of both),
    and the result re-sorted descending. KP = next power of two >= topk."""
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < N
    b = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr)
    ck = tl.arange(0, BLOCK_CK)
    ck_mask = ck < Ck
    qt = tl.load(q_ptr + b * sq_b + q[:, None] * sq_n + ck[None, :] * sq_c,
                 mask=q_mask[:, None] & ck_mask[None, :], other=0.0)
    qy = (q // W).to(ACC)
    qx = (q % W).to(ACC)
    lowest = tl.full([BLOCK_Q, KP], -9223372036854775808, tl.int64)
    best = lowest
    j = tl.arange(0, KP)
    for f_i in range(n_frames):
        frame = tl.load(frames_ptr + f_i)
        for s0 in range(0, HW, KP):
            pix = s0 + j
            pix_mask = pix < HW
            p = frame * HW + pix
            kt = tl.load(k_ptr + b * sk_b + ck[:, None] * sk_c + p[None, :] * sk_m,
                         mask=ck_mask[:, None] & pix_mask[None, :], other=0.0)
            s = dot(qt, kt, ACC, PRECISION) * scale
            if HAS_CENTERS:
                cy, cx, gamma = _load_centers(c_ptr + b * sc_b, sig_ptr + b * ss_b, p, pix_mask, sc_m, ss_t, HW, W,
                                              ACC)
                s += gaussian_bias(qy[:, None], qx[:, None], cy[None, :], cx[None, :], gamma[None, :])
            key = tl.where(pix_mask[None, :], rank_key(s, f_i * HW + pix[None, :], IDX_BITS), lowest)
            best = topk_merge(best, key)
    tl.store(idx_ptr + b * si_b + q[:, None] * si_n + j[None, :], rank_index(best, IDX_BITS),
             mask=q_mask[:, None] & (j[None, :] < topk))


@triton.autotune(**_KV_TUNING, key=["BLOCK_CK", "BLOCK_CV", "HAS_CENTERS"])
@triton.jit
def _bwd_kv(q_ptr, k_ptr, v_ptr, c_ptr, sig_ptr, scale_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
            sq_b, sq_c, sq_n, sk_b, sk_c, sk_m, sv_b, sv_c, sv_m, sc_b, sc_m, ss_b, ss_t,
            sdo_b, sdo_c, sdo_n, sdk_b, sdk_s, sdk_c, sdk_m, sdv_b, sdv_c, sdv_m,
            N, M, HW, W, Ck, Cv,
            HAS_CENTERS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_P: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr, BLOCK_Q: tl.constexpr):
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
    kt = tl.load(k_ptr + b * sk_b + p[:, None] * sk_m + ck[None, :] * sk_c,
                 mask=p_mask[:, None] & ck_mask[None, :], other=0.0)                       # [BP, CK]
    vt = tl.load(v_ptr + b * sv_b + p[:, None] * sv_m + cv[None, :] * sv_c,
                 mask=p_mask[:, None] & cv_mask[None, :], other=0.0)                       # [BP, BCV]
    if HAS_CENTERS:
        cy, cx, gamma = _load_centers(c_ptr + b * sc_b, sig_ptr + b * ss_b, p, p_mask, sc_m, ss_t, HW, W, ACC)
    # dS = P * (dP - D) is linear in dP = sum over value tiles, so each tile adds its share of dK;
    # the -D term is counted once, by tile 0.
    d_weight = (vb == 0).to(ACC)

    dk = tl.zeros([BLOCK_P, BLOCK_CK], ACC)
    dv = tl.zeros([BLOCK_P, BLOCK_CV], ACC)
    for q0 in range(0, N, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        q_mask = q < N
        qt = tl.load(q_ptr + b * sq_b + ck[:, None] * sq_c + q[None, :] * sq_n,
                     mask=ck_mask[:, None] & q_mask[None, :], other=0.0)                   # [CK, BQ]
        s = dot(kt, qt, ACC, PRECISION) * scale                                            # [BP, BQ]
        if HAS_CENTERS:
            s += gaussian_bias((q // W).to(ACC)[None, :], (q % W).to(ACC)[None, :], cy[:, None], cx[:, None],
                               gamma[:, None])
        lse = tl.load(lse_ptr + b * N + q, mask=q_mask, other=0.0)
        s = tl.where(p_mask[:, None] & q_mask[None, :], s - lse[None, :], float("-inf"))
        pr = tl.exp(s)
        do = tl.load(do_ptr + b * sdo_b + q[:, None] * sdo_n + cv[None, :] * sdo_c,
                     mask=q_mask[:, None] & cv_mask[None, :], other=0.0)                   # [BQ, BCV]
        dv += dot(pr, do, ACC, PRECISION)
        dp = dot(vt, tl.trans(do), ACC, PRECISION)                                         # [BP, BQ]
        delta = tl.load(delta_ptr + b * N + q, mask=q_mask, other=0.0) * d_weight
        ds = pr * (dp - delta[None, :])
        dk += dot(ds, tl.trans(qt), ACC, PRECISION)

    tl.store(dv_ptr + b * sdv_b + cv[None, :] * sdv_c + p[:, None] * sdv_m, dv.to(dv_ptr.dtype.element_ty),
             mask=p_mask[:, None] & cv_mask[None, :])
    tl.store(dk_ptr + b * sdk_b + vb * sdk_s + ck[None, :] * sdk_c + p[:, None] * sdk_m,
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=p_mask[:, None] & ck_mask[None, :])


@triton.autotune(**_Q_TUNING, key=["BLOCK_CK", "Cv", "HAS_CENTERS"])
@triton.jit
def _bwd_q(q_ptr, k_ptr, v_ptr, c_ptr, sig_ptr, scale_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
           sq_b, sq_c, sq_n, sk_b, sk_c, sk_m, sv_b, sv_c, sv_m, sc_b, sc_m, ss_b, ss_t,
           sdo_b, sdo_c, sdo_n, sdq_b, sdq_s, sdq_c, sdq_n,
           N, M, HW, W, Ck, Cv, split_len,
           HAS_CENTERS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
           BLOCK_Q: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr, BLOCK_P: tl.constexpr):
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < N
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    scale = tl.load(scale_ptr)
    ck = tl.arange(0, BLOCK_CK)
    ck_mask = ck < Ck
    qt = tl.load(q_ptr + b * sq_b + q[:, None] * sq_n + ck[None, :] * sq_c,
                 mask=q_mask[:, None] & ck_mask[None, :], other=0.0)                       # [BQ, CK]
    qy = (q // W).to(ACC)
    qx = (q % W).to(ACC)
    lse = tl.load(lse_ptr + b * N + q, mask=q_mask, other=0.0)
    delta = tl.load(delta_ptr + b * N + q, mask=q_mask, other=0.0)

    dq = tl.zeros([BLOCK_Q, BLOCK_CK], ACC)
    start = split * split_len
    end = tl.minimum(start + split_len, M)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < end
        kt = tl.load(k_ptr + b * sk_b + ck[:, None] * sk_c + p[None, :] * sk_m,
                     mask=ck_mask[:, None] & p_mask[None, :], other=0.0)                   # [CK, BP]
        s = dot(qt, kt, ACC, PRECISION) * scale
        if HAS_CENTERS:
            cy, cx, gamma = _load_centers(c_ptr + b * sc_b, sig_ptr + b * ss_b, p, p_mask, sc_m, ss_t, HW, W, ACC)
            s += gaussian_bias(qy[:, None], qx[:, None], cy[None, :], cx[None, :], gamma[None, :])
        s = tl.where(q_mask[:, None] & p_mask[None, :], s - lse[:, None], float("-inf"))
        pr = tl.exp(s)
        dp = tl.zeros([BLOCK_Q, BLOCK_P], ACC)
        for c0 in range(0, Cv, BLOCK_CV):
            cv = c0 + tl.arange(0, BLOCK_CV)
            cv_mask = cv < Cv
            do = tl.load(do_ptr + b * sdo_b + q[:, None] * sdo_n + cv[None, :] * sdo_c,
                         mask=q_mask[:, None] & cv_mask[None, :], other=0.0)               # [BQ, BCV]
            vt = tl.load(v_ptr + b * sv_b + cv[:, None] * sv_c + p[None, :] * sv_m,
                         mask=cv_mask[:, None] & p_mask[None, :], other=0.0)               # [BCV, BP]
            dp += dot(do, vt, ACC, PRECISION)
        ds = pr * (dp - delta[:, None])
        dq += dot(ds, tl.trans(kt), ACC, PRECISION)
    tl.store(dq_ptr + b * sdq_b + split * sdq_s + ck[None, :] * sdq_c + q[:, None] * sdq_n,
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask[:, None] & ck_mask[None, :])


# ---------------------------------------------------------------- host side


def _prepare(query_key, memory_key, memory_value, centers, sigma, scale):
    """Flattened views, their strides and the launch constants shared by every kernel."""
    B, Ck, H, W = query_key.shape
    T, Cv = memory_key.shape[2], memory_value.shape[1]
    acc = acc_dtype(query_key.dtype)
    q, k, v = flat(query_key, 2), flat(memory_key, 2), flat(memory_value, 2)
    has_centers = centers is not None
    if has_centers:
        c, sig = flat(centers, 1), sigma.to(acc)
    else:  # placeholders, never read
        c, sig = torch.empty(1, 1, dtype=torch.int64, device=q.device), torch.empty(1, 1, dtype=acc, device=q.device)
    block_cv = min(pow2(Cv), MAX_BLOCK_CV)
    args = dict(
        tensors=(q, k, v, c, sig, scale_tensor(scale, acc, q.device)),
        strides=(*q.stride(), *k.stride(), *v.stride(), *c.stride(), *sig.stride()),
        meta=dict(HAS_CENTERS=has_centers, ACC=tl_acc(query_key.dtype), PRECISION=dot_precision(query_key.dtype),
                  BLOCK_CK=pow2(Ck), BLOCK_CV=block_cv),
    )
    return B, Ck, Cv, T, H, W, acc, args


def kernel_guided_read(query_key, memory_key, memory_value, centers, sigma, scale, topk, topk_frames):
    check_supported(query_key, "kernel_guided_read")
    B, Ck, Cv, T, H, W, acc, a = _prepare(query_key, memory_key, memory_value, centers, sigma, scale)
    N, M, dev = H * W, T * H * W, query_key.device
    out = torch.empty(B, Cv, H, W, dtype=query_key.dtype, device=dev)
    lse = torch.empty(B, N, dtype=acc, device=dev)
    indices = torch.empty(B, N, topk, dtype=torch.int64, device=dev)
    if B == 0:
        return out, lse, indices
    n_cv = triton.cdiv(Cv, a["meta"]["BLOCK_CV"])
    splits, split_len = memory_splits(triton.cdiv(N, BLOCK_Q) * n_cv * B, M, dev)
    o, l = flat(out, 2), lse.view(B, 1, N)
    if splits > 1:
        o = torch.empty(B, splits, Cv, N, dtype=acc, device=dev)
        l = torch.empty(B, splits, N, dtype=acc, device=dev)
    o_strides = o.stride() if splits > 1 else (o.stride(0), 0, o.stride(1), o.stride(2))
    with device_guard(query_key):
        _fwd[lambda meta: (triton.cdiv(N, BLOCK_Q) * n_cv, splits, B)](
            *a["tensors"], o, l, *a["strides"], *o_strides, *l.stride(),
            N, M, N, W, Ck, Cv, split_len, BLOCK_Q=BLOCK_Q, **a["meta"])
        if splits > 1:
            _combine[(triton.cdiv(N, BLOCK_Q), B)](
                o, l, out, lse, splits, N, Cv, o.stride(0), o.stride(1), o.stride(2), l.stride(0), l.stride(1),
                out.stride(0), out.stride(1), BLOCK_Q=BLOCK_Q, BLOCK_CV=min(pow2(Cv), 16 if INTERPRET else 64))
        if topk > 0:
            _launch_topk(a, topk, topk_frames, indices, B, Ck, N, W, query_key.dtype)
    return out, lse, indices


def _launch_topk(a, topk, topk_frames, indices, B, Ck, N, W, dtype):
    q, k, _, c, sig, scale = a["tensors"]
    frames = constant(tuple(topk_frames), torch.int32, q.device)
    n_listed = len(topk_frames)
    # float32 keys keep every bit; float64 keys give up as few mantissa bits as the indices need.
    idx_bits = max(1, (n_listed * N - 1).bit_length()) if dtype == torch.float64 else 32
    meta = {key: a["meta"][key] for key in ("HAS_CENTERS", "ACC", "PRECISION", "BLOCK_CK")}
    block_q = 16  # tl.dot's minimum; the [BLOCK_Q, KP] sort dominates, so stay small
    _topk[(triton.cdiv(N, block_q), B)](
        q, k, c, sig, scale, frames, indices,
        *q.stride(), *k.stride(), *c.stride(), *sig.stride(), indices.stride(0), indices.stride(1),
        N, N, W, Ck, n_listed, topk, IDX_BITS=idx_bits, BLOCK_Q=block_q, KP=pow2(topk), **meta)


def kernel_guided_read_backward(grad_out, query_key, memory_key, memory_value, centers, sigma, out, lse, scale):
    check_supported(query_key, "kernel_guided_read_backward")
    B, Ck, Cv, T, H, W, acc, a = _prepare(query_key, memory_key, memory_value, centers, sigma, scale)
    N, M, dev = H * W, T * H * W, query_key.device
    dq = torch.empty(B, Ck, H, W, dtype=query_key.dtype, device=dev)
    dk = torch.empty(B, Ck, T, H, W, dtype=memory_key.dtype, device=dev)
    dv = torch.empty(B, Cv, T, H, W, dtype=memory_value.dtype, device=dev)
    if B == 0:
        return dq, dk, dv
    d_out = flat(grad_out, 2)
    delta = (d_out.to(acc) * flat(out, 2).to(acc)).sum(1).contiguous()  # D[q] = <dO[:, q], O[:, q]>
    lse = lse.to(acc).contiguous()
    n_cv = triton.cdiv(Cv, a["meta"]["BLOCK_CV"])
    splits, split_len = memory_splits(triton.cdiv(N, BLOCK_Q) * B, M, dev)
    # Partial sums (value tiles for dK, memory splits for dQ) go to float buffers summed here.
    dk_part = flat(dk, 2).unsqueeze(1) if n_cv == 1 else torch.empty(B, n_cv, Ck, M, dtype=acc, device=dev)
    dq_part = flat(dq, 2).unsqueeze(1) if splits == 1 else torch.empty(B, splits, Ck, N, dtype=acc, device=dev)
    dv_flat = flat(dv, 2)
    with device_guard(query_key):
        _bwd_kv[lambda meta: (triton.cdiv(M, meta["BLOCK_P"]) * n_cv, B)](
            *a["tensors"], d_out, lse, delta, dk_part, dv_flat, *a["strides"], *d_out.stride(),
            *dk_part.stride(), *dv_flat.stride(), N, M, N, W, Ck, Cv, **a["meta"])
        q_meta = {key: value for key, value in a["meta"].items() if key != "BLOCK_CV"}  # dQ picks its own
        _bwd_q[lambda meta: (triton.cdiv(N, meta["BLOCK_Q"]), splits, B)](
            *a["tensors"], d_out, lse, delta, dq_part, *a["strides"], *d_out.stride(), *dq_part.stride(),
            N, M, N, W, Ck, Cv, split_len, **q_meta)
    if n_cv > 1:
        dk.copy_(dk_part.sum(1).view_as(dk))
    if splits > 1:
        dq.copy_(dq_part.sum(1).view_as(dq))
    return dq, dk, dv
