"""topk_guided_read (docs/ops.md section 5) in Triton: gather-and-attend over each coarse cell's candidates.

A coarse cell has only r*r fine queries (4 at res3), too few for a tl.dot tile, so one program
packs CELLS cells: its ROWS = CELLS * RR_PAD query rows (RR_PAD = r*r rounded up to a power of
two) meet COLS candidate columns, COLS // CELLS from each cell, and a block-diagonal mask keeps
every row to its own cell's candidates. The wasted products are cheap: the op is bound by the
gathers, not the math.

Candidate u of a cell (0 <= u < k*r*r) is fine pixel (u % rr) of coarse index u // rr. Memory
keys and values are read channels-last (B, M, C), so each candidate is one contiguous row.
The backward scatters dK/dV with atomics into float buffers (a duplicated index adds twice).
"""
import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    MIN_DOT,
    acc_dtype,
    check_supported,
    config,
    device_guard,
    dot,
    dot_precision,
    flat,
    pow2,
    saturate,
    scale_tensor,
    tl_acc,
    tuning,
)

MAX_BLOCK_CV = 16 if INTERPRET else 128

# GPU configs: the ones that do not spill (much) at Ck = 128, Cv = 256 (sm_90 ptxas, float16).
_FWD_TUNING = tuning(
    [config(COLS=c, num_warps=w, num_stages=s) for c, w, s in ((32, 8, 2), (32, 8, 3), (64, 8, 2), (32, 4, 2))],
    config(COLS=16),
    full=[config(COLS=32, num_warps=w, num_stages=2) for w in (4, 8)],
)
_BWD_TUNING = tuning(
    [config(COLS=c, num_warps=w, num_stages=2) for c, w in ((32, 8), (64, 8), (16, 4))],
    config(COLS=16),
    full=[config(COLS=c, num_warps=8, num_stages=2) for c in (16, 32)],
)


