"""The public front: gradients, op registration (opcheck, torch.compile), backends and errors."""
import pytest
import torch

import hmmn_ops
from hmmn_ops.backends import native_ops

D = torch.float64


def _read_inputs(B=2, Ck=3, Cv=2, T=2, H=3, W=4, dtype=D, grad=False):
    mk = torch.randn(B, Ck, T, H, W, dtype=dtype, requires_grad=grad)
    return (torch.randn(B, Ck, H, W, dtype=dtype, requires_grad=grad), mk,
            torch.randn(B, Cv, T, H, W, dtype=dtype, requires_grad=grad))


def _forced_backends():
    return ["auto", "reference"] + (["native"] if "kernel_guided_read" in native_ops("cpu") else [])


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("with_centers", [False, True])
def test_kernel_guided_read_gradcheck(backend, with_centers):
    qk, mk, mv = _read_inputs(grad=True)
    centers = torch.randint(-1, 12, (2, 2, 3, 4)) if with_centers else None
    sigma = torch.tensor([0.8, 1.5], dtype=D) if with_centers else None
    fn = lambda q, k, v: hmmn_ops.kernel_guided_read(q, k, v, centers, sigma, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qk, mk, mv))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_kernel_guided_read_with_topk_is_differentiable_in_out(backend):
    qk, mk, mv = _read_inputs(grad=True)
    fn = lambda q, k, v: hmmn_ops.kernel_guided_read(q, k, v, topk=3, topk_frames=(0, 1), backend=backend)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qk, mk, mv))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_topk_guided_read_gradcheck(backend):
    qk, mk, mv = _read_inputs(H=4, W=4, grad=True)
    indices = torch.randint(0, 2 * 4, (2, 4, 3))
    indices[:, :, 1] = indices[:, :, 0]  # duplicates accumulate twice in the memory grads
    fn = lambda q, k, v: hmmn_ops.topk_guided_read(q, k, v, indices, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qk, mk, mv))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gaussian_softmax_gradcheck(backend):
    aff = torch.randn(2, 2 * 6, 6, dtype=D, requires_grad=True)
    centers = torch.randint(-1, 6, (2, 2, 2, 3))
    fn = lambda a: hmmn_ops.gaussian_softmax(a, centers, torch.tensor([1.0, 2.0], dtype=D), size=(2, 3), backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (aff,))


