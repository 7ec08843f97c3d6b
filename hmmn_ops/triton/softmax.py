"""gaussian_softmax (docs/ops.md section 2) and its backward in Triton.

One program = (block of query columns, batch). Softmax runs down dim 1 (memory), so each
program makes two passes over its columns: running max / sum, then the normalised write
(backward: the column sum of grad * output, then the write). Loads are contiguous along queries.
"""
import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, center_terms, check_supported, config, device_guard, gaussian_bias, saturate, tl_acc,
                      tuning)

_TUNING = tuning(
    [config(BLOCK_P=p, BLOCK_Q=q, num_warps=w) for p, q, w in
     ((32, 64, 4), (32, 128, 4), (64, 64, 4), (32, 64, 8), (64, 128, 8))],
    config(BLOCK_P=16, BLOCK_Q=16),
)


@triton.jit
def _logits(a_ptr, c_ptr, sig_ptr, p, p_mask, q, q_mask, qy, qx, sa_m, sa_n, sc_m, ss_t, HW, W, ACC: tl.constexpr):
    """affinity + Gaussian bias for a [BLOCK_P, BLOCK_Q] tile, saturated; -inf on memory rows past
    the end (columns past the end read 0 so every column stays finite). Offsets in int64: p * sa_m
    passes 2^31 at real sizes (1080p res4, T >= 33)."""
    x = tl.load(a_ptr + p[:, None] * sa_m + q[None, :] * sa_n, mask=p_mask[:, None] & q_mask[None, :], other=0.0)
    c = tl.load(c_ptr + p * sc_m, mask=p_mask, other=-1)
    s = tl.load(sig_ptr + (p // HW) * ss_t, mask=p_mask, other=1.0)
    cy, cx, gamma = center_terms(c, s, W, ACC)
    x = x.to(ACC) + gaussian_bias(qy[None, :], qx[None, :], cy[:, None], cx[:, None], gamma[:, None])
    return tl.where(p_mask[:, None], saturate(x), float("-inf"))


@triton.autotune(**_TUNING, key=["M_BUCKET"])
@triton.jit
def _fwd(a_ptr, c_ptr, sig_ptr, o_ptr, sa_b, sa_m, sa_n, sc_b, sc_m, ss_b, ss_t, so_b, so_m, so_n,
         M, HW, W, M_BUCKET, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    q = (tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)  # 64-bit offsets, as _logits
    q_mask = q < HW
    b = tl.program_id(1).to(tl.int64)
    a_ptr += b * sa_b
    c_ptr += b * sc_b
    sig_ptr += b * ss_b
    qy = (q // W).to(ACC)
    qx = (q % W).to(ACC)
    m_i = tl.full([BLOCK_Q], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_Q], ACC)
    for p0 in range(0, M, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        x = _logits(a_ptr, c_ptr, sig_ptr, p, p < M, q, q_mask, qy, qx, sa_m, sa_n, sc_m, ss_t, HW, W, ACC)
        m_new = tl.maximum(m_i, tl.max(x, axis=0))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(x - m_new[None, :]), axis=0)
        m_i = m_new
    for p0 in range(0, M, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        p_mask = p < M
        x = _logits(a_ptr, c_ptr, sig_ptr, p, p_mask, q, q_mask, qy, qx, sa_m, sa_n, sc_m, ss_t, HW, W, ACC)
        y = tl.exp(x - m_i[None, :]) / l_i[None, :]
        tl.store(o_ptr + b * so_b + p[:, None] * so_m + q[None, :] * so_n, y.to(o_ptr.dtype.element_ty),
                 mask=p_mask[:, None] & q_mask[None, :])


@triton.autotune(**_TUNING, key=["M_BUCKET"])
@triton.jit
def _bwd(g_ptr, y_ptr, o_ptr, sg_b, sg_m, sg_n, sy_b, sy_m, sy_n, so_b, so_m, so_n,
         M, N, M_BUCKET, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    q = (tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)  # 64-bit offsets, as _logits
    q_mask = q < N
    b = tl.program_id(1).to(tl.int64)
    g_ptr += b * sg_b
    y_ptr += b * sy_b
    total = tl.zeros([BLOCK_Q], ACC)
    for p0 in range(0, M, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        mask = (p[:, None] < M) & q_mask[None, :]
        g = tl.load(g_ptr + p[:, None] * sg_m + q[None, :] * sg_n, mask=mask, other=0.0).to(ACC)
        y = tl.load(y_ptr + p[:, None] * sy_m + q[None, :] * sy_n, mask=mask, other=0.0).to(ACC)
        total += tl.sum(g * y, axis=0)
    for p0 in range(0, M, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        mask = (p[:, None] < M) & q_mask[None, :]
        g = tl.load(g_ptr + p[:, None] * sg_m + q[None, :] * sg_n, mask=mask, other=0.0).to(ACC)
        y = tl.load(y_ptr + p[:, None] * sy_m + q[None, :] * sy_n, mask=mask, other=0.0).to(ACC)
        dx = y * (g - total[None, :])
        tl.store(o_ptr + b * so_b + p[:, None] * so_m + q[None, :] * so_n, dx.to(o_ptr.dtype.element_ty), mask=mask)


def _bucket(m):
    """Autotune key: memory length rounded to a power of two, so growing memories reuse tunings."""
    return triton.next_power_of_2(m)


def gaussian_softmax(affinity, centers, sigma, height, width):
    check_supported(affinity, "gaussian_softmax")
    B, M, N = affinity.shape
    out = torch.empty(affinity.shape, dtype=affinity.dtype, device=affinity.device)
    if out.numel() == 0:
        return out
    acc = acc_dtype(affinity.dtype)
    c = centers.reshape(B, M)
    sig = sigma.to(acc)
    with device_guard(affinity):
        _fwd[lambda meta: (triton.cdiv(N, meta["BLOCK_Q"]), B)](
            affinity, c, sig, out, *affinity.stride(), *c.stride(), *sig.stride(), *out.stride(),
            M, N, width, _bucket(M), ACC=tl_acc(affinity.dtype))
    return out


def gaussian_softmax_backward(grad_output, output):
    check_supported(output, "gaussian_softmax_backward")
    B, M, N = output.shape
    grad = torch.empty(output.shape, dtype=output.dtype, device=output.device)
    if grad.numel() == 0:
        return grad
    with device_guard(output):
        _bwd[lambda meta: (triton.cdiv(N, meta["BLOCK_Q"]), B)](
            grad_output, output, grad, *grad_output.stride(), *output.stride(), *grad.stride(),
            M, N, _bucket(M), ACC=tl_acc(output.dtype))
    return grad
