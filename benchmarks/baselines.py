"""Baselines that hmmn_ops is measured against (see benchmarks/README.md).

Two families, all taking the public-API arguments of docs/ops.md:

* ``naive_*`` — the papers' equations computed the way the released HMMN code does it
  (github.com/Hongje/HMMN, model.py, re-written here from its description, not copied):
  materialise the ``T*H*W x H*W`` affinity, softmax over memory, multiply a dense Gaussian
  map and renormalise, ``torch.topk`` on the normalised attention; a dense ``H*W x H*W``
  window mask + masked argmax for local tracking, one dense Gaussian map per memory frame
  gathered along the tracking chain; a dense one-hot scattered from the top-k indices and
  ``nonzero`` + advanced indexing + einsum for the top-k read.
* ``dense_*`` / ``sdpa_read`` / ``flex_read`` — what a careful PyTorch user writes today:
  ``bmm + (log-Gaussian bias) + softmax + bmm``, PyTorch's scaled_dot_product_attention with
  the bias materialised as ``attn_mask``, FlexAttention with the bias as ``score_mod``.

Every function computes the same function as the hmmn_ops op of the same name (same outputs
up to rounding; tests/test_baselines.py checks it against hmmn_ops.reference) with these
documented differences:

* naive Gaussian read / naive gaussian_softmax: ``softmax(a) * G / sum(softmax(a) * G)``
  equals ``softmax(a + log G)`` in exact arithmetic, but in floating point the product
  underflows when every memory position is far from the query (small sigma, large grid)
  and the renormalisation gives 0/0 = NaN; hmmn_ops works in log space and never does.
  Top-k of the naive read ranks the *normalised attention*, which can order near-ties
  differently from the logits after rounding.
* naive_topk_read assumes distinct indices per query cell (they come from ``torch.topk``
  in HMMN): the one-hot scatter collapses duplicates, which hmmn_ops counts twice.
* sdpa_read / flex_read compute the top-k indices with a separate dense pass over the
  listed frames only (neither attention kernel returns them); SDPA's materialised bias is
  cast to the input dtype (in bf16 a Gaussian bias of ~100 is rounded by ~0.5).

Low-precision inputs are computed in their own dtype (as a user would), the Gaussian
coordinates in float32 (float64 for float64 inputs).
"""
import functools
import math

import torch
import torch.nn.functional as F

__all__ = [
    "window_mask",
    "chain_centers",
    "naive_kernel_read",
    "naive_tracked_read",
    "naive_gaussian_softmax",
    "naive_topk_read",
    "naive_local_track",
    "naive_global_track",
    "dense_read",
    "dense_tracked_read",
    "dense_gaussian_softmax",
    "sdpa_read",
    "flex_read",
]


# ---------------------------------------------------------------- shared helpers


def _coord_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(scale, channels):
    return 1.0 / math.sqrt(channels) if scale is None else float(scale)


def _sigma_bt(sigma, B, T):
    """(T,) or (B, T) sigma -> (B, T)."""
    return sigma.expand(B, T) if sigma.dim() == 1 else sigma


def _affinity(query_key, memory_key, scale):
    """(B, T*H*W, H*W): scale * <memory_key[p], query_key[q]>, rows memory, columns query."""
    B, Ck = query_key.shape[:2]
    mk = memory_key.reshape(B, Ck, -1).transpose(1, 2)
    return torch.bmm(mk, query_key.reshape(B, Ck, -1)).mul_(scale)


def _weighted_sum(memory_value, attention, H, W):
    """memory_value (B, Cv, T, H, W), attention (B, T*H*W, H*W) -> (B, Cv, H, W)."""
    B, Cv = memory_value.shape[:2]
    return torch.bmm(memory_value.reshape(B, Cv, -1), attention).view(B, Cv, H, W)


