"""Pure-PyTorch reference of every op: the readable spec, the test oracle, the last fallback.

Functions take the canonical arguments of docs/internals.md (the public front in ops.py
checks and normalises them first). Everything is computed in the accumulation dtype
(float64 for float64 inputs, float32 otherwise) and cast back at the end.

They stay usable at real sizes: reads process queries (or coarse cells) in chunks, so no
more than about ``CHUNK_ELEMENTS`` scores exist at once, never the whole
``T*H*W x H*W`` affinity.
"""
import torch

# Upper bound on the elements of one score slice (memory x query chunk). 4M float32 = 16 MB;
# a chunk holds a few such temporaries.
CHUNK_ELEMENTS = 1 << 22

__all__ = [
    "kernel_guided_read",
    "kernel_guided_read_backward",
    "gaussian_softmax",
    "gaussian_softmax_backward",
    "local_track",
    "global_track",
    "topk_guided_read",
    "topk_guided_read_backward",
    "memory_read",
    "memory_read_backward",
]


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(total, per_item):
    """Ranges covering [0, total) whose length times per_item stays near CHUNK_ELEMENTS."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_item))
    return [(s, min(s + step, total)) for s in range(0, total, step)]


# Logits saturate at +-LOGIT_BOUND (by accumulation dtype), far inside the finite range so that
# a log-sum-exp of saturated logits stays finite too.
LOGIT_BOUND = {torch.float32: 1e36, torch.float64: 1e300}


def saturate_(logits):
    """Clamp logits to +-LOGIT_BOUND, in place (NaN stays NaN): an overflow (huge scale, sigma so
    tiny that 1 / (2 sigma^2) is inf) saturates instead of making inf - inf = NaN in the softmax
    (docs/reliability.md)."""
    big = LOGIT_BOUND[logits.dtype]
    return logits.clamp_(-big, big)


def rank_order(scores, dim):
    """Indices sorting ``scores`` along ``dim`` by descending value, ties (and NaN, which ranks
    as -inf: last) to the smaller index: the top-k and argmax order of docs/reliability.md."""
    return torch.sort(scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")), dim=dim,
                      descending=True, stable=True).indices


def rank_argmax(scores, dim):
    """First index of the largest value along ``dim``, NaN ranking as -inf (rank_order's first)."""
    return scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")).argmax(dim=dim)


def _gaussian_bias(centers, gamma, width, q0, q1):
    """-(squared distance from query q to centre c(p)) * gamma[p]; 0 where centers[p] == -1.

    centers: (B, M) int64 flat query indices or -1; gamma: (B, M) = 1 / (2 sigma^2) per memory
    position. Returns (B, M, q1 - q0) for queries q0..q1-1.
    """
    q = torch.arange(q0, q1, device=centers.device)
    qy, qx = (q // width).to(gamma.dtype), (q % width).to(gamma.dtype)
    c = centers.clamp_min(0)
    cy, cx = (c // width).to(gamma.dtype).unsqueeze(-1), (c % width).to(gamma.dtype).unsqueeze(-1)
    d2 = (qy - cy).square() + (qx - cx).square()
    # d2 == 0 contributes exactly 0, even where gamma overflowed to inf (no 0 * inf).
    bias = torch.where(d2 == 0, 0.0, -d2 * gamma.unsqueeze(-1))
    return bias.masked_fill_((centers < 0).unsqueeze(-1), 0.0)


def _gamma(sigma, hw):
    """(B, T) sigma -> (B, T*H*W) Gaussian coefficient 1 / (2 sigma^2) per memory position."""
    return (0.5 / sigma.square()).repeat_interleave(hw, dim=1)


class _Scores:
    """The scores s[b, p, q] of a read, per chunk of queries, and their gradient: the one
    logit engine every read here shares.

    "dot": ``s = scale * K^T Q`` (+ the Gaussian bias of kernel_guided_read where ``centers``
    is given); "l2": ``s = -scale * w[p] * sum_c e[c, q] (K[c, p] - Q[c, q])^2``, expanded into
    block products as the fused kernels compute it: ``sum_c e K^2 - 2 sum_c K (e Q) + sum_c e Q^2``.
    ``backward`` accumulates dQ, dK (and dw, de when given) from ``dS = dL/ds`` of a chunk.
    """

    def __init__(self, q, k, scale, similarity="dot", shrinkage=None, selection=None, centers=None, gamma=None,
                 width=1):
        self.q, self.k, self.scale, self.similarity = q, k, scale, similarity
        self.w, self.e = shrinkage, selection
        self.centers, self.gamma, self.width = centers, gamma, width
        if similarity == "l2":
            self.u = -scale * (shrinkage if shrinkage is not None else torch.ones_like(k[:, 0]))  # (B, M)
            self.k_sq = k.square()
        self.dq, self.dk = torch.zeros_like(q), torch.zeros_like(k)
        self.dw = torch.zeros_like(shrinkage) if shrinkage is not None else None
        self.de = torch.zeros_like(selection) if selection is not None else None

    def _selected_query(self, q0, q1):
        """(Q, e*Q, e) of queries q0..q1-1, e = None without selection."""
        qc = self.q[:, :, q0:q1]
        if self.e is None:
            return qc, qc, None
        e = self.e[:, :, q0:q1]
        return qc, e * qc, e

    def _distance(self, q0, q1):
        """d2[p, q] = sum_c e[c, q] (K[c, p] - Q[c, q])^2 as block products: (B, M, n)."""
        qc, eq, e = self._selected_query(q0, q1)
        k_t = self.k.transpose(1, 2)
        if e is None:
            d2 = self.k_sq.sum(1).unsqueeze(-1) - 2 * torch.bmm(k_t, qc)
        else:
            d2 = torch.bmm(self.k_sq.transpose(1, 2), e).sub_(torch.bmm(k_t, eq), alpha=2)
        return d2.add_((eq * qc).sum(1).unsqueeze(1))

    def __call__(self, q0, q1):
        if self.similarity == "l2":
            return saturate_(self._distance(q0, q1).mul_(self.u.unsqueeze(-1)))
        logits = torch.bmm(self.k.transpose(1, 2), self.q[:, :, q0:q1]).mul_(self.scale)
        if self.centers is not None:
            logits += _gaussian_bias(self.centers, self.gamma, self.width, q0, q1)
        return saturate_(logits)

    def backward(self, d_scores, q0, q1):
        qc, eq, e = self._selected_query(q0, q1)
        if self.similarity == "dot":
            self.dq[:, :, q0:q1] = torch.bmm(self.k, d_scores).mul_(self.scale)
            self.dk += torch.bmm(qc, d_scores.transpose(1, 2)).mul_(self.scale)
            return
        if self.dw is not None:
            self.dw -= self.scale * (d_scores * self._distance(q0, q1)).sum(2)
        ds_u = d_scores * self.u.unsqueeze(-1)  # dL/d(d2)
        ds_t = ds_u.transpose(1, 2)
        col = ds_u.sum(1).unsqueeze(1)          # (B, 1, n): sum_p dS u
        k_ds = torch.bmm(self.k, ds_u)          # (B, Ck, n): sum_p dS u K
        # d2 = sum_c e K^2 - 2 K (eQ) + e Q^2
        ones = torch.ones_like(qc) if e is None else e
        self.dk += 2 * (self.k * torch.bmm(ones, ds_t) - torch.bmm(eq, ds_t))
        self.dq[:, :, q0:q1] = 2 * ones * (qc * col - k_ds)
        if self.de is not None:
            self.de[:, :, q0:q1] = torch.bmm(self.k_sq, ds_u) - 2 * qc * k_ds + qc.square() * col


def _attend(scores, v, nq, *, topk=0, restrict=False, topk_columns=None, usage=False):
    """The forward of every read: log-space softmax over memory of ``scores`` (a _Scores),
    ``out = V P``, in query chunks. With ``topk``: the top-k memory positions of each query
    (among ``topk_columns`` if given; ties to the smaller index), and with
    ``restrict`` the softmax runs over them only. Returns (out, lse, indices, usage)."""
    B, Cv, M = v.shape
    out, lse = v.new_empty(B, Cv, nq), v.new_empty(B, nq)
    indices = torch.empty(B, nq, topk, dtype=torch.int64, device=v.device)
    used = v.new_zeros(B, M if usage else 0)
    for q0, q1 in _chunks(nq, B * M * 3):
        logits = scores(q0, q1)
        if topk > 0:
            candidates = logits if topk_columns is None else logits[:, topk_columns]
            order = _topk_indices(candidates, topk)
            indices[:, q0:q1] = order.transpose(1, 2)
            if restrict:
                logits = _keep(logits, order)
        lse[:, q0:q1] = torch.logsumexp(logits, dim=1)
        # softmax, not exp(logits - lse): at saturated magnitudes lse cannot hold log(count)
        probs = torch.softmax(logits, dim=1)
        out[:, :, q0:q1] = torch.bmm(v, probs)
        if usage:
            used += probs.sum(2)
    return out, lse, indices, used


def _topk_indices(scores, k):
    """Indices (B, k, n) of the k largest of scores (B, M, n) along dim 1, by descending score,
    ties to the smaller index, without sorting all M (torch.topk alone leaves ties unordered).
    NaN ranks as -inf (rank_order's rule)."""
    scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    kth = torch.topk(scores, k, dim=1).values[:, -1:]            # the k-th score: exact
    equal = scores == kth
    room = k - (scores > kth).sum(1, keepdim=True)                # how many ties at the k-th get in
    selected = (scores > kth) | (equal & (equal.cumsum(1) <= room))  # exactly k, smallest tied indices
    M = scores.shape[1]
    rank = torch.arange(M, 0, -1, device=scores.device, dtype=torch.float64 if M > 2**24 else torch.float32)
    index = torch.topk(selected * rank.view(1, M, 1), k, dim=1).indices.sort(dim=1).values  # ascending index
    order = torch.sort(scores.gather(1, index), dim=1, descending=True, stable=True).indices
    return index.gather(1, order)


def _keep(logits, index):
    """logits (B, M, n) with -inf everywhere but at ``index`` (B, k, n) along dim 1."""
    return torch.full_like(logits, float("-inf")).scatter_(1, index, logits.gather(1, index))


def _attend_backward(scores, v, grad_out, out, lse, nq, topk_indices=None):
    """Backward of _attend (P recomputed from lse; a top-k read's selected set held fixed):
    returns dV and leaves dQ, dK, ... in ``scores``."""
    B, Cv, M = v.shape
    d_out = grad_out.reshape(B, Cv, nq).to(v.dtype)
    delta = (d_out * out.reshape(B, Cv, nq).to(v.dtype)).sum(1)  # D[q] = <dO[:, q], O[:, q]>
    lse = lse.to(v.dtype)
    dv = torch.zeros_like(v)
    for q0, q1 in _chunks(nq, B * M * 4):
        logits = scores(q0, q1)
        if topk_indices is not None and topk_indices.shape[2] > 0:
            logits = _keep(logits, topk_indices[:, q0:q1].transpose(1, 2))
        probs = torch.exp(logits - lse[:, None, q0:q1])
        d_out_c = d_out[:, :, q0:q1]
        dv += torch.bmm(d_out_c, probs.transpose(1, 2))
        d_scores = torch.bmm(v.transpose(1, 2), d_out_c).sub_(delta[:, None, q0:q1]).mul_(probs)
        scores.backward(d_scores, q0, q1)
    return dv


def _flatten_read_inputs(query_key, memory_key, memory_value, centers, sigma):
    B, Ck, H, W = query_key.shape
    T, Cv = memory_key.shape[2], memory_value.shape[1]
    acc = acc_dtype(query_key.dtype)
    q = query_key.reshape(B, Ck, H * W).to(acc)
    k = memory_key.reshape(B, Ck, T * H * W).to(acc)
    v = memory_value.reshape(B, Cv, T * H * W).to(acc)
    c = gamma = None
    if centers is not None:
        c = centers.reshape(B, T * H * W)
        gamma = _gamma(sigma.to(acc), H * W)
    return q, k, v, c, gamma


def kernel_guided_read(query_key, memory_key, memory_value, centers, sigma, scale, topk, topk_frames):
    B, Ck, H, W = query_key.shape
    Cv, HW = memory_value.shape[1], H * W
    q, k, v, c, gamma = _flatten_read_inputs(query_key, memory_key, memory_value, centers, sigma)
    selected = None
    if topk > 0:  # memory positions of the listed frames, in the listed order
        selected = torch.cat([torch.arange(f * HW, (f + 1) * HW, device=q.device) for f in topk_frames])
    scores = _Scores(q, k, scale, centers=c, gamma=gamma, width=W)
    out, lse, indices, _ = _attend(scores, v, HW, topk=topk, topk_columns=selected)
    return out.view(B, Cv, H, W).to(query_key.dtype), lse, indices


def kernel_guided_read_backward(grad_out, query_key, memory_key, memory_value, centers, sigma, out, lse, scale):
    W = query_key.shape[3]
    q, k, v, c, gamma = _flatten_read_inputs(query_key, memory_key, memory_value, centers, sigma)
    scores = _Scores(q, k, scale, centers=c, gamma=gamma, width=W)
    dv = _attend_backward(scores, v, grad_out, out, lse, q.shape[2])
    return (
        scores.dq.view(query_key.shape).to(query_key.dtype),
        scores.dk.view(memory_key.shape).to(memory_key.dtype),
        dv.view(memory_value.shape).to(memory_value.dtype),
    )


# ---------------------------------------------------------------- memory read (docs/ops.md section 7)


def _memory_read_inputs(query_key, memory_key, memory_value, memory_shrinkage, query_selection, similarity, scale):
    acc = acc_dtype(query_key.dtype)
    cast = (lambda x: None if x is None else x.to(acc))
    scores = _Scores(cast(query_key), cast(memory_key), scale, similarity, cast(memory_shrinkage),
                     cast(query_selection))
    return scores, memory_value.to(acc)


def memory_read(query_key, memory_key, memory_value, memory_shrinkage, query_selection, similarity, scale, topk,
                return_usage):
    scores, v = _memory_read_inputs(query_key, memory_key, memory_value, memory_shrinkage, query_selection,
                                    similarity, scale)
    out, lse, indices, usage = _attend(scores, v, query_key.shape[2], topk=topk, restrict=True, usage=return_usage)
    return out.to(query_key.dtype), lse, indices, usage


def memory_read_backward(grad_out, query_key, memory_key, memory_value, memory_shrinkage, query_selection, out, lse,
                         topk_indices, similarity, scale):
    scores, v = _memory_read_inputs(query_key, memory_key, memory_value, memory_shrinkage, query_selection,
                                    similarity, scale)
    dv = _attend_backward(scores, v, grad_out, out, lse, query_key.shape[2], topk_indices)
    dtype = query_key.dtype
    empty = query_key.new_empty(0)
    return (scores.dq.to(dtype), scores.dk.to(dtype), dv.to(dtype),
            empty if scores.dw is None else scores.dw.to(dtype), empty if scores.de is None else scores.de.to(dtype))


def gaussian_softmax(affinity, centers, sigma, height, width):
    B, M, HW = affinity.shape
    acc = acc_dtype(affinity.dtype)
    c = centers.reshape(B, M)
    gamma = _gamma(sigma.to(acc), HW)
    out = torch.empty(affinity.shape, dtype=affinity.dtype, device=affinity.device)
    for q0, q1 in _chunks(HW, B * M):
        logits = affinity[:, :, q0:q1].to(acc) + _gaussian_bias(c, gamma, width, q0, q1)
        out[:, :, q0:q1] = torch.softmax(saturate_(logits), dim=1)
    return out


def gaussian_softmax_backward(grad_output, output):
    acc = acc_dtype(output.dtype)
    g, y = grad_output.to(acc), output.to(acc)
    return (y * (g - (g * y).sum(1, keepdim=True))).to(output.dtype)


def local_track(memory_key, query_key, window):
    B, C, H, W = memory_key.shape
    acc = acc_dtype(memory_key.dtype)
    mk, qk = memory_key.to(acc), query_key.to(acc)
    rad = min(window // 2, max(H, W) - 1)  # offsets past the frame have no candidate
    ys = torch.arange(H, device=mk.device).view(H, 1)
    xs = torch.arange(W, device=mk.device).view(1, W)
    # Start from the smallest-index candidate of each window so the answer is always in the
    # frame; then visit offsets in increasing flat-index order and replace only on a strictly
    # larger score, so ties keep the smaller index.
    best_idx = ((ys - rad).clamp_min(0) * W + (xs - rad).clamp_min(0)).expand(B, H, W).clone()
    best = torch.full((B, H, W), float("-inf"), dtype=acc, device=mk.device)
    for dy in range(-rad, rad + 1):
        y0, y1 = max(0, -dy), min(H, H - dy)
        if y0 >= y1:
            continue
        for dx in range(-rad, rad + 1):
            x0, x1 = max(0, -dx), min(W, W - dx)
            if x0 >= x1:
                continue
            score = (mk[:, :, y0:y1, x0:x1] * qk[:, :, y0 + dy:y1 + dy, x0 + dx:x1 + dx]).sum(1)
            region = best[:, y0:y1, x0:x1]
            better = score.nan_to_num(nan=float("-inf")) > region  # NaN ranks as -inf
            region[better] = score[better]
            flat = ((ys[y0:y1] + dy) * W + (xs[:, x0:x1] + dx)).expand_as(score)
            best_idx[:, y0:y1, x0:x1][better] = flat[better]
    return best_idx


def global_track(memory_key, query_key):
    B, C, T, H, W = memory_key.shape
    HW, M = H * W, T * H * W
    acc = acc_dtype(memory_key.dtype)
    k = memory_key.reshape(B, C, M).to(acc)
    q = query_key.reshape(B, C, HW).to(acc)
    out = torch.empty(B, M, dtype=torch.int64, device=k.device)
    for m0, m1 in _chunks(M, B * HW):
        out[:, m0:m1] = rank_argmax(torch.bmm(k[:, :, m0:m1].transpose(1, 2), q), dim=2)
    return out.view(B, T, H, W)


# ---------------------------------------------------------------- top-k guided read (docs/ops.md section 5)


def _cell_layout(x, r):
    """(B, C, H, W) -> (B, Hc*Wc, r*r, C): the fine pixels of each coarse cell."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // r, r, W // r, r).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // r) * (W // r), r * r, C)


def _from_cell_layout(x, H, W, r):
    """Inverse of _cell_layout: (B, Hc*Wc, r*r, C) -> (B, C, H, W)."""
    B, C = x.shape[0], x.shape[-1]
    x = x.reshape(B, H // r, W // r, r, r, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, H, W)


def _fine_candidates(topk_indices, T, H, W, r):
    """Coarse indices (B, Nc, k) -> flat fine memory indices (B, Nc, k*r*r)."""
    Hc, Wc = H // r, W // r
    t = topk_indices // (Hc * Wc)
    rem = topk_indices % (Hc * Wc)
    base = t * (H * W) + (rem // Wc) * (r * W) + (rem % Wc) * r
    offs = torch.arange(r, device=topk_indices.device)
    offs = (offs.view(r, 1) * W + offs.view(1, r)).reshape(-1)
    return (base.unsqueeze(-1) + offs).flatten(-2)


def _gather(mem, idx):
    """mem (B, M, C), idx (B, n, m) -> (B, n, m, C)."""
    B, n, m = idx.shape
    C = mem.shape[2]
    return torch.gather(mem, 1, idx.reshape(B, n * m, 1).expand(B, n * m, C)).view(B, n, m, C)


def _topk_inputs(query_key, memory_key, memory_value, topk_indices, r):
    B, Ck, H, W = query_key.shape
    T, Cv = memory_key.shape[2], memory_value.shape[1]
    acc = acc_dtype(query_key.dtype)
    q = _cell_layout(query_key.to(acc), r)                                   # (B, Nc, rr, Ck)
    k = memory_key.reshape(B, Ck, T * H * W).transpose(1, 2).to(acc)        # (B, M, Ck)
    v = memory_value.reshape(B, Cv, T * H * W).transpose(1, 2).to(acc)      # (B, M, Cv)
    cand = _fine_candidates(topk_indices, T, H, W, r)                        # (B, Nc, krr)
    return q, k, v, cand


def topk_guided_read(query_key, memory_key, memory_value, topk_indices, scale, ratio):
    B, Ck, H, W = query_key.shape
    Cv, r = memory_value.shape[1], ratio
    q, k, v, cand = _topk_inputs(query_key, memory_key, memory_value, topk_indices, r)
    Nc, m = cand.shape[1], cand.shape[2]
    out = q.new_empty(B, Nc, r * r, Cv)
    lse = q.new_empty(B, Nc, r * r)
    for c0, c1 in _chunks(Nc, B * m * (Ck + Cv + r * r)):
        keys, values = _gather(k, cand[:, c0:c1]), _gather(v, cand[:, c0:c1])
        logits = saturate_(torch.matmul(q[:, c0:c1], keys.transpose(-1, -2)).mul_(scale))  # (B, n, rr, m)
        lse[:, c0:c1] = torch.logsumexp(logits, dim=-1)
        out[:, c0:c1] = torch.matmul(torch.softmax(logits, dim=-1), values)  # as kernel_guided_read
    lse = _from_cell_layout(lse.unsqueeze(-1), H, W, r).reshape(B, H * W)
    return _from_cell_layout(out, H, W, r).to(query_key.dtype), lse


def topk_guided_read_backward(grad_out, query_key, memory_key, memory_value, topk_indices, out, lse, scale, ratio):
    B, Ck, H, W = query_key.shape
    T, Cv, r = memory_key.shape[2], memory_value.shape[1], ratio
    q, k, v, cand = _topk_inputs(query_key, memory_key, memory_value, topk_indices, r)
    acc = q.dtype
    d_out = _cell_layout(grad_out.to(acc), r)                                  # (B, Nc, rr, Cv)
    delta = (d_out * _cell_layout(out.to(acc), r)).sum(-1)                     # (B, Nc, rr)
    lse = _cell_layout(lse.to(acc).view(B, 1, H, W), r).squeeze(-1)            # (B, Nc, rr)
    Nc, m = cand.shape[1], cand.shape[2]
    dq = torch.empty_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for c0, c1 in _chunks(Nc, B * m * (2 * Ck + 2 * Cv + r * r)):
        idx = cand[:, c0:c1]
        keys, values = _gather(k, idx), _gather(v, idx)
        logits = saturate_(torch.matmul(q[:, c0:c1], keys.transpose(-1, -2)).mul_(scale))
        probs = torch.exp(logits - lse[:, c0:c1, :, None])                     # (B, n, rr, m)
        d_values = torch.matmul(probs.transpose(-1, -2), d_out[:, c0:c1])      # (B, n, m, Cv)
        d_scores = torch.matmul(d_out[:, c0:c1], values.transpose(-1, -2))
        d_scores = d_scores.sub_(delta[:, c0:c1, :, None]).mul_(probs)
        dq[:, c0:c1] = torch.matmul(d_scores, keys).mul_(scale)
        d_keys = torch.matmul(d_scores.transpose(-1, -2), q[:, c0:c1]).mul_(scale)  # (B, n, m, Ck)
        n = idx.shape[1] * m  # explicit sizes: B may be 0
        flat = idx.reshape(B, n, 1)
        dk.scatter_add_(1, flat.expand(B, n, Ck), d_keys.reshape(B, n, Ck))
        dv.scatter_add_(1, flat.expand(B, n, Cv), d_values.reshape(B, n, Cv))
    return (
        _from_cell_layout(dq, H, W, r).to(query_key.dtype),
        dk.transpose(1, 2).reshape(B, Ck, T, H, W).to(memory_key.dtype),
        dv.transpose(1, 2).reshape(B, Cv, T, H, W).to(memory_value.dtype),
    )
