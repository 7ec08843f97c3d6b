"""Triton kernels of every hmmn_ops op (forward and backward), with the canonical arguments of
docs/internals.md: the same names and signatures as hmmn_ops/reference.py.

backends.py runs them for ``backend="triton"`` and, when the extension has no CUDA kernels, as
the CUDA kernel of ``torch.ops.hmmn_ops.<op>``. On CPU tensors they run only in Triton's
interpreter (``TRITON_INTERPRET=1`` set before triton is imported): slow, for tests.
Design notes: docs/triton.md.
"""
from .memory import memory_read, memory_read_backward
from .read import kernel_guided_read, kernel_guided_read_backward
from .softmax import gaussian_softmax, gaussian_softmax_backward
from .topk_read import topk_guided_read, topk_guided_read_backward
from .track import global_track, local_track

__all__ = [
    "kernel_guided_read",
    "kernel_guided_read_backward",
    "memory_read",
    "memory_read_backward",
    "gaussian_softmax",
    "gaussian_softmax_backward",
    "local_track",
    "global_track",
    "topk_guided_read",
    "topk_guided_read_backward",
]
