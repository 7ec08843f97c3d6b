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
