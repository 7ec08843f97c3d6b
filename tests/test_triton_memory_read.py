"""Triton kernels of memory_read (hmmn_ops/triton/memory.py) against the reference.

On a CPU machine they run in Triton's interpreter, at tiny shapes, in float32/float64:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/test_triton_memory_read.py

(bfloat16 is not tested under the interpreter: its tl.dot on bfloat16 is wrong upstream.)
Without TRITON_INTERPRET=1 and without a GPU every test skips and says so.
"""

import pytest
import torch

import hmmn_ops
from hmmn_ops import reference

from inputs import LAYOUTS, triton_device

INTERPRET, DEVICE = triton_device()

import hmmn_ops.triton as tri  # noqa: E402  (after the skip: importing it is what needs Triton)

pytestmark = pytest.mark.triton

F32, F64 = torch.float32, torch.float64
TOL = {F32: dict(rtol=2e-5, atol=2e-5), F64: dict(rtol=1e-10, atol=1e-10)}


def _close(got, want, **tol):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **(tol or TOL.get(want.dtype, {})))


def _inputs(B, Ck, Cv, N, M, similarity, shrinkage, selection, dtype=F32, layout="contig", keys=None):
    """Canonical memory_read arguments (q, k, v, w, e); ``keys`` builds Q and K (default randn)."""
    lay = LAYOUTS[layout]
    keys = keys or (lambda *s: torch.randn(*s, dtype=dtype, device=DEVICE))
    q, k = lay(keys(B, Ck, N)), lay(keys(B, Ck, M))
    v = lay(torch.randn(B, Cv, M, dtype=dtype, device=DEVICE))
    w = e = None
    if similarity == "l2":
        w = torch.rand(B, M, dtype=dtype, device=DEVICE) + 0.5 if shrinkage else None
        e = lay(torch.rand(B, Ck, N, dtype=dtype, device=DEVICE) + 0.5) if selection else None
    return q, k, v, w, e


# similarity, shrinkage, selection, topk, dtype
FORWARD_CASES = {
    "dot": ("dot", False, False, 0, F32),
    "dot,k=1": ("dot", False, False, 1, F32),
    "l2(stcn),k=4": ("l2", False, False, 4, F32),
    "l2(stcn),full,f64": ("l2", False, False, 0, F64),
    "l2+w+e,full": ("l2", True, True, 0, F32),
    "l2+w+e,k=5,f64": ("l2", True, True, 5, F64),
    "l2+w,k=Nm": ("l2", True, False, -1, F32),
    "l2+e,full,f64": ("l2", False, True, 0, F64),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_and_usage_match_reference(case):
    similarity, shrinkage, selection, topk, dtype = FORWARD_CASES[case]
    B, Ck, Cv, N, M = 2, 5, 19, 21, 23  # Cv over two value tiles, odd sizes everywhere
    topk = M if topk < 0 else topk
    args = (*_inputs(B, Ck, Cv, N, M, similarity, shrinkage, selection, dtype), similarity, 0.7, topk, True)
    got, want = tri.memory_read(*args), reference.memory_read(*args)
    assert torch.equal(got[2], want[2])  # random floats: no (near-)ties
    for g, w in zip((got[0], got[1], got[3]), (want[0], want[1], want[3])):
        _close(g, w)
    assert got[0].is_contiguous() and got[3].shape == (B, M)


def test_forward_without_usage_and_split_memory():
    # One query block and one value tile: the memory axis is split over programs and combined.
    args = (*_inputs(1, 3, 4, 5, 57, "l2", True, True), "l2", 0.9, 0, False)
    got, want = tri.memory_read(*args), reference.memory_read(*args)
    _close(got[0], want[0])
    _close(got[1], want[1])
    assert got[3].shape == want[3].shape == (1, 0)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_non_contiguous_inputs(layout):
    args = (*_inputs(2, 4, 3, 7, 9, "l2", True, True, layout=layout), "l2", 0.5, 3, True)
    got, want = tri.memory_read(*args), reference.memory_read(*args)
    assert torch.equal(got[2], want[2])
    for i in (0, 1, 3):
        _close(got[i], want[i])


@pytest.mark.parametrize("topk", [0, 2])
def test_empty_batch_and_queries(topk):
    for B, N in ((0, 5), (2, 0)):
        q, k, v, w, e = _inputs(B, 3, 4, N, 6, "l2", True, True)
        out, lse, idx, usage = tri.memory_read(q, k, v, w, e, "l2", 0.5, topk, True)
        assert out.shape == (B, 4, N) and lse.shape == (B, N) and idx.shape == (B, N, topk)
        assert usage.shape == (B, 6) and not usage.any()
        grads = tri.memory_read_backward(torch.randn(B, 4, N), q, k, v, w, e, out, lse, idx, "l2", 0.5)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, w.shape, e.shape]


