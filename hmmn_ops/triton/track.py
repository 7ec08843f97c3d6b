"""local_track (docs/ops.md section 3) and global_track (docs/ops.md section 4) in Triton: fused dot product + argmax.

Ties go to the smaller flat query index: candidates are visited in increasing index order and
only a strictly larger score replaces the best (tl.argmax breaks ties to the left inside a block).
A NaN score ranks as -inf (docs/reliability.md). Offsets are int64 (index times stride).
"""
import torch
import triton
import triton.language as tl

from ._common import check_supported, config, device_guard, dot, dot_precision, flat, pow2, tl_acc, tuning

_LOCAL_TUNING = tuning([config(BLOCK=b, num_warps=w) for b in (16, 32) for w in (2, 4)], config(BLOCK=16))
_GLOBAL_TUNING = tuning(
    [config(BLOCK_P=p, BLOCK_Q=q, num_warps=w, num_stages=s) for p, q, w in
     ((64, 32, 4), (64, 64, 4), (64, 64, 8), (128, 32, 8), (128, 64, 8)) for s in (2, 3)],
    config(BLOCK_P=16, BLOCK_Q=16),
    full=[config(BLOCK_P=64, BLOCK_Q=32, num_warps=w, num_stages=2) for w in (4, 8)],
    width_arg="m_ptr",
)


@triton.autotune(**_LOCAL_TUNING, key=["BLOCK_C", "window"])
@triton.jit
def _local(m_ptr, q_ptr, o_ptr, sm_b, sm_c, sm_n, sq_b, sq_c, sq_n, H, W, C, window,
           ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    pix = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    valid = pix < H * W
    b = tl.program_id(1).to(tl.int64)
    y = pix // W
    x = pix % W
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    mk = tl.load(m_ptr + b * sm_b + pix[:, None] * sm_n + c[None, :] * sm_c,
                 mask=valid[:, None] & c_mask[None, :], other=0.0)                         # [BLOCK, C]
    rad = window // 2
    # The window's first in-frame pixel: the answer when no score beats -inf.
    best_idx = tl.maximum(y - rad, 0) * W + tl.maximum(x - rad, 0)
    best = tl.full([BLOCK], float("-inf"), ACC)
    for dy in range(-rad, rad + 1):
        qy = y + dy
        for dx in range(-rad, rad + 1):
            qx = x + dx
            inside = valid & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
            qpos = qy * W + qx
            qk = tl.load(q_ptr + b * sq_b + qpos[:, None] * sq_n + c[None, :] * sq_c,
                         mask=inside[:, None] & c_mask[None, :], other=0.0).to(ACC)
            score = tl.where(inside, tl.sum(mk.to(ACC) * qk, axis=1), float("-inf"))
            better = score > best
            best = tl.where(better, score, best)
            best_idx = tl.where(better, qpos, best_idx)
    tl.store(o_ptr + b * H * W + pix, best_idx.to(tl.int64), mask=valid)


@triton.autotune(**_GLOBAL_TUNING, key=["BLOCK_C"])
@triton.jit
def _global(m_ptr, q_ptr, o_ptr, sm_b, sm_c, sm_m, sq_b, sq_c, sq_n, M, N, C,
            ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
            BLOCK_C: tl.constexpr):
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    p_mask = p < M
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    mk = tl.load(m_ptr + b * sm_b + p[:, None] * sm_m + c[None, :] * sm_c,
                 mask=p_mask[:, None] & c_mask[None, :], other=0.0)                        # [BP, C]
    best = tl.full([BLOCK_P], float("-inf"), ACC)
    best_idx = tl.zeros([BLOCK_P], tl.int64)
    for q0 in range(0, N, BLOCK_Q):
        q = (q0 + tl.arange(0, BLOCK_Q)).to(tl.int64)
        q_mask = q < N
        qk = tl.load(q_ptr + b * sq_b + c[:, None] * sq_c + q[None, :] * sq_n,
                     mask=c_mask[:, None] & q_mask[None, :], other=0.0)                    # [C, BQ]
        s = dot(mk, qk, ACC, PRECISION)
        s = tl.where(q_mask[None, :] & (s == s), s, float("-inf"))  # NaN ranks as -inf
        block_best = tl.max(s, axis=1)
        block_idx = q0 + tl.argmax(s, axis=1, tie_break_left=True)
        better = block_best > best
        best = tl.where(better, block_best, best)
        best_idx = tl.where(better, block_idx, best_idx)
    tl.store(o_ptr + b * M + p, best_idx.to(tl.int64), mask=p_mask)


def local_track(memory_key, query_key, window):
    check_supported(memory_key, "local_track")
    B, C, H, W = memory_key.shape
    out = torch.empty(B, H, W, dtype=torch.int64, device=memory_key.device)
    if out.numel() == 0:
        return out
    window = 2 * min(window // 2, max(H, W) - 1) + 1  # offsets past the frame have no candidate
    mk, qk = flat(memory_key, 2), flat(query_key, 2)
    with device_guard(memory_key):
        _local[lambda meta: (triton.cdiv(H * W, meta["BLOCK"]), B)](
            mk, qk, out, *mk.stride(), *qk.stride(), H, W, C, window,
            ACC=tl_acc(memory_key.dtype), BLOCK_C=pow2(C, lo=1))
    return out


def global_track(memory_key, query_key):
    check_supported(memory_key, "global_track")
    B, C, T, H, W = memory_key.shape
    out = torch.empty(B, T, H, W, dtype=torch.int64, device=memory_key.device)
    if out.numel() == 0:
        return out
    mk, qk = flat(memory_key, 2), flat(query_key, 2)
    M, N = T * H * W, H * W
    with device_guard(memory_key):
        _global[lambda meta: (triton.cdiv(M, meta["BLOCK_P"]), B)](
            mk, qk, out, *mk.stride(), *qk.stride(), M, N, C,
            ACC=tl_acc(memory_key.dtype), PRECISION=dot_precision(memory_key.dtype), BLOCK_C=pow2(C))
    return out
