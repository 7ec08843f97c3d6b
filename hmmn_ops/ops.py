"""The public ops (docs/ops.md): argument checks with clear messages, then one call.

Every check lives here, so every backend receives the canonical arguments of
docs/internals.md. ``backend="auto"`` goes through ``torch.ops.hmmn_ops`` (one op for the
dispatcher, autograd and torch.compile); a forced backend runs that backend's
implementation under the same backward formula (see backends.py).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

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


def _check_values(ok, message):
    """``ok`` (a bool tensor) must hold everywhere. Eager: ValueError(message()). Compiled: the
    same check as an assert torch.compile keeps in the graph (RuntimeError naming the argument;
    without the range of values, which would need the data)."""
    if _eager():
        if not bool(ok.all()):
            raise ValueError(message())
    else:
        torch._assert_async(ok.all(), message(compiled=True))


def _real_number(name, x):
    """A real Python/NumPy number or a 0-d floating/integer tensor; not a bool, not a string."""
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.dtype.is_complex and x.dtype != torch.bool:
        return float(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name}: expected a real number, got {type(x).__name__} {x!r}")
    return float(x)


def _resolve_scale(scale, channels):
    if scale is None:
        return 1.0 / math.sqrt(channels)
    scale = _real_number("scale", scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return scale


def _same_dtype_under_autocast(*tensors):
    """Under torch.autocast the floating inputs are cast to one dtype, the widest among them
    (docs/reliability.md); elsewhere they must already share one (checked by the caller)."""
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
        return tensors
    device = tensors[0].device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


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
    if H < 1 or W < 1 or Ck < 1:
        raise ValueError(f"query_key: expected positive sizes (B, Ck, H, W), got {_shape(query_key)}")
    if memory_value.shape[1] < 1:
        raise ValueError(f"memory_value: expected Cv >= 1 value channels, got shape {_shape(memory_value)}")
    return B, Ck, T, H, W


def _check_centers(centers, B, T, H, W, device):
    _tensor("centers", centers, 4, "(B, T, H, W) int64")
    if centers.dtype != torch.int64:
        raise ValueError(f"centers: expected dtype torch.int64 (flat query indices y*W+x, or -1), got {centers.dtype}")
    if centers.device != device:
        raise ValueError(f"centers: expected device {device}, got {centers.device}")
    _expect_dims("centers", centers, (B, T, H, W), "(B, T, H, W)")
    if centers.numel() > 0:
        _check_values((centers >= -1) & (centers < H * W), lambda compiled=False: (
            f"centers: expected flat query indices in [0, {H * W}) or -1, got "
            + ("values outside" if compiled else f"values in [{int(centers.min())}, {int(centers.max())}]")))


def _check_sigma(sigma, B, T, device, dtype):
    """sigma: number, (T,) or (B, T) -> canonical (B, T) contiguous tensor in the accumulation dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if not isinstance(sigma, torch.Tensor):
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
            raise ValueError(f"sigma: expected a positive number or a floating tensor (T,) or (B, T), got "
                             f"{type(sigma).__name__} {sigma!r}")
        sigma = torch.full((T,), float(sigma), dtype=torch.float64, device=device)
    if not sigma.is_floating_point():
        raise ValueError(f"sigma: expected a floating tensor (T,) or (B, T), got dtype {sigma.dtype}")
    if sigma.dim() == 1 and sigma.shape[0] == T:
        sigma = sigma.unsqueeze(0).expand(B, T)
    elif sigma.dim() != 2 or tuple(sigma.shape) != (B, T):
        raise ValueError(f"sigma: expected shape ({T},) or ({B}, {T}) (T,) or (B, T), got {_shape(sigma)}")
    if sigma.numel() > 0:
        # > 0 and finite in the accumulation dtype (1e300 overflows float32 to inf).
        big = torch.finfo(acc).max
        _check_values((sigma > 0) & (sigma <= big), lambda compiled=False: (
            f"sigma: expected every value > 0 and finite in {acc}, got "
            + ("a value outside" if compiled else f"values in [{float(sigma.min())}, {float(sigma.max())}]")))
    return sigma.to(device=device, dtype=acc).contiguous()


def _normalise_frames(topk_frames, T):
    """topk_frames -> distinct frame indices in [0, T), in the order given (first listing kept):
    a negative index counts from the end and a repeat counts once, so (0, -1) serves every T."""
    if topk_frames is None:
        return list(range(T))
    if isinstance(topk_frames, (str, bytes)) or not hasattr(topk_frames, "__iter__"):
        raise ValueError(f"topk_frames: expected a sequence of frame indices (ints), got "
                         f"{type(topk_frames).__name__} {topk_frames!r}")
    frames = []
    for f in topk_frames:
        try:
            if isinstance(f, bool) or (isinstance(f, torch.Tensor) and f.dtype == torch.bool):
                raise TypeError
            f = operator.index(f)
        except TypeError:
            raise ValueError(f"topk_frames: expected int frame indices, got {type(f).__name__} {f!r} "
                             f"in {topk_frames!r}") from None
        if not -T <= f < T:
            raise ValueError(f"topk_frames: expected frame indices in [-{T}, {T}) (T = memory frames), "
                             f"got {f} in {list(topk_frames)!r}")
        f %= T
        if f not in frames:
            frames.append(f)
    return frames


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


