"""Triton kernels (hmmn_ops/triton/) against the reference, forward and backward.

On a CPU machine they run in Triton's interpreter, at tiny shapes, in float32/float64:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/test_triton.py

Without TRITON_INTERPRET=1 and without a GPU every test skips and says so. On a GPU (no
TRITON_INTERPRET) the same tests run on CUDA tensors, plus the ``cuda`` ones at the real HMMN
shapes in float32, float16 and bfloat16 (error at most twice the reference's error at the same
precision, measured against a float64 reference: the flash-attention rule).
"""
import os
import subprocess
import sys

import pytest
import torch

import hmmn_ops
from hmmn_ops import reference

from inputs import LAYOUTS, Inputs, triton_device

INTERPRET, DEVICE = triton_device()

import hmmn_ops.triton as tri  # noqa: E402  (after the skip: importing it is what needs Triton)

pytestmark = pytest.mark.triton
real_shapes = pytest.mark.skipif(INTERPRET, reason="real shapes are for a GPU, not the interpreter")

F32, F64 = torch.float32, torch.float64
FLOATS = [F32, F64] if INTERPRET else [F32]  # float64 is the interpreter's (CUDA refuses it)
TOL = {F32: dict(rtol=2e-5, atol=2e-5), F64: dict(rtol=1e-10, atol=1e-10)}


def _close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, **TOL.get(want.dtype, {}))


_IN = Inputs(DEVICE)
_randn, _ints, _read_args = _IN.randn, _IN.ints, _IN.read_args


# ---------------------------------------------------------------- kernel_guided_read


READ_CASES = {
    # B, Ck, Cv, T, H, W
    "small": (2, 5, 7, 2, 3, 5),  # two programs: the memory axis is split and combined
    "no-split": (5, 3, 4, 1, 3, 5),  # enough programs: written directly
    "T=1,1x1": (1, 2, 3, 1, 1, 1),
    "wide": (1, 17, 20, 3, 2, 7),  # Ck > one key block, Cv over two value tiles
    "B=0": (0, 3, 4, 2, 3, 5),
}


@pytest.mark.parametrize("case", READ_CASES)
@pytest.mark.parametrize("gaussian", [False, True], ids=["plain", "gaussian"])
def test_kernel_guided_read_forward(case, gaussian):
    args = _read_args(*READ_CASES[case], gaussian)
    got, want = tri.kernel_guided_read(*args, 0.4, 0, []), reference.kernel_guided_read(*args, 0.4, 0, [])
    _close(got[0], want[0])
    _close(got[1], want[1])
    assert got[2].shape == want[2].shape == (args[0].shape[0], args[0].shape[2] * args[0].shape[3], 0)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_kernel_guided_read_forward_layouts_and_float64(layout, dtype):
    args = _read_args(2, 3, 5, 2, 3, 4, True, dtype=dtype, layout=layout)
    got, want = tri.kernel_guided_read(*args, 0.6, 0, []), reference.kernel_guided_read(*args, 0.6, 0, [])
    _close(got[0], want[0])
    _close(got[1], want[1])


@pytest.mark.parametrize("dtype", FLOATS)
def test_kernel_guided_read_tiny_sigma_far_centres_no_nan(dtype):
    # Gaussian terms down to -4000: the log-space form must neither underflow to 0/0 nor lose the keys.
    B, T, H, W = 1, 2, 6, 9
    q, k, v, _, _ = _read_args(B, 4, 3, T, H, W, False, dtype=dtype)
    centers = torch.zeros(B, T, H, W, dtype=torch.int64, device=DEVICE)
    sigma = torch.full((B, T), 0.1, dtype=dtype, device=DEVICE)
    got, want = tri.kernel_guided_read(q, k, v, centers, sigma, 1.0, 0, []), \
        reference.kernel_guided_read(q, k, v, centers, sigma, 1.0, 0, [])
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    # float32 logits near -4000 carry ~2e-4 absolute rounding, in the reference as much as here.
    tol = TOL[F64] if dtype == F64 else dict(rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)


TOPK_CASES = {
    # B, T, H, W, topk, frames
    "k=1": (2, 2, 3, 5, 1, [1, 0]),
    "k=5,reordered": (1, 3, 3, 5, 5, [2, 0]),
    "k=all": (1, 2, 2, 3, 12, [0, 1]),  # every listed position, each once
    "one-frame,k=odd": (2, 3, 3, 4, 7, [1]),
    "T=1,1x1": (1, 1, 1, 1, 1, [0]),
}


