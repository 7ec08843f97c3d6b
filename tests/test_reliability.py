"""Reliability: one test (or a few) per item of the bad-input and numerics probe, named after it.

Items: 1 double backward, 2 checks under torch.compile, 3 NaN inputs, 4 tiny sigma / huge
scale, 5 local_track window, 7 forced backends compile, 8 Triton bf16 under the interpreter,
9 front nits, 10 index widths; then the conventions (autocast, topk_frames). The rules are
docs/reliability.md's.
"""
import os

import pytest
import torch

import hmmn_ops
from hmmn_ops.backends import native_ops, refusal

D, F = torch.float64, torch.float32
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def cpu_backends(op, params=True):
    """Backends that run ``op`` on CPU tensors here (Triton only under its interpreter, marked
    ``triton`` so that CI's Triton step runs it)."""
    names = [b for b in ("reference", "native", "triton", "cuda_emulated") if (b != "triton" or INTERPRET) and _runs(b, op)]
    if not params:
        return names
    return [pytest.param(b, marks=pytest.mark.triton) if b == "triton" else b for b in names]


def _runs(backend, op):
    try:
        return refusal(backend, op, "cpu") is None
    except Exception:
        return False


def _read(B=1, Ck=3, Cv=2, T=2, H=3, W=4, dtype=D, grad=False):
    return (torch.randn(B, Ck, H, W, dtype=dtype, requires_grad=grad),
            torch.randn(B, Ck, T, H, W, dtype=dtype, requires_grad=grad),
            torch.randn(B, Cv, T, H, W, dtype=dtype, requires_grad=grad))


# ---------------------------------------------------------------- 1. double backward


def _double_backward_calls():
    centers = torch.randint(-1, 12, (1, 2, 3, 4))
    sigma = torch.tensor([0.8, 1.5], dtype=D)
    idx = torch.randint(0, 2 * 4, (1, 4, 3))
    return {
        "kernel_guided_read": lambda q, k, v, b: hmmn_ops.kernel_guided_read(q, k, v, backend=b),
        "kernel_guided_read_gaussian": lambda q, k, v, b: hmmn_ops.kernel_guided_read(q, k, v, centers, sigma, backend=b),
        "topk_guided_read": lambda q, k, v, b: hmmn_ops.topk_guided_read(q, k, v, idx, backend=b),
        "gaussian_softmax": lambda q, k, v, b: hmmn_ops.gaussian_softmax(
            (q.flatten(2).transpose(1, 2) @ q.flatten(2)).repeat(1, 2, 1), centers.reshape(1, 2, 3, 4),
            sigma, size=(3, 4), backend=b),
    }