def _frame_rows(x, frames, hw):
    """Rows of the listed frames of a (B, T*H*W, ...) tensor, concatenated in the listed order."""
    return torch.cat([x[:, f * hw:(f + 1) * hw] for f in frames], dim=1)


def _topk_over_memory(scores, k, frames, hw):
    """Top-k memory positions (of the listed frames) per query: (B, H*W, k), sorted descending."""
    return torch.topk(_frame_rows(scores, frames, hw).transpose(1, 2), k, dim=2, sorted=True).indices


def _sq_distance(centers, H, W, dtype):
    """centers (B, M) flat query indices -> (B, M, H*W) squared pixel distance to every query."""
    device = centers.device
    cy = (centers // W).to(dtype).unsqueeze(-1)
    cx = (centers % W).to(dtype).unsqueeze(-1)
    qy = torch.arange(H, device=device, dtype=dtype).repeat_interleave(W)
    qx = torch.arange(W, device=device, dtype=dtype).repeat(H)
    return (qy - cy).square() + (qx - cx).square()


def _position_sigma(centers, sigma):
    """(B, T, H, W) centers, (T,)/(B, T) sigma -> flat centers (B, M) and sigma per position (B, M)."""
    B, T, H, W = centers.shape
    sig = _sigma_bt(sigma, B, T).repeat_interleave(H * W, dim=1)
    return centers.reshape(B, T * H * W), sig


def _gaussian_map(centers, sigma, H, W, dtype):
    """Dense Gaussian kernel exp(-d^2 / (2 sigma^2)) (B, M, H*W); 1 where centers == -1.

    centers (B, M) flat indices; sigma (B,) for all rows or (B, M) per row.
    """
    cd = _coord_dtype(dtype)
    sig = sigma.to(cd).view(sigma.shape[0], -1, 1)
    g = torch.exp(-_sq_distance(centers.clamp_min(0), H, W, cd) / (2 * sig.square()))
    return g.masked_fill_((centers < 0).unsqueeze(-1), 1.0).to(dtype)


def _log_gaussian_bias(centers, sigma, dtype):
    """-(d^2) / (2 sigma^2) per (memory position, query): (B, T*H*W, H*W); 0 where centers == -1."""
    H, W = centers.shape[-2:]
    flat, sig = _position_sigma(centers, sigma)
    cd = _coord_dtype(dtype)
    bias = _sq_distance(flat.clamp_min(0), H, W, cd).mul_((-0.5 / sig.to(cd).square()).unsqueeze(-1))
    return bias.masked_fill_((flat < 0).unsqueeze(-1), 0.0).to(dtype)


@functools.lru_cache(maxsize=8)
def _window_mask_cached(H, W, window, device):
    rad = window // 2
    ys, xs = torch.arange(H, device=device), torch.arange(W, device=device)
    far_y = (ys[:, None] - ys[None, :]).abs() > rad  # (H memory, H query)
    far_x = (xs[:, None] - xs[None, :]).abs() > rad
    return (far_y[:, None, :, None] | far_x[None, :, None, :]).reshape(H * W, H * W)


def window_mask(H, W, window, device):
    """Dense (H*W, H*W) bool mask, True where query q is outside memory pixel p's window.

    The released code builds it once per grid size with Python loops and caches it; it is
    cached here too, so its construction is not part of the timed baseline.
    """
    return _window_mask_cached(H, W, window, torch.device(device))


def chain_centers(step, chain):
    """Gaussian centres of every memory frame from the newest local track (docs/ops.md section 6).

    step: (B, H, W) local_track of the previous (newest memory) frame into the query;
    chain: (B, T-1, H, W), for each pixel of an older memory frame the flat index of the
    pixel of the previous frame it is tracked to. Returns centers (B, T, H, W): older
    frames are centred at ``step[chain]``, the previous frame at ``step``.
    """
    B, H, W = step.shape
    flat = step.reshape(B, H * W)
    older = flat.gather(1, chain.reshape(B, -1)).view(chain.shape)
    return torch.cat([older, step.unsqueeze(1)], dim=1)


# ---------------------------------------------------------------- naive, released-code style


def _renormalised_read(affinity, gauss, memory_value, H, W, topk, topk_frames):
    """softmax over memory, multiply the Gaussian, renormalise, weighted sum, topk (HMMN Memory)."""
    p = F.softmax(affinity, dim=1)
    if gauss is not None:
        p.mul_(gauss)
        p.div_(p.sum(dim=1, keepdim=True))
    out = _weighted_sum(memory_value, p, H, W)
    if topk > 0:
        return out, _topk_over_memory(p, topk, topk_frames, H * W)
    return out


def naive_kernel_read(query_key, memory_key, memory_value, centers=None, sigma=None, *,
                      scale=None, topk=0, topk_frames=None):
    """Released-style kernel_guided_read with given centres (docs/ops.md section 1)."""
    B, Ck, H, W = query_key.shape
    p = _affinity(query_key, memory_key, _scale(scale, Ck))
    gauss = None
    if centers is not None:
        flat, sig = _position_sigma(centers, sigma)
        gauss = _gaussian_map(flat, sig, H, W, p.dtype)
    frames = tuple(range(memory_key.shape[2])) if topk_frames is None else tuple(topk_frames)
    return _renormalised_read(p, gauss, memory_value, H, W, topk, frames)


def naive_tracked_read(query_key, memory_key, memory_value, chain, sigma, *, scale=None,
                       topk=0, topk_frames=None, window=7):
    """Released-style HMMN res4 read with tracking included (HMMN Memory.forward).

    Local track of the newest memory frame by a dense masked argmax over its block of the
    affinity, then one dense Gaussian map per memory frame, the older ones gathered along
    ``chain`` (see chain_centers), then the renormalised read. Same result as
    ``kernel_guided_read(..., centers=chain_centers(local_track(mk[:, :, -1], qk), chain))``.
    """
    B, Ck, T, H, W = memory_key.shape
    HW = H * W
    p = _affinity(query_key, memory_key, _scale(scale, Ck))
    newest = p[:, -HW:].clone().masked_fill_(window_mask(H, W, window, p.device), float("-inf"))
    step = newest.argmax(dim=2)  # (B, HW): local track of every previous-frame pixel
    sig = _sigma_bt(sigma, B, T)
    maps = []
    for t in range(T - 1):
        g = _gaussian_map(step, sig[:, t], H, W, p.dtype)  # rows: previous-frame pixels
        maps.append(torch.gather(g, 1, chain[:, t].reshape(B, HW, 1).expand(B, HW, HW)))
    maps.append(_gaussian_map(step, sig[:, T - 1], H, W, p.dtype))
    frames = tuple(range(T)) if topk_frames is None else tuple(topk_frames)
    return _renormalised_read(p, torch.cat(maps, dim=1), memory_value, H, W, topk, frames)


def naive_gaussian_softmax(affinity, centers, sigma, *, size):
    """softmax(affinity) * G / sum(softmax(affinity) * G) over dim 1 (HMMN Memory.forward)."""
    H, W = size
    flat, sig = _position_sigma(centers, sigma)
    p = F.softmax(affinity, dim=1)
    p.mul_(_gaussian_map(flat, sig, H, W, p.dtype))
    return p.div_(p.sum(dim=1, keepdim=True))


def naive_local_track(memory_key, query_key, window=7):
    """Dense masked argmax: the full H*W x H*W affinity, the window mask, argmax (HMMN)."""
    B, C, H, W = memory_key.shape
    p = torch.bmm(memory_key.reshape(B, C, -1).transpose(1, 2), query_key.reshape(B, C, -1))
    p.masked_fill_(window_mask(H, W, window, p.device), float("-inf"))
    return p.argmax(dim=2).view(B, H, W)


def naive_global_track(memory_key, query_key):
    """Dense argmax over the full T*H*W x H*W affinity (KMN's memory-to-query argmax)."""
    B, C, T, H, W = memory_key.shape
    return _affinity(query_key, memory_key, 1.0).argmax(dim=2).view(B, T, H, W)


def naive_topk_read(query_key, memory_key, memory_value, topk_indices, *, scale=None):
    """Released-style top-k guided read (HMMN Memory_topk).

    A dense one-hot (B, Hc*Wc, T*Hc*Wc) is scattered from the indices, ``nonzero`` turns it
    back into coordinates (so each cell's candidates come in memory order), advanced
    indexing gathers the r x r fine keys/values of every candidate, two einsums attend.
    Indices must be distinct per cell.
    """
    B, Ck, H, W = query_key.shape
    T, Cv = memory_key.shape[2], memory_value.shape[1]
    Nc, k = topk_indices.shape[1:]
    r = math.isqrt((H * W) // Nc)
    Hc, Wc = H // r, W // r
    one_hot = torch.zeros(B, Nc, T * Nc, dtype=query_key.dtype, device=query_key.device)
    one_hot.scatter_(2, topk_indices, 1.0)
    b, _, _, t, my, mx = torch.nonzero(one_hot.view(B, Hc, Wc, T, Hc, Wc)).unbind(1)

    def gather(x, C):  # (B, C, T, H, W) -> (B, Hc, Wc, k*r*r, C)
        cells = x.reshape(B, C, T, Hc, r, Wc, r).permute(0, 2, 3, 5, 4, 6, 1)[b, t, my, mx]
        return cells.reshape(B, Hc, Wc, k * r * r, C)

    keys, values = gather(memory_key, Ck), gather(memory_value, Cv)
    q = query_key.reshape(B, Ck, Hc, r, Wc, r).permute(0, 2, 4, 1, 3, 5)  # (B, Hc, Wc, Ck, r, r)
    p = torch.einsum("bhwnc,bhwcij->bhwijn", keys, q).mul_(_scale(scale, Ck))
    p = F.softmax(p, dim=-1)
    out = torch.einsum("bhwnc,bhwijn->bchiwj", values, p)
    return out.reshape(B, Cv, H, W)


# ---------------------------------------------------------------- dense, careful-user style


def dense_read(query_key, memory_key, memory_value, centers=None, sigma=None, *, scale=None,
               topk=0, topk_frames=None):
    """bmm + (log-Gaussian bias) + softmax + bmm; top-k by torch.topk over the logits.

    Without centres and top-k this is the plain STM read ``bmm + softmax + bmm``.
    """
    B, Ck, T, H, W = memory_key.shape
    logits = _affinity(query_key, memory_key, _scale(scale, Ck))
    if centers is not None:
        logits += _log_gaussian_bias(centers, sigma, logits.dtype)
    out = _weighted_sum(memory_value, F.softmax(logits, dim=1), H, W)
    if topk > 0:
        frames = tuple(range(T)) if topk_frames is None else tuple(topk_frames)
        return out, _topk_over_memory(logits, topk, frames, H * W)
    return out


def dense_tracked_read(query_key, memory_key, memory_value, chain, sigma, *, scale=None,
                       topk=0, topk_frames=None, window=7):
    """dense masked argmax for the local track, chained centres, then dense_read."""
    step = naive_local_track(memory_key[:, :, -1], query_key, window)
    return dense_read(query_key, memory_key, memory_value, chain_centers(step, chain), sigma,
                      scale=scale, topk=topk, topk_frames=topk_frames)


def dense_gaussian_softmax(affinity, centers, sigma, *, size):
    """softmax(affinity + log-Gaussian bias) over dim 1, the bias materialised."""
    return F.softmax(affinity + _log_gaussian_bias(centers, sigma, affinity.dtype), dim=1)


def _dense_topk(query_key, memory_key, centers, sigma, scale, topk, topk_frames):
    """Top-k by logits over the listed frames only (for kernels that cannot return it)."""
    T = memory_key.shape[2]
    frames = tuple(range(T)) if topk_frames is None else tuple(topk_frames)
    mk = memory_key[:, :, list(frames)]
    c = None if centers is None else centers[:, list(frames)]
    s = None if sigma is None else _sigma_bt(sigma, mk.shape[0], T)[:, list(frames)]
    logits = _affinity(query_key, mk, _scale(scale, query_key.shape[1]))
    if c is not None:
        logits += _log_gaussian_bias(c, s, logits.dtype)
    return torch.topk(logits.transpose(1, 2), topk, dim=2, sorted=True).indices


def _heads(x):
    """(B, C, ...) -> (B, 1, L, C): the one-head attention layout."""
    return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2).unsqueeze(1)


def _from_heads(out, H, W):
    """(B, 1, H*W, Cv) -> (B, Cv, H, W)."""
    return out.squeeze(1).transpose(1, 2).reshape(out.shape[0], -1, H, W)


def sdpa_read(query_key, memory_key, memory_value, centers=None, sigma=None, *, scale=None,
              topk=0, topk_frames=None):
    """F.scaled_dot_product_attention with the Gaussian bias materialised as attn_mask.

    On CUDA the math fallback is excluded, so a shape no fused kernel supports raises
    instead of silently timing the math path (memory-efficient attention is the one that
    takes a float bias).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, Ck, H, W = query_key.shape
    s = _scale(scale, Ck)
    q, k, v = _heads(query_key), _heads(memory_key), _heads(memory_value)
    mask = None
    if centers is not None:
        mask = _log_gaussian_bias(centers, sigma, q.dtype).transpose(1, 2).unsqueeze(1)
    if q.is_cuda:
        kernels = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    else:
        kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(kernels):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s)
    out = _from_heads(out, H, W)
    if topk > 0:
        return out, _dense_topk(query_key, memory_key, centers, sigma, s, topk, topk_frames)
    return out


def _flex_body(q, k, v, cy, cx, gamma, width, scale):
    from torch.nn.attention.flex_attention import flex_attention

    if cy is None:
        return flex_attention(q, k, v, scale=scale)

    def gaussian(score, b, h, q_idx, kv_idx):
        dy = (q_idx // width).to(torch.float32) - cy[b, kv_idx]
        dx = (q_idx % width).to(torch.float32) - cx[b, kv_idx]
        return score - (dy * dy + dx * dx) * gamma[b, kv_idx]

    return flex_attention(q, k, v, score_mod=gaussian, scale=scale)


@functools.lru_cache(maxsize=1)
def _flex_compiled():
    # Compiling the whole body (score_mod included) keeps one graph per shape instead of a
    # recompilation per new closure.
    return torch.compile(_flex_body, dynamic=False)


def flex_read(query_key, memory_key, memory_value, centers=None, sigma=None, *, scale=None,
              topk=0, topk_frames=None, compiled=None):
    """FlexAttention with the Gaussian bias computed in score_mod from per-position centres.

    compiled=None compiles on CUDA (the fused kernel) and runs eagerly elsewhere (an
    unfused implementation, only useful to check the math).
    """
    B, Ck, H, W = query_key.shape
    s = _scale(scale, Ck)
    q, k, v = _heads(query_key), _heads(memory_key), _heads(memory_value)
    cy = cx = gamma = None
    if centers is not None:
        flat, sig = _position_sigma(centers, sigma)
        c = flat.clamp_min(0)
        cy, cx = (c // W).float(), (c % W).float()
        gamma = (0.5 / sig.float().square()).masked_fill(flat < 0, 0.0)
    if compiled is None:
        compiled = q.is_cuda
    body = _flex_compiled() if compiled else _flex_body
    out = _from_heads(body(q, k, v, cy, cx, gamma, W, s), H, W)
    if topk > 0:
        return out, _dense_topk(query_key, memory_key, centers, sigma, s, topk, topk_frames)
    return out


# ---------------------------------------------------------------- memory_read (STCN / XMem / Cutie / DEVA / AOT)


def dense_memory_read(query_key, memory_key, memory_value, memory_shrinkage=None, query_selection=None, *,
                      similarity="dot", scale=None, topk=0, return_usage=False):
    """memory_read the way STCN's and XMem's released code computes it (re-written from their
    description): the whole ``Nm x Nq`` similarity (XMem's ``get_similarity``: ``-a_sq + 2ab - b_sq``
    times shrinkage / sqrt(Ck); STCN's ``2ab - a_sq``), then ``torch.topk`` over memory, ``exp`` of
    the top values, normalise, scatter into the (zeroed, reused) similarity matrix; or the
    max-subtracted full softmax; then ``V @ affinity``; usage = ``affinity.sum(dim=2)``.

    Differences from hmmn_ops: the top-k ``exp`` of the raw values (no max subtracted) gives 0/0
    where every selected score is below about -87 in float32 (hmmn_ops works in log space);
    ``b_sq`` is kept whenever a shrinkage is given (XMem drops it without a selection term, a
    different function; its released models always pass the selection).
    """
    B, Ck = memory_key.shape[:2]
    scale = _scale(scale, Ck)
    mk, qk = memory_key.flatten(2), query_key.flatten(2)
    if similarity == "dot":
        sim = mk.transpose(1, 2) @ qk                                             # B, Nm, Nq
    else:
        qe = None if query_selection is None else query_selection.flatten(2)
        if qe is not None:
            mkt = mk.transpose(1, 2)
            sim = 2 * (mkt @ (qk * qe)) - mkt.pow(2) @ qe - (qe * qk.pow(2)).sum(1, keepdim=True)
        else:
            sim = 2 * (mk.transpose(1, 2) @ qk) - mk.pow(2).sum(1).unsqueeze(2)
            if memory_shrinkage is not None:
                sim -= qk.pow(2).sum(1, keepdim=True)
    if memory_shrinkage is not None:
        sim *= memory_shrinkage.flatten(1).unsqueeze(2) * scale
    else:
        sim *= scale
    if topk:
        values, indices = torch.topk(sim, k=topk, dim=1)
        x_exp = values.exp_()
        x_exp /= torch.sum(x_exp, dim=1, keepdim=True)
        affinity = sim.zero_().scatter_(1, indices, x_exp)
    else:
        affinity = torch.exp(sim - torch.max(sim, dim=1, keepdim=True)[0])
        affinity /= torch.sum(affinity, dim=1, keepdim=True)
    out = torch.bmm(memory_value.flatten(2), affinity).view(*memory_value.shape[:2], *query_key.shape[2:])
    if return_usage:
        return out, affinity.sum(dim=2).view(B, *memory_key.shape[2:])
    return out


def gemm_bound(query_key, memory_key, memory_value):
    """The two products of a full read alone, ``K^T Q`` and ``V S``, with nothing between them:
    the time a fused full read (topk=0) cannot beat. A yardstick, not the same function."""
    scores = memory_key.flatten(2).transpose(1, 2) @ query_key.flatten(2)
    return torch.bmm(memory_value.flatten(2), scores)


def sdpa_memory_read(query_key, memory_key, memory_value, *, scale=None):
    """A full dot-product memory read (topk=0, similarity="dot") as one
    F.scaled_dot_product_attention call, whatever fused kernel torch picks for it: the
    attention library a user would reach for (AOT-style long-term attention). Same function."""
    q, k, v = _heads(query_key), _heads(memory_key), _heads(memory_value)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=_scale(scale, query_key.shape[1]))
    return out.squeeze(1).transpose(1, 2).reshape(memory_value.shape[0], memory_value.shape[1], *query_key.shape[2:])