@pytest.mark.parametrize("case", TOPK_CASES)
@pytest.mark.parametrize("gaussian", [False, True], ids=["plain", "gaussian"])
def test_kernel_guided_read_topk_matches_including_ties(case, gaussian):
    B, T, H, W, topk, frames = TOPK_CASES[case]
    q, k, v, centers, sigma = _read_args(B, 3, 2, T, H, W, gaussian, values=_ints)
    if gaussian:
        sigma = torch.ones_like(sigma)  # bias = -d2 / 2: exact, so logits still tie
    got = tri.kernel_guided_read(q, k, v, centers, sigma, 0.5, topk, frames)
    want = reference.kernel_guided_read(q, k, v, centers, sigma, 0.5, topk, frames)
    assert got[2].dtype == torch.int64
    assert torch.equal(got[2], want[2])
    _close(got[0], want[0])


def test_kernel_guided_read_topk_all_equal_logits_in_index_order():
    q, _, v, _, _ = _read_args(1, 3, 2, 2, 2, 3, False)
    k = torch.zeros(1, 3, 2, 2, 3, device=DEVICE)
    _, _, idx = tri.kernel_guided_read(q, k, v, None, None, 1.0, 9, [1, 0])
    assert torch.equal(idx, torch.arange(9, device=DEVICE).expand(1, 6, 9))


def test_kernel_guided_read_topk_negative_and_signed_zero_logits():
    # Negative logits order by magnitude the other way; -0.0 ties with +0.0 (smaller index first).
    q = torch.ones(1, 1, 1, 2, device=DEVICE)
    k = torch.tensor([-0.0, -1.0, 0.0, -2.0, -0.5, 3.0], device=DEVICE).view(1, 1, 3, 1, 2)
    v = torch.zeros(1, 1, 3, 1, 2, device=DEVICE)
    _, _, idx = tri.kernel_guided_read(q, k, v, None, None, 1.0, 6, [0, 1, 2])
    assert idx[0, 0].tolist() == [5, 0, 2, 4, 1, 3]


@pytest.mark.parametrize("dtype", FLOATS)
def test_kernel_guided_read_topk_random_floats(dtype):
    # Random logits: ties (and float32 near-ties) are practically impossible.
    B, Ck, T, H, W, topk, frames = 2, 4, 3, 3, 4, 6, [2, 0]
    q, k, v, centers, sigma = _read_args(B, Ck, 2, T, H, W, True, dtype=dtype)
    _, _, idx = tri.kernel_guided_read(q, k, v, centers, sigma, 0.7, topk, frames)
    _, _, want = reference.kernel_guided_read(q, k, v, centers, sigma, 0.7, topk, frames)
    assert torch.equal(idx, want)


# ---------------------------------------------------------------- kernel_guided_read backward


BACKWARD_CASES = {
    "small": (2, 5, 7, 2, 3, 5),  # dQ over two memory splits
    "wide": (1, 17, 20, 2, 2, 7),  # dK summed over two value tiles
    "T=1,1x1": (1, 2, 3, 1, 1, 1),
    "B=0": (0, 3, 4, 2, 3, 5),
}


@pytest.mark.parametrize("case", BACKWARD_CASES)
@pytest.mark.parametrize("gaussian", [False, True], ids=["plain", "gaussian"])
def test_kernel_guided_read_backward(case, gaussian):
    args = _read_args(*BACKWARD_CASES[case], gaussian)
    out, lse, _ = reference.kernel_guided_read(*args, 0.4, 0, [])
    grad = _randn(*out.shape)
    got = tri.kernel_guided_read_backward(grad, *args, out, lse, 0.4)
    want = reference.kernel_guided_read_backward(grad, *args, out, lse, 0.4)
    for g, w in zip(got, want):
        _close(g, w)


@pytest.mark.parametrize("dtype", FLOATS)
def test_kernel_guided_read_backward_layouts(dtype):
    args = _read_args(2, 3, 4, 2, 3, 4, True, dtype=dtype, layout="channels_last")
    out, lse, _ = reference.kernel_guided_read(*args, 0.9, 0, [])
    grad = _randn(1, 4, 1, 1, dtype=dtype).expand_as(out)  # stride-0 gradient, as autograd may pass
    got = tri.kernel_guided_read_backward(grad, *args, out, lse, 0.9)
    want = reference.kernel_guided_read_backward(grad, *args, out, lse, 0.9)
    for g, w in zip(got, want):
        _close(g, w)


