"""memory_read (the STCN / XMem / Cutie / DEVA / AOT read, docs/internals.md) in Triton.

The full read (topk = 0), its usage and backward, and the top-k selection are the shared read
engine's kernels (``_engine.py``) with the dot / l2 score options (shrinkage w, selection e).
memory_read's own kernels read each query's k selected positions, which share no tile for
tl.dot:

  _fwd_topk  per query, gathers only its k selected keys and values (one selected position per
             step, online softmax over the k steps).
  _bwd_topk  top-k backward, one program = query block: dQ, de in registers; dK, dV, dw
             scattered with atomics into float buffers.
"""
import torch
import triton
import triton.language as tl

from . import _engine
from ._common import INTERPRET, check_supported, device_guard, saturate
from ._engine import TOPK_BLOCK_Q, span, tile, tile_program

TOPK_MAX = 1024  # KP above this would not fit a program's registers on a GPU


# ---------------------------------------------------------------- top-k read kernels


@triton.jit
def _gathered(q_ptr, e_ptr, k_ptr, w_ptr, idx_ptr, b, q, q_mask, j, ck, ck_mask, scale,
              sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sw_b, sw_m, si_b, si_n,
              L2: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr, ACC: tl.constexpr):
    """Selected position ``j`` of each query of the block: (index, K rows [BQ, CK], Q, e, w, d2, s).
    The per-query pairs are gathered, so the scores are direct sums (no block product)."""
    pos = tl.load(idx_ptr + b * si_b + q * si_n + j, mask=q_mask, other=0)
    qt = tile(q_ptr + b * sq_b, q, q_mask, sq_n, ck, ck_mask, sq_c).to(ACC)
    kt = tile(k_ptr + b * sk_b, pos, q_mask, sk_m, ck, ck_mask, sk_c).to(ACC)
    et = tl.full([1, 1], 1.0, ACC)
    if HAS_E:
        et = tile(e_ptr + b * se_b, q, q_mask, se_n, ck, ck_mask, se_c).to(ACC)
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
    return pos, kt, qt, et, w, d2, saturate(s)


@triton.jit
def _fwd_topk(q_ptr, e_ptr, k_ptr, v_ptr, w_ptr, scale_ptr, idx_ptr, o_ptr, lse_ptr, s_ptr,
              sq_b, sq_c, sq_n, se_b, se_c, se_n, sk_b, sk_c, sk_m, sv_b, sv_c, sv_m, sw_b, sw_m, si_b, si_n,
              N, Ck, Cv, topk,
              L2: tl.constexpr, HAS_W: tl.constexpr, HAS_E: tl.constexpr, ACC: tl.constexpr,
              SAVE_S: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr):
    """Online softmax over each query's k selected positions; only those k values are read.
    SAVE_S keeps the scores (B, N, topk) for the usage."""
    q, q_mask, cv, cv_mask, vb = tile_program(tl.program_id(0), N, BLOCK_Q, Cv, BLOCK_CV)
    b = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr)
    ck, ck_mask = span(0, BLOCK_CK, Ck)
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
        vt = tile(v_ptr + b * sv_b, pos, q_mask, sv_m, cv, cv_mask, sv_c).to(ACC)             # [BQ, BCV]
        acc = acc * alpha[:, None] + pr[:, None] * vt
        m_i = m_new
    tl.store(o_ptr + b * Cv * N + cv[None, :] * N + q[:, None], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
             mask=q_mask[:, None] & cv_mask[None, :])
    tl.store(lse_ptr + b * N + q, m_i + tl.log(l_i), mask=q < tl.where(vb == 0, N, 0))


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
    q, q_mask = span(tl.program_id(0) * BLOCK_Q, BLOCK_Q, N)
    b = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr)
    ck, ck_mask = span(0, BLOCK_CK, Ck)
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
            cv, cv_mask = span(c0, BLOCK_CV, Cv)
            vmask = q_mask[:, None] & cv_mask[None, :]
            do = tile(do_ptr + b * sdo_b, q, q_mask, sdo_n, cv, cv_mask, sdo_c).to(ACC)       # [BQ, BCV]
            vt = tile(v_ptr + b * sv_b, pos, q_mask, sv_m, cv, cv_mask, sv_c).to(ACC)
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


def _args(query_key, memory_key, memory_value, memory_shrinkage, query_selection, similarity, scale):
    return _engine.Args(query_key, memory_key, memory_value, scale, shrinkage=memory_shrinkage,
                        selection=query_selection, l2=similarity == "l2")


def _check_topk(topk):
    if topk > TOPK_MAX and not INTERPRET:
        raise RuntimeError(f"hmmn_ops.triton.memory_read: topk={topk} is above the Triton kernels' limit of "
                           f"{TOPK_MAX}; use topk=0 (the full read) or another backend")


