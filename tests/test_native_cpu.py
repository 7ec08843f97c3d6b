"""The native C++ CPU kernels (csrc/cpu) against reference.py, forward and backward.

Every test of an op skips cleanly when this build has no native CPU kernel for it.
Tolerances: float64 1e-10, float32 1e-5, relative to the largest reference magnitude.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hmmn_ops
from hmmn_ops import reference as ref
from hmmn_ops.backends import native_ops

OPS = torch.ops.hmmn_ops
NATIVE = native_ops("cpu")
D, F = torch.float64, torch.float32


def needs(*ops):
    missing = [op for op in ops if op not in NATIVE]
    return pytest.mark.skipif(bool(missing), reason=f"no native CPU kernel for {missing}")


def acc(dtype):
    return D if dtype == D else F


def assert_close(got, want, dtype=None):
    dtype = dtype or want.dtype
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    if want.numel() == 0:
        return
    tol = {D: 1e-10, F: 1e-5}.get(dtype, 2e-2)
    err = (got.double() - want.double()).abs().max().item()
    bound = tol * max(1.0, want.double().abs().max().item())
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e}"
    assert not torch.isnan(got).any()


def noncontig(x):
    """Same values, non-contiguous strides (a transposed copy, transposed back)."""
    return x.transpose(0, -1).contiguous().transpose(0, -1)


# ---------------------------------------------------------------- inputs


def read_inputs(B, Ck, Cv, T, H, W, dtype, gaussian=True, sigma_lo=0.5):
    q = torch.randn(B, Ck, H, W, dtype=dtype)
    k = torch.randn(B, Ck, T, H, W, dtype=dtype)
    v = torch.randn(B, Cv, T, H, W, dtype=dtype)
    if not gaussian:
        return q, k, v, None, None
    centers = torch.randint(-1, H * W, (B, T, H, W))
    sigma = torch.rand(B, T, dtype=acc(dtype)) * 2 + sigma_lo
    return q, k, v, centers, sigma


# (B, Ck, Cv, T, H, W, gaussian, topk, topk_frames)
READ_CASES = [
    (2, 5, 3, 3, 5, 7, True, 4, [0, 2]),
    (1, 3, 2, 1, 1, 1, False, 1, [0]),       # T = 1, one pixel
    (1, 16, 24, 6, 13, 11, True, 32, [0, 5]),  # HMMN-like: top-32 over first and previous
    (2, 4, 6, 2, 9, 4, False, 0, []),
    (1, 8, 8, 3, 17, 19, True, 7, [2, 0]),   # frames listed out of order
    (1, 4, 5, 12, 9, 10, True, 3, [11, 0, 5]),  # memory longer than one chunk
    (0, 4, 5, 2, 3, 3, True, 2, [0, 1]),     # empty batch
]


# ---------------------------------------------------------------- kernel_guided_read


@needs("kernel_guided_read")
@pytest.mark.parametrize("dtype", [D, F])
@pytest.mark.parametrize("case", READ_CASES)
def test_kernel_guided_read_forward(dtype, case):
    B, Ck, Cv, T, H, W, gaussian, topk, frames = case
    q, k, v, c, s = read_inputs(B, Ck, Cv, T, H, W, dtype, gaussian)
    scale = 3.0 / Ck ** 0.5
    got = OPS.kernel_guided_read(q, k, v, c, s, scale, topk, frames)
    want = ref.kernel_guided_read(q, k, v, c, s, scale, topk, frames)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1], dtype)
    assert torch.equal(got[2], want[2])


@needs("kernel_guided_read")
def test_kernel_guided_read_noncontiguous_and_bfloat16():
    q, k, v, c, s = read_inputs(2, 6, 5, 3, 7, 9, D)
    args = (1.0 / 6 ** 0.5, 5, [2, 1])
    want = ref.kernel_guided_read(q, k, v, c, s, *args)
    got = OPS.kernel_guided_read(noncontig(q), noncontig(k), noncontig(v), noncontig(c), noncontig(s), *args)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    assert torch.equal(got[2], want[2])
    b16 = [x.to(torch.bfloat16) for x in (q, k, v)]
    got = OPS.kernel_guided_read(*b16, c, s.float(), *args)
    want = ref.kernel_guided_read(*b16, c, s.float(), *args)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == F
    assert_close(got[0], want[0])


@needs("kernel_guided_read")
def test_kernel_guided_read_tiny_sigma_large_grid_no_nan():
    # Every memory position is far from most queries: the Gaussian factor underflows to 0 in
    # linear space; in log space the read stays finite. Logits of size ~7000 carry float32
    # rounding of ~5e-4, so the float32 result is compared with the float64 one by the
    # flash-attention rule: error at most twice the reference's own float32 error.
    q, k, v, c, _ = read_inputs(1, 8, 4, 2, 30, 54, F)
    c[:, :, :, :] = 0  # all centres in the top-left corner
    s = torch.full((1, 2), 0.5)
    out, lse, _ = OPS.kernel_guided_read(q, k, v, c, s, 0.35, 4, [0, 1])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    exact = ref.kernel_guided_read(q.double(), k.double(), v.double(), c, s.double(), 0.35, 0, [])[0]
    ref_err = (ref.kernel_guided_read(q, k, v, c, s, 0.35, 0, [])[0].double() - exact).abs().max()
    assert (out.double() - exact).abs().max() <= 2 * ref_err + 1e-5


@needs("kernel_guided_read")
@pytest.mark.parametrize("frames", [[0, 1], [1, 0]])
def test_kernel_guided_read_topk_ties_go_to_smaller_index(frames):
    # Zero keys: every logit is equal, so the top-k is the first k concatenated indices.
    B, Ck, T, H, W = 2, 4, 2, 5, 6
    q = torch.randn(B, Ck, H, W, dtype=D)
    k = torch.zeros(B, Ck, T, H, W, dtype=D)
    v = torch.randn(B, 3, T, H, W, dtype=D)
    _, _, idx = OPS.kernel_guided_read(q, k, v, None, None, 1.0, 40, frames)
    assert torch.equal(idx, torch.arange(40).expand(B, H * W, 40))
    # Integer-valued keys: many exact ties among different values.
    q = torch.randint(-1, 2, (B, Ck, H, W)).double()
    k = torch.randint(-1, 2, (B, Ck, T, H, W)).double()
    got = OPS.kernel_guided_read(q, k, v, None, None, 1.0, 9, frames)
    want = ref.kernel_guided_read(q, k, v, None, None, 1.0, 9, frames)
    assert torch.equal(got[2], want[2])


@needs("kernel_guided_read", "kernel_guided_read_backward")
@pytest.mark.parametrize("dtype", [D, F])
@pytest.mark.parametrize("case", READ_CASES)
def test_kernel_guided_read_backward(dtype, case):
    B, Ck, Cv, T, H, W, gaussian, _, _ = case
    q, k, v, c, s = read_inputs(B, Ck, Cv, T, H, W, dtype, gaussian)
    scale = 3.0 / Ck ** 0.5
    out, lse, _ = ref.kernel_guided_read(q, k, v, c, s, scale, 0, [])
    g = torch.randn_like(out)
    got = OPS.kernel_guided_read_backward(g, q, k, v, c, s, out, lse, scale)
    want = ref.kernel_guided_read_backward(g, q, k, v, c, s, out, lse, scale)
    for x, y in zip(got, want):
        assert_close(x, y)


@needs("kernel_guided_read", "kernel_guided_read_backward")
@pytest.mark.parametrize("backend", ["native", "auto"])
@pytest.mark.parametrize("gaussian", [False, True])
def test_kernel_guided_read_gradcheck(backend, gaussian):
    q, k, v, c, s = read_inputs(2, 3, 2, 2, 3, 4, D, gaussian)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    fn = lambda q, k, v: hmmn_ops.kernel_guided_read(q, k, v, c, s, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------- gaussian_softmax


def softmax_inputs(B, T, H, W, dtype, sigma_lo=0.5):
    HW = H * W
    aff = torch.randn(B, T * HW, HW, dtype=dtype) * 3
    centers = torch.randint(-1, HW, (B, T, H, W))
    sigma = torch.rand(B, T, dtype=acc(dtype)) * 2 + sigma_lo
    return aff, centers, sigma


SOFTMAX_CASES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 2, 9, 4), (1, 4, 17, 19), (0, 2, 3, 3)]


@needs("gaussian_softmax", "gaussian_softmax_backward")
@pytest.mark.parametrize("dtype", [D, F])
@pytest.mark.parametrize("case", SOFTMAX_CASES)
def test_gaussian_softmax(dtype, case):
    B, T, H, W = case
    aff, c, s = softmax_inputs(B, T, H, W, dtype)
    want = ref.gaussian_softmax(aff, c, s, H, W)
    assert_close(OPS.gaussian_softmax(aff, c, s, H, W), want)
    assert_close(OPS.gaussian_softmax(noncontig(aff), noncontig(c), s, H, W), want)
    g = torch.randn_like(aff)
    assert_close(OPS.gaussian_softmax_backward(g, want), ref.gaussian_softmax_backward(g, want))
    assert_close(OPS.gaussian_softmax_backward(noncontig(g), noncontig(want)), ref.gaussian_softmax_backward(g, want))


@needs("gaussian_softmax")
def test_gaussian_softmax_tiny_sigma_no_nan():
    aff, c, _ = softmax_inputs(1, 2, 30, 54, F)
    c.zero_()
    s = torch.full((1, 2), 0.5)
    got = OPS.gaussian_softmax(aff, c, s, 30, 54)
    assert torch.isfinite(got).all()
    assert_close(got, ref.gaussian_softmax(aff, c, s, 30, 54))


@needs("gaussian_softmax", "gaussian_softmax_backward")
def test_gaussian_softmax_gradcheck():
    aff, c, s = softmax_inputs(2, 2, 2, 3, D)
    aff.requires_grad_()
    fn = lambda a: hmmn_ops.gaussian_softmax(a, c, s, size=(2, 3), backend="native")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (aff,))


# ---------------------------------------------------------------- tracking


# (B, C, H, W, window): window larger than the frame, one pixel, tall and thin frames.
LOCAL_CASES = [(2, 5, 7, 9, 3), (1, 3, 4, 5, 7), (2, 8, 30, 54, 7), (1, 4, 1, 1, 3), (1, 4, 2, 3, 15),
               (3, 16, 13, 17, 5), (1, 3, 40, 3, 9), (1, 2, 3, 40, 1), (0, 3, 4, 4, 3)]


@needs("local_track")
@pytest.mark.parametrize("dtype", [D, F])
@pytest.mark.parametrize("case", LOCAL_CASES)
def test_local_track(dtype, case):
    B, C, H, W, window = case
    mk, qk = torch.randn(B, C, H, W, dtype=dtype), torch.randn(B, C, H, W, dtype=dtype)
    want = ref.local_track(mk, qk, window)
    assert torch.equal(OPS.local_track(mk, qk, window), want)
    assert torch.equal(OPS.local_track(noncontig(mk), noncontig(qk), window), want)


@needs("local_track")
def test_local_track_ties_go_to_smaller_index():
    mk = torch.randint(0, 2, (2, 3, 9, 11)).float()
    qk = torch.randint(0, 2, (2, 3, 9, 11)).float()
    assert torch.equal(OPS.local_track(mk, qk, 5), ref.local_track(mk, qk, 5))
    # All scores equal: the top-left candidate of each (clipped) window wins.
    ones = torch.ones(1, 2, 6, 7)
    got = OPS.local_track(ones, ones, 3)
    ys, xs = torch.meshgrid(torch.arange(6), torch.arange(7), indexing="ij")
    assert torch.equal(got[0], (ys - 1).clamp_min(0) * 7 + (xs - 1).clamp_min(0))


@needs("global_track")
@pytest.mark.parametrize("dtype", [D, F])
@pytest.mark.parametrize("case", [(2, 5, 3, 7, 9), (1, 16, 2, 30, 54), (1, 3, 1, 1, 1), (0, 3, 2, 2, 2)])
def test_global_track(dtype, case):
    B, C, T, H, W = case
    mk, qk = torch.randn(B, C, T, H, W, dtype=dtype), torch.randn(B, C, H, W, dtype=dtype)
    want = ref.global_track(mk, qk)
    assert torch.equal(OPS.global_track(mk, qk), want)
    assert torch.equal(OPS.global_track(noncontig(mk), noncontig(qk)), want)


@needs("global_track")
def test_global_track_ties_go_to_smaller_index():
    mk = torch.randint(0, 2, (1, 3, 2, 9, 11)).float()
    qk = torch.randint(0, 2, (1, 3, 9, 11)).float()
    assert torch.equal(OPS.global_track(mk, qk), ref.global_track(mk, qk))
    big = torch.ones(1, 2, 1, 40, 40)  # equal scores across several query blocks
    assert (OPS.global_track(big, torch.ones(1, 2, 40, 40)) == 0).all()


# ---------------------------------------------------------------- topk_guided_read


# (B, Ck, Cv, T, H, W, r, k)
TOPK_CASES = [(2, 5, 3, 3, 6, 8, 2, 4), (1, 3, 2, 1, 1, 1, 1, 1), (1, 16, 24, 2, 12, 16, 4, 8),
              (2, 4, 6, 2, 9, 6, 3, 1), (1, 8, 8, 3, 10, 14, 2, 7), (0, 3, 3, 2, 4, 4, 2, 2)]


def topk_inputs(B, Ck, Cv, T, H, W, r, k, dtype):
    Nc = (H // r) * (W // r)
    q = torch.randn(B, Ck, H, W, dtype=dtype)
    mk = torch.randn(B, Ck, T, H, W, dtype=dtype)
    mv = torch.randn(B, Cv, T, H, W, dtype=dtype)
    idx = torch.randint(0, T * Nc, (B, Nc, k))
    if k > 1:
        idx[:, ::2, 1] = idx[:, ::2, 0]  # duplicates count twice
    return q, mk, mv, idx


@needs("topk_guided_read", "topk_guided_read_backward")
@pytest.mark.parametrize("dtype", [D, F])
@pytest.mark.parametrize("case", TOPK_CASES)
def test_topk_guided_read(dtype, case):
    *shape, r, k = case
    q, mk, mv, idx = topk_inputs(*shape, r, k, dtype)
    scale = 3.0 / shape[1] ** 0.5
    want = ref.topk_guided_read(q, mk, mv, idx, scale, r)
    got = OPS.topk_guided_read(noncontig(q), noncontig(mk), noncontig(mv), noncontig(idx), scale, r)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1], dtype)
    g = torch.randn_like(want[0])
    got = OPS.topk_guided_read_backward(g, q, mk, mv, idx, want[0], want[1], scale, r)
    if q.shape[0] == 0:  # (reference.py cannot reshape an empty batch here)
        assert [x.shape for x in got] == [q.shape, mk.shape, mv.shape]
        return
    for x, y in zip(got, ref.topk_guided_read_backward(g, q, mk, mv, idx, want[0], want[1], scale, r)):
        assert_close(x, y)


@needs("topk_guided_read")
def test_topk_guided_read_channels_last_memory():
    # Memory already stored channel-last is used without a transpose copy.
    q, mk, mv, idx = topk_inputs(2, 6, 5, 3, 8, 10, 2, 4, F)
    want = ref.topk_guided_read(q, mk, mv, idx, 0.4, 2)
    cl = torch.channels_last_3d
    got = OPS.topk_guided_read(q, mk.contiguous(memory_format=cl), mv.contiguous(memory_format=cl), idx, 0.4, 2)
    assert_close(got[0], want[0])


@needs("topk_guided_read", "topk_guided_read_backward")
@pytest.mark.parametrize("backend", ["native", "auto"])
def test_topk_guided_read_gradcheck(backend):
    q, mk, mv, idx = topk_inputs(2, 3, 2, 2, 4, 4, 2, 3, D)
    inputs = [x.requires_grad_() for x in (q, mk, mv)]
    fn = lambda q, k, v: hmmn_ops.topk_guided_read(q, k, v, idx, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------- registration, errors


def opcheck_samples():
    q, k, v, c, s = read_inputs(2, 3, 2, 2, 3, 4, D)
    out, lse, _ = ref.kernel_guided_read(q, k, v, c, s, 0.5, 0, [])
    aff, ac, asg = softmax_inputs(2, 2, 2, 3, D)
    y = ref.gaussian_softmax(aff, ac, asg, 2, 3)
    tq, tk, tv, ti = topk_inputs(2, 3, 2, 2, 4, 4, 2, 3, D)
    tout, tlse = ref.topk_guided_read(tq, tk, tv, ti, 0.5, 2)
    return {
        "kernel_guided_read": (q, k, v, c, s, 0.5, 3, [1, 0]),
        "kernel_guided_read_backward": (torch.randn_like(out), q, k, v, c, s, out, lse, 0.5),
        "gaussian_softmax": (aff, ac, asg, 2, 3),
        "gaussian_softmax_backward": (torch.randn_like(y), y),
        "local_track": (q, q.flip(-1), 3),
        "global_track": (k, q),
        "topk_guided_read": (tq, tk, tv, ti, 0.5, 2),
        "topk_guided_read_backward": (torch.randn_like(tout), tq, tk, tv, ti, tout, tlse, 0.5, 2),
    }


@pytest.mark.parametrize("op", sorted(opcheck_samples()))
def test_opcheck(op):
    if op not in NATIVE:
        pytest.skip(f"no native CPU kernel for {op}")
    args = opcheck_samples()[op]
    differentiable = op in ("kernel_guided_read", "gaussian_softmax", "topk_guided_read")
    if differentiable:
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and a.dim() >= 3 else a for a in args)
    torch.library.opcheck(getattr(OPS, op).default, args)


@needs("kernel_guided_read", "topk_guided_read", "local_track", "gaussian_softmax")
def test_bad_arguments_name_the_argument():
    q, k, v, c, s = read_inputs(1, 3, 2, 2, 3, 4, F)
    with pytest.raises(RuntimeError, match="centers"):
        OPS.kernel_guided_read(q, k, v, c + 20, s, 0.5, 0, [])
    with pytest.raises(RuntimeError, match="topk_frames"):
        OPS.kernel_guided_read(q, k, v, c, s, 0.5, 2, [0, 0])
    with pytest.raises(RuntimeError, match="memory_value"):
        OPS.kernel_guided_read(q, k, v[:, :, :1], c, s, 0.5, 0, [])
    with pytest.raises(RuntimeError, match="window"):
        OPS.local_track(q, q, 4)
    tq, tk, tv, ti = topk_inputs(1, 3, 2, 2, 4, 4, 2, 3, F)
    with pytest.raises(RuntimeError, match="topk_indices"):
        OPS.topk_guided_read(tq, tk, tv, ti + 100, 0.5, 2)
    with pytest.raises(RuntimeError, match="ratio"):
        OPS.topk_guided_read(tq, tk, tv, ti, 0.5, 3)
    aff, ac, asg = softmax_inputs(1, 2, 2, 3, F)
    with pytest.raises(RuntimeError, match="sigma"):
        OPS.gaussian_softmax(aff, ac, asg[:, :1], 2, 3)


# ---------------------------------------------------------------- determinism


def _all_ops_once():
    """Every native op on inputs large enough to split over several tasks."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    res = []
    q, k, v = rnd(2, 16, 20, 22), rnd(2, 16, 4, 20, 22), rnd(2, 24, 4, 20, 22)
    c = torch.randint(-1, 440, (2, 4, 20, 22), generator=g)
    s = torch.rand(2, 4, generator=g) + 0.5
    if "kernel_guided_read" in NATIVE:
        out, lse, idx = OPS.kernel_guided_read(q, k, v, c, s, 0.3, 8, [3, 0])
        res += [out, lse, idx]
        if "kernel_guided_read_backward" in NATIVE:
            res += OPS.kernel_guided_read_backward(torch.ones_like(out), q, k, v, c, s, out, lse, 0.3)
        # One query block: a single task, run inline, where BLAS may use every thread itself.
        q1, k1, v1 = rnd(1, 64, 8, 8), rnd(1, 64, 30, 8, 8), rnd(1, 96, 30, 8, 8)
        out, lse, idx = OPS.kernel_guided_read(q1, k1, v1, None, None, 0.2, 4, [0])
        res += [out, lse, idx]
        if "kernel_guided_read_backward" in NATIVE:
            res += OPS.kernel_guided_read_backward(torch.ones_like(out), q1, k1, v1, None, None, out, lse, 0.2)
    if "topk_guided_read" in NATIVE:
        idx = torch.randint(0, 4 * 110, (2, 110, 6), generator=g)
        out, lse = OPS.topk_guided_read(q, k, v, idx, 0.3, 2)
        res += [out, lse]
        if "topk_guided_read_backward" in NATIVE:
            res += OPS.topk_guided_read_backward(torch.ones_like(out), q, k, v, idx, out, lse, 0.3, 2)
    if "gaussian_softmax" in NATIVE:
        aff = rnd(2, 4 * 110, 110)
        y = OPS.gaussian_softmax(aff, c[:, :, :10, :11].clamp_max(109), s, 10, 11)
        res.append(y)
        if "gaussian_softmax_backward" in NATIVE:
            res.append(OPS.gaussian_softmax_backward(rnd(2, 440, 110), y))
    if "local_track" in NATIVE:
        res.append(OPS.local_track(q, rnd(2, 16, 20, 22), 7))
    if "global_track" in NATIVE:
        res.append(OPS.global_track(k, q))
    return res


