"""hmmn_ops: fast, memory-light memory matching for video object segmentation.

The public API (docs/ops.md): the ops, each with ``backend="auto"``, and the ``Tracker``.
"""
from ._build import BUILD_CONFIG
from . import _autograd, _fake  # noqa: F401  (registrations)
from .backends import backends, register_fallbacks
from .ops import gaussian_softmax, global_track, kernel_guided_read, local_track, memory_read, topk_guided_read
from .tracking import Tracker

__version__ = "0.1.0"

_autograd.register()
register_fallbacks()

__all__ = [
    "kernel_guided_read",
    "gaussian_softmax",
    "local_track",
    "global_track",
    "topk_guided_read",
    "memory_read",
    "Tracker",
    "backends",
    "BUILD_CONFIG",
]
