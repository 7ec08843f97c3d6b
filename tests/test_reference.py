"""reference.py (and the public front on top of it) against brute-force loops from docs/ops.md."""
import pytest
import torch

import hmmn_ops
from hmmn_ops import reference

import bruteforce as bf

D = torch.float64


def _noncontig(x):
    """Same values, non-contiguous storage (channels moved last, then viewed back)."""
    perm = list(range(x.dim()))
    perm = [0] + perm[2:] + [1]
    inv = [perm.index(i) for i in range(x.dim())]
    return x.permute(perm).contiguous().permute(inv)


@pytest.fixture(params=[False, True], ids=["contig", "noncontig"])
def layout(request):
    return _noncontig if request.param else (lambda x: x)


@pytest.fixture(params=[None, 8], ids=["one-chunk", "many-chunks"])
def chunked(request, monkeypatch):
    # A tiny chunk budget forces every chunked loop of reference.py through several chunks.
    if request.param:
        monkeypatch.setattr(reference, "CHUNK_ELEMENTS", request.param)


def _read_inputs(B, Ck, Cv, T, H, W, layout):
    qk = layout(torch.randn(B, Ck, H, W, dtype=D))
    mk = layout(torch.randn(B, Ck, T, H, W, dtype=D))
    mv = layout(torch.randn(B, Cv, T, H, W, dtype=D))
    return qk, mk, mv


@pytest.mark.parametrize("B,Ck,Cv,T,H,W", [(1, 3, 2, 1, 3, 4), (2, 4, 3, 2, 3, 5), (1, 2, 5, 3, 1, 7)])
@pytest.mark.parametrize("with_centers", [False, True])
def test_kernel_guided_read_matches_bruteforce(B, Ck, Cv, T, H, W, with_centers, layout, chunked):
    qk, mk, mv = _read_inputs(B, Ck, Cv, T, H, W, layout)
    centers = sigma = None
    if with_centers:
        centers = torch.randint(-1, H * W, (B, T, H, W))
        centers[..., 0, 0] = H * W - 1  # a far corner: the bias is largest at the border
        sigma = torch.rand(B, T, dtype=D) * 2 + 0.5
    frames = [T - 1, 0] if T > 1 else [0]
    topk = min(3, len(frames) * H * W)
    expected, expected_idx = bf.kernel_guided_read(qk, mk, mv, centers, sigma, 0.7, topk, frames)
    for backend in ("auto", "reference"):
        out, idx = hmmn_ops.kernel_guided_read(qk, mk, mv, centers, sigma, scale=0.7, topk=topk, topk_frames=frames,
                                               backend=backend)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        assert torch.equal(idx, expected_idx)
        assert out.dtype == D and idx.dtype == torch.int64


def test_kernel_guided_read_default_scale_and_topk_frames():
    qk, mk, mv = _read_inputs(1, 4, 2, 2, 2, 3, lambda x: x)
    out, idx = hmmn_ops.kernel_guided_read(qk, mk, mv, topk=12)
    expected, expected_idx = bf.kernel_guided_read(qk, mk, mv, topk=12)
    torch.testing.assert_close(out, expected)
    assert torch.equal(idx, expected_idx)
    assert torch.equal(idx.sort(-1).values, torch.arange(12).expand(1, 6, 12))  # all positions, each once


def test_kernel_guided_read_topk_ties_go_to_smaller_index():
    qk = torch.randn(1, 3, 2, 2, dtype=D)
    mk = torch.zeros(1, 3, 2, 2, 2, dtype=D)  # every logit equal
    mv = torch.randn(1, 2, 2, 2, 2, dtype=D)
    _, idx = hmmn_ops.kernel_guided_read(qk, mk, mv, topk=5, topk_frames=[1, 0])
    assert torch.equal(idx, torch.arange(5).expand(1, 4, 5))


