"""The recipes of docs/recipes.md: each model's memory read restated from its paper and released
code in plain PyTorch (float64), against hmmn_ops.memory_read called as the recipe says:
forward, usage, gradients; and the float32 near-tie rule for top-k comparisons."""
import math

import pytest
import torch

import hmmn_ops

F64 = torch.float64


def _leaves(*xs):
    return [x.clone().requires_grad_(True) for x in xs]


def _grads(out, leaves, weight):
    return torch.autograd.grad((out * weight).sum(), leaves)


def _close_all(got, want, **tol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


# ---------------------------------------------------------------- the models' formulas


def softmax_w_top(x, top):
    """STCN / XMem top-k softmax over dim 1: torch.topk, exp, normalise, scatter into zeros
    (the released codes exponentiate the raw values; fine at these magnitudes)."""
    values, indices = torch.topk(x, k=top, dim=1)
    x_exp = values.exp()
    x_exp = x_exp / x_exp.sum(dim=1, keepdim=True)
    return torch.zeros_like(x).scatter(1, indices, x_exp)


def stcn_read(mk, mv, qk, top):
    """STCN (eval): affinity = (2ab - a^2) / sqrt(CK), top-k softmax, mv @ affinity."""
    B, CK = mk.shape[:2]
    mk, qk = mk.flatten(2), qk.flatten(2)
    a_sq = mk.pow(2).sum(1).unsqueeze(2)
    ab = mk.transpose(1, 2) @ qk
    affinity = (2 * ab - a_sq) / math.sqrt(CK)                          # B, THW, HW
    affinity = softmax_w_top(affinity, top) if top else affinity.softmax(dim=1)
    return torch.bmm(mv.flatten(2), affinity)


def xmem_similarity(mk, ms, qk, qe):
    """XMem's get_similarity (also Cutie's and DEVA's): -a_sq + 2ab - b_sq, times ms / sqrt(CK)."""
    CK = mk.shape[1]
    mk, ms = mk.flatten(2).transpose(1, 2), ms.flatten(1).unsqueeze(2)
    qk, qe = qk.flatten(2), qe.flatten(2)
    a_sq = mk.pow(2) @ qe
    two_ab = 2 * (mk @ (qk * qe))
    b_sq = (qe * qk.pow(2)).sum(1, keepdim=True)
    return (-a_sq + two_ab - b_sq) * ms / math.sqrt(CK)                 # B, N, HW


def xmem_read(mk, ms, mv, qk, qe, top_k):
    """XMem's do_softmax (top-k, or the max-subtracted full softmax) with usage, and readout."""
    similarity = xmem_similarity(mk, ms, qk, qe)
    if top_k:
        affinity = softmax_w_top(similarity, top_k)
    else:
        x_exp = torch.exp(similarity - similarity.max(dim=1, keepdim=True)[0])
        affinity = x_exp / x_exp.sum(dim=1, keepdim=True)
    return mv.flatten(2) @ affinity, affinity.sum(dim=2)


def aot_attention(q, k, v, heads):
    """AOT's MultiheadAttention core: Q / sqrt(d_head) @ K^T, softmax over memory, @ V
    (q (B, heads*d, HW), k (B, heads*d, N), v (B, heads*dv, N))."""
    B, C, HW = q.shape
    d = C // heads
    Q = q.view(B, heads, d, HW).transpose(2, 3) / math.sqrt(d)         # bs, heads, hw, d
    K = k.view(B, heads, d, -1)                                          # bs, heads, d, n
    V = v.view(B, heads, v.shape[1] // heads, -1).transpose(2, 3)        # bs, heads, n, dv
    attn = (Q @ K).softmax(dim=-1)
    return (attn @ V).transpose(2, 3).reshape(B, -1, HW)


# ---------------------------------------------------------------- the recipes


@pytest.mark.parametrize("top", [20, 0], ids=["eval-top20", "train-full"])
def test_stcn(top):
    B, n_obj, Ck, Cv, T, H, W = 2, 3, 8, 4, 3, 4, 5
    mk, qk = torch.randn(B, Ck, T, H, W, dtype=F64), torch.randn(B, Ck, H, W, dtype=F64)
    mv = torch.randn(B, n_obj, Cv, T, H, W, dtype=F64)
    leaves = _leaves(mk, mv, qk)
    got = hmmn_ops.memory_read(leaves[2], leaves[0], leaves[1].flatten(1, 2), similarity="l2", topk=top)
    got = got.view(B, n_obj, Cv, H, W)
    want = stcn_read(leaves[0], leaves[1].flatten(1, 2), leaves[2], top).view(B, n_obj, Cv, H, W)
    torch.testing.assert_close(got, want)
    weight = torch.randn_like(want)
    _close_all(_grads(got, leaves, weight), _grads(want, leaves, weight))


def _xmem_memory(B, Ck, Cv, n_obj, L, T, H, W):
    """Long-term tokens (L) and working-memory frames (T, H, W), as XMem keeps them."""
    lk, ls, lv = torch.randn(B, Ck, L, dtype=F64), torch.rand(B, 1, L, dtype=F64) + 1, \
        torch.randn(B, n_obj * Cv, L, dtype=F64)
    wk, ws, wv = torch.randn(B, Ck, T, H, W, dtype=F64), torch.rand(B, 1, T, H, W, dtype=F64) + 1, \
        torch.randn(B, n_obj * Cv, T, H, W, dtype=F64)
    qk, qe = torch.randn(B, Ck, H, W, dtype=F64), torch.rand(B, Ck, H, W, dtype=F64)
    return lk, ls, lv, wk, ws, wv, qk, qe


@pytest.mark.parametrize("top_k", [30, 0], ids=["inference-top30", "training-full"])
def test_xmem_cutie_deva(top_k):
    B, Ck, Cv, n_obj, L, T, H, W = 1, 8, 5, 2, 17, 2, 3, 5   # L: no multiple of H*W
    leaves = _leaves(*_xmem_memory(B, Ck, Cv, n_obj, L, T, H, W))
    lk, ls, lv, wk, ws, wv, qk, qe = leaves
    mk = torch.cat([lk, wk.flatten(2)], -1)
    ms = torch.cat([ls, ws.flatten(2)], -1)
    mv = torch.cat([lv, wv.flatten(2)], -1)
    got, usage = hmmn_ops.memory_read(qk, mk, mv, similarity="l2", memory_shrinkage=ms, query_selection=qe,
                                      topk=top_k, return_usage=True)
    want, want_usage = xmem_read(mk, ms, mv, qk, qe, top_k)
    torch.testing.assert_close(got, want.view_as(got))
    torch.testing.assert_close(usage, want_usage.detach())
    assert usage.shape == (B, L + T * H * W) and not usage.requires_grad
    weight = torch.randn_like(got)
    _close_all(_grads(got, leaves, weight), _grads(want.view_as(got), leaves, weight))


def test_aot_heads_in_batch():
    B, heads, d, dv, HW, N = 2, 4, 6, 5, 7, 11
    q, k = torch.randn(B, heads * d, HW, dtype=F64), torch.randn(B, heads * d, N, dtype=F64)
    v = torch.randn(B, heads * dv, N, dtype=F64)
    leaves = _leaves(q, k, v)
    fold = lambda x, c: x.reshape(B * heads, c, x.shape[-1])  # noqa: E731
    got = hmmn_ops.memory_read(fold(leaves[0], d), fold(leaves[1], d), fold(leaves[2], dv)).reshape(B, heads * dv, HW)
    want = aot_attention(*leaves, heads)
    torch.testing.assert_close(got, want)
    weight = torch.randn_like(want)
    _close_all(_grads(got, leaves, weight), _grads(want, leaves, weight))


def test_float32_near_tie_swaps_at_most_the_kth_candidate():
    """A float32 read may order a near-tie at the k-th score either way: accept the float64
    top-k set, or that set with its k-th member swapped for the (k+1)-th when their float64
    scores are within float32 rounding. Anything else is a bug."""
    B, Ck, Cv, Nq, Nm, k = 1, 16, 3, 24, 40, 6
    qk, mk, mv = torch.randn(B, Ck, Nq), torch.randn(B, Ck, Nm), torch.randn(B, Cv, Nm)
    # Memory token 1 becomes a near-copy of each query's k-th best: a near-tie at the k-th score.
    s64 = -((mk.double()[:, :, :, None] - qk.double()[:, :, None, :]) ** 2).sum(1)       # B, Nm, Nq
    kth = s64.topk(k, dim=1).indices[0, k - 1, 0]
    mk[0, :, 1] = mk[0, :, kth] + 1e-7 * torch.randn(Ck)
    out = hmmn_ops.memory_read(qk, mk, mv, similarity="l2", topk=k)

    s64 = -((mk.double()[:, :, :, None] - qk.double()[:, :, None, :]) ** 2).sum(1) / math.sqrt(Ck)
    order = torch.sort(-s64, dim=1, stable=True).indices                                # ties: smaller index
    for q in range(Nq):
        top = order[0, : k + 1, q]
        sets = [top[:k]]
        s_k, s_next = s64[0, top[k - 1], q], s64[0, top[k], q]
        if (s_k - s_next).abs() <= 1e-5 * s_k.abs().clamp_min(1):
            sets.append(torch.cat([top[: k - 1], top[k:]]))
        reads = [(mv.double()[0][:, idx] * s64[0, idx, q].softmax(0)).sum(1) for idx in sets]
        assert any(torch.allclose(out[0, :, q].double(), r, rtol=1e-4, atol=1e-5) for r in reads), q
