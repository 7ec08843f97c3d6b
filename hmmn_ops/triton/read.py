"""kernel_guided_read (docs/ops.md section 1) in Triton: the shared read engine (``_engine.py``)
with the dot score and its Gaussian-bias option (HAS_CENTERS): the flash-style forward (memory
splits merged by ``_combine``), the top-k over the listed frames, and the flash-style backward
(P recomputed from lse).

Queries (B, Ck, H, W) are read as (B, Ck, N) with N = H*W, memory keys and values
(B, C, T, H, W) as (B, C, M) with M = T*H*W, centres (B, T, H, W) as (B, M).
"""
import torch

from . import _engine
from ._common import check_supported, device_guard, flat


def _args(query_key, memory_key, memory_value, centers, sigma, scale):
    return _engine.Args(flat(query_key, 2), flat(memory_key, 2), flat(memory_value, 2), scale,
                        centers=None if centers is None else flat(centers, 1), sigma=sigma,
                        width=query_key.shape[3])


def kernel_guided_read(query_key, memory_key, memory_value, centers, sigma, scale, topk, topk_frames):
    check_supported(query_key, "kernel_guided_read")
    a = _args(query_key, memory_key, memory_value, centers, sigma, scale)
    B, Cv, (H, W), dev = a.B, a.Cv, query_key.shape[2:], a.device
    out = torch.empty(B, Cv, H, W, dtype=a.dtype, device=dev)
    lse = torch.empty(B, a.N, dtype=a.acc, device=dev)
    indices = torch.empty(B, a.N, topk, dtype=torch.int64, device=dev)
    if B == 0:
        return out, lse, indices
    with device_guard(query_key):
        _engine.full_forward(a, flat(out, 2), lse)
        if topk > 0:
            _engine.select_topk(a, indices, topk, topk_frames, a.HW)
    return out, lse, indices


def kernel_guided_read_backward(grad_out, query_key, memory_key, memory_value, centers, sigma, out, lse, scale):
    check_supported(query_key, "kernel_guided_read_backward")
    a = _args(query_key, memory_key, memory_value, centers, sigma, scale)
    dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format)
                  for x in (query_key, memory_key, memory_value))
    if a.B == 0:
        return dq, dk, dv
    d_out = flat(grad_out, 2)
    delta = _engine.softmax_delta(d_out, flat(out, 2), a.acc)
    with device_guard(query_key):
        _engine.full_backward(a, d_out, lse.to(a.acc).contiguous(), delta, flat(dq, 2), flat(dk, 2), flat(dv, 2))
    return dq, dk, dv