@pytest.mark.parametrize("backend", ["auto", "reference", "native"])
@pytest.mark.parametrize("call", sorted(_double_backward_calls()))
def test_1_double_backward_raises(call, backend):
    op = "gaussian_softmax" if call == "gaussian_softmax" else call.replace("_gaussian", "")
    if backend == "native" and op not in native_ops("cpu"):
        pytest.skip("no native CPU kernel")
    fn = _double_backward_calls()[call]
    q, k, v = _read(H=4, W=4, grad=True) if "topk" in call else _read(grad=True)
    out = fn(q, k, v, backend)
    g, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), q)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_1_gradgradcheck_raises(backend):
    q, k, v = _read(grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.gradgradcheck(lambda q, k, v: hmmn_ops.kernel_guided_read(q, k, v, backend=backend), (q, k, v))


# ---------------------------------------------------------------- 2. checks under torch.compile


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_2_compiled_sigma_is_checked(backend):
    q, k, v = _read(dtype=F)
    centers = torch.zeros(1, 2, 3, 4, dtype=torch.int64)

    def step(q, k, v, sigma):
        return hmmn_ops.kernel_guided_read(q, k, v, centers, sigma, backend=backend)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    assert compiled(q, k, v, torch.ones(2)).isfinite().all()
    with pytest.raises(RuntimeError, match="sigma"):
        compiled(q, k, v, torch.zeros(2))
    aff = torch.randn(1, 24, 12)
    soft = torch.compile(lambda a, s: hmmn_ops.gaussian_softmax(a, centers, s, size=(3, 4), backend=backend),
                         backend="eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="sigma"):
        soft(aff, torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_2_compiled_centers_and_indices_are_checked(backend):
    q, k, v = _read(dtype=F, H=4, W=4)
    read = torch.compile(lambda c: hmmn_ops.kernel_guided_read(q, k, v, c, 1.0, backend=backend),
                         backend="eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="centers"):
        read(torch.full((1, 2, 4, 4), 16, dtype=torch.int64))
    sparse = torch.compile(lambda i: hmmn_ops.topk_guided_read(q, k, v, i, backend=backend),
                           backend="eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="topk_indices"):
        sparse(torch.full((1, 4, 2), 8, dtype=torch.int64))


# ---------------------------------------------------------------- 3. NaN inputs


def _nan_read():
    q, k, v = _read(dtype=F, T=2, H=3, W=4)
    k[0, :, 1, 1, 2] = float("nan")   # one memory position's scores are NaN for every query
    return q, k, v


@pytest.mark.parametrize("backend", cpu_backends("kernel_guided_read"))
def test_3_nan_scores_rank_last_in_topk(backend):
    q, k, v = _nan_read()
    nan_pos = 1 * 12 + 1 * 4 + 2
    _, idx = hmmn_ops.kernel_guided_read(q, k, v, topk=24, backend=backend)
    assert idx.min() >= 0 and idx.max() < 24
    assert (idx[..., -1] == nan_pos).all()  # the NaN position is last for every query
    _, idx3 = hmmn_ops.kernel_guided_read(q, k, v, topk=3, backend=backend)
    assert (idx3 != nan_pos).all()


@pytest.mark.parametrize("backend", cpu_backends("kernel_guided_read"))
def test_3_all_nan_topk_is_the_smallest_indices(backend):
    q, k, v = _read(dtype=F)
    k.fill_(float("nan"))
    _, idx = hmmn_ops.kernel_guided_read(q, k, v, topk=5, topk_frames=(1, 0), backend=backend)
    assert torch.equal(idx, torch.arange(5).expand_as(idx))


@pytest.mark.parametrize("backend", cpu_backends("global_track"))
def test_3_global_track_nan_query_is_never_picked(backend):
    k = torch.randn(2, 3, 2, 3, 4)
    q = torch.randn(2, 3, 3, 4)
    q[:, :, 0, 1] = float("nan")
    got = hmmn_ops.global_track(k, q, backend=backend)
    assert (got != 1).all()
    ref = torch.einsum("bctp,bcq->btpq", k.flatten(3), q.flatten(2)).nan_to_num(nan=float("-inf")).argmax(-1)
    assert torch.equal(got.flatten(2), ref)
    allnan = hmmn_ops.global_track(k, torch.full_like(q, float("nan")), backend=backend)
    assert (allnan == 0).all()


@pytest.mark.parametrize("backend", cpu_backends("local_track"))
def test_3_local_track_nan_is_never_picked(backend):
    k = torch.randn(2, 3, 5, 6)
    q = torch.randn(2, 3, 5, 6)
    q[:, :, 2, 2] = float("nan")
    got = hmmn_ops.local_track(k, q, 3, backend=backend)
    assert (got != 2 * 6 + 2).all()
    n = torch.arange(30)
    near = ((n.view(-1, 1) // 6 - n.view(1, -1) // 6).abs() <= 1) & ((n.view(-1, 1) % 6 - n.view(1, -1) % 6).abs() <= 1)
    scores = torch.einsum("bcm,bcn->bmn", k.flatten(2), q.flatten(2)).nan_to_num(nan=float("-inf"))
    assert torch.equal(got.flatten(1), scores.masked_fill(~near, float("-inf")).argmax(-1))
    allnan = hmmn_ops.local_track(k, torch.full_like(q, float("nan")), 3, backend=backend)
    first = (torch.arange(5).clamp_min(1) - 1).view(5, 1) * 6 + (torch.arange(6).clamp_min(1) - 1).view(1, 6)
    assert torch.equal(allnan, first.expand(2, 5, 6))


# ---------------------------------------------------------------- 4. tiny sigma, huge scale


@pytest.mark.parametrize("backend", cpu_backends("kernel_guided_read"))
def test_4a_first_chunk_all_minus_inf_is_guarded(backend):
    """sigma 1e-19 on frame 0 (every Gaussian term there is -inf except at the centre), frame 1
    without centres: the first 512 positions (frame 0) of most queries are all -inf."""
    H, W = (32, 32) if backend == "native" else (8, 8)  # native: frame 0 fills its first 512-position chunk
    q, k, v = _read(dtype=F, T=2, H=H, W=W, Ck=2)
    centers = torch.full((1, 2, H, W), -1, dtype=torch.int64)
    centers[:, 0] = 0
    sigma = torch.tensor([1e-19, 1.0])
    out = hmmn_ops.kernel_guided_read(q, k, v, centers, sigma, backend=backend)
    assert out.isfinite().all()
    want = hmmn_ops.kernel_guided_read(q.double(), k.double(), v.double(), centers, sigma.double(), backend="reference")
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends("kernel_guided_read"))
@pytest.mark.parametrize("sigma", [3e-20, 1e-30, 1e-38])
def test_4b_tiny_sigma_gives_no_nan(backend, sigma):
    q, k, v = _read(dtype=F, H=3, W=4)
    centers = torch.randint(0, 12, (1, 2, 3, 4))
    out = hmmn_ops.kernel_guided_read(q, k, v, centers, torch.tensor([sigma, 1.0]), backend=backend)
    assert out.isfinite().all()
    aff = torch.randn(1, 24, 12)
    if backend in cpu_backends("gaussian_softmax", params=False):
        y = hmmn_ops.gaussian_softmax(aff, centers, torch.tensor([sigma, sigma]), size=(3, 4), backend=backend)
        assert y.isfinite().all()
        torch.testing.assert_close(y.sum(1), torch.ones(1, 12))


@pytest.mark.parametrize("backend", cpu_backends("kernel_guided_read"))
def test_4_huge_scale_gives_no_nan(backend):
    q, k, v = _read(dtype=F)
    out = hmmn_ops.kernel_guided_read(q, k, v, scale=1e38, backend=backend)
    assert out.isfinite().all()
    # Saturated logits (+-3.4e38) share the weight: still a convex combination of the values.
    lo, hi = v.flatten(2).min(-1).values, v.flatten(2).max(-1).values
    assert (out.flatten(2) >= lo[..., None] - 1e-6).all() and (out.flatten(2) <= hi[..., None] + 1e-6).all()
    _, idx = hmmn_ops.kernel_guided_read(q, k, v, scale=1e38, topk=4, backend=backend)
    assert idx.min() >= 0 and idx.max() < 24


@pytest.mark.parametrize("backend", cpu_backends("memory_read"))
@pytest.mark.parametrize("similarity", ["dot", "l2"])
@pytest.mark.parametrize("topk", [0, 4])
def test_4_memory_read_huge_scale_gives_no_nan(backend, similarity, topk):
    q, k, v = torch.randn(2, 3, 9), torch.randn(2, 3, 30), torch.randn(2, 4, 30)
    out, usage = hmmn_ops.memory_read(q, k, v, similarity=similarity, scale=1e38, topk=topk, return_usage=True,
                                      backend=backend)
    assert out.isfinite().all() and usage.isfinite().all()
    lo, hi = v.min(-1).values, v.max(-1).values  # still a convex combination of the values
    assert (out >= lo[..., None] - 1e-5).all() and (out <= hi[..., None] + 1e-5).all()


# ---------------------------------------------------------------- 5. local_track window


@pytest.mark.parametrize("backend", cpu_backends("local_track"))
@pytest.mark.parametrize("window", [2**31 + 1, 2**63 + 1, 10**30 + 1])
def test_5_huge_window_is_the_whole_frame(backend, window):
    k, q = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    got = hmmn_ops.local_track(k, q, window, backend=backend)
    whole = hmmn_ops.global_track(k.unsqueeze(2), q, backend="reference").squeeze(1)
    assert torch.equal(got, whole)
    assert torch.equal(hmmn_ops.local_track(k, q, 9, backend=backend), whole)


@pytest.mark.parametrize("window", [7.0, "7", None, True])
def test_5_window_must_be_an_int(window):
    k = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"window: expected a positive odd int, got"):
        hmmn_ops.local_track(k, k, window)


# ---------------------------------------------------------------- 7. forced backends compile


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_7_forced_backends_compile_fullgraph(backend):
    if backend == "native" and "kernel_guided_read" not in native_ops("cpu"):
        pytest.skip("no native CPU kernels")
    q, k, v = _read(dtype=F, H=4, W=4, grad=True)
    centers = torch.randint(-1, 16, (1, 2, 4, 4))
    idx = torch.randint(0, 8, (1, 4, 2))

    def step(q, k, v):
        out = hmmn_ops.kernel_guided_read(q, k, v, centers, torch.tensor([1.0, 2.0]), backend=backend)
        fine = hmmn_ops.topk_guided_read(q, k, v, idx, backend=backend)
        soft = hmmn_ops.gaussian_softmax(torch.randn(1, 32, 16) + q.sum(), centers, 1.0, size=(4, 4), backend=backend)
        return out.sum() + fine.sum() + soft.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v)
    got.backward()
    assert q.grad is not None and q.grad.isfinite().all()


# ---------------------------------------------------------------- 8. Triton bf16 under the interpreter


@pytest.mark.triton
def test_8_triton_interpreter_refuses_bfloat16(monkeypatch):
    pytest.importorskip("triton")
    from hmmn_ops.backends import _triton_module

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _triton_module()[0] is None:
        pytest.skip("hmmn_ops.triton does not import here")
    q, k, v = _read(dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        hmmn_ops.kernel_guided_read(q, k, v, backend="triton")
    with pytest.raises(RuntimeError, match="bfloat16"):
        hmmn_ops.local_track(q, q, 3, backend="triton")


# ---------------------------------------------------------------- 9. front nits


@pytest.mark.parametrize("frames,match", [
    (1, "topk_frames: expected a sequence"),
    ([0.7], "topk_frames: expected int frame indices"),
    ([True], "topk_frames: expected int frame indices"),
    ("01", "topk_frames: expected a sequence"),
    ([2], r"topk_frames: expected frame indices in \[-2, 2\)"),
    ([-3], r"topk_frames: expected frame indices in \[-2, 2\)"),
])
@pytest.mark.parametrize("topk", [0, 2])
def test_9_topk_frames_checked(frames, match, topk):
    q, k, v = _read()
    with pytest.raises(ValueError, match=match):
        hmmn_ops.kernel_guided_read(q, k, v, topk=topk, topk_frames=frames)


@pytest.mark.parametrize("scale", ["0.5", True, float("nan"), float("inf"), [0.5]])
def test_9_scale_must_be_a_real_number(scale):
    q, k, v = _read()
    with pytest.raises(ValueError, match="scale"):
        hmmn_ops.kernel_guided_read(q, k, v, scale=scale)
    with pytest.raises(ValueError, match="scale"):
        hmmn_ops.topk_guided_read(q[..., :2], k[..., :2], v[..., :2], torch.zeros(1, 6, 1, dtype=torch.int64),
                                  scale=scale)


@pytest.mark.parametrize("sigma", [True, "1.0", 1e300, float("nan"), float("inf"), 0.0, -1])
def test_9_sigma_must_be_a_positive_finite_number(sigma):
    q, k, v = _read(dtype=F)
    centers = torch.zeros(1, 2, 3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="sigma"):
        hmmn_ops.kernel_guided_read(q, k, v, centers, sigma)
    if not isinstance(sigma, (bool, str)):  # the same value inside a tensor
        with pytest.raises(ValueError, match="sigma"):
            hmmn_ops.kernel_guided_read(q, k, v, centers, torch.tensor([1.0, sigma], dtype=D))


def test_9_sigma_tensor_overflowing_the_dtype_is_refused():
    q, k, v = _read(dtype=F)
    centers = torch.zeros(1, 2, 3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="sigma"):
        hmmn_ops.kernel_guided_read(q, k, v, centers, torch.tensor([1.0, 1e300], dtype=D))


def test_9_empty_value_channels_name_memory_value():
    q, k, v = _read()
    with pytest.raises(ValueError, match="memory_value"):
        hmmn_ops.kernel_guided_read(q, k, v[:, :0])
    with pytest.raises(ValueError, match="memory_value"):
        hmmn_ops.topk_guided_read(q[..., :2], k[..., :2], v[:, :0, ..., :2], torch.zeros(1, 3, 1, dtype=torch.int64))


def test_9_empty_key_channels_refused_everywhere():
    q, k, v = _read()
    with pytest.raises(ValueError, match="query_key"):
        hmmn_ops.kernel_guided_read(q[:, :0], k[:, :0], v)
    with pytest.raises(ValueError, match="C"):
        hmmn_ops.local_track(q[:, :0], q[:, :0])
    with pytest.raises(ValueError, match="C"):
        hmmn_ops.global_track(k[:, :0], q[:, :0])


# ---------------------------------------------------------------- 10. index widths


@pytest.mark.parametrize("backend", cpu_backends("gaussian_softmax"))
def test_10_softmax_offsets_are_64_bit(backend):
    """Memory rows 2^31 // 15 + 1 elements apart: the last row's offset passes 2^31 (int32 wraps).
    The storage is a lazily allocated 4 GB float16 buffer, of which only the viewed elements
    are ever touched."""
    B, T, H, W = 1, 4, 2, 2
    M, N = T * H * W, H * W
    stride = 2**31 // (M - 1) + 1
    storage = torch.empty((M - 1) * stride + N, dtype=torch.float16)
    aff = storage.as_strided((B, M, N), (0, stride, 1))
    assert (M - 1) * stride >= 2**31
    aff.copy_(torch.randn(B, M, N))
    centers = torch.randint(-1, N, (B, T, H, W))
    want = hmmn_ops.gaussian_softmax(aff.double(), centers, 1.0, size=(H, W), backend="reference")
    got = hmmn_ops.gaussian_softmax(aff, centers, 1.0, size=(H, W), backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", cpu_backends("kernel_guided_read"))
def test_10_read_offsets_are_64_bit(backend):
    """memory_key / memory_value as views whose channel stride times channel passes 2^31 (a
    slice of a larger memory bank), lazily allocated: every backend reads the right elements."""
    B, Ck, T, H, W = 1, 3, 2, 2, 2
    stride = 2**31 // (Ck - 1) + 1
    storage = torch.empty((Ck - 1) * stride + T * H * W, dtype=torch.float16)
    k = storage.as_strided((B, Ck, T, H, W), (0, stride, H * W, W, 1))
    k.copy_(torch.randn(B, Ck, T, H, W))
    v = k[:, :2]
    q = torch.randn(B, Ck, H, W, dtype=torch.float16)
    want = hmmn_ops.kernel_guided_read(q.double(), k.double(), v.double(), backend="reference")
    idx = torch.randint(0, T * H * W, (B, H * W, 2))
    sparse = hmmn_ops.topk_guided_read(q.double(), k.double(), v.double(), idx, backend="reference")
    got = hmmn_ops.kernel_guided_read(q, k, v, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)
    got = hmmn_ops.topk_guided_read(q, k, v, idx, backend=backend)
    torch.testing.assert_close(got.double(), sparse, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- conventions: autocast, topk_frames


def test_autocast_casts_to_the_widest_dtype():
    q = torch.randn(1, 3, 3, 4, dtype=torch.bfloat16)
    k = torch.randn(1, 3, 2, 3, 4)
    v = torch.randn(1, 2, 2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hmmn_ops.kernel_guided_read(q, k, v)
        idx = hmmn_ops.global_track(k, q)
        track = hmmn_ops.local_track(k[:, :, 0], q)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, hmmn_ops.kernel_guided_read(q.float(), k, v))
    assert torch.equal(idx, hmmn_ops.global_track(k, q.float()))
    assert torch.equal(track, hmmn_ops.local_track(k[:, :, 0], q.float()))
    with pytest.raises(ValueError, match="memory_key"):
        hmmn_ops.kernel_guided_read(q, k, v)  # outside autocast: one dtype


def test_autocast_casts_memory_read_inputs_to_the_widest_dtype():
    q = torch.randn(1, 3, 5, dtype=torch.bfloat16)
    k, v = torch.randn(1, 3, 7), torch.randn(1, 2, 7)
    w, e = torch.rand(1, 1, 7, dtype=torch.bfloat16) + 0.5, torch.rand(1, 3, 5) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, usage = hmmn_ops.memory_read(q, k, v, similarity="l2", memory_shrinkage=w, query_selection=e, topk=3,
                                          return_usage=True)
    assert out.dtype == usage.dtype == torch.float32
    want, want_usage = hmmn_ops.memory_read(q.float(), k, v, similarity="l2", memory_shrinkage=w.float(),
                                            query_selection=e, topk=3, return_usage=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(usage, want_usage)
    with pytest.raises(ValueError, match="memory_key"):
        hmmn_ops.memory_read(q, k, v)  # outside autocast: one dtype


@pytest.mark.parametrize("backend", cpu_backends("kernel_guided_read"))
def test_topk_frames_negative_and_repeated(backend):
    q, k, v = _read(dtype=F, T=3)
    _, want = hmmn_ops.kernel_guided_read(q, k, v, topk=5, topk_frames=(0, 2), backend=backend)
    for frames in [(0, -1), (0, 2, -1), (-3, 2, 0)]:
        _, got = hmmn_ops.kernel_guided_read(q, k, v, topk=5, topk_frames=frames, backend=backend)
        assert torch.equal(got, want)
    _, one = hmmn_ops.kernel_guided_read(q[:, :, :], k[:, :, :1], v[:, :, :1], topk=3, topk_frames=(0, -1),
                                         backend=backend)
    _, one_ref = hmmn_ops.kernel_guided_read(q, k[:, :, :1], v[:, :, :1], topk=3, backend=backend)
    assert torch.equal(one, one_ref)
    with pytest.raises(ValueError, match="topk"):  # two distinct frames: at most 2*H*W
        hmmn_ops.kernel_guided_read(q, k, v, topk=25, topk_frames=(0, -1, 0), backend=backend)


@pytest.mark.parametrize("backend", cpu_backends("topk_guided_read"))
def test_topk_guided_read_topk_frames_uses_the_whole_memory(backend):
    q, k, v = _read(dtype=D, T=4, H=4, W=4)
    q3, k3, v3 = _read(dtype=D, T=4, H=8, W=8)
    frames = (0, -1)
    _, idx = hmmn_ops.kernel_guided_read(q, k, v, topk=6, topk_frames=frames)
    sliced = hmmn_ops.topk_guided_read(q3, k3[:, :, [0, 3]], v3[:, :, [0, 3]], idx, backend=backend)
    whole = hmmn_ops.topk_guided_read(q3, k3, v3, idx, topk_frames=frames, backend=backend)
    torch.testing.assert_close(whole, sliced)
    with pytest.raises(ValueError, match="topk_indices"):
        hmmn_ops.topk_guided_read(q3, k3, v3, idx + 16, topk_frames=frames, backend=backend)
    with pytest.raises(ValueError, match="topk_frames"):
        hmmn_ops.topk_guided_read(q3, k3, v3, idx, topk_frames=(4,), backend=backend)
