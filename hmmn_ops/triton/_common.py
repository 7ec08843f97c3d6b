"""Pieces shared by the Triton kernels: launch settings and small @triton.jit helpers."""
import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether kernels run in its CPU interpreter, from the same
# variable, so reading it once here agrees with what the kernels below will do.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Smallest tl.dot tile side.
MIN_DOT = 16


def tuning(half, interpreted, full=None, width_arg="q_ptr"):
    """``triton.autotune`` arguments. On a GPU: the ``half`` configs for 2-byte inputs and the
    ``full`` ones (smaller tiles; default ``half``) for float32, whose tiles take twice the shared
    memory and whose exact dots compile slowly; ``width_arg`` names the input that decides. Under
    the interpreter: one small config, since tuning there is slow and meaningless."""
    if INTERPRET:
        return dict(configs=[interpreted])
    if full is None:
        return dict(configs=half)

    def prune(configs, named_args, **kwargs):
        return full if named_args[width_arg].element_size() > 2 else half

    return dict(configs=half + full, prune_configs_by={"early_config_prune": prune})


def check_supported(x, op):
    """float64 runs in the interpreter (tests) only: docs/ops.md asks float16/bfloat16/float32 of CUDA.
    bfloat16 does not run in the interpreter: its tl.dot on bfloat16 returns garbage (values
    around 1e9; an upstream interpreter bug), so it is refused rather than wrong."""
    if x.is_cuda and x.dtype == torch.float64:
        raise RuntimeError(f"hmmn_ops.triton.{op}: the Triton kernels take float16, bfloat16 or float32 CUDA "
                           f"tensors, got float64; use backend='reference' for float64")
    if INTERPRET and not x.is_cuda and x.dtype == torch.bfloat16:  # compile_check's CPU tensors pass
        raise RuntimeError(f"hmmn_ops.triton.{op}: bfloat16 is refused under the Triton interpreter "
                           f"(TRITON_INTERPRET=1), whose tl.dot computes bfloat16 wrong (upstream bug); "
                           f"use float32 or float16 there, or run Triton on a GPU")


def config(num_warps=4, num_stages=2, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def pow2(n, lo=MIN_DOT):
    """Power-of-two block side covering ``n`` (at least ``lo``)."""
    return max(lo, triton.next_power_of_2(max(1, n)))


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype):
    """float32 inputs follow torch's matmul setting (exact by default); other dtypes ignore it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=256)
def constant(values, dtype, device):
    """Read-only device tensor of ``values`` (a tuple), made once: no host-to-device copy per call
    (which would also break CUDA graph capture)."""
    return torch.tensor(values, dtype=dtype, device=device)


def scale_tensor(scale, acc, device):
    # Triton passes Python floats as float32: a 1-element tensor keeps float64 scales exact.
    return constant((float(scale),), acc, device)


def device_guard(tensor):
    """Launch on the tensor's GPU (Triton uses the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device):
    """Programs that keep the device busy: two per SM on a GPU, a few under the interpreter (so
    small test shapes still exercise the split-and-combine code)."""
    if device.type != "cuda":
        return 4
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def memory_splits(programs, length, device):
    """Split ``length`` memory positions into chunks when ``programs`` alone under-fill the device.

    Returns ``(splits, split_len)``: every split is non-empty and ``split_len`` is a multiple
    of the largest memory block, so only the last block of the last split is partial.
    """
    unit = 16 if INTERPRET else 128
    want = min(triton.cdiv(target_programs(device), max(1, programs)), triton.cdiv(length, unit))
    if want <= 1:
        return 1, length
    split_len = triton.cdiv(triton.cdiv(length, want), unit) * unit
    return triton.cdiv(length, split_len), split_len


def flat(x, dims):
    """View (when possible) of ``x`` with its dims from ``dims`` on merged into one."""
    return x.reshape(*x.shape[:dims], math.prod(x.shape[dims:]))


# ---------------------------------------------------------------- @triton.jit helpers


@triton.jit
def dot(a, b, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b accumulated in ACC. ``a`` is cast to ``b``'s dtype (probabilities and score
    gradients in float32 meet half-precision keys/values on the tensor cores). float64 has no
    tensor-core path everywhere, so it multiplies and sums."""
    if ACC == tl.float64:
        return tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    else:
        return tl.dot(a.to(b.dtype), b, input_precision=PRECISION)


@triton.jit
def center_terms(c, s, W, ACC: tl.constexpr):
    """(cy, cx, gamma) of memory positions with centres ``c`` (flat, -1 = none) and sigma ``s``:
    gamma = 1 / (2 sigma^2), and 0 where there is no centre so the bias vanishes."""
    gamma = tl.where(c >= 0, 0.5 / (s * s), 0.0).to(ACC)
    c = tl.maximum(c, 0).to(tl.int32)
    return (c // W).to(ACC), (c % W).to(ACC), gamma


@triton.jit
def gaussian_bias(qy, qx, cy, cx, gamma):
    """-|q - c|^2 * gamma, broadcast over the shapes given (queries on one axis, memory on the other);
    exactly 0 at the centre even where gamma overflowed to inf (no 0 * inf)."""
    dy = qy - cy
    dx = qx - cx
    d2 = dy * dy + dx * dx
    return tl.where(d2 == 0, 0.0, -d2 * gamma)


@triton.jit
def saturate(x):
    """Logits clamped to +-1e36 (float32) / +-1e300 (float64), NaN kept (reference.py's
    LOGIT_BOUND): an overflow saturates instead of making inf - inf = NaN in a softmax."""
    if x.dtype == tl.float64:
        big = tl.full([], 1e300, tl.float64)
    else:
        big = tl.full([], 1e36, tl.float32)
    return tl.where(x > big, big, tl.where(x < -big, -big, x))


@triton.jit
def rank_key(logit, index, IDX_BITS: tl.constexpr):
    """int64 keys whose order is (logit, then smaller index): descending key order is the top-k
    order of docs/ops.md section 1. float32 logits keep all their bits (IDX_BITS = 32). float64 logits lose their
    lowest IDX_BITS mantissa bits to the index, so logits closer than about 2^(IDX_BITS-52)
    relative count as tied."""
    logit = tl.where(logit == 0, 0.0, logit)  # -0.0 ties with +0.0, as in torch.sort
    logit = tl.where(logit != logit, float("-inf"), logit)  # NaN ranks as -inf (docs/reliability.md)
    low = (1 << IDX_BITS) - 1 - index.to(tl.int64)
    if logit.dtype == tl.float64:
        bits = logit.to(tl.int64, bitcast=True)
        bits = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)  # sign-magnitude -> two's-complement order
        return ((bits >> IDX_BITS) << IDX_BITS) | low
    else:
        bits = logit.to(tl.float32).to(tl.int32, bitcast=True)
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return (bits.to(tl.int64) << 32) | low


@triton.jit
def rank_index(key, IDX_BITS: tl.constexpr):
    """The index packed by ``rank_key``."""
    return (1 << IDX_BITS) - 1 - (key & ((1 << IDX_BITS) - 1))


@triton.jit
def topk_merge(best, keys):
    """The KP largest of ``best`` (a [R, KP] list sorted descending) and a new block of KP ``keys``:
    the block sorted ascending, max'ed element-wise with ``best`` (one bitonic-merge step keeps
    the KP largest of both), re-sorted descending."""
    return tl.sort(tl.maximum(best, tl.sort(keys, descending=False)), descending=True)