def test_tiny_sigma_on_a_large_grid_gives_no_nan():
    # The papers' softmax-then-multiply form underflows to 0/0 here; the log-space form must not.
    H, W = 68, 120
    qk = torch.randn(1, 4, H, W)
    mk = torch.randn(1, 4, 1, H, W) * 10
    mv = torch.randn(1, 2, 1, H, W)
    centers = torch.full((1, 1, H, W), H * W - 1)  # every memory pixel centred on the far corner
    out = hmmn_ops.kernel_guided_read(qk, mk, mv, centers, torch.tensor([0.5]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("T,H,W", [(1, 2, 3), (2, 3, 3)])
def test_gaussian_softmax_matches_bruteforce(T, H, W, layout, chunked):
    B = 2
    aff = torch.randn(B, T * H * W, H * W, dtype=D)
    aff = aff.transpose(1, 2).contiguous().transpose(1, 2) if layout is _noncontig else aff
    centers = torch.randint(-1, H * W, (B, T, H, W))
    sigma = torch.rand(T, dtype=D) + 0.5
    expected = bf.gaussian_softmax(aff, centers, sigma, H, W)
    for backend in ("auto", "reference"):
        out = hmmn_ops.gaussian_softmax(aff, centers, sigma, size=(H, W), backend=backend)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("H,W,window", [(5, 6, 3), (4, 7, 5), (3, 3, 9), (1, 5, 1), (6, 5, 7)])
def test_local_track_matches_bruteforce(H, W, window, layout):
    mk = layout(torch.randn(2, 3, H, W, dtype=D))
    qk = layout(torch.randn(2, 3, H, W, dtype=D))
    expected = bf.local_track(mk, qk, window)
    for backend in ("auto", "reference"):
        assert torch.equal(hmmn_ops.local_track(mk, qk, window, backend=backend), expected)


def test_local_track_ties_and_window_clipped_to_the_frame():
    H, W = 4, 5
    mk = torch.zeros(1, 2, H, W, dtype=D)
    qk = torch.randn(1, 2, H, W, dtype=D)
    out = hmmn_ops.local_track(mk, qk, 3)  # all scores 0: the smallest index in each clipped window
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    assert torch.equal(out[0], (ys - 1).clamp_min(0) * W + (xs - 1).clamp_min(0))


@pytest.mark.parametrize("T,H,W", [(1, 2, 3), (3, 3, 2)])
def test_global_track_matches_bruteforce(T, H, W, layout, chunked):
    mk = layout(torch.randn(2, 3, T, H, W, dtype=D))
    qk = layout(torch.randn(2, 3, H, W, dtype=D))
    qk[0, :, 1, 1] = qk[0, :, 0, 1]  # a duplicated query: ties go to the smaller index
    expected = bf.global_track(mk, qk)
    for backend in ("auto", "reference"):
        assert torch.equal(hmmn_ops.global_track(mk, qk, backend=backend), expected)


@pytest.mark.parametrize("T,H,W,r,k", [(1, 2, 2, 1, 1), (2, 4, 6, 2, 3), (2, 6, 3, 3, 2), (1, 4, 4, 4, 1)])
def test_topk_guided_read_matches_bruteforce(T, H, W, r, k, layout, chunked):
    B, Ck, Cv = 2, 3, 2
    qk, mk, mv = _read_inputs(B, Ck, Cv, T, H, W, layout)
    cells = (H // r) * (W // r)
    indices = torch.randint(0, T * cells, (B, cells, k))
    if k > 1:
        indices[:, 0, 1] = indices[:, 0, 0]  # a duplicated index counts twice
    expected = bf.topk_guided_read(qk, mk, mv, indices, 0.9)
    for backend in ("auto", "reference"):
        out = hmmn_ops.topk_guided_read(qk, mk, mv, indices, scale=0.9, backend=backend)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_empty_batch_gives_empty_outputs():
    qk, mk, mv = _read_inputs(0, 3, 2, 2, 4, 4, lambda x: x)
    out, idx = hmmn_ops.kernel_guided_read(qk, mk, mv, topk=2)
    assert out.shape == (0, 2, 4, 4) and idx.shape == (0, 16, 2)
    assert hmmn_ops.topk_guided_read(qk, mk, mv, torch.zeros(0, 4, 2, dtype=torch.int64)).shape == (0, 2, 4, 4)
    assert hmmn_ops.local_track(qk, qk).shape == (0, 4, 4)
    assert hmmn_ops.global_track(mk, qk).shape == (0, 2, 4, 4)
    aff = torch.zeros(0, 32, 16, dtype=D)
    assert hmmn_ops.gaussian_softmax(aff, torch.zeros(0, 2, 4, 4, dtype=torch.int64), 1.0, size=(4, 4)).shape == aff.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_follows_float64(dtype):
    qk, mk, mv = _read_inputs(1, 8, 4, 2, 5, 6, lambda x: x)
    expected = hmmn_ops.kernel_guided_read(qk, mk, mv)
    out = hmmn_ops.kernel_guided_read(qk.to(dtype), mk.to(dtype), mv.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=0.05 if dtype == torch.bfloat16 else 1e-5, atol=0.05 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_batch_backward(backend):
    qk, mk, mv = (t.requires_grad_() for t in _read_inputs(0, 3, 2, 2, 4, 4, lambda x: x))
    out = hmmn_ops.kernel_guided_read(qk, mk, mv, torch.zeros(0, 2, 4, 4, dtype=torch.int64), 1.0, backend=backend)
    out = out.sum() + hmmn_ops.topk_guided_read(qk, mk, mv, torch.zeros(0, 4, 2, dtype=torch.int64), backend=backend).sum()
    out.backward()
    assert qk.grad.shape == qk.shape and mk.grad.shape == mk.shape and mv.grad.shape == mv.shape