# ---------------------------------------------------------------- the ops


def kernel_guided_read(query_key: Tensor, memory_key: Tensor, memory_value: Tensor, centers: Optional[Tensor] = None,
                       sigma: Union[float, Tensor, None] = None, *, scale: Optional[float] = None, topk: int = 0,
                       topk_frames: Optional[Sequence[int]] = None,
                       backend: str = "auto") -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Fused (Gaussian-)kernel-weighted memory read, docs/ops.md section 1.

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
        topk_frames: frame indices searched by the top-k (default: all frames, in order); a
            negative index counts from the end, a repeat counts once (``(0, -1)`` serves every
            T). Returned indices point into their concatenation: ``j * H * W + y * W + x`` for
            the j-th distinct listed frame.
        backend: "auto" | "reference" | "native" | "triton" | "cuda_emulated" (docs/ops.md, Backends).

    Returns:
        ``out`` (B, Cv, H, W), or ``(out, topk_indices (B, H*W, topk) int64)`` if ``topk > 0``.
    """
    query_key, memory_key, memory_value = _same_dtype_under_autocast(query_key, memory_key, memory_value)
    B, Ck, T, H, W = _check_read_inputs(query_key, memory_key, memory_value)
    if (centers is None) != (sigma is None):
        raise ValueError("centers and sigma: give both (Gaussian-guided read) or neither (plain read); "
                         f"got centers={'None' if centers is None else 'a tensor'}, sigma={'None' if sigma is None else 'given'}")
    if centers is not None:
        _check_centers(centers, B, T, H, W, query_key.device)
        sigma = _check_sigma(sigma, B, T, query_key.device, query_key.dtype)
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 0:
        raise ValueError(f"topk: expected an int >= 0, got {topk!r}")
    frames = _normalise_frames(topk_frames, T)  # checked even when topk == 0
    if topk == 0:
        frames = []
    elif not frames:
        raise ValueError("topk_frames: expected at least one frame index when topk > 0, got an empty list")
    elif topk > len(frames) * H * W:
        raise ValueError(f"topk: expected at most len(distinct topk_frames) * H * W = {len(frames) * H * W}, got {topk}")
    scale = _resolve_scale(scale, Ck)
    _check_backend(backend)
    out, _lse, indices = call("kernel_guided_read", backend, query_key.device,
                                       (query_key, memory_key, memory_value, centers, sigma, scale, topk, frames))
    return (out, indices) if topk > 0 else out


def gaussian_softmax(affinity: Tensor, centers: Tensor, sigma: Union[float, Tensor], *, size: Tuple[int, int],
                     backend: str = "auto") -> Tensor:
    """``softmax(affinity + log-Gaussian bias, dim=1)``, docs/ops.md section 2.

    Drop-in for code that already holds the (scaled) affinity: one pass over the matrix
    instead of softmax, multiply by the Gaussian, sum and divide.

    Args:
        affinity: (B, T*H*W, H*W), memory positions along dim 1, queries along dim 2.
        centers: (B, T, H, W) int64 flat query indices, or -1 for no Gaussian.
        sigma: (T,), (B, T) or a number, > 0.
        size: (H, W) of the grid.
        backend: as for kernel_guided_read.

    Returns:
        (B, T*H*W, H*W), the affinity's dtype: each column (query) sums to 1 over memory.
    """
    _tensor("affinity", affinity, 3, "(B, T*H*W, H*W)")
    _floating("affinity", affinity)
    try:
        H, W = (operator.index(s) for s in size)
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
    if query_key.shape[1] < 1:
        raise ValueError(f"query_key: expected C >= 1 key channels, got shape {_shape(query_key)}")


def local_track(memory_key: Tensor, query_key: Tensor, window: int = 7, *, backend: str = "auto") -> Tensor:
    """Local-window tracking between adjacent frames, docs/ops.md section 3.

    For every memory pixel (y, x): the flat query index ``qy * W + qx`` of the best match
    ``argmax <memory_key[:, y, x], query_key[:, qy, qx]>`` over ``|qy - y| <= window // 2``,
    ``|qx - x| <= window // 2`` inside the frame. Ties go to the smaller index. A window
    larger than the frame is the whole frame.

    Args:
        memory_key: (B, C, H, W), the earlier frame's key.
        query_key: (B, C, H, W), the next frame's key.
        window: positive odd int, the side of the search window.
        backend: as for kernel_guided_read.

    Returns:
        (B, H, W) int64 flat query indices ``qy * W + qx``.
    """
    _tensor("memory_key", memory_key, 4, "(B, C, H, W)")
    memory_key, query_key = _same_dtype_under_autocast(memory_key, query_key)
    _check_track_keys(memory_key, query_key)
    _expect_dims("query_key", query_key, tuple(memory_key.shape), "(B, C, H, W) equal to memory_key's shape")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1 or window % 2 == 0:
        raise ValueError(f"window: expected a positive odd int, got {type(window).__name__} {window!r}")
    # Offsets past the frame have no candidate: the radius never needs to exceed max(H, W) - 1
    # (this also keeps a huge Python int from overflowing int64 or looping for ever).
    window = 2 * min(window // 2, max(max(memory_key.shape[2:]) - 1, 0)) + 1
    _check_backend(backend)
    return call("local_track", backend, query_key.device, (memory_key, query_key, window))


def global_track(memory_key: Tensor, query_key: Tensor, *, backend: str = "auto") -> Tensor:
    """KMN's memory-to-query argmax, docs/ops.md section 4: for every memory pixel the flat query
    index of ``argmax_q <memory_key[p], query_key[q]>`` (ties: smaller index), without
    materialising the affinity.

    Args:
        memory_key: (B, C, T, H, W).
        query_key: (B, C, H, W).
        backend: as for kernel_guided_read.

    Returns:
        (B, T, H, W) int64 flat query indices ``y * W + x``.
    """
    _tensor("memory_key", memory_key, 5, "(B, C, T, H, W)")
    memory_key, query_key = _same_dtype_under_autocast(memory_key, query_key)
    _check_track_keys(memory_key, query_key)
    B, C, H, W = query_key.shape
    _expect_dims("memory_key", memory_key, (B, C, None, H, W), "(B, C, T, H, W) matching query_key (B, C, H, W)")
    _check_backend(backend)
    return call("global_track", backend, query_key.device, (memory_key, query_key))


def topk_guided_read(query_key: Tensor, memory_key: Tensor, memory_value: Tensor, topk_indices: Tensor, *,
                     scale: Optional[float] = None, topk_frames: Optional[Sequence[int]] = None,
                     backend: str = "auto") -> Tensor:
    """Top-k guided sparse gather-and-attend, docs/ops.md section 5.

    ``topk_indices`` (B, Hc*Wc, k) int64 index the coarse memory grid ``T*Hc*Wc``; each index
    stands for its ``r x r`` fine pixels (``r = H // Hc``, inferred). Every fine query attends,
    by a softmax of ``scale * <q, k>``, over the ``k*r*r`` fine pixels of its coarse cell's
    indices. Nothing gathered is materialised by the fused backends.

    ``topk_frames``: the frames of the ``kernel_guided_read`` call that produced the indices
    (same rules: negative indices count from the end, a repeat counts once). The indices then
    point into the concatenation of those frames of the whole memory, which is passed as is.

    Args:
        query_key: (B, Ck, H, W), fine scale.
        memory_key: (B, Ck, T, H, W), fine scale.
        memory_value: (B, Cv, T, H, W).
        topk_indices: (B, Hc*Wc, k) int64 into the coarse grid (``T*Hc*Wc``, or
            ``len(distinct topk_frames)*Hc*Wc`` with ``topk_frames``); a duplicate counts twice.
        scale: defaults to ``1 / sqrt(Ck)``.
        topk_frames: None, or the frames the indices were computed over (see above).
        backend: as for kernel_guided_read.

    Returns:
        (B, Cv, H, W), the inputs' dtype.
    """
    query_key, memory_key, memory_value = _same_dtype_under_autocast(query_key, memory_key, memory_value)
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
    frames = None if topk_frames is None else _normalise_frames(topk_frames, T)
    coarse = (T if frames is None else len(frames)) * cells
    bound = "T*Hc*Wc" if frames is None else "len(distinct topk_frames)*Hc*Wc"
    if topk_indices.numel() > 0:
        _check_values((topk_indices >= 0) & (topk_indices < coarse), lambda compiled=False: (
            f"topk_indices: expected values in [0, {bound} = {coarse}), got "
            + ("values outside" if compiled else f"values in [{int(topk_indices.min())}, {int(topk_indices.max())}]")))
    if frames is not None and frames != list(range(T)):
        # Index i of the concatenation of the listed frames -> the same cell of frame
        # frames[i // cells] of the whole memory: O(B * Hc*Wc * k), and every backend gets it.
        listed = torch.tensor(frames, dtype=torch.int64, device=topk_indices.device)
        topk_indices = listed[topk_indices // cells] * cells + topk_indices % cells
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


def memory_read(query_key: Tensor, memory_key: Tensor, memory_value: Tensor, *, similarity: str = "dot",
                memory_shrinkage: Optional[Tensor] = None, query_selection: Optional[Tensor] = None,
                scale: Optional[float] = None, topk: int = 0, return_usage: bool = False,
                backend: str = "auto") -> Union[Tensor, Tuple[Tensor, Tensor]]:
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
        backend: as for kernel_guided_read.

    Returns:
        ``out`` (B, Cv, *Q), or ``(out, usage (B, *M))`` when ``return_usage``.
    """
    present = [x for x in (query_key, memory_key, memory_value, memory_shrinkage, query_selection) if x is not None]
    cast = iter(_same_dtype_under_autocast(*present))
    query_key, memory_key, memory_value = next(cast), next(cast), next(cast)
    memory_shrinkage = None if memory_shrinkage is None else next(cast)
    query_selection = None if query_selection is None else next(cast)
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
