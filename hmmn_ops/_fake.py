"""Fake (meta) kernels: output shapes and dtypes only, for torch.compile and FakeTensor tracing.

csrc/ops.cpp names this module with ``set_python_module``, so torch imports it when needed.
"""
import torch


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("hmmn_ops::kernel_guided_read")
def _kernel_guided_read(query_key, memory_key, memory_value, centers, sigma, scale, topk, topk_frames):
    B, _, H, W = query_key.shape
    out = query_key.new_empty(B, memory_value.shape[1], H, W)
    lse = query_key.new_empty(B, H * W, dtype=_acc(query_key.dtype))
    indices = query_key.new_empty(B, H * W, topk, dtype=torch.int64)
    return out, lse, indices


def _grads_like(query_key, memory_key, memory_value):
    return torch.empty_like(query_key), torch.empty_like(memory_key), torch.empty_like(memory_value)


@torch.library.register_fake("hmmn_ops::kernel_guided_read_backward")
def _kernel_guided_read_backward(grad_out, query_key, memory_key, memory_value, centers, sigma, out, lse, scale):
    return _grads_like(query_key, memory_key, memory_value)


@torch.library.register_fake("hmmn_ops::gaussian_softmax")
def _gaussian_softmax(affinity, centers, sigma, height, width):
    return torch.empty_like(affinity)


@torch.library.register_fake("hmmn_ops::gaussian_softmax_backward")
def _gaussian_softmax_backward(grad_output, output):
    return torch.empty_like(output)


@torch.library.register_fake("hmmn_ops::local_track")
def _local_track(memory_key, query_key, window):
    B, _, H, W = memory_key.shape
    return memory_key.new_empty(B, H, W, dtype=torch.int64)


@torch.library.register_fake("hmmn_ops::global_track")
def _global_track(memory_key, query_key):
    B, _, T, H, W = memory_key.shape
    return memory_key.new_empty(B, T, H, W, dtype=torch.int64)


@torch.library.register_fake("hmmn_ops::topk_guided_read")
def _topk_guided_read(query_key, memory_key, memory_value, topk_indices, scale, ratio):
    B, _, H, W = query_key.shape
    out = query_key.new_empty(B, memory_value.shape[1], H, W)
    return out, query_key.new_empty(B, H * W, dtype=_acc(query_key.dtype))


@torch.library.register_fake("hmmn_ops::topk_guided_read_backward")
def _topk_guided_read_backward(grad_out, query_key, memory_key, memory_value, topk_indices, out, lse, scale, ratio):
    return _grads_like(query_key, memory_key, memory_value)


@torch.library.register_fake("hmmn_ops::memory_read")
def _memory_read(query_key, memory_key, memory_value, memory_shrinkage, query_selection, similarity, scale, topk,
                 return_usage):
    B, _, Nq = query_key.shape
    Nm = memory_key.shape[2]
    acc = _acc(query_key.dtype)
    out = query_key.new_empty(B, memory_value.shape[1], Nq)
    lse = query_key.new_empty(B, Nq, dtype=acc)
    indices = query_key.new_empty(B, Nq, topk, dtype=torch.int64)
    usage = query_key.new_empty(B, Nm if return_usage else 0, dtype=acc)
    return out, lse, indices, usage


@torch.library.register_fake("hmmn_ops::memory_read_backward")
def _memory_read_backward(grad_out, query_key, memory_key, memory_value, memory_shrinkage, query_selection, out, lse,
                          topk_indices, similarity, scale):
    grads = _grads_like(query_key, memory_key, memory_value)
    d_shrinkage = torch.empty_like(memory_shrinkage) if memory_shrinkage is not None else query_key.new_empty(0)
    d_selection = torch.empty_like(query_selection) if query_selection is not None else query_key.new_empty(0)
    return (*grads, d_shrinkage, d_selection)
