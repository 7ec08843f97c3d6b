"""The compiled CUDA kernels (csrc/cuda/) against the pure-PyTorch reference, forward and backward.

Every test runs twice through the ``cuda_target`` fixture (tests/conftest.py): marked ``cuda``, on a
GPU with a CUDA build (``backend="native"`` / ``torch.ops.hmmn_ops`` on CUDA tensors; skipped
without one), and marked ``emulated``, the same kernels' device code run on CPU tensors by the host
emulator (``backend="cuda_emulated"``, an HMMN_OPS_CUDA_EMULATION=1 build; docs/cuda.md). Each op
is compared with ``hmmn_ops.reference``:

- float32 / float64: close to the reference at the same dtype;
- float16 / bfloat16: the flash-attention rule, error against the float64 reference at most twice
  the error of the reference itself run at that precision (plus a hair for exact-zero cases);
- top-k and argmax indices exactly, on integer-valued inputs where every score is exact (ties),
  and by score (not index) at half precision where near-ties may legitimately flip.

    python -m pytest -m cuda tests/test_cuda.py       # on a GPU
    python -m pytest -m emulated tests/test_cuda.py   # anywhere, with the emulator built
"""
import pytest
import torch

import hmmn_ops
from hmmn_ops import reference

from inputs import LAYOUTS, Inputs, channels_last, strided

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
HALF = [F16, BF16]
TOL = {F32: dict(rtol=2e-5, atol=2e-5), F64: dict(rtol=1e-10, atol=1e-10)}
OPS = torch.ops.hmmn_ops
CANONICAL_OPS = ["kernel_guided_read", "kernel_guided_read_backward", "gaussian_softmax", "gaussian_softmax_backward",
                 "local_track", "global_track", "topk_guided_read", "topk_guided_read_backward"]


# ---------------------------------------------------------------- inputs


def _gpu_only(target, why="too large to emulate in CI time"):
    if target.name == "emulated":
        pytest.skip(why)


