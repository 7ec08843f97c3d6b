"""The public ops (SPEC.md): argument checks with clear messages, then one call.

Every check lives here, so every backend receives the canonical arguments of
docs/internals.md. ``backend="auto"`` goes through ``torch.ops.hmmn_ops`` (one op for the
dispatcher, autograd and torch.compile); a forced backend runs that backend's
implementation under the same backward formula (see backends.py).
"""
import math

import torch

from .backends import BACKENDS, call

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------- argument checks


def _shape(t):
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _tensor(name, x, ndim, layout):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {_shape(x)}")
    return x


def _floating(name, x, like=None, like_name=None):
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: expected float16, bfloat16, float32 or float64, got {x.dtype}")
    if like is not None:
        if x.dtype != like.dtype:
            raise ValueError(f"{name}: expected dtype {like.dtype} (the dtype of {like_name}), got {x.dtype}")
        if x.device != like.device:
            raise ValueError(f"{name}: expected device {like.device} (the device of {like_name}), got {x.device}")


def _expect_dims(name, x, expected, layout):
    got = tuple(x.shape)
    if len(got) != len(expected) or any(e is not None and g != e for g, e in zip(got, expected)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {want} {layout}, got {_shape(x)}")


def _eager():
    """Value checks read tensor data; under torch.compile they would break the graph."""
    return not torch.compiler.is_compiling()


def _resolve_scale(scale, channels):
    if scale is None:
        return 1.0 / math.sqrt(channels)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return scale


def _check_read_inputs(query_key, memory_key, memory_value):
    _tensor("query_key", query_key, 4, "(B, Ck, H, W)")
    _tensor("memory_key", memory_key, 5, "(B, Ck, T, H, W)")
    _tensor("memory_value", memory_value, 5, "(B, Cv, T, H, W)")
    _floating("query_key", query_key)
    _floating("memory_key", memory_key, query_key, "query_key")
    _floating("memory_value", memory_value, query_key, "query_key")
    B, Ck, H, W = query_key.shape
    T = memory_key.shape[2]
    _expect_dims("memory_key", memory_key, (B, Ck, None, H, W), "(B, Ck, T, H, W) matching query_key (B, Ck, H, W)")
    if T < 1:
        raise ValueError(f"memory_key: expected at least one memory frame (T >= 1), got shape {_shape(memory_key)}")
    _expect_dims("memory_value", memory_value, (B, None, T, H, W), "(B, Cv, T, H, W) matching memory_key")
    if H < 1 or W < 1 or Ck < 1 or memory_value.shape[1] < 1:
        raise ValueError(f"query_key: expected positive sizes, got {_shape(query_key)} and {_shape(memory_value)}")
    return B, Ck, T, H, W


def _check_centers(centers, B, T, H, W, device):
    _tensor("centers", centers, 4, "(B, T, H, W) int64")
    if centers.dtype != torch.int64:
        raise ValueError(f"centers: expected dtype torch.int64 (flat query indices y*W+x, or -1), got {centers.dtype}")
    if centers.device != device:
        raise ValueError(f"centers: expected device {device}, got {centers.device}")
    _expect_dims("centers", centers, (B, T, H, W), "(B, T, H, W)")
    if _eager() and centers.numel() > 0:
        lo, hi = int(centers.min()), int(centers.max())
        if lo < -1 or hi >= H * W:
            raise ValueError(f"centers: expected flat query indices in [0, {H * W}) or -1, got values in [{lo}, {hi}]")


def _check_sigma(sigma, B, T, device, dtype):
    """sigma: number, (T,) or (B, T) -> canonical (B, T) contiguous tensor in the accumulation dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if isinstance(sigma, (int, float)):
        sigma = torch.full((T,), float(sigma), dtype=acc, device=device)
    if not isinstance(sigma, torch.Tensor):
        raise ValueError(f"sigma: expected a number or a tensor (T,) or (B, T), got {type(sigma).__name__}")
    if not sigma.is_floating_point():
        raise ValueError(f"sigma: expected a floating tensor (T,) or (B, T), got dtype {sigma.dtype}")
    if sigma.dim() == 1 and sigma.shape[0] == T:
        sigma = sigma.unsqueeze(0).expand(B, T)
    elif sigma.dim() != 2 or tuple(sigma.shape) != (B, T):
        raise ValueError(f"sigma: expected shape ({T},) or ({B}, {T}) (T,) or (B, T), got {_shape(sigma)}")
    sigma = sigma.to(device=device, dtype=acc).contiguous()
    if _eager() and sigma.numel() > 0 and not bool((sigma > 0).all()):
        raise ValueError(f"sigma: expected every value > 0, got min {float(sigma.min())}")
    return sigma


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


# ---------------------------------------------------------------- the ops


def kernel_guided_read(query_key, memory_key, memory_value, centers=None, sigma=None, *, scale=None, topk=0,
                       topk_frames=None, backend="auto"):
    """Fused (Gaussian-)kernel-weighted memory read, SPEC.md section 1.

    ``out[:, q] = sum_p softmax_p(logit[:, q]) * memory_value[:, p]`` with
    ``logit[p, q] = scale * <memory_key[p], query_key[q]> - |q - c(p)|^2 / (2 sigma[t(p)]^2)``
    (no Gaussian term where ``centers`` is None or ``centers[p] == -1``). Computed in log
    space, so a tiny sigma cannot produce 0/0, and without materialising the
    ``T*H*W x H*W`` affinity.

    Args:
        query_key: (B, Ck, H, W).
        memory_key: (B, Ck, T, H, W).
        memory_value: (B, Cv, T, H, W).
        centers: None or (B, T, H, W) int64, for each memory pixel the flat query index
            ``y * W + x`` it was tracked to, or -1 for no Gaussian.
        sigma: (T,), (B, T) or a number, > 0; required with ``centers``.
        scale: defaults to ``1 / sqrt(Ck)``.
        topk: if > 0, also return for each query the ``topk`` memory positions of largest
            logit among ``topk_frames``, sorted by descending logit (ties: smaller index).
        topk_frames: frame indices searched by the top-k (default: all frames, in order).
            Returned indices point into their concatenation: ``j * H * W + y * W + x`` for the
            j-th listed frame.
        backend: "auto" | "reference" | "native" | "triton" | "cuda_emulated".

    Returns:
        ``out`` (B, Cv, H, W), or ``(out, topk_indices (B, H*W, topk) int64)`` if ``topk > 0``.
    """
    B, Ck, T, H, W = _check_read_inputs(query_key, memory_key, memory_value)
    if (centers is None) != (sigma is None):
        raise ValueError("centers and sigma: give both (Gaussian-guided read) or neither (plain read); "
                         f"got centers={'None' if centers is None else 'a tensor'}, sigma={'None' if sigma is None else 'given'}")
    if centers is not None:
        _check_centers(centers, B, T, H, W, query_key.device)
        sigma = _check_sigma(sigma, B, T, query_key.device, query_key.dtype)
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 0:
        raise ValueError(f"topk: expected an int >= 0, got {topk!r}")
    frames = []
    if topk > 0:
        frames = list(range(T)) if topk_frames is None else [int(f) for f in topk_frames]
        if not frames:
            raise ValueError("topk_frames: expected at least one frame index when topk > 0, got an empty list")
        bad = [f for f in frames if not 0 <= f < T]
        if bad:
            raise ValueError(f"topk_frames: expected frame indices in [0, {T}) (T = memory frames), got {bad}")
        if len(set(frames)) != len(frames):
            raise ValueError(f"topk_frames: a frame is listed twice: {frames}")
        if topk > len(frames) * H * W:
            raise ValueError(f"topk: expected at most len(topk_frames) * H * W = {len(frames) * H * W}, got {topk}")
    scale = _resolve_scale(scale, Ck)
    _check_backend(backend)
    out, _lse, indices = call("kernel_guided_read", backend, query_key.device,
                                       (query_key, memory_key, memory_value, centers, sigma, scale, topk, frames))
    return (out, indices) if topk > 0 else out


def gaussian_softmax(affinity, centers, sigma, *, size, backend="auto"):
    """``softmax(affinity + log-Gaussian bias, dim=1)``, SPEC.md section 2.

    Drop-in for code that already holds the (scaled) affinity: one pass over the matrix
    instead of softmax, multiply by the Gaussian, sum and divide.

    Args:
        affinity: (B, T*H*W, H*W), memory positions along dim 1, queries along dim 2.
        centers: (B, T, H, W) int64 flat query indices, or -1 for no Gaussian.
        sigma: (T,), (B, T) or a number, > 0.
        size: (H, W) of the grid.
    """
    _tensor("affinity", affinity, 3, "(B, T*H*W, H*W)")
    _floating("affinity", affinity)
    try:
        H, W = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size: expected (H, W), got {size!r}") from None
    if H < 1 or W < 1:
        raise ValueError(f"size: expected positive (H, W), got {size!r}")
    B, M, HW = affinity.shape
    if HW != H * W or M % (H * W) != 0 or M == 0:
        raise ValueError(f"affinity: expected shape (B, T*{H}*{W}, {H}*{W}) for size=({H}, {W}), got {_shape(affinity)}")
    T = M // HW
    _check_centers(centers, B, T, H, W, affinity.device)
    sigma = _check_sigma(sigma, B, T, affinity.device, affinity.dtype)
    _check_backend(backend)
    return call("gaussian_softmax", backend, affinity.device, (affinity, centers, sigma, H, W))


def _check_track_keys(memory_key, query_key):
    _tensor("query_key", query_key, 4, "(B, C, H, W)")
    _floating("query_key", query_key)
    _floating("memory_key", memory_key, query_key, "query_key")


def local_track(memory_key, query_key, window=7, *, backend="auto"):
    """Local-window tracking between adjacent frames, SPEC.md section 3.

    For every memory pixel (y, x): the flat query index ``qy * W + qx`` of the best match
    ``argmax <memory_key[:, y, x], query_key[:, qy, qx]>`` over ``|qy - y| <= window // 2``,
    ``|qx - x| <= window // 2`` inside the frame. Ties go to the smaller index.

    Returns: (B, H, W) int64.
    """
    _tensor("memory_key", memory_key, 4, "(B, C, H, W)")
    _check_track_keys(memory_key, query_key)
    _expect_dims("query_key", query_key, tuple(memory_key.shape), "(B, C, H, W) equal to memory_key's shape")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1 or window % 2 == 0:
        raise ValueError(f"window: expected a positive odd int, got {window!r}")
    _check_backend(backend)
    return call("local_track", backend, query_key.device, (memory_key, query_key, window))


def global_track(memory_key, query_key, *, backend="auto"):
    """KMN's memory-to-query argmax, SPEC.md section 4: for every memory pixel the flat query
    index of ``argmax_q <memory_key[p], query_key[q]>`` (ties: smaller index), without
    materialising the affinity.

    Returns: (B, T, H, W) int64.
    """
    _tensor("memory_key", memory_key, 5, "(B, C, T, H, W)")
    _check_track_keys(memory_key, query_key)
    B, C, H, W = query_key.shape
    _expect_dims("memory_key", memory_key, (B, C, None, H, W), "(B, C, T, H, W) matching query_key (B, C, H, W)")
    _check_backend(backend)
    return call("global_track", backend, query_key.device, (memory_key, query_key))


def topk_guided_read(query_key, memory_key, memory_value, topk_indices, *, scale=None, backend="auto"):
    """Top-k guided sparse gather-and-attend, SPEC.md section 5.

    ``topk_indices`` (B, Hc*Wc, k) int64 index the coarse memory grid ``T*Hc*Wc``; each index
    stands for its ``r x r`` fine pixels (``r = H // Hc``, inferred). Every fine query attends,
    by a softmax of ``scale * <q, k>``, over the ``k*r*r`` fine pixels of its coarse cell's
    indices. Nothing gathered is materialised by the fused backends.

    Returns: (B, Cv, H, W).
    """
    B, Ck, T, H, W = _check_read_inputs(query_key, memory_key, memory_value)
    _tensor("topk_indices", topk_indices, 3, "(B, Hc*Wc, k) int64")
    if topk_indices.dtype != torch.int64:
        raise ValueError(f"topk_indices: expected dtype torch.int64, got {topk_indices.dtype}")
    if topk_indices.device != query_key.device:
        raise ValueError(f"topk_indices: expected device {query_key.device}, got {topk_indices.device}")
    cells, k = topk_indices.shape[1], topk_indices.shape[2]
    ratio = next((r for r in range(1, min(H, W) + 1) if H % r == 0 and W % r == 0 and (H // r) * (W // r) == cells), None)
    if ratio is None or topk_indices.shape[0] != B:
        raise ValueError(
            f"topk_indices: expected shape ({B}, Hc*Wc, k) with Hc = H // r, Wc = W // r for a ratio r dividing "
            f"H={H} and W={W} (e.g. ({B}, {(H // 2) * (W // 2)}, k) for r = 2), got {_shape(topk_indices)}")
    if k < 1:
        raise ValueError(f"topk_indices: expected k >= 1 candidates per cell, got shape {_shape(topk_indices)}")
    coarse = T * cells
    if _eager() and topk_indices.numel() > 0:
        lo, hi = int(topk_indices.min()), int(topk_indices.max())
        if lo < 0 or hi >= coarse:
            raise ValueError(f"topk_indices: expected values in [0, T*Hc*Wc = {coarse}), got values in [{lo}, {hi}]")
    scale = _resolve_scale(scale, Ck)
    _check_backend(backend)
    out, _lse = call("topk_guided_read", backend, query_key.device,
                              (query_key, memory_key, memory_value, topk_indices, scale, ratio))
    return out


def _trailing(x):
    return "(" + ", ".join(str(s) for s in x.shape[2:]) + ")"


def _check_memory_read_tensor(name, x, layout, like=None, like_name="query_key"):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor {layout}, got {type(x).__name__}")
    if x.dim() < 3:
        raise ValueError(f"{name}: expected a tensor {layout} with at least one trailing dim, got shape {_shape(x)}")
    _floating(name, x, like, like_name)


def memory_read(query_key, memory_key, memory_value, *, similarity="dot", memory_shrinkage=None,
                query_selection=None, scale=None, topk=0, return_usage=False, backend="auto"):
    """Fused memory read of STCN / XMem / Cutie / DEVA / AOT, docs/ops.md section 7.

    Memory and query are flat lists of tokens whatever their trailing shape (``*M``, ``*Q``:
    ``(T, H, W)`` frames, ``(N,)`` tokens, ``(H, W)``, ...). For memory token ``p`` and query ``q``::

        "dot": s[p, q] = scale * <K[:, p], Q[:, q]>
        "l2":  s[p, q] = -scale * w[p] * sum_c e[c, q] * (K[c, p] - Q[c, q])^2
        P[:, q] = softmax_p(s[:, q])                  (topk == 0)
                  softmax over the topk largest s[., q], 0 elsewhere (ties: smaller p)
        out[:, q] = sum_p P[p, q] V[:, p];   usage[p] = sum_q P[p, q]

    with ``w = memory_shrinkage`` and ``e = query_selection`` (1 when None). Computed in log
    space without materialising the ``Nm x Nq`` scores. Differentiable in the keys, values,
    shrinkage and selection (with ``topk > 0`` the selected set is held fixed).

    Args:
        query_key: (B, Ck, *Q).
        memory_key: (B, Ck, *M).
        memory_value: (B, Cv, *M); objects that share keys stack their values in Cv.
        similarity: "dot" or "l2" (STCN; XMem / Cutie / DEVA with shrinkage and selection).
        memory_shrinkage: None or (B, 1, *M), "l2" only.
        query_selection: None or (B, Ck, *Q), "l2" only.
        scale: defaults to ``1 / sqrt(Ck)``.
        topk: 0 (full softmax) or ``1 <= topk <= Nm`` (softmax over each query's top-k).
        return_usage: also return ``usage`` (B, *M), not differentiable.
        backend: "auto" | "reference" | "native" | "triton".

    Returns:
        ``out`` (B, Cv, *Q), or ``(out, usage (B, *M))`` when ``return_usage``.
    """
    _check_memory_read_tensor("query_key", query_key, "(B, Ck, *Q)")
    _check_memory_read_tensor("memory_key", memory_key, "(B, Ck, *M)", query_key)
    _check_memory_read_tensor("memory_value", memory_value, "(B, Cv, *M)", query_key)
    B, Ck = query_key.shape[:2]
    Q, M = tuple(query_key.shape[2:]), tuple(memory_key.shape[2:])
    if tuple(memory_key.shape[:2]) != (B, Ck):
        raise ValueError(f"memory_key: expected shape ({B}, {Ck}, *M) matching query_key (B, Ck, *Q) = "
                         f"{_shape(query_key)}, got {_shape(memory_key)}")
    if memory_value.shape[0] != B or tuple(memory_value.shape[2:]) != M:
        raise ValueError(f"memory_value: expected shape ({B}, Cv, {', '.join(map(str, M))}) (B, Cv, *M) matching "
                         f"memory_key {_shape(memory_key)}, got {_shape(memory_value)}")
    Nq, Nm, Cv = math.prod(Q), math.prod(M), memory_value.shape[1]
    if Ck < 1 or Cv < 1 or Nm < 1:
        raise ValueError(f"memory_key, memory_value: expected Ck >= 1, Cv >= 1 and at least one memory token, got "
                         f"memory_key {_shape(memory_key)}, memory_value {_shape(memory_value)}")
    if similarity not in ("dot", "l2"):
        raise ValueError(f"similarity: expected 'dot' or 'l2', got {similarity!r}")
    for name, x in (("memory_shrinkage", memory_shrinkage), ("query_selection", query_selection)):
        if x is not None and similarity != "l2":
            raise ValueError(f"{name}: only defined for similarity='l2' (XMem / Cutie), got similarity={similarity!r}")
    if memory_shrinkage is not None:
        _check_memory_read_tensor("memory_shrinkage", memory_shrinkage, "(B, 1, *M)", query_key)
        if tuple(memory_shrinkage.shape) != (B, 1, *M):
            raise ValueError(f"memory_shrinkage: expected shape ({B}, 1, {', '.join(map(str, M))}) (B, 1, *M) "
                             f"matching memory_key, got {_shape(memory_shrinkage)}")
        memory_shrinkage = memory_shrinkage.reshape(B, Nm)
    if query_selection is not None:
        _check_memory_read_tensor("query_selection", query_selection, "(B, Ck, *Q)", query_key)
        if query_selection.shape != query_key.shape:
            raise ValueError(f"query_selection: expected shape {_shape(query_key)} (B, Ck, *Q) equal to query_key's, "
                             f"got {_shape(query_selection)}")
        query_selection = query_selection.reshape(B, Ck, Nq)
    if not isinstance(topk, int) or isinstance(topk, bool) or not 0 <= topk <= Nm:
        raise ValueError(f"topk: expected 0 (full softmax) or an int in [1, Nm = {Nm}], got {topk!r}")
    if not isinstance(return_usage, bool):
        raise ValueError(f"return_usage: expected a bool, got {return_usage!r}")
    scale = _resolve_scale(scale, Ck)
    _check_backend(backend)
    args = (query_key.reshape(B, Ck, Nq), memory_key.reshape(B, Ck, Nm), memory_value.reshape(B, Cv, Nm),
            memory_shrinkage, query_selection, similarity, scale, topk, return_usage)
    out, _lse, _indices, usage = call("memory_read", backend, query_key.device, args)
    out = out.view(B, Cv, *Q)
    if not return_usage:
        return out
    return out, usage.to(query_key.dtype).view(B, *M)
