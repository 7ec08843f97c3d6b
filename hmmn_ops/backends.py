"""Which backend runs an op, and why the others cannot.

Backends:
  reference  pure PyTorch (hmmn_ops/reference.py): any device, the test oracle
  native     the compiled extension hmmn_ops._C: C++ kernels on CPU tensors, CUDA kernels on CUDA
  triton     Triton kernels (hmmn_ops/triton/): CUDA tensors, or CPU tensors with TRITON_INTERPRET=1
  cuda_emulated  the CUDA kernels' own device code run on the CPU by a host emulator
             (hmmn_ops._C_emulated, built with HMMN_OPS_CUDA_EMULATION=1; docs/cuda.md): CPU tensors,
             slow, for testing the CUDA backend without a GPU

``backend="auto"`` calls ``torch.ops.hmmn_ops.<op>``; the dispatcher runs the compiled kernel of
the tensors' device. Slots without a compiled kernel are filled at import by
``register_fallbacks``: CPU -> reference; CUDA -> Triton when importable, else reference.
A CUDA build on a GPU older than sm_80 is routed the same way, with a warning.
"""
import importlib
import os
import warnings

import torch

from . import _autograd, reference

BACKENDS = ("auto", "reference", "native", "triton", "cuda_emulated")

# Every schema of csrc/ops.cpp; the differentiable ones have a "<op>_backward" companion.
FORWARD_OPS = ("kernel_guided_read", "gaussian_softmax", "local_track", "global_track", "topk_guided_read",
               "memory_read")
ALL_OPS = FORWARD_OPS + tuple(f"{op}_backward" for op in _autograd.DIFFERENTIABLE)

_native = {}  # dispatch key -> ops with a compiled kernel, recorded before fallbacks fill the gaps
_registered = False


def _has_compiled_kernel(op, key, namespace="hmmn_ops"):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{op}", key)


def native_ops(device_type):
    """Ops with a compiled kernel for ``device_type`` ("cpu" or "cuda")."""
    return _native.get(device_type, frozenset())


class _Native:
    """The compiled kernels, reached through the dispatcher like any torch op."""

    def __getattr__(self, op):
        return getattr(torch.ops.hmmn_ops, op).default


NATIVE = _Native()