def test_read_gradients_match_dense_autograd():
    """The analytic backward equals autograd through a dense softmax read."""
    qk, mk, mv = _read_inputs(grad=True)
    centers = torch.randint(-1, 12, (2, 2, 3, 4))
    sigma = torch.tensor([[0.7, 2.0], [1.0, 3.0]], dtype=D)
    g = torch.randn(2, 2, 3, 4, dtype=D)
    out = hmmn_ops.kernel_guided_read(qk, mk, mv, centers, sigma)
    grads = torch.autograd.grad(out, (qk, mk, mv), g)
    # dense: logits (B, M, HW)
    B, Ck, T, H, W = mk.shape
    q = torch.arange(H * W)
    c = centers.reshape(B, -1, 1)
    d2 = (q // W - c // W) ** 2 + (q % W - c % W) ** 2
    bias = torch.where(c >= 0, -d2 / (2 * sigma.repeat_interleave(H * W, 1).unsqueeze(-1) ** 2), 0.0)
    logits = mk.reshape(B, Ck, -1).transpose(1, 2) @ qk.reshape(B, Ck, -1) / Ck ** 0.5 + bias
    dense = (mv.reshape(B, 2, -1) @ logits.softmax(1)).view_as(out)
    torch.testing.assert_close(out, dense)
    for a, b in zip(grads, torch.autograd.grad(dense, (qk, mk, mv), g)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- op registration


def _canonical_samples():
    qk, mk, mv = _read_inputs()
    centers = torch.randint(-1, 12, (2, 2, 3, 4))
    sigma = torch.tensor([[0.7, 2.0], [1.0, 3.0]], dtype=D)
    out, lse, _ = torch.ops.hmmn_ops.kernel_guided_read(qk, mk, mv, centers, sigma, 0.5, 0, [])
    qk4, mk4, mv4 = _read_inputs(H=4, W=4)
    idx = torch.randint(0, 8, (2, 4, 3))
    tout, tlse = torch.ops.hmmn_ops.topk_guided_read(qk4, mk4, mv4, idx, 0.5, 2)
    aff = torch.randn(2, 24, 12, dtype=D)
    soft = torch.ops.hmmn_ops.gaussian_softmax(aff, centers, sigma, 3, 4)
    return {
        "kernel_guided_read": (qk, mk, mv, centers, sigma, 0.5, 3, [1, 0]),
        "kernel_guided_read_backward": (torch.randn_like(out), qk, mk, mv, centers, sigma, out, lse, 0.5),
        "gaussian_softmax": (aff, centers, sigma, 3, 4),
        "gaussian_softmax_backward": (torch.randn_like(soft), soft),
        "local_track": (qk, torch.randn_like(qk), 3),
        "global_track": (mk, qk),
        "topk_guided_read": (qk4, mk4, mv4, idx, 0.5, 2),
        "topk_guided_read_backward": (torch.randn_like(tout), qk4, mk4, mv4, idx, tout, tlse, 0.5, 2),
    }


@pytest.mark.parametrize("op", sorted(_canonical_samples()))
def test_opcheck(op):
    args = list(_canonical_samples()[op])
    if op in ("kernel_guided_read", "gaussian_softmax", "topk_guided_read"):
        args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() and i < 3 and op != "gaussian_softmax"
                or (op == "gaussian_softmax" and i == 0) else a for i, a in enumerate(args)]
    torch.library.opcheck(getattr(torch.ops.hmmn_ops, op).default, tuple(args))


def test_torch_compile_fullgraph():
    qk, mk, mv = _read_inputs(dtype=torch.float32, H=4, W=4)
    centers = torch.randint(-1, 16, (2, 2, 4, 4))

    def step(qk, mk, mv):
        out, idx = hmmn_ops.kernel_guided_read(qk, mk, mv, centers, torch.tensor([1.0, 2.0]), topk=2, topk_frames=(0, 1))
        cells = idx[:, ::4][:, :4]  # any valid coarse indices for a 2x2 coarse grid: positions < 2*16 -> remap
        fine = hmmn_ops.topk_guided_read(qk, mk, mv, cells % 8)
        return out + fine, hmmn_ops.local_track(qk, qk)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got, track = compiled(qk, mk, mv)
    want, want_track = step(qk, mk, mv)
    torch.testing.assert_close(got, want)
    assert torch.equal(track, want_track)


def test_backends_report_says_why():
    report = hmmn_ops.backends("cpu")
    assert set(report) == {"auto", "reference", "native", "triton", "cuda_emulated"}
    assert all(why is None for why in report["reference"].values())
    assert report["auto"]["kernel_guided_read"] in ("native", "reference")
    for op, why in report["native"].items():
        assert (why is None) == (op in native_ops("cpu"))


def test_forced_backend_that_cannot_run_raises_and_says_why(monkeypatch):
    qk, mk, mv = _read_inputs()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
        hmmn_ops.kernel_guided_read(qk, mk, mv, backend="triton")
    if torch.cuda.is_available():
        return
    with pytest.raises(RuntimeError, match="backend='native'") as info:
        hmmn_ops.local_track(qk.to("meta"), qk.to("meta"), backend="native")
    assert "meta" in str(info.value)


# ---------------------------------------------------------------- errors


def _bad_calls():
    qk, mk, mv = _read_inputs()
    c = torch.zeros(2, 2, 3, 4, dtype=torch.int64)
    idx = torch.zeros(2, 1, 2, dtype=torch.int64)  # r = 3 does not divide W = 4
    return [
        ("query_key", lambda: hmmn_ops.kernel_guided_read(qk[0], mk, mv)),
        ("memory_key", lambda: hmmn_ops.kernel_guided_read(qk, mk[:, :, :, :2], mv)),
        ("memory_key", lambda: hmmn_ops.kernel_guided_read(qk, mk[:, :, :0], mv[:, :, :0])),
        ("memory_value", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv[:, :, :1])),
        ("memory_value", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv.float())),
        ("query_key", lambda: hmmn_ops.kernel_guided_read(qk.long(), mk, mv)),
        ("centers and sigma", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, c)),
        ("centers", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, c.int(), 1.0)),
        ("centers", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, c[:, :1], 1.0)),
        ("centers", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, c + 12, 1.0)),
        ("centers", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, c - 2, 1.0)),
        ("sigma", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, c, torch.ones(3))),
        ("sigma", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, c, torch.tensor([1.0, 0.0]))),
        ("sigma", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, c, -1.0)),
        ("topk", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, topk=-1)),
        ("topk", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, topk=13, topk_frames=(0,))),
        ("topk_frames", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, topk=2, topk_frames=(0, -3))),
        ("topk_frames", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, topk=2, topk_frames=(2,))),
        ("topk_frames", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, topk=2, topk_frames=())),
        ("backend", lambda: hmmn_ops.kernel_guided_read(qk, mk, mv, backend="cuda")),
        ("affinity", lambda: hmmn_ops.gaussian_softmax(torch.zeros(2, 24, 11, dtype=D), c, 1.0, size=(3, 4))),
        ("size", lambda: hmmn_ops.gaussian_softmax(torch.zeros(2, 24, 12, dtype=D), c, 1.0, size=3)),
        ("window", lambda: hmmn_ops.local_track(qk, qk, 4)),
        ("window", lambda: hmmn_ops.local_track(qk, qk, 0)),
        ("query_key", lambda: hmmn_ops.local_track(qk, qk[:, :, :2])),
        ("memory_key", lambda: hmmn_ops.global_track(mk[:, :2], qk)),
        ("topk_indices", lambda: hmmn_ops.topk_guided_read(qk, mk, mv, idx)),
        ("topk_indices", lambda: hmmn_ops.topk_guided_read(qk, mk, mv, torch.zeros(2, 3, 2, dtype=torch.int32))),
        ("topk_indices", lambda: hmmn_ops.topk_guided_read(qk, mk, mv, torch.full((2, 3, 2), 6))),  # r=2: T*Hc*Wc=4? H=3
        ("topk_indices", lambda: hmmn_ops.topk_guided_read(qk, mk, mv, torch.full((2, 12, 2), 24))),
        ("topk_indices", lambda: hmmn_ops.topk_guided_read(qk, mk, mv, torch.zeros(2, 12, 0, dtype=torch.int64))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_naming_the_argument(case):
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(name), str(info.value)
    assert "expected" in str(info.value) or "give both" in str(info.value) or "listed twice" in str(info.value)