# ---------------------------------------------------------------- gaussian_softmax


@pytest.mark.parametrize("B,T,H,W", [(2, 2, 3, 5), (1, 1, 1, 1), (1, 3, 4, 6), (0, 2, 2, 3)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_gaussian_softmax_forward_and_backward(B, T, H, W, dtype):
    M, N = T * H * W, H * W
    affinity = _randn(B, N, M, dtype=dtype).transpose(1, 2)  # non-contiguous (B, M, N)
    centers = torch.randint(-1, N, (B, T, H, W), device=DEVICE)
    sigma = torch.rand(B, T, dtype=dtype, device=DEVICE) + 0.3
    got, want = tri.gaussian_softmax(affinity, centers, sigma, H, W), \
        reference.gaussian_softmax(affinity, centers, sigma, H, W)
    _close(got, want)
    grad = _randn(B, M, N, dtype=dtype)
    _close(tri.gaussian_softmax_backward(grad, want), reference.gaussian_softmax_backward(grad, want))


# ---------------------------------------------------------------- local_track / global_track


@pytest.mark.parametrize("window", [1, 3, 5, 9])  # 9 is wider than the frame
@pytest.mark.parametrize("layout", ["contig", "strided"])
def test_local_track_matches_including_ties(window, layout):
    mk, qk = (LAYOUTS[layout](_ints(2, 3, 4, 7)) for _ in range(2))
    got = tri.local_track(mk, qk, window)
    assert got.dtype == torch.int64
    assert torch.equal(got, reference.local_track(mk, qk, window))


@pytest.mark.parametrize("shape", [(1, 5, 1, 1), (0, 3, 4, 5), (1, 0, 3, 3)], ids=["1x1", "B=0", "C=0"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_local_track_edge_shapes(shape, dtype):
    mk, qk = _ints(*shape, dtype=dtype), _ints(*shape, dtype=dtype)
    assert torch.equal(tri.local_track(mk, qk, 3), reference.local_track(mk, qk, 3))


@pytest.mark.parametrize("B,C,T,H,W", [(2, 3, 2, 4, 5), (1, 20, 1, 1, 1), (0, 3, 2, 3, 3), (1, 5, 3, 3, 7)])
@pytest.mark.parametrize("layout", ["contig", "channels_last"])
def test_global_track_matches_including_ties(B, C, T, H, W, layout):
    mk, qk = LAYOUTS[layout](_ints(B, C, T, H, W)), LAYOUTS[layout](_ints(B, C, H, W))
    got = tri.global_track(mk, qk)
    assert got.dtype == torch.int64
    assert torch.equal(got, reference.global_track(mk, qk))


@pytest.mark.parametrize("dtype", FLOATS)
def test_tracks_random_floats(dtype):
    mk, qk = _randn(2, 6, 5, 6, dtype=dtype), _randn(2, 6, 5, 6, dtype=dtype)
    assert torch.equal(tri.local_track(mk, qk, 3), reference.local_track(mk, qk, 3))
    mk5 = _randn(2, 6, 2, 5, 6, dtype=dtype)
    assert torch.equal(tri.global_track(mk5, qk), reference.global_track(mk5, qk))


# ---------------------------------------------------------------- topk_guided_read


TOPK_READ_CASES = {
    # B, Ck, Cv, T, H, W, r, k
    "r=2": (2, 5, 7, 2, 4, 6, 2, 3),  # four cells per program, the last program half empty
    "r=4,k=1": (1, 3, 4, 2, 8, 4, 4, 1),
    "r=3": (1, 4, 3, 1, 6, 3, 3, 2),  # r*r = 9: rows padded to 16
    "r=1": (2, 3, 2, 2, 3, 5, 1, 4),
    "wide": (1, 17, 20, 2, 4, 4, 2, 2),  # Cv over two value tiles
    "B=0": (0, 3, 4, 2, 4, 4, 2, 2),
}


def _topk_read_args(B, Ck, Cv, T, H, W, r, k, dtype=F32, layout="contig"):
    q, mk, mv, _, _ = _read_args(B, Ck, Cv, T, H, W, False, dtype=dtype, layout=layout)
    cells = (H // r) * (W // r)
    indices = torch.randint(0, T * cells, (B, cells, k), device=DEVICE)
    if k > 1:
        indices[:, ::2, 1] = indices[:, ::2, 0]  # duplicates count twice
    return q, mk, mv, indices


@pytest.mark.parametrize("case", TOPK_READ_CASES)
def test_topk_guided_read_forward_and_backward(case):
    *shape, r, k = TOPK_READ_CASES[case]
    args = _topk_read_args(*shape, r, k)
    got, want = tri.topk_guided_read(*args, 0.3, r), reference.topk_guided_read(*args, 0.3, r)
    _close(got[0], want[0])
    _close(got[1], want[1])
    grad = _randn(*want[0].shape)
    got = tri.topk_guided_read_backward(grad, *args, *want, 0.3, r)
    if shape[0] == 0:  # (the reference's backward cannot reshape an empty batch)
        assert [(g.shape, g.dtype) for g in got] == [(x.shape, x.dtype) for x in args[:3]]
        return
    for g, w in zip(got, reference.topk_guided_read_backward(grad, *args, *want, 0.3, r)):
        _close(g, w)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_guided_read_layouts_and_float64(layout, dtype):
    args = _topk_read_args(2, 3, 4, 2, 4, 6, 2, 2, dtype=dtype, layout=layout)
    want = reference.topk_guided_read(*args, 0.5, 2)
    for g, w in zip(tri.topk_guided_read(*args, 0.5, 2), want):
        _close(g, w)
    grad = _randn(*want[0].shape, dtype=dtype)
    for g, w in zip(tri.topk_guided_read_backward(grad, *args, *want, 0.5, 2),
                    reference.topk_guided_read_backward(grad, *args, *want, 0.5, 2)):
        _close(g, w)


# ---------------------------------------------------------------- through the public API


def test_backend_triton_runs_every_op():
    from hmmn_ops.backends import ALL_OPS, refusal

    assert {op: refusal("triton", op, DEVICE) for op in ALL_OPS} == dict.fromkeys(ALL_OPS)


def _grads(fn, inputs, backend):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves, backend=backend)
    out = out[0] if isinstance(out, tuple) else out
    torch.manual_seed(7)
    out.backward(torch.randn(out.shape).to(out))
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("op", ["kernel_guided_read", "topk_guided_read", "gaussian_softmax"])
def test_public_api_forward_and_gradients_match_reference(op):
    if op == "kernel_guided_read":
        q, k, v, centers, sigma = _read_args(2, 3, 4, 2, 3, 4, True)
        fn = lambda q, k, v, backend: hmmn_ops.kernel_guided_read(  # noqa: E731
            q, k, v, centers, sigma[0], topk=3, topk_frames=(1, 0), backend=backend)
        inputs = (q, k, v)
    elif op == "topk_guided_read":
        q, k, v, indices = _topk_read_args(2, 3, 4, 2, 4, 6, 2, 3)
        fn = lambda q, k, v, backend: hmmn_ops.topk_guided_read(q, k, v, indices, backend=backend)  # noqa: E731
        inputs = (q, k, v)
    else:
        centers = torch.randint(-1, 6, (2, 2, 2, 3), device=DEVICE)
        fn = lambda a, backend: hmmn_ops.gaussian_softmax(a, centers, 1.5, size=(2, 3), backend=backend)  # noqa: E731
        inputs = (_randn(2, 12, 6),)
    got_out, got = _grads(fn, inputs, "triton")
    want_out, want = _grads(fn, inputs, "reference")
    _close(got_out, want_out)
    for g, w in zip(got, want):
        _close(g, w)


def test_float32_tunes_over_the_smaller_tiles(monkeypatch):
    from hmmn_ops.triton import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    half, full = ["half-1", "half-2"], ["full"]
    tuning = _common.tuning(half, "interpreted", full=full)
    prune = tuning["prune_configs_by"]["early_config_prune"]
    assert tuning["configs"] == half + full
    assert prune(tuning["configs"], {"q_ptr": torch.zeros(1, dtype=torch.float16)}) == half
    assert prune(tuning["configs"], {"q_ptr": torch.zeros(1)}, BLOCK_CK=16) == full
    monkeypatch.setattr(_common, "INTERPRET", True)
    assert _common.tuning(half, "interpreted", full=full) == {"configs": ["interpreted"]}


@pytest.mark.slow
def test_every_kernel_compiles_for_a_gpu():
    """What the interpreter cannot catch: each kernel through Triton's compiler and ptxas for sm_90
    (float16, first autotune config; ``python -m hmmn_ops.triton.compile_check`` does more)."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "hmmn_ops.triton.compile_check", "--arch", "90", "--dtype", "float16"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "every kernel compiled" in run.stdout


# ---------------------------------------------------------------- GPU: real shapes, low precision


@pytest.mark.cuda
@real_shapes
def test_cuda_float64_is_refused_and_says_why():
    x = torch.zeros(1, 2, 3, 3, dtype=F64, device=DEVICE)
    with pytest.raises(RuntimeError, match="float64"):
        tri.local_track(x, x, 3)


LOW_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _assert_within_twice_pytorch_error(got, ref_same_dtype, truth, dtype, what):
    """|got - truth| <= 2 |reference at the same dtype - truth| + atol, relative to truth's scale."""
    scale = max(1.0, truth.abs().max().item())
    err = (got.double() - truth).abs().max().item() / scale
    ref_err = (ref_same_dtype.double() - truth).abs().max().item() / scale
    assert err <= 2 * ref_err + LOW_ATOL[dtype], f"{what}: error {err:.3g} vs reference error {ref_err:.3g} ({dtype})"


LEVELS = {  # docs/ops.md's HMMN table at DAVIS 480p (input padded to 480x864)
    "res4": dict(B=2, Ck=128, Cv=512, T=4, H=30, W=54),
    "res3": dict(B=2, Ck=128, Cv=256, T=2, H=60, W=108, r=2, k=32),
    "res2": dict(B=1, Ck=64, Cv=128, T=2, H=120, W=216, r=4, k=8),
}


@pytest.mark.cuda
@real_shapes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_guided_read_res4(dtype):
    L = LEVELS["res4"]
    B, Ck, Cv, T, H, W = L["B"], L["Ck"], L["Cv"], L["T"], L["H"], L["W"]
    q, k, v, centers, sigma = _read_args(B, Ck, Cv, T, H, W, True)
    q, k, v = (x.to(dtype) for x in (q, k, v))  # sigma stays float32 (the accumulation dtype)
    scale, frames, topk = Ck ** -0.5, [0, T - 1], 32
    out, lse, idx = tri.kernel_guided_read(q, k, v, centers, sigma, scale, topk, frames)
    ref = reference.kernel_guided_read(q, k, v, centers, sigma, scale, 0, [])
    d = [x.double() for x in (q, k, v)]
    truth = reference.kernel_guided_read(*d, centers, sigma.double(), scale, 0, [])
    _assert_within_twice_pytorch_error(out, ref[0], truth[0], dtype, "out")
    _assert_within_twice_pytorch_error(lse, ref[1], truth[1], dtype, "lse")
    # Top-k: the float64 logits at the returned indices are the true top-k values, in order.
    c, gamma = centers.reshape(B, -1), reference._gamma(sigma.double(), H * W)
    logits = reference._read_logits(d[0].reshape(B, Ck, -1), d[1].reshape(B, Ck, -1), c, gamma, scale, W, 0, H * W)
    listed = torch.cat([logits[:, f * H * W:(f + 1) * H * W] for f in frames], 1).transpose(1, 2)  # (B, N, 2HW)
    got_vals = listed.gather(2, idx)
    true_vals = listed.topk(topk, dim=2).values
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got_vals, true_vals, rtol=0, atol=tol)
    assert (idx.sort(2).values.diff(dim=2) > 0).all()  # distinct

    grad = torch.randn_like(out)
    got = tri.kernel_guided_read_backward(grad, q, k, v, centers, sigma, out, lse, scale)
    ref_g = reference.kernel_guided_read_backward(grad, q, k, v, centers, sigma, ref[0], ref[1], scale)
    truth_g = reference.kernel_guided_read_backward(grad.double(), *d, centers, sigma.double(), *truth[:2], scale)
    for g, r_, t, name in zip(got, ref_g, truth_g, ("dq", "dk", "dv")):
        _assert_within_twice_pytorch_error(g, r_, t, dtype, name)


@pytest.mark.cuda
@real_shapes
@pytest.mark.parametrize("level", ["res3", "res2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_topk_guided_read_real_shapes(level, dtype):
    L = LEVELS[level]
    B, Ck, Cv, T, H, W, r, k = (L[n] for n in ("B", "Ck", "Cv", "T", "H", "W", "r", "k"))
    q, mk, mv, indices = _topk_read_args(B, Ck, Cv, T, H, W, r, k)
    q, mk, mv = (x.to(dtype) for x in (q, mk, mv))
    scale = Ck ** -0.5
    out, lse = tri.topk_guided_read(q, mk, mv, indices, scale, r)
    ref = reference.topk_guided_read(q, mk, mv, indices, scale, r)
    d = [x.double() for x in (q, mk, mv)]
    truth = reference.topk_guided_read(*d, indices, scale, r)
    _assert_within_twice_pytorch_error(out, ref[0], truth[0], dtype, "out")
    _assert_within_twice_pytorch_error(lse, ref[1], truth[1], dtype, "lse")
    grad = torch.randn_like(out)
    got = tri.topk_guided_read_backward(grad, q, mk, mv, indices, out, lse, scale, r)
    ref_g = reference.topk_guided_read_backward(grad, q, mk, mv, indices, *ref, scale, r)
    truth_g = reference.topk_guided_read_backward(grad.double(), *d, indices, *truth, scale, r)
    for g, r_, t, name in zip(got, ref_g, truth_g, ("dq", "dk", "dv")):
        _assert_within_twice_pytorch_error(g, r_, t, dtype, name)


@pytest.mark.cuda
@real_shapes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_gaussian_softmax_real_shape(dtype):
    B, T, H, W = 2, 3, 30, 54
    M, N = T * H * W, H * W
    affinity = _randn(B, M, N).to(dtype)
    centers = torch.randint(-1, N, (B, T, H, W), device=DEVICE)
    sigma = torch.rand(B, T, device=DEVICE) * 3 + 0.5
    got = tri.gaussian_softmax(affinity, centers, sigma, H, W)
    truth = reference.gaussian_softmax(affinity.double(), centers, sigma.double(), H, W)
    _assert_within_twice_pytorch_error(got, reference.gaussian_softmax(affinity, centers, sigma, H, W), truth, dtype,
                                       "softmax")
    grad = torch.randn_like(got)
    _assert_within_twice_pytorch_error(tri.gaussian_softmax_backward(grad, got),
                                       reference.gaussian_softmax_backward(grad, got),
                                       reference.gaussian_softmax_backward(grad.double(), got.double()), dtype,
                                       "softmax backward")


def _assert_argmax_up_to_rounding(idx, scores, tol):
    """scores (B, P, Q) float64 of the candidates (-inf where not a candidate): the chosen one is
    within tol of the best (exact argmax can differ from the reference on near-ties)."""
    chosen = scores.gather(2, idx.reshape(idx.shape[0], -1, 1)).squeeze(2)
    assert (chosen >= scores.max(2).values - tol).all()


@pytest.mark.cuda
@real_shapes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_tracks_real_shapes(dtype):
    B, C, T, H, W = 2, 128, 3, 30, 54
    mk, qk = _randn(B, C, T, H, W).to(dtype), _randn(B, C, H, W).to(dtype)
    tol = 1e-3  # products of 16-bit floats are exact in the float32 accumulators
    scores = torch.bmm(mk.double().reshape(B, C, -1).transpose(1, 2), qk.double().reshape(B, C, -1))
    _assert_argmax_up_to_rounding(tri.global_track(mk, qk), scores, tol)
    idx = tri.local_track(mk[:, :, 0], qk, 7)
    ys, xs = torch.arange(H, device=DEVICE), torch.arange(W, device=DEVICE)
    py, px = ys.view(H, 1).expand(H, W).reshape(-1), xs.view(1, W).expand(H, W).reshape(-1)
    inside = ((py.view(-1, 1) - py.view(1, -1)).abs() <= 3) & ((px.view(-1, 1) - px.view(1, -1)).abs() <= 3)
    local = scores[:, :H * W].masked_fill(~inside, float("-inf"))
    _assert_argmax_up_to_rounding(idx, local, tol)  # (-inf, so a failure, outside the window)
    # Exact agreement (ties included) on integer-valued keys.
    mk_i, qk_i = _ints(B, C, T, H, W).to(dtype), _ints(B, C, H, W).to(dtype)
    assert torch.equal(tri.global_track(mk_i, qk_i), reference.global_track(mk_i, qk_i))
    assert torch.equal(tri.local_track(mk_i[:, :, 0], qk_i, 7), reference.local_track(mk_i[:, :, 0], qk_i, 7))