def _triton_module():
    """(module, None) or (None, why Triton cannot run here)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return None, f"triton is not installed ({e}); pip install triton"
    try:
        return importlib.import_module("hmmn_ops.triton"), None
    except ImportError as e:
        return None, f"hmmn_ops.triton failed to import: {e}"


def _triton_refusal(op, device):
    module, why = _triton_module()
    if module is None:
        return why
    if not hasattr(module, op):
        return f"no Triton kernel for {op} yet"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 (slow; for tests)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton does not run on {device.type} tensors"
    return None


class _Emulated:
    """The emulated CUDA kernels: the ops of the hmmn_ops_emulated namespace (CPU kernels)."""

    def __getattr__(self, op):
        return getattr(torch.ops.hmmn_ops_emulated, op).default


_emulated = None  # (_Emulated(), None) or (None, why the emulated kernels cannot run)
_emulated_lib = None  # keeps the hmmn_ops_emulated schemas registered


def _emulated_module():
    global _emulated, _emulated_lib
    if _emulated is None:
        from ._build import BUILD_CONFIG

        if not BUILD_CONFIG.get("cuda_emulated"):
            _emulated = (None, "hmmn_ops was built without the CUDA emulator; rebuild with HMMN_OPS_CUDA_EMULATION=1 "
                               "(needs the CUDA headers, no GPU)")
            return _emulated
        # The same schemas as hmmn_ops (csrc/ops.cpp), under their own namespace: the emulated
        # kernels register for CPU there, next to (not instead of) the native CPU kernels.
        _emulated_lib = torch.library.Library("hmmn_ops_emulated", "DEF")
        for op in ALL_OPS:
            _emulated_lib.define(str(getattr(torch.ops.hmmn_ops, op).default._schema).split("::", 1)[1])
        _emulated_lib.define("_emulator_selftest(str name) -> Tensor")  # csrc/emulator/selftest.cpp
        try:
            importlib.import_module("hmmn_ops._C_emulated")
            _emulated = (_Emulated(), None)
        except ImportError as e:
            _emulated = (None, f"hmmn_ops._C_emulated failed to load ({e}); rebuild with HMMN_OPS_CUDA_EMULATION=1")
    return _emulated


def _emulated_refusal(op, device):
    module, why = _emulated_module()
    if module is None:
        return why
    if device.type != "cpu":
        return f"the emulated CUDA kernels run on CPU tensors, not {device.type}"
    if not _has_compiled_kernel(op, "CPU", "hmmn_ops_emulated"):
        return f"no CUDA kernel for {op} to emulate yet"
    return None


def _native_refusal(op, device):
    key = device.type
    if key == "cuda":
        from ._build import BUILD_CONFIG

        if not BUILD_CONFIG.get("cuda_built"):
            return ("hmmn_ops was built without CUDA kernels (torch CUDA: "
                    f"{BUILD_CONFIG.get('torch_cuda')}); rebuild on a machine with nvcc and a CUDA torch: "
                    "HMMN_OPS_CUDA=1 pip install --no-build-isolation --no-deps -e .")
        if _old_gpu(device):
            return f"the CUDA kernels need compute capability >= 8.0, {torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}"
    if key not in ("cpu", "cuda"):
        return f"no native kernels for {key} tensors"
    if op not in native_ops(key):
        return f"this build has no native {key.upper()} kernel for {op} yet"
    return None


def refusal(backend, op, device):
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    device = torch.device(device)
    if backend in ("auto", "reference"):
        return None
    if backend == "native":
        return _native_refusal(op, device)
    if backend == "triton":
        return _triton_refusal(op, device)
    if backend == "cuda_emulated":
        return _emulated_refusal(op, device)
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


def implementation(backend, op, device):
    """The module-like object whose attribute ``op`` implements it for ``backend``; raises if it cannot."""
    why = refusal(backend, op, device)
    if why is not None:
        raise RuntimeError(f"hmmn_ops.{op}: backend={backend!r} cannot run on {torch.device(device)}: {why}")
    if backend == "reference":
        return reference
    if backend == "triton":
        return _triton_module()[0]
    if backend == "cuda_emulated":
        return _emulated_module()[0]
    return NATIVE


_old_gpu_cache = {}


def _old_gpu(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _old_gpu_cache:
        _old_gpu_cache[index] = torch.cuda.get_device_capability(index) < (8, 0)
    return _old_gpu_cache[index]


def call(op, backend, device, args):
    """Run ``op`` with canonical ``args`` on ``backend`` (see module docstring)."""
    if backend == "auto":
        if device.type == "cuda" and op in native_ops("cuda") and _old_gpu(device):
            backend = "triton" if _triton_refusal(op, device) is None else "reference"
            warnings.warn(f"hmmn_ops: the CUDA kernels need sm_80+; running {op} with the {backend} backend", stacklevel=3)
        else:
            return getattr(torch.ops.hmmn_ops, op)(*args)
    impl = implementation(backend, op, device)
    if op in _autograd.DIFFERENTIABLE:
        return _autograd.run_forced(op, impl, args)
    return getattr(impl, op)(*args)


def _cuda_fallback(op):
    """CUDA kernel for an op the extension did not compile: Triton if it can run, else the reference
    (also for float64, which the Triton kernels do not take)."""

    def kernel(*args):
        module, _ = _triton_module()
        double = any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args)
        impl = module if module is not None and hasattr(module, op) and not double else reference
        return getattr(impl, op)(*args)

    kernel.__name__ = f"{op}_cuda_fallback"
    return kernel


def register_fallbacks():
    """Fill every (op, device) slot without a compiled kernel. Idempotent."""
    global _registered
    if _registered:
        return
    for key, device_type in (("CPU", "cpu"), ("CUDA", "cuda")):
        _native[device_type] = frozenset(op for op in ALL_OPS if _has_compiled_kernel(op, key))
    for op in ALL_OPS:
        if op not in _native["cpu"]:
            torch.library.impl(f"hmmn_ops::{op}", "CPU", getattr(reference, op))
        if op not in _native["cuda"]:
            torch.library.impl(f"hmmn_ops::{op}", "CUDA", _cuda_fallback(op))
    _registered = True


def backends(device=None):
    """What can run here: ``{backend: {op: None or the reason it cannot}}`` for ``device``
    (default: cuda if available, else cpu). Printed by ``hmmn-vos info``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {b: {op: refusal(b, op, device) for op in FORWARD_OPS} for b in BACKENDS if b != "auto"} | {
        "auto": {op: auto_choice(op, device) for op in FORWARD_OPS}
    }


def auto_choice(op, device):
    """Name of the backend ``backend="auto"`` runs for ``op`` on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        if op in native_ops("cuda") and not _old_gpu(device):
            return "native"
        return "triton" if _triton_refusal(op, device) is None else "reference"
    return "native" if op in native_ops(device.type) else "reference"