def memory_read(query_key, memory_key, memory_value, memory_shrinkage, query_selection, similarity, scale, topk,
                return_usage):
    check_supported(query_key, "memory_read")
    a = _args(query_key, memory_key, memory_value, memory_shrinkage, query_selection, similarity, scale)
    B, N, Cv, M, dev = a.B, a.N, a.Cv, a.M, a.device
    out = torch.empty(B, Cv, N, dtype=a.dtype, device=dev)
    lse = torch.empty(B, N, dtype=a.acc, device=dev)
    indices = torch.empty(B, N, topk, dtype=torch.int64, device=dev)
    usage = torch.zeros(B, M if return_usage else 0, dtype=a.acc, device=dev)
    if B == 0 or N == 0:
        return out, lse, indices, usage
    with device_guard(query_key):
        if topk == 0:
            _engine.full_forward(a, out, lse)
            if return_usage:
                _engine.full_usage(a, out, lse, usage)
            return out, lse, indices, usage
        _check_topk(topk)
        _engine.select_topk(a, indices, topk, (0,), M)  # one "frame": the whole memory
        scores = torch.empty(B, N, topk, dtype=a.acc, device=dev) if return_usage else lse  # lse: never written
        _fwd_topk[(triton.cdiv(N, TOPK_BLOCK_Q) * a.n_cv, B)](
            *a.tensors[:5], a.scale, indices, out, lse, scores, *a.strides[:14], indices.stride(0), indices.stride(1),
            N, a.Ck, Cv, topk, SAVE_S=return_usage, BLOCK_Q=TOPK_BLOCK_Q, BLOCK_CV=a.block_cv,
            **a.select("L2", "HAS_W", "HAS_E", "ACC", "BLOCK_CK"))
    if return_usage:  # P of the selected pairs, scattered: O(B * N * topk) extra
        usage.scatter_add_(1, indices.view(B, -1), (scores - lse[..., None]).exp_().view(B, -1))
    return out, lse, indices, usage


def memory_read_backward(grad_out, query_key, memory_key, memory_value, memory_shrinkage, query_selection, out, lse,
                         topk_indices, similarity, scale):
    check_supported(query_key, "memory_read_backward")
    a = _args(query_key, memory_key, memory_value, memory_shrinkage, query_selection, similarity, scale)
    B, Ck, N, M, dev = a.B, a.Ck, a.N, a.M, a.device
    grads = [torch.zeros(x.shape, dtype=x.dtype, device=dev) for x in (query_key, memory_key, memory_value)]
    grads.append(torch.zeros(B, M, dtype=a.dtype, device=dev) if a.has_w else torch.empty(0, dtype=a.dtype, device=dev))
    grads.append(torch.zeros(B, Ck, N, dtype=a.dtype, device=dev) if a.has_e
                 else torch.empty(0, dtype=a.dtype, device=dev))
    if B == 0 or N == 0:
        return tuple(grads)
    delta = _engine.softmax_delta(grad_out, out, a.acc)
    lse = lse.to(a.acc).contiguous()
    with device_guard(query_key):
        if topk_indices.shape[2] > 0:  # the kernels step along k with stride 1
            return _topk_backward(a, grad_out, lse, delta, topk_indices.contiguous(), grads)
        _engine.full_backward(a, grad_out, lse, delta, *grads)
    return tuple(grads)


def _topk_backward(a, grad_out, lse, delta, topk_indices, grads):
    B, Ck, N, Cv, M, dev, acc = a.B, a.Ck, a.N, a.Cv, a.M, a.device, a.acc
    dq, dk, dv, dw, de = grads
    dk_buf = torch.zeros(B, Ck, M, dtype=acc, device=dev)
    dv_buf = torch.zeros(B, Cv, M, dtype=acc, device=dev)
    dw_buf = torch.zeros(B, M if a.has_w else 1, dtype=acc, device=dev)
    _bwd_topk[(triton.cdiv(N, TOPK_BLOCK_Q), B)](
        *a.tensors[:5], a.scale, topk_indices, grad_out, lse, delta, dq, de if a.has_e else dq, dk_buf, dv_buf, dw_buf,
        *a.strides[:14], topk_indices.stride(0), topk_indices.stride(1), *grad_out.stride(),
        N, M, Ck, Cv, topk_indices.shape[2], BLOCK_Q=TOPK_BLOCK_Q, BLOCK_CV=a.block_cv,
        **a.select("L2", "HAS_W", "HAS_E", "ACC", "BLOCK_CK"))
    dk.copy_(dk_buf)
    dv.copy_(dv_buf)
    if a.has_w:
        dw.copy_(dw_buf)
    return dq, dk, dv, dw, de