def test_topk_ties_go_to_the_smaller_index():
    # Integer keys make every score exact: ties everywhere, and the order must be the reference's.
    ints = lambda *s: torch.randint(-1, 2, s, device=DEVICE).to(F32)  # noqa: E731
    for similarity in ("dot", "l2"):
        args = (*_inputs(2, 3, 2, 6, 17, similarity, False, False, keys=ints), similarity, 1.0, 7, True)
        got, want = tri.memory_read(*args), reference.memory_read(*args)
        assert torch.equal(got[2], want[2])
        _close(got[0], want[0])
        _close(got[3], want[3])
    q = torch.randn(1, 2, 3, device=DEVICE)
    _, _, idx, _ = tri.memory_read(q, torch.zeros(1, 2, 5, device=DEVICE), torch.randn(1, 1, 5, device=DEVICE),
                                   None, None, "dot", 1.0, 5, False)
    assert idx[0].tolist() == [list(range(5))] * 3


@pytest.mark.parametrize("dtype", [F32, F64])
def test_hugely_negative_scores_still_give_a_softmax(dtype):
    # l2 scores around -1e5: exp underflows to 0 everywhere (the released codes' 0/0).
    q, k, v, w, e = _inputs(1, 4, 3, 6, 11, "l2", True, False, dtype=dtype)
    k = k + 100.0
    for topk in (0, 3):
        got = tri.memory_read(q, k, v, w, e, "l2", 2.0, topk, True)
        want = reference.memory_read(q, k, v, w, e, "l2", 2.0, topk, True)
        assert all(torch.isfinite(x).all() for x in (got[0], got[1], got[3]))
        _close(got[0], want[0], rtol=1e-4, atol=1e-4)


# similarity, shrinkage, selection, topk, dtype
BACKWARD_CASES = {
    "dot,full": ("dot", False, False, 0, F32),
    "l2+w+e,full,f64": ("l2", True, True, 0, F64),
    "l2(stcn),full": ("l2", False, False, 0, F32),
    "l2+w+e,k=3": ("l2", True, True, 3, F32),
    "dot,k=Nm,f64": ("dot", False, False, -1, F64),
    "l2+e,k=1,f64": ("l2", False, True, 1, F64),
}


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_backward_matches_reference(case):
    similarity, shrinkage, selection, topk, dtype = BACKWARD_CASES[case]
    B, Ck, Cv, N, M = 2, 5, 19, 13, 21
    topk = M if topk < 0 else topk
    inputs = _inputs(B, Ck, Cv, N, M, similarity, shrinkage, selection, dtype)
    out, lse, idx, _ = reference.memory_read(*inputs, similarity, 0.6, topk, False)
    grad_out = torch.randn_like(out).transpose(1, 2).contiguous().transpose(1, 2)  # strided dO
    args = (grad_out, *inputs, out, lse, idx, similarity, 0.6)
    got, want = tri.memory_read_backward(*args), reference.memory_read_backward(*args)
    tol = TOL[F64] if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
    for g, w in zip(got, want):
        _close(g, w, **tol)


def test_public_api_forward_and_gradients_match_reference():
    B, Ck, Cv = 2, 4, 6
    base = [torch.randn(B, Ck, 2, 3, dtype=F64), torch.randn(B, Ck, 2, 2, 3, dtype=F64),
            torch.randn(B, Cv, 2, 2, 3, dtype=F64), torch.rand(B, 1, 2, 2, 3, dtype=F64) + 0.5,
            torch.rand(B, Ck, 2, 3, dtype=F64) + 0.5]
    for topk in (0, 4):
        results = {}
        for backend in ("triton", "reference"):
            leaves = [x.clone().requires_grad_(True) for x in base]
            out, usage = hmmn_ops.memory_read(*leaves[:3], similarity="l2", memory_shrinkage=leaves[3],
                                              query_selection=leaves[4], topk=topk, return_usage=True,
                                              backend=backend)
            grads = torch.autograd.grad((out * torch.arange(out.numel(), dtype=F64).view_as(out)).sum(), leaves)
            results[backend] = (out, usage, *grads)
        for g, w in zip(results["triton"], results["reference"]):
            _close(g, w)
