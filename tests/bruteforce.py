"""Tiny brute-force loops written straight from the formulas of docs/ops.md (float64, per element).

They are slow on purpose: no vectorisation that could share a bug with reference.py.
"""
import math

import torch


def logit(qk, mk, centers, sigma, scale, b, p, q):
    """docs/ops.md section 1: logit[p, q] for batch b; p is a flat memory index, q a flat query index."""
    _, Ck, T, H, W = mk.shape
    t, rem = divmod(p, H * W)
    y, x = divmod(rem, W)
    qy, qx = divmod(q, W)
    value = scale * sum(float(mk[b, c, t, y, x]) * float(qk[b, c, qy, qx]) for c in range(Ck))
    if centers is not None and int(centers[b, t, y, x]) >= 0:
        cy, cx = divmod(int(centers[b, t, y, x]), W)
        s = float(sigma[b, t] if sigma.dim() == 2 else sigma[t])
        value -= ((qy - cy) ** 2 + (qx - cx) ** 2) / (2 * s * s)
    return value


def kernel_guided_read(qk, mk, mv, centers=None, sigma=None, scale=None, topk=0, topk_frames=None):
    B, Ck, T, H, W = mk.shape
    Cv = mv.shape[1]
    scale = 1 / math.sqrt(Ck) if scale is None else scale
    frames = list(range(T)) if topk_frames is None else list(topk_frames)
    out = torch.zeros(B, Cv, H, W, dtype=torch.float64)
    idx = torch.zeros(B, H * W, topk, dtype=torch.int64)
    for b in range(B):
        for q in range(H * W):
            logits = [logit(qk, mk, centers, sigma, scale, b, p, q) for p in range(T * H * W)]
            m = max(logits)
            w = [math.exp(l - m) for l in logits]
            z = sum(w)
            qy, qx = divmod(q, W)
            for c in range(Cv):
                out[b, c, qy, qx] = sum(w[p] * float(mv.reshape(B, Cv, -1)[b, c, p]) for p in range(T * H * W)) / z
            if topk:
                cand = [(-logits[f * H * W + s], j * H * W + s) for j, f in enumerate(frames) for s in range(H * W)]
                idx[b, q] = torch.tensor([i for _, i in sorted(cand)[:topk]])
    return out, idx


def gaussian_softmax(aff, centers, sigma, H, W):
    B, M, HW = aff.shape
    out = torch.zeros(B, M, HW, dtype=torch.float64)
    for b in range(B):
        for q in range(HW):
            qy, qx = divmod(q, W)
            vals = []
            for p in range(M):
                t, rem = divmod(p, H * W)
                c = int(centers[b, t].reshape(-1)[rem])
                v = float(aff[b, p, q])
                if c >= 0:
                    cy, cx = divmod(c, W)
                    s = float(sigma[b, t] if sigma.dim() == 2 else sigma[t])
                    v -= ((qy - cy) ** 2 + (qx - cx) ** 2) / (2 * s * s)
                vals.append(v)
            m = max(vals)
            e = [math.exp(v - m) for v in vals]
            for p in range(M):
                out[b, p, q] = e[p] / sum(e)
    return out


def local_track(mk, qk, window):
    B, C, H, W = mk.shape
    rad = window // 2
    out = torch.zeros(B, H, W, dtype=torch.int64)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                best = None
                for qy in range(max(0, y - rad), min(H, y + rad + 1)):
                    for qx in range(max(0, x - rad), min(W, x + rad + 1)):
                        s = sum(float(mk[b, c, y, x]) * float(qk[b, c, qy, qx]) for c in range(C))
                        if best is None or s > best[0]:  # strict: ties keep the smaller index
                            best = (s, qy * W + qx)
                out[b, y, x] = best[1]
    return out


def global_track(mk, qk):
    B, C, T, H, W = mk.shape
    out = torch.zeros(B, T, H, W, dtype=torch.int64)
    for b in range(B):
        for t in range(T):
            for y in range(H):
                for x in range(W):
                    scores = [sum(float(mk[b, c, t, y, x]) * float(qk[b, c, q // W, q % W]) for c in range(C))
                              for q in range(H * W)]
                    out[b, t, y, x] = max(range(H * W), key=lambda q: (scores[q], -q))
    return out


def topk_guided_read(qk, mk, mv, indices, scale=None):
    B, Ck, T, H, W = mk.shape
    Cv = mv.shape[1]
    cells = indices.shape[1]
    r = next(r for r in range(1, H + 1) if (H // r) * (W // r) == cells and H % r == 0 and W % r == 0)
    Hc, Wc = H // r, W // r
    scale = 1 / math.sqrt(Ck) if scale is None else scale
    out = torch.zeros(B, Cv, H, W, dtype=torch.float64)
    for b in range(B):
        for qy in range(H):
            for qx in range(W):
                cell = (qy // r) * Wc + qx // r
                cands = []
                for i in indices[b, cell].tolist():
                    t, rem = divmod(i, Hc * Wc)
                    my, mx = divmod(rem, Wc)
                    cands += [(t, my * r + a, mx * r + bb) for a in range(r) for bb in range(r)]
                logits = [scale * sum(float(mk[b, c, t, y, x]) * float(qk[b, c, qy, qx]) for c in range(Ck))
                          for t, y, x in cands]
                m = max(logits)
                w = [math.exp(l - m) for l in logits]
                for c in range(Cv):
                    out[b, c, qy, qx] = sum(wi * float(mv[b, c, t, y, x]) for wi, (t, y, x) in zip(w, cands)) / sum(w)
    return out