def _to(args, dtype):
    """Floating tensors (not sigma, which stays in its accumulation dtype) cast to dtype."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() >= 3:
            a = a.to(dtype)
        elif isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.to(reference.acc_dtype(dtype))
        out.append(a)
    return out


def _close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL.get(want.dtype, {}))


def _err(x, exact):
    return (x.double() - exact.double()).abs().max().item() if x.numel() else 0.0


def _within_twice_reference(cuda_target, op, args_fn, dtype, outputs=None):
    """Run op on the target and in the reference at `dtype`; both against the float64 reference."""
    exact = getattr(reference, op)(*args_fn(F64))
    ref_lo = getattr(reference, op)(*args_fn(dtype))
    got = cuda_target.op(op)(*args_fn(dtype))
    exact, ref_lo, got = ([x] if isinstance(x, torch.Tensor) else list(x) for x in (exact, ref_lo, got))
    for i in outputs if outputs is not None else range(len(exact)):
        assert got[i].dtype == ref_lo[i].dtype and got[i].shape == ref_lo[i].shape
        e_got, e_ref = _err(got[i], exact[i]), _err(ref_lo[i], exact[i])
        assert e_got <= 2 * e_ref + 1e-6, f"output {i}: error {e_got:.3g} > 2 x reference error {e_ref:.3g} in {dtype}"


# ---------------------------------------------------------------- kernel_guided_read forward

READ_CASES = {
    # B, Ck, Cv, T, H, W
    "small": (2, 5, 7, 2, 3, 5),
    "odd": (3, 3, 4, 3, 5, 7),
    "T=1,1x1": (1, 2, 3, 1, 1, 1),
    "wide": (1, 17, 70, 3, 2, 7),           # Ck over one channel chunk, Cv over one value chunk
    "long-memory": (1, 8, 6, 40, 4, 5),      # few queries, long memory: split + log-sum-exp combine
    "many-queries": (1, 4, 3, 1, 13, 11),    # several query tiles, odd last tile
    "B=0": (0, 3, 4, 2, 3, 5),
}


@pytest.mark.parametrize("case", READ_CASES)
@pytest.mark.parametrize("gaussian", [False, True], ids=["plain", "gaussian"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_kernel_guided_read_forward(case, gaussian, dtype, cuda_target):
    io = Inputs(cuda_target.device)
    args = io.read_args(*READ_CASES[case], gaussian, dtype=dtype)
    got = cuda_target.op("kernel_guided_read")(*args, 0.4, 0, [])
    want = reference.kernel_guided_read(*args, 0.4, 0, [])
    _close(got[0], want[0])
    _close(got[1], want[1])
    assert got[2].shape == want[2].shape and got[2].dtype == torch.int64


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", ["odd", "wide", "long-memory"])
def test_kernel_guided_read_forward_half(case, dtype, cuda_target):
    io = Inputs(cuda_target.device)
    args = io.read_args(*READ_CASES[case], True, dtype=F64)
    _within_twice_reference(cuda_target, "kernel_guided_read", lambda dt: _to(args, dt) + [0.4, 0, []], dtype, outputs=[0, 1])


@pytest.mark.parametrize("dtype", [F32, *HALF])
def test_kernel_guided_read_hmmn_res4_shape(dtype, cuda_target):
    _gpu_only(cuda_target)
    io = Inputs(cuda_target.device)
    # HMMN res4 at 480p (30 x 54, Ck 128, Cv 512) with first + previous frame top-32, B = 2.
    args = io.read_args(2, 128, 512, 3, 30, 54, True, dtype=F64)
    args[0].mul_(0.3), args[1].mul_(0.3)
    if dtype == F32:
        got = cuda_target.op("kernel_guided_read")(*_to(args, F32), 128 ** -0.5, 32, [0, 2])
        want = reference.kernel_guided_read(*_to(args, F32), 128 ** -0.5, 32, [0, 2])
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-4)
        _assert_topk_by_logit(args, 128 ** -0.5, [0, 2], got[2], want[2])
    else:
        _within_twice_reference(cuda_target, "kernel_guided_read", lambda dt: _to(args, dt) + [128 ** -0.5, 0, []], dtype,
                                outputs=[0, 1])


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_kernel_guided_read_noncontiguous(layout, dtype, cuda_target):
    io = Inputs(cuda_target.device)
    args = io.read_args(2, 3, 5, 2, 3, 4, True, dtype=dtype, layout=layout)
    got = cuda_target.op("kernel_guided_read")(*args, 0.6, 2, [1])
    want = reference.kernel_guided_read(*args, 0.6, 2, [1])
    _close(got[0], want[0])
    _close(got[1], want[1])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_kernel_guided_read_tiny_sigma_far_centres_no_nan(dtype, cuda_target):
    io = Inputs(cuda_target.device)
    B, T, H, W = 1, 2, 6, 9
    q, k, v, _, _ = io.read_args(B, 4, 3, T, H, W, False, dtype=dtype)
    centers = torch.zeros(B, T, H, W, dtype=torch.int64, device=cuda_target.device)
    sigma = torch.full((B, T), 0.1, dtype=dtype, device=cuda_target.device)
    got = cuda_target.op("kernel_guided_read")(q, k, v, centers, sigma, 1.0, 0, [])
    want = reference.kernel_guided_read(q, k, v, centers, sigma, 1.0, 0, [])
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    tol = TOL[F64] if dtype == F64 else dict(rtol=1e-6, atol=1e-3)  # logits near -4000 in float32
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)


# ---------------------------------------------------------------- top-k of kernel_guided_read


def _assert_topk_by_logit(args, scale, frames, got_idx, want_idx):
    """Half precision or near-ties: the float64 logits at the returned indices match the best ones."""
    q, k, _, centers, sigma = (a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                               for a in args)
    B, Ck, H, W = q.shape
    N = H * W
    logits = torch.einsum("bcn,bcm->bnm", q.reshape(B, Ck, N), k.reshape(B, Ck, -1)) * scale
    if centers is not None:
        c = centers.reshape(B, -1)
        qy, qx = torch.arange(N, device=q.device) // W, torch.arange(N, device=q.device) % W
        d2 = (qy[None, :, None] - (c // W)[:, None]) ** 2 + (qx[None, :, None] - (c % W)[:, None]) ** 2
        g = (0.5 / sigma.double() ** 2).repeat_interleave(N, dim=1)[:, None]
        logits = logits - torch.where(c[:, None] >= 0, d2 * g, torch.zeros_like(g))
    sel = torch.cat([torch.arange(f * N, (f + 1) * N, device=q.device) for f in frames])
    logits = logits[:, :, sel]
    got_l, want_l = logits.gather(2, got_idx), logits.gather(2, want_idx)
    assert (got_idx >= 0).all() and (got_idx < len(frames) * N).all()
    assert (got_idx.sort(-1).values.diff(dim=-1) != 0).all(), "an index is returned twice"
    torch.testing.assert_close(got_l, want_l, rtol=0, atol=1e-2 * (1 + want_l.abs().max().item()))


TOPK_CASES = {
    # B, T, H, W, topk, frames
    "k=1": (2, 2, 3, 5, 1, [1, 0]),
    "k=5,reordered": (1, 3, 3, 5, 5, [2, 0]),
    "k=all": (1, 2, 2, 3, 12, [0, 1]),
    "one-frame,k=odd": (2, 3, 3, 4, 7, [1]),
    "k=40>32": (1, 2, 5, 9, 40, [0, 1]),      # more than one warp's worth: multi-round shifts
    "T=1,1x1": (1, 1, 1, 1, 1, [0]),
}


@pytest.mark.parametrize("case", TOPK_CASES)
@pytest.mark.parametrize("gaussian", [False, True], ids=["plain", "gaussian"])
@pytest.mark.parametrize("dtype", [F32, F64, *HALF])
def test_kernel_guided_read_topk_exact_with_ties(case, gaussian, dtype, cuda_target):
    io = Inputs(cuda_target.device)
    B, T, H, W, topk, frames = TOPK_CASES[case]
    q, k, v, centers, sigma = io.read_args(B, 3, 2, T, H, W, gaussian, dtype=dtype, values=io.ints)
    if gaussian:
        sigma = torch.ones_like(sigma)  # bias = -d2 / 2: exact, so logits still tie
    got = cuda_target.op("kernel_guided_read")(q, k, v, centers, sigma, 0.5, topk, frames)
    want = reference.kernel_guided_read(q, k, v, centers, sigma, 0.5, topk, frames)
    assert got[2].dtype == torch.int64
    assert torch.equal(got[2], want[2])


def test_kernel_guided_read_topk_all_equal_logits_in_index_order(cuda_target):
    io = Inputs(cuda_target.device)
    q, _, v, _, _ = io.read_args(1, 3, 2, 2, 2, 3, False)
    k = torch.zeros(1, 3, 2, 2, 3, device=cuda_target.device)
    _, _, idx = cuda_target.op("kernel_guided_read")(q, k, v, None, None, 1.0, 9, [1, 0])
    assert torch.equal(idx, torch.arange(9, device=cuda_target.device).expand(1, 6, 9))


@pytest.mark.parametrize("dtype", [F64, *HALF])
def test_kernel_guided_read_topk_random_floats(dtype, cuda_target):
    io = Inputs(cuda_target.device)
    B, Ck, T, H, W, topk, frames = 2, 4, 3, 3, 4, 6, [2, 0]
    args = io.read_args(B, Ck, 2, T, H, W, True, dtype=dtype)
    _, _, idx = cuda_target.op("kernel_guided_read")(*args, 0.7, topk, frames)
    _, _, want = reference.kernel_guided_read(*args, 0.7, topk, frames)
    if dtype == F64:
        assert torch.equal(idx, want)
    else:
        _assert_topk_by_logit(args, 0.7, frames, idx, want)


# ---------------------------------------------------------------- kernel_guided_read backward

BACKWARD_CASES = {
    "small": (2, 5, 7, 2, 3, 5),
    "wide": (1, 17, 70, 2, 2, 7),
    "odd-tiles": (1, 3, 4, 3, 9, 11),   # memory and query tiles with ragged ends
    "T=1,1x1": (1, 2, 3, 1, 1, 1),
    "B=0": (0, 3, 4, 2, 3, 5),
}


@pytest.mark.parametrize("case", BACKWARD_CASES)
@pytest.mark.parametrize("gaussian", [False, True], ids=["plain", "gaussian"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_kernel_guided_read_backward(case, gaussian, dtype, cuda_target):
    io = Inputs(cuda_target.device)
    args = io.read_args(*BACKWARD_CASES[case], gaussian, dtype=dtype)
    out, lse, _ = reference.kernel_guided_read(*args, 0.4, 0, [])
    grad = io.randn(*out.shape, dtype=dtype)
    got = cuda_target.op("kernel_guided_read_backward")(grad, *args, out, lse, 0.4)
    want = reference.kernel_guided_read_backward(grad, *args, out, lse, 0.4)
    for g, w in zip(got, want):
        _close(g, w)


@pytest.mark.parametrize("dtype", HALF)
def test_kernel_guided_read_backward_half(dtype, cuda_target):
    io = Inputs(cuda_target.device)
    args = io.read_args(1, 16, 24, 2, 5, 6, True, dtype=F64)
    out, lse, _ = reference.kernel_guided_read(*args, 0.3, 0, [])
    grad = io.randn(*out.shape, dtype=F64)

    def canonical(dt):
        a = _to(args, dt)
        return [grad.to(dt), *a, out.to(dt), lse.to(reference.acc_dtype(dt)), 0.3]

    _within_twice_reference(cuda_target, "kernel_guided_read_backward", canonical, dtype)


@pytest.mark.parametrize("gaussian", [False, True], ids=["plain", "gaussian"])
def test_kernel_guided_read_gradcheck(gaussian, cuda_target):
    io = Inputs(cuda_target.device)
    q, k, v, centers, sigma = io.read_args(2, 3, 2, 2, 3, 4, gaussian, dtype=F64)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    fn = lambda q, k, v: hmmn_ops.kernel_guided_read(q, k, v, centers, sigma, backend=cuda_target.backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---------------------------------------------------------------- gaussian_softmax


def _softmax_args(io, B, T, H, W, dtype):
    aff = io.randn(B, T * H * W, H * W, dtype=dtype) * 3
    centers = torch.randint(-1, H * W, (B, T, H, W), device=io.device)
    sigma = torch.rand(B, T, dtype=reference.acc_dtype(dtype), device=io.device) * 2 + 0.5
    return [aff, centers, sigma, H, W]


@pytest.mark.parametrize("shape", [(2, 2, 3, 5), (1, 1, 1, 1), (1, 3, 7, 9), (0, 2, 3, 4)])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_gaussian_softmax(shape, dtype, cuda_target):
    io = Inputs(cuda_target.device)
    args = _softmax_args(io, *shape, dtype)
    got = cuda_target.op("gaussian_softmax")(*args)
    want = reference.gaussian_softmax(*args)
    _close(got, want)
    grad = io.randn(*got.shape, dtype=dtype)
    _close(cuda_target.op("gaussian_softmax_backward")(grad, want), reference.gaussian_softmax_backward(grad, want))


@pytest.mark.parametrize("dtype", HALF)
def test_gaussian_softmax_half(dtype, cuda_target):
    io = Inputs(cuda_target.device)
    args = _softmax_args(io, 2, 2, 5, 6, F64)
    _within_twice_reference(cuda_target, "gaussian_softmax", lambda dt: _to(args, dt), dtype)
    out = reference.gaussian_softmax(*args)
    grad = io.randn(*out.shape, dtype=F64)
    _within_twice_reference(cuda_target, "gaussian_softmax_backward", lambda dt: [grad.to(dt), out.to(dt)], dtype)


def test_gaussian_softmax_noncontiguous_and_gradcheck(cuda_target):
    io = Inputs(cuda_target.device)
    aff, centers, sigma, H, W = _softmax_args(io, 2, 2, 3, 4, F64)
    aff_t = aff.transpose(1, 2).contiguous().transpose(1, 2)
    _close(cuda_target.op("gaussian_softmax")(aff_t, centers, sigma, H, W), reference.gaussian_softmax(aff, centers, sigma, H, W))
    a = aff.clone().requires_grad_()
    fn = lambda a: hmmn_ops.gaussian_softmax(a, centers, sigma, size=(H, W), backend=cuda_target.backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a,))


# ---------------------------------------------------------------- local_track / global_track


def _score_at(mk, qk, idx):
    """<mk[:, p], qk[:, idx[p]]> in float64, for (B, C, M) and (B, C, N)."""
    q = qk.double().gather(2, idx.unsqueeze(1).expand(-1, qk.shape[1], -1))
    return (mk.double() * q).sum(1)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 1), (1, 2, 9, 4), (0, 3, 4, 4)])
@pytest.mark.parametrize("window", [1, 3, 7])
@pytest.mark.parametrize("values", ["ints", "floats"])
def test_local_track(shape, window, values, cuda_target):
    io = Inputs(cuda_target.device)
    B, C, H, W = shape
    make = io.ints if values == "ints" else lambda *s, dtype=F64: io.randn(*s, dtype=dtype)
    mk, qk = make(B, C, H, W, dtype=F64), make(B, C, H, W, dtype=F64)
    got = cuda_target.op("local_track")(mk, qk, window)
    assert got.dtype == torch.int64
    assert torch.equal(got, reference.local_track(mk, qk, window))


@pytest.mark.parametrize("dtype", [F32, *HALF])
def test_local_track_lower_precision_by_score(dtype, cuda_target):
    io = Inputs(cuda_target.device)
    mk, qk = io.randn(2, 16, 9, 12, dtype=dtype), io.randn(2, 16, 9, 12, dtype=dtype)
    got, want = cuda_target.op("local_track")(mk, qk, 7), reference.local_track(mk, qk, 7)
    B, C = mk.shape[:2]
    s_got = _score_at(mk.reshape(B, C, -1), qk.reshape(B, C, -1), got.reshape(B, -1))
    s_want = _score_at(mk.reshape(B, C, -1), qk.reshape(B, C, -1), want.reshape(B, -1))
    torch.testing.assert_close(s_got, s_want, rtol=0, atol=1e-2)


@pytest.mark.parametrize("shape", [(2, 3, 2, 5, 7), (1, 4, 1, 1, 1), (1, 5, 3, 9, 10), (0, 3, 2, 4, 4)])
@pytest.mark.parametrize("values", ["ints", "floats"])
def test_global_track(shape, values, cuda_target):
    io = Inputs(cuda_target.device)
    B, C, T, H, W = shape
    make = io.ints if values == "ints" else lambda *s, dtype=F64: io.randn(*s, dtype=dtype)
    mk, qk = make(B, C, T, H, W, dtype=F64), make(B, C, H, W, dtype=F64)
    got = cuda_target.op("global_track")(mk, qk)
    assert got.dtype == torch.int64 and got.shape == (B, T, H, W)
    assert torch.equal(got, reference.global_track(mk, qk))


@pytest.mark.parametrize("dtype", [F32, *HALF])
def test_global_track_lower_precision_by_score(dtype, cuda_target):
    io = Inputs(cuda_target.device)
    mk, qk = io.randn(2, 32, 2, 9, 13, dtype=dtype), io.randn(2, 32, 9, 13, dtype=dtype)
    got, want = cuda_target.op("global_track")(mk, qk), reference.global_track(mk, qk)
    B, C = qk.shape[:2]
    args = (mk.reshape(B, C, -1), qk.reshape(B, C, -1))
    torch.testing.assert_close(_score_at(*args, got.reshape(B, -1)), _score_at(*args, want.reshape(B, -1)),
                               rtol=0, atol=1e-2)


def test_track_noncontiguous(cuda_target):
    io = Inputs(cuda_target.device)
    mk, qk = channels_last(io.randn(2, 5, 6, 7, dtype=F64)), strided(io.randn(2, 5, 6, 7, dtype=F64))
    assert torch.equal(cuda_target.op("local_track")(mk, qk, 5), reference.local_track(mk, qk, 5))
    mk5 = channels_last(io.randn(2, 5, 3, 6, 7, dtype=F64))
    assert torch.equal(cuda_target.op("global_track")(mk5, qk), reference.global_track(mk5, qk))


# ---------------------------------------------------------------- topk_guided_read


def _topk_args(io, B, Ck, Cv, T, H, W, r, k, dtype=F32, layout="contig", duplicates=False):
    lay = LAYOUTS[layout]
    q, mk, mv = (lay(io.randn(*s, dtype=dtype)) for s in ((B, Ck, H, W), (B, Ck, T, H, W), (B, Cv, T, H, W)))
    Nc = (H // r) * (W // r)
    idx = torch.randint(0, T * Nc, (B, Nc, k), device=io.device)
    if duplicates and k > 1:
        idx[:, :, 1] = idx[:, :, 0]  # a duplicated index counts twice
    return [q, mk, mv, idx, 0.35, r]


TOPK_READ_CASES = {
    # B, Ck, Cv, T, H, W, r, k
    "r=2,k=3": (2, 5, 6, 2, 4, 6, 2, 3),
    "r=4,k=2": (1, 3, 70, 2, 8, 12, 4, 2),     # 16 queries a cell, Cv over one value chunk
    "r=1,k=1": (2, 4, 3, 1, 3, 5, 1, 1),
    "r=3,k=5": (1, 17, 4, 3, 6, 9, 3, 5),      # 9 queries a cell, Ck over one channel chunk
    "r=5,k=2": (1, 3, 4, 2, 5, 10, 5, 2),      # 25 queries a cell: two query chunks
    "k>tile": (1, 4, 5, 2, 4, 4, 2, 20),       # 80 candidates: several candidate tiles
    "B=0": (0, 3, 4, 2, 4, 4, 2, 2),
}


@pytest.mark.parametrize("case", TOPK_READ_CASES)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_topk_guided_read_forward(case, dtype, cuda_target):
    io = Inputs(cuda_target.device)
    args = _topk_args(io, *TOPK_READ_CASES[case], dtype=dtype, duplicates=True)
    got, want = cuda_target.op("topk_guided_read")(*args), reference.topk_guided_read(*args)
    _close(got[0], want[0])
    _close(got[1], want[1])


@pytest.mark.parametrize("dtype", HALF)
def test_topk_guided_read_forward_half(dtype, cuda_target):
    io = Inputs(cuda_target.device)
    args = _topk_args(io, 2, 32, 24, 2, 8, 12, 2, 6, dtype=F64)
    _within_twice_reference(cuda_target, "topk_guided_read", lambda dt: _to(args[:3], dt) + args[3:], dtype)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_topk_guided_read_noncontiguous(layout, cuda_target):
    io = Inputs(cuda_target.device)
    args = _topk_args(io, 2, 5, 6, 2, 4, 6, 2, 3, dtype=F64, layout=layout)
    got, want = cuda_target.op("topk_guided_read")(*args), reference.topk_guided_read(*args)
    _close(got[0], want[0])
    _close(got[1], want[1])


def _topk_backward(cuda_target, args, deterministic):
    out, lse = reference.topk_guided_read(*args)
    grad = torch.randn_like(out)
    want = reference.topk_guided_read_backward(grad, *args[:4], out, lse, *args[4:])
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = cuda_target.op("topk_guided_read_backward")(grad, *args[:4], out, lse, *args[4:])
        again = cuda_target.op("topk_guided_read_backward")(grad, *args[:4], out, lse, *args[4:])
    finally:
        torch.use_deterministic_algorithms(prev)
    return got, again, want


@pytest.mark.parametrize("case", TOPK_READ_CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_topk_guided_read_backward(case, deterministic, dtype, cuda_target):
    io = Inputs(cuda_target.device)
    args = _topk_args(io, *TOPK_READ_CASES[case], dtype=dtype, duplicates=True)
    got, again, want = _topk_backward(cuda_target, args, deterministic)
    for g, w in zip(got, want):
        _close(g, w)
    if deterministic:
        for g, a in zip(got, again):
            assert torch.equal(g, a), "deterministic mode must give bitwise identical gradients"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_topk_guided_read_backward_half(dtype, deterministic, cuda_target):
    io = Inputs(cuda_target.device)
    args = _topk_args(io, 1, 16, 24, 2, 8, 8, 2, 5, dtype=F64, duplicates=True)
    out, lse = reference.topk_guided_read(*args)
    grad = torch.randn_like(out)

    def canonical(dt):
        return [grad.to(dt), *_to(args[:3], dt), args[3], out.to(dt), lse.to(reference.acc_dtype(dt)), *args[4:]]

    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        _within_twice_reference(cuda_target, "topk_guided_read_backward", canonical, dtype)
    finally:
        torch.use_deterministic_algorithms(prev)


def test_topk_guided_read_gradcheck(cuda_target):
    io = Inputs(cuda_target.device)
    q, mk, mv, idx, _, _ = _topk_args(io, 2, 3, 2, 2, 4, 4, 2, 3, dtype=F64, duplicates=True)
    q, mk, mv = (x.requires_grad_() for x in (q, mk, mv))
    fn = lambda q, k, v: hmmn_ops.topk_guided_read(q, k, v, idx, backend=cuda_target.backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, mk, mv))


@pytest.mark.parametrize("res", ["res3", "res2"])
def test_topk_guided_read_hmmn_shapes(res, cuda_target):
    _gpu_only(cuda_target)
    io = Inputs(cuda_target.device)
    # HMMN at 480p, B = 2: res3 60 x 108, 128/256, r = 2, k = 32; res2 120 x 216, 64/128, r = 4, k = 8.
    Ck, Cv, H, W, r, k = (128, 256, 60, 108, 2, 32) if res == "res3" else (64, 128, 120, 216, 4, 8)
    args = _topk_args(io, 2, Ck, Cv, 2, H, W, r, k, dtype=F64)
    args[0].mul_(0.3)
    _within_twice_reference(cuda_target, "topk_guided_read", lambda dt: _to(args[:3], dt) + args[3:], torch.bfloat16)


# ---------------------------------------------------------------- registration, streams, devices


def _opcheck_samples(io):
    q, k, v, centers, sigma = io.read_args(2, 3, 2, 2, 3, 4, True, dtype=F64)
    out, lse, _ = reference.kernel_guided_read(q, k, v, centers, sigma, 0.5, 0, [])
    tq, tk, tv, idx, scale, r = _topk_args(io, 2, 3, 2, 2, 4, 4, 2, 3, dtype=F64)
    tout, tlse = reference.topk_guided_read(tq, tk, tv, idx, scale, r)
    aff, c2, s2, H, W = _softmax_args(io, 2, 2, 3, 4, F64)
    soft = reference.gaussian_softmax(aff, c2, s2, H, W)
    return {
        "kernel_guided_read": (q, k, v, centers, sigma, 0.5, 3, [1, 0]),
        "kernel_guided_read_backward": (torch.randn_like(out), q, k, v, centers, sigma, out, lse, 0.5),
        "gaussian_softmax": (aff, c2, s2, H, W),
        "gaussian_softmax_backward": (torch.randn_like(soft), soft),
        "local_track": (q, torch.randn_like(q), 3),
        "global_track": (k, q),
        "topk_guided_read": (tq, tk, tv, idx, scale, r),
        "topk_guided_read_backward": (torch.randn_like(tout), tq, tk, tv, idx, tout, tlse, scale, r),
    }


@pytest.mark.parametrize("op", CANONICAL_OPS)
def test_opcheck_cuda(op, cuda_target):
    _gpu_only(cuda_target, "opcheck tests the hmmn_ops registration (fake kernels, autograd), which the emulated "
                           "namespace does not have")
    io = Inputs(cuda_target.device)
    args = list(_opcheck_samples(io)[op])
    if op in ("kernel_guided_read", "topk_guided_read"):
        args[:3] = [a.clone().requires_grad_() for a in args[:3]]
    elif op == "gaussian_softmax":
        args[0] = args[0].clone().requires_grad_()
    cuda_target.op(op)
    torch.library.opcheck(getattr(OPS, op).default, tuple(args))


def test_non_default_stream(cuda_target):
    _gpu_only(cuda_target, "CUDA streams")
    io = Inputs(cuda_target.device)
    args = io.read_args(2, 16, 24, 3, 7, 9, True)
    want = cuda_target.op("kernel_guided_read")(*args, 0.4, 4, [0, 2])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cuda_target.op("kernel_guided_read")(*args, 0.4, 4, [0, 2])
        grads = cuda_target.op("kernel_guided_read_backward")(torch.ones_like(got[0]), *args, got[0], got[1], 0.4)
    torch.cuda.current_stream().wait_stream(side)
    for g, w in zip(got, want):
        assert torch.equal(g, w)  # same kernels, same launch plan: bitwise equal
    ref = reference.kernel_guided_read_backward(torch.ones_like(got[0]), *args, got[0], got[1], 0.4)
    for g, w in zip(grads, ref):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_forward_is_deterministic_run_to_run(cuda_target):
    io = Inputs(cuda_target.device)
    args = io.read_args(1, 32, 48, 12, 6, 7, True)
    first = cuda_target.op("kernel_guided_read")(*args, 0.2, 8, [0, 11])
    for _ in range(3):
        again = cuda_target.op("kernel_guided_read")(*args, 0.2, 8, [0, 11])
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device(cuda_target):
    _gpu_only(cuda_target, "a second GPU")
    io = Inputs(cuda_target.device)
    args = [a.to("cuda:1") if isinstance(a, torch.Tensor) else a for a in io.read_args(2, 5, 6, 2, 3, 5, True)]
    got = cuda_target.op("kernel_guided_read")(*args, 0.4, 3, [1])
    want = reference.kernel_guided_read(*args, 0.4, 3, [1])
    assert got[0].device == torch.device("cuda:1")
    torch.testing.assert_close(got[0], want[0], **TOL[F32])
    targs = [a.to("cuda:1") if isinstance(a, torch.Tensor) else a for a in _topk_args(io, 1, 3, 4, 2, 4, 4, 2, 2)]
    torch.testing.assert_close(cuda_target.op("topk_guided_read")(*targs)[0], reference.topk_guided_read(*targs)[0],
                               **TOL[F32])


def test_errors_name_the_argument(cuda_target):
    io = Inputs(cuda_target.device)
    q, k, v, _, _ = io.read_args(1, 3, 2, 2, 3, 4, False)
    read, other = cuda_target.op("kernel_guided_read"), "cpu" if cuda_target.device == "cuda" else "meta"
    with pytest.raises(RuntimeError, match="memory_key"):
        read(q, k.to(other), v, None, None, 0.5, 0, [])
    with pytest.raises(RuntimeError, match="memory_value"):
        read(q, k, v[:, :, :1], None, None, 0.5, 0, [])
    with pytest.raises(RuntimeError, match="topk_frames"):
        read(q, k, v, None, None, 0.5, 2, [0, 0])
    with pytest.raises(RuntimeError, match="window"):
        cuda_target.op("local_track")(q, q, 4)


# ---------------------------------------------------------------- the emulator itself


@pytest.fixture
def emulator(cuda_target):
    """The emulated target only (these tests check the emulator, not the kernels)."""
    if cuda_target.name != "emulated":
        pytest.skip("tests of the CUDA emulator")
    return torch.ops.hmmn_ops_emulated._emulator_selftest


def test_emulator_catches_a_dropped_barrier(emulator):
    # The same small kernel built with and without its __syncthreads: without, the readers see
    # the poisoned (NaN) shared memory the slow writers have not filled yet.
    assert torch.equal(emulator("barrier")[:32], torch.arange(32.0))
    assert emulator("barrier_dropped")[:32].isnan().any()


@pytest.mark.parametrize("case,match", [
    ("divergent_barrier", "divergent __syncthreads"),
    ("missing_lane", "missing lane"),
    ("divergent_warp", "divergent warp"),
    ("too_many_threads", "block out of range"),
    ("grid_y_too_large", "grid out of range"),
    ("smem_without_optin", "cudaFuncSetAttribute"),
])
def test_emulator_reports_errors_as_failed_launches(emulator, case, match):
    with pytest.raises(RuntimeError, match=match):
        emulator(case)
    assert torch.equal(emulator("shuffle"), torch.full((64,), 496.0 + 16))  # the next launch is clean


def test_emulator_dynamic_shared_memory_after_optin(emulator):
    assert torch.equal(emulator("smem_with_optin")[:32], torch.ones(32))  # poisoned, not zeroed


# Launch-plan branches that real sizes take, forced at small sizes by the emulator's knobs:
# HMMN_EMU_SMEM_BUDGET caps the dynamic shared memory a plan may use (channel chunks),
# HMMN_EMU_NUM_SMS sets the SM count (memory splits); the launch log shows what ran.
PLAN_KNOBS = {
    # one VC-wide accumulator chunk a block (value chunks, channel chunks), no memory split
    "chunks,no-split": {"HMMN_EMU_SMEM_BUDGET": "0", "HMMN_EMU_NUM_SMS": "1"},
    "split": {"HMMN_EMU_NUM_SMS": "100000"},  # a split per memory tile, then the log-sum-exp combine
}


def _launches(monkeypatch, tmp_path, knobs, fn):
    log = tmp_path / "launches.txt"
    for k, v in {**knobs, "HMMN_EMU_LAUNCH_LOG": str(log)}.items():
        monkeypatch.setenv(k, v)
    fn()
    monkeypatch.delenv("HMMN_EMU_LAUNCH_LOG")
    return log.read_text().splitlines()


def _grid(line):
    return [int(x) for x in line.split("<<<(")[1].split(")")[0].split(", ")]


@pytest.mark.parametrize("knob", PLAN_KNOBS)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_emulated_plan_branches_kernel_guided_read(emulator, cuda_target, knob, dtype, monkeypatch, tmp_path):
    io = Inputs("cpu")
    args = io.read_args(1, 70, 70, 6, 3, 4, True, dtype=dtype)  # Ck, Cv over two chunks of 32/64; M = 72
    grad = io.randn(1, 70, 3, 4, dtype=dtype)

    def run():
        out = cuda_target.op("kernel_guided_read")(*args, 0.3, 5, [0, 5])
        want = reference.kernel_guided_read(*args, 0.3, 5, [0, 5])
        _close(out[0], want[0])
        _close(out[1], want[1])
        assert torch.equal(out[2], want[2])
        for g, w in zip(cuda_target.op("kernel_guided_read_backward")(grad, *args, want[0], want[1], 0.3),
                        reference.kernel_guided_read_backward(grad, *args, want[0], want[1], 0.3)):
            _close(g, w)

    lines = _launches(monkeypatch, tmp_path, PLAN_KNOBS[knob], run)
    fwd = [_grid(l) for l in lines if "kgr_fwd_kernel" in l]
    dq = [_grid(l) for l in lines if "kgr_dq_kernel" in l]
    combined = any("kgr_combine_kernel" in l for l in lines)
    if knob == "split":
        assert fwd[0][1] >= 2 and combined
    else:
        assert fwd[0][1] >= 2 and dq[0][1] >= 2 and not combined


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_emulated_plan_branches_topk_guided_read(emulator, cuda_target, deterministic, dtype, monkeypatch, tmp_path):
    io = Inputs("cpu")
    args = _topk_args(io, 1, 70, 70, 2, 4, 4, 2, 3, dtype=dtype, duplicates=True)

    def run():
        got = cuda_target.op("topk_guided_read")(*args)
        want = reference.topk_guided_read(*args)
        _close(got[0], want[0])
        got, _, want = _topk_backward(cuda_target, args, deterministic)
        for g, w in zip(got, want):
            _close(g, w)

    lines = _launches(monkeypatch, tmp_path, PLAN_KNOBS["chunks,no-split"], run)
    assert _grid(next(l for l in lines if "topk_fwd_kernel" in l))[1] >= 2
    assert _grid(next(l for l in lines if "topk_dq_kernel" in l))[1] >= 2
    name = "topk_dkdv_det_kernel" if deterministic else "topk_dkdv_atomic_kernel"
    assert any(name in l for l in lines)
