"""Input builders shared by the GPU backends' tests (test_cuda.py, test_triton.py): random and
small-integer tensors on a device, non-contiguous layouts, kernel_guided_read arguments."""
import os

import pytest
import torch

from hmmn_ops import reference

F32 = torch.float32


def channels_last(x):
    """Same values, channels stored last (a permuted, non-contiguous view)."""
    perm = [0, *range(2, x.dim()), 1]
    return x.permute(perm).contiguous().permute([perm.index(i) for i in range(x.dim())])


def strided(x):
    """Same values in every other element of the last dim (stride 2, non-contiguous)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


LAYOUTS = {"contig": lambda x: x, "channels_last": channels_last, "strided": strided}


class Inputs:
    """Builders that put their tensors on one device."""

    def __init__(self, device):
        self.device = device

    def randn(self, *shape, dtype=F32):
        return torch.randn(*shape, dtype=dtype, device=self.device)

    def ints(self, *shape, dtype=F32, lo=-1, hi=1):
        """Small integer values: every score is exact in any dtype and summation order, so ties
        and top-k orders are reproducible."""
        return torch.randint(lo, hi + 1, shape, device=self.device).to(dtype)

    def read_args(self, B, Ck, Cv, T, H, W, gaussian, dtype=F32, layout="contig", values=None):
        """(query_key, memory_key, memory_value, centers, sigma) of kernel_guided_read; `values`
        builds the keys (default randn, or ints for exact ties)."""
        lay, values = LAYOUTS[layout], values or self.randn
        q, k = lay(values(B, Ck, H, W, dtype=dtype)), lay(values(B, Ck, T, H, W, dtype=dtype))
        v = lay(self.randn(B, Cv, T, H, W, dtype=dtype))
        centers = sigma = None
        if gaussian:
            centers = torch.randint(-1, H * W, (B, T, H, W), device=self.device)
            centers[..., 0, 0] = H * W - 1  # a far corner: the largest bias
            sigma = torch.rand(B, T, dtype=reference.acc_dtype(dtype), device=self.device) * 2 + 0.5
        return q, k, v, centers, sigma


def triton_device():
    """(interpreting, device) for a Triton test module, skipping the module where Triton cannot
    run: it needs a CUDA GPU, or TRITON_INTERPRET=1 for its CPU interpreter."""
    pytest.importorskip("triton")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret and not torch.cuda.is_available():
        pytest.skip("Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 (set before triton is imported) to run "
                    "them in the CPU interpreter", allow_module_level=True)
    return interpret, "cpu" if interpret else "cuda"