def test_results_do_not_depend_on_thread_count():
    """Our task boundaries depend on the shapes only; the products inside go to MKL, which rounds
    differently inside and outside a parallel region unless its conditional numerical
    reproducibility mode is on (MKL_CBWR, read when MKL starts): hence a subprocess with it."""
    if not NATIVE:
        pytest.skip("no native CPU kernels in this build")
    env = dict(os.environ, MKL_CBWR="AUTO,STRICT")
    script = "import sys; sys.path.insert(0, sys.argv[1]); import test_native_cpu as t; t.compare_thread_counts()"
    run = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def compare_thread_counts():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_ops_once()
        torch.set_num_threads(2)
        two = _all_ops_once()
    finally:
        torch.set_num_threads(threads)
    assert len(one) == len(two) > 0
    for a, b in zip(one, two):
        assert torch.equal(a, b)


_ISA_SCRIPT = textwrap.dedent("""
    import torch, hmmn_ops
    from hmmn_ops import reference as ref
    OPS = torch.ops.hmmn_ops
    torch.manual_seed(0)
    for dt in (torch.float32, torch.float64):
        q, k, v = torch.randn(1, 8, 9, 21, dtype=dt), torch.randn(1, 8, 3, 9, 21, dtype=dt), torch.randn(1, 5, 3, 9, 21, dtype=dt)
        c, s = torch.randint(-1, 189, (1, 3, 9, 21)), torch.rand(1, 3, dtype=dt) + 0.5
        assert torch.equal(OPS.local_track(q, k[:, :, 0], 7), ref.local_track(q, k[:, :, 0], 7))
        assert torch.equal(OPS.global_track(k, q), ref.global_track(k, q))
        a, b = OPS.kernel_guided_read(q, k, v, c, s, 0.4, 5, [0, 2]), ref.kernel_guided_read(q, k, v, c, s, 0.4, 5, [0, 2])
        assert (a[0] - b[0]).abs().max() < 1e-5 and torch.equal(a[2], b[2])
        idx = torch.randint(0, 3 * 10, (1, 10, 4))
        q6, k6, v6 = q[..., :6, :15], k[..., :6, :15].contiguous(), v[..., :6, :15].contiguous()
        a, b = OPS.topk_guided_read(q6, k6, v6, idx, 0.4, 3), ref.topk_guided_read(q6, k6, v6, idx, 0.4, 3)
        assert (a[0] - b[0]).abs().max() < 1e-5
        aff = torch.randn(1, 3 * 189, 189, dtype=dt)
        a, b = OPS.gaussian_softmax(aff, c, s, 9, 21), ref.gaussian_softmax(aff, c, s, 9, 21)
        assert (a - b).abs().max() < 1e-5
    print("ok")
""")


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_lower_isa_kernels(isa):
    """The SSE2 / AVX2 builds of the kernels (chosen on CPUs without AVX-512) are correct too."""
    if not {"local_track", "global_track", "kernel_guided_read", "topk_guided_read", "gaussian_softmax"} <= NATIVE:
        pytest.skip("needs every native forward kernel")
    env = dict(os.environ, HMMN_OPS_CPU_ISA=isa, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]