@triton.jit
def _cell_rows(cell_block, Nc, Wc, W, r, RR, CELLS: tl.constexpr, RR_PAD: tl.constexpr):
    """The program's query rows: (local cell of each row, row valid, flat fine query index)."""
    row = tl.arange(0, CELLS * RR_PAD)
    local = row // RR_PAD
    j = row % RR_PAD
    cell = cell_block * CELLS + local
    valid = (j < RR) & (cell < Nc)
    cell = tl.minimum(cell, Nc - 1)  # padding rows read a real cell; their results are dropped
    qpos = ((cell // Wc) * r + j // r) * W + (cell % Wc) * r + j % r
    return local, valid, tl.where(valid, qpos, 0)


@triton.jit
def _candidates(idx_ptr, si_c, si_k, cell_block, n0, Nc, Wc, HcWc, W, HW, r, RR, m,
                CELLS: tl.constexpr, COLS: tl.constexpr):
    """Columns n0.. of every packed cell: (local cell of each column, column valid, flat memory index).
    Cells past the end read the last real cell, so their padding rows stay finite; the backward
    gives those rows zero probability."""
    PER_CELL: tl.constexpr = COLS // CELLS
    col = tl.arange(0, COLS)
    local = col // PER_CELL
    u = n0 + col % PER_CELL
    cell = tl.minimum(cell_block * CELLS + local, Nc - 1)
    valid = u < m
    ci = tl.load(idx_ptr + cell * si_c + (u // RR) * si_k, mask=valid, other=0)
    off = u % RR
    rem = ci % HcWc
    pos = (ci // HcWc) * HW + ((rem // Wc) * r + off // r) * W + (rem % Wc) * r + off % r
    return local, valid, pos


@triton.autotune(**_FWD_TUNING, key=["BLOCK_CK", "BLOCK_CV", "RR_PAD"])
@triton.jit
def _fwd(q_ptr, k_ptr, v_ptr, idx_ptr, scale_ptr, o_ptr, lse_ptr,
         sq_b, sq_c, sq_n, sk_b, sk_m, sk_c, sv_b, sv_m, sv_c, si_b, si_c, si_k, so_b, so_c, so_n,
         Nc, Wc, HcWc, W, HW, r, RR, kk, Ck, Cv,
         ACC: tl.constexpr, PRECISION: tl.constexpr, CELLS: tl.constexpr, RR_PAD: tl.constexpr,
         BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr, COLS: tl.constexpr):
    n_cb = tl.cdiv(Nc, CELLS)
    cb = tl.program_id(0) % n_cb
    vb = tl.program_id(0) // n_cb
    b = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr)
    ROWS: tl.constexpr = CELLS * RR_PAD
    PER_CELL: tl.constexpr = COLS // CELLS
    ck = tl.arange(0, BLOCK_CK).to(tl.int64)
    ck_mask = ck < Ck
    cv = (vb * BLOCK_CV + tl.arange(0, BLOCK_CV)).to(tl.int64)
    cv_mask = cv < Cv
    row_cell, row_ok, qpos = _cell_rows(cb, Nc, Wc, W, r, RR, CELLS, RR_PAD)
    qt = tl.load(q_ptr + b * sq_b + qpos[:, None] * sq_n + ck[None, :] * sq_c,
                 mask=row_ok[:, None] & ck_mask[None, :], other=0.0)                      # [ROWS, CK]

    m_i = tl.full([ROWS], float("-inf"), ACC)
    l_i = tl.zeros([ROWS], ACC)
    acc = tl.zeros([ROWS, BLOCK_CV], ACC)
    m = kk * RR
    for n0 in range(0, m, PER_CELL):
        col_cell, col_ok, pos = _candidates(idx_ptr + b * si_b, si_c, si_k, cb, n0, Nc, Wc, HcWc, W, HW, r, RR, m,
                                            CELLS, COLS)
        kt = tl.load(k_ptr + b * sk_b + pos[None, :] * sk_m + ck[:, None] * sk_c,
                     mask=col_ok[None, :] & ck_mask[:, None], other=0.0)                  # [CK, COLS]
        s = dot(qt, kt, ACC, PRECISION) * scale
        # Every row has a valid column in each step (u = n0 < m of its own cell), so no -inf rows.
        s = tl.where((row_cell[:, None] == col_cell[None, :]) & col_ok[None, :], saturate(s), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(e, axis=1)
        vt = tl.load(v_ptr + b * sv_b + pos[:, None] * sv_m + cv[None, :] * sv_c,
                     mask=col_ok[:, None] & cv_mask[None, :], other=0.0)                  # [COLS, BCV]
        acc = acc * alpha[:, None] + dot(e, vt, ACC, PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + qpos[:, None] * so_n + cv[None, :] * so_c, out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & cv_mask[None, :])
    lse_ok = row_ok & (tl.zeros_like(qpos) + vb == 0)  # one value tile writes lse
    tl.store(lse_ptr + b * HW + qpos, m_i + tl.log(l_i), mask=lse_ok)


@triton.autotune(**_BWD_TUNING, key=["BLOCK_CK", "BLOCK_CV", "RR_PAD"], reset_to_zero=["dk_ptr", "dv_ptr"])
@triton.jit
def _bwd(q_ptr, k_ptr, v_ptr, idx_ptr, scale_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
         sq_b, sq_c, sq_n, sk_b, sk_m, sk_c, sv_b, sv_m, sv_c, si_b, si_c, si_k, sdo_b, sdo_c, sdo_n,
         sdq_b, sdq_c, sdq_n, sdk_b, sdv_b,
         Nc, Wc, HcWc, W, HW, r, RR, kk, Ck, Cv,
         ACC: tl.constexpr, PRECISION: tl.constexpr, CELLS: tl.constexpr, RR_PAD: tl.constexpr,
         BLOCK_CK: tl.constexpr, BLOCK_CV: tl.constexpr, COLS: tl.constexpr):
    """dK (B, M, Ck) and dV (B, M, Cv) are contiguous float buffers filled by atomics."""
    cb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr)
    ROWS: tl.constexpr = CELLS * RR_PAD
    PER_CELL: tl.constexpr = COLS // CELLS
    ck = tl.arange(0, BLOCK_CK).to(tl.int64)
    ck_mask = ck < Ck
    row_cell, row_ok, qpos = _cell_rows(cb, Nc, Wc, W, r, RR, CELLS, RR_PAD)
    qt = tl.load(q_ptr + b * sq_b + qpos[:, None] * sq_n + ck[None, :] * sq_c,
                 mask=row_ok[:, None] & ck_mask[None, :], other=0.0)                      # [ROWS, CK]
    lse = tl.load(lse_ptr + b * HW + qpos, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + b * HW + qpos, mask=row_ok, other=0.0)

    dq = tl.zeros([ROWS, BLOCK_CK], ACC)
    m = kk * RR
    for n0 in range(0, m, PER_CELL):
        col_cell, col_ok, pos = _candidates(idx_ptr + b * si_b, si_c, si_k, cb, n0, Nc, Wc, HcWc, W, HW, r, RR, m,
                                            CELLS, COLS)
        kt = tl.load(k_ptr + b * sk_b + pos[None, :] * sk_m + ck[:, None] * sk_c,
                     mask=col_ok[None, :] & ck_mask[:, None], other=0.0)                  # [CK, COLS]
        s = dot(qt, kt, ACC, PRECISION) * scale
        # Padding rows must add nothing to dK/dV: their probabilities are forced to 0.
        valid = (row_cell[:, None] == col_cell[None, :]) & col_ok[None, :] & row_ok[:, None]
        pr = tl.exp(tl.where(valid, saturate(s) - lse[:, None], float("-inf")))                     # [ROWS, COLS]
        dp = tl.zeros([ROWS, COLS], ACC)
        for c0 in range(0, Cv, BLOCK_CV):
            cv = (c0 + tl.arange(0, BLOCK_CV)).to(tl.int64)
            cv_mask = cv < Cv
            do = tl.load(do_ptr + b * sdo_b + qpos[:, None] * sdo_n + cv[None, :] * sdo_c,
                         mask=row_ok[:, None] & cv_mask[None, :], other=0.0)              # [ROWS, BCV]
            vt = tl.load(v_ptr + b * sv_b + pos[None, :] * sv_m + cv[:, None] * sv_c,
                         mask=col_ok[None, :] & cv_mask[:, None], other=0.0)              # [BCV, COLS]
            dp += dot(do, vt, ACC, PRECISION)
            dv = dot(tl.trans(pr), do, ACC, PRECISION)                                     # [COLS, BCV]
            tl.atomic_add(dv_ptr + b * sdv_b + pos[:, None] * Cv + cv[None, :], dv,
                          mask=col_ok[:, None] & cv_mask[None, :])
        ds = pr * (dp - delta[:, None])
        dq += dot(ds, tl.trans(kt), ACC, PRECISION)
        dk = dot(tl.trans(ds), qt, ACC, PRECISION) * scale                                 # [COLS, CK]
        tl.atomic_add(dk_ptr + b * sdk_b + pos[:, None] * Ck + ck[None, :], dk, mask=col_ok[:, None] & ck_mask[None, :])
    tl.store(dq_ptr + b * sdq_b + qpos[:, None] * sdq_n + ck[None, :] * sdq_c,
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & ck_mask[None, :])


# ---------------------------------------------------------------- host side


def _prepare(query_key, memory_key, memory_value, topk_indices, scale, ratio):
    _, Ck, H, W = query_key.shape
    Cv = memory_value.shape[1]
    r, rr = ratio, ratio * ratio
    Hc, Wc = H // r, W // r
    rr_pad = triton.next_power_of_2(rr)
    q = flat(query_key, 2)
    # Channels-last memory: one candidate = one contiguous row (a no-op if already so).
    k = flat(memory_key, 2).transpose(1, 2).contiguous()
    v = flat(memory_value, 2).transpose(1, 2).contiguous()
    acc = acc_dtype(query_key.dtype)
    geometry = (Hc * Wc, Wc, Hc * Wc, W, H * W, r, rr, topk_indices.shape[2], Ck, Cv)
    meta = dict(ACC=tl_acc(query_key.dtype), PRECISION=dot_precision(query_key.dtype),
                CELLS=max(1, MIN_DOT // rr_pad), RR_PAD=rr_pad, BLOCK_CK=pow2(Ck))
    strides = (*q.stride(), *k.stride(), *v.stride(), *topk_indices.stride())
    return q, k, v, scale_tensor(scale, acc, q.device), acc, geometry, meta, strides


def topk_guided_read(query_key, memory_key, memory_value, topk_indices, scale, ratio):
    check_supported(query_key, "topk_guided_read")
    B, _, H, W = query_key.shape
    Cv, dev = memory_value.shape[1], query_key.device
    out = torch.empty(B, Cv, H, W, dtype=query_key.dtype, device=dev)
    lse = torch.empty(B, H * W, dtype=acc_dtype(query_key.dtype), device=dev)
    if B == 0:
        return out, lse
    q, k, v, scale_t, _, geometry, meta, strides = _prepare(query_key, memory_key, memory_value, topk_indices,
                                                            scale, ratio)
    o = flat(out, 2)
    block_cv = min(pow2(Cv), MAX_BLOCK_CV)
    n_cv, n_cb = triton.cdiv(Cv, block_cv), triton.cdiv(geometry[0], meta["CELLS"])
    with device_guard(query_key):
        _fwd[(n_cb * n_cv, B)](q, k, v, topk_indices, scale_t, o, lse, *strides, *o.stride(), *geometry,
                               BLOCK_CV=block_cv, **meta)
    return out, lse


def topk_guided_read_backward(grad_out, query_key, memory_key, memory_value, topk_indices, out, lse, scale, ratio):
    check_supported(query_key, "topk_guided_read_backward")
    B, Ck, H, W = query_key.shape
    T, Cv, dev = memory_key.shape[2], memory_value.shape[1], query_key.device
    if B == 0:
        return tuple(torch.empty(x.shape, dtype=x.dtype, device=dev) for x in (query_key, memory_key, memory_value))
    q, k, v, scale_t, acc, geometry, meta, strides = _prepare(query_key, memory_key, memory_value, topk_indices,
                                                              scale, ratio)
    M = T * H * W
    d_out = flat(grad_out, 2)
    delta = (d_out.to(acc) * flat(out, 2).to(acc)).sum(1).contiguous()  # D[q] = <dO[:, q], O[:, q]>
    lse = lse.to(acc).contiguous()
    dq = torch.empty(B, Ck, H, W, dtype=query_key.dtype, device=dev)
    dk = torch.zeros(B, M, Ck, dtype=acc, device=dev)
    dv = torch.zeros(B, M, Cv, dtype=acc, device=dev)
    dq_flat = flat(dq, 2)
    with device_guard(query_key):
        _bwd[(triton.cdiv(geometry[0], meta["CELLS"]), B)](
            q, k, v, topk_indices, scale_t, d_out, lse, delta, dq_flat, dk, dv, *strides, *d_out.stride(),
            *dq_flat.stride(), dk.stride(0), dv.stride(0), *geometry, BLOCK_CV=min(pow2(Cv), MAX_BLOCK_CV), **meta)
    return dq, _channels_first(dk, memory_key), _channels_first(dv, memory_value)


def _channels_first(grad, like):
    """(B, T*H*W, C) float buffer -> contiguous (B, C, T, H, W) tensor of ``like``'s dtype, one copy."""
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return out.copy_(grad.transpose(1, 2).view(like.shape))
