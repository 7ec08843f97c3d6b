"""memory_read (docs/ops.md section 7): the reference against a float64 brute force written from
the formula, the native C++ CPU kernels against the reference, gradients, registration, errors.

The brute force below restates the op for memory token p and query q:
    "dot": s[p, q] = scale * sum_c K[c, p] Q[c, q]
    "l2":  s[p, q] = -scale * w[p] * sum_c e[c, q] (K[c, p] - Q[c, q])^2
    P[:, q] = softmax over all p (topk == 0) or over the topk largest s[., q] (ties: smaller p)
    out[:, q] = sum_p P[p, q] V[:, p];  usage[p] = sum_q P[p, q]
"""
import os
import subprocess
import sys

import pytest
import torch

import hmmn_ops
from hmmn_ops import reference as ref
from hmmn_ops.backends import native_ops

OPS = torch.ops.hmmn_ops
D, F = torch.float64, torch.float32
HAS_NATIVE = "memory_read" in native_ops("cpu") and "memory_read_backward" in native_ops("cpu")
needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="no native CPU kernel for memory_read in this build")
KINDS = [("dot", False, False), ("l2", False, False), ("l2", True, False), ("l2", False, True), ("l2", True, True)]


def brute_force(q, k, v, similarity, w, e, scale, topk):
    """Canonical flat float64 inputs -> (out, usage, selected index lists), written per query."""
    B, Ck, Nq = q.shape
    Nm = k.shape[2]
    if similarity == "dot":
        s = scale * torch.einsum("bcp,bcq->bpq", k, q)
    else:
        w = torch.ones(B, Nm, dtype=D) if w is None else w
        e = torch.ones_like(q) if e is None else e
        s = -scale * w[:, :, None] * (e[:, :, None, :] * (k[:, :, :, None] - q[:, :, None, :]) ** 2).sum(1)
    probs = torch.zeros_like(s)
    selected = torch.zeros(B, Nq, topk, dtype=torch.int64)
    for b in range(B):
        for j in range(Nq):
            col = s[b, :, j].tolist()
            support = list(range(Nm))
            if topk:
                support = sorted(support, key=lambda p: (-col[p], p))[:topk]
                selected[b, j] = torch.tensor(support)
            logits = torch.tensor([col[p] for p in support], dtype=D)
            probs[b, support, j] = torch.softmax(logits, 0)
    return torch.bmm(v, probs), probs.sum(2), selected


def inputs(B, Ck, Cv, Q, M, dtype, shrink=False, select=False):
    q = torch.randn(B, Ck, *Q, dtype=dtype)
    k = torch.randn(B, Ck, *M, dtype=dtype)
    v = torch.randn(B, Cv, *M, dtype=dtype)
    w = torch.rand(B, 1, *M, dtype=dtype) + 0.5 if shrink else None
    e = torch.rand(B, Ck, *Q, dtype=dtype) + 0.2 if select else None
    return q, k, v, w, e


def read(q, k, v, w, e, similarity, topk=0, backend="auto", scale=None, usage=True):
    return hmmn_ops.memory_read(q, k, v, similarity=similarity, memory_shrinkage=w, query_selection=e, topk=topk,
                                scale=scale, return_usage=usage, backend=backend)


def flat(q, k, v, w, e):
    B, Ck, Cv = q.shape[0], q.shape[1], v.shape[1]
    return (q.reshape(B, Ck, -1), k.reshape(B, Ck, -1), v.reshape(B, Cv, -1),
            None if w is None else w.reshape(B, -1), None if e is None else e.reshape(B, Ck, -1))


def assert_close(got, want, tol):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert not torch.isnan(got).any()
    if want.numel():
        err = (got.double() - want.double()).abs().max().item()
        assert err <= tol * max(1.0, want.double().abs().max().item()), f"max abs error {err:.3e}"


# ---------------------------------------------------------------- reference vs the brute force


@pytest.mark.parametrize("similarity,shrink,select", KINDS)
@pytest.mark.parametrize("topk", [0, 1, 4, 15])
def test_reference_matches_brute_force(similarity, shrink, select, topk):
    q, k, v, w, e = inputs(2, 5, 3, (7,), (3, 5), D, shrink, select)
    out, usage = read(q, k, v, w, e, similarity, topk, backend="reference", scale=0.7)
    want_out, want_usage, want_idx = brute_force(*flat(q, k, v, w, e)[:3], similarity,
                                                 *flat(q, k, v, w, e)[3:], 0.7, topk)
    assert_close(out.reshape(want_out.shape), want_out, 1e-12)
    assert_close(usage.reshape(want_usage.shape), want_usage, 1e-12)
    _, _, idx, _ = ref.memory_read(*flat(q, k, v, w, e)[:3], *flat(q, k, v, w, e)[3:], similarity, 0.7, topk, False)
    assert torch.equal(idx, want_idx)


def test_reference_is_chunked(monkeypatch):
    """A tiny chunk budget (many query chunks) gives the same result as one chunk."""
    q, k, v, w, e = inputs(2, 4, 3, (9,), (11,), D, True, True)
    whole = read(q, k, v, w, e, "l2", 3, backend="reference")
    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 20)
    assert ref._chunks(9, 2 * 11 * 3)[0] == (0, 1)
    pieces = read(q, k, v, w, e, "l2", 3, backend="reference")
    for a, b in zip(whole, pieces):
        assert_close(a, b, 1e-14)


# ---------------------------------------------------------------- native vs reference


LAYOUTS = [((13,), (29,)), ((3, 5), (2, 3, 7)), ((1, 9), (4, 5)), ((2, 2, 3), (41,))]


@needs_native
@pytest.mark.parametrize("dtype", [D, F])
@pytest.mark.parametrize("similarity,shrink,select", KINDS)
@pytest.mark.parametrize("topk", [0, 1, 7])
def test_native_matches_reference(dtype, similarity, shrink, select, topk):
    for Q, M in LAYOUTS:
        q, k, v, w, e = inputs(2, 6, 5, Q, M, dtype, shrink, select)
        args = flat(q, k, v, w, e)
        got = OPS.memory_read(*args, similarity, 0.4, topk, True)
        # float64 reference of the same inputs: the oracle for both dtypes
        want = ref.memory_read(*(None if a is None else a.double() for a in args), similarity, 0.4, topk, True)
        if topk and dtype == F:
            assert_topk_agrees(got[2], want[2], args, similarity, 0.4)
            same = (got[2].sort(-1).values == want[2].sort(-1).values).all(-1)  # queries with the same set
            got_out, want_out = got[0].transpose(1, 2)[same], want[0].transpose(1, 2)[same]
        else:
            assert torch.equal(got[2], want[2])
            got_out, want_out = got[0], want[0]
            assert_close(got[3], want[3], 1e-4 if dtype == F else 1e-11)
        tol = 1e-4 if dtype == F else 1e-11
        assert got[0].dtype == dtype and got[1].dtype == dtype and got[3].dtype == dtype
        assert_close(got_out, want_out.to(dtype), tol)
        if not topk or dtype == D:
            assert_close(got[1], want[1], tol)


def scores64(args, similarity, scale):
    q, k, v, w, e = (None if a is None else a.double() for a in args)
    if similarity == "dot":
        return scale * torch.einsum("bcp,bcq->bqp", k, q)
    w = torch.ones(k.shape[0], k.shape[2], dtype=D) if w is None else w
    e = torch.ones_like(q) if e is None else e
    return -scale * w[:, None, :] * (e[:, :, :, None] * (k[:, :, None, :] - q[:, :, :, None]) ** 2).sum(1)


def assert_topk_agrees(got, want, args, similarity, scale, eps=1e-4):
    """The float32 near-tie rule: the selected sets may differ by one candidate per query, only
    where its score ties the k-th score to float32 rounding; the order is by descending score."""
    s = scores64(args, similarity, scale)
    for b in range(got.shape[0]):
        for j in range(got.shape[1]):
            a, c = set(got[b, j].tolist()), set(want[b, j].tolist())
            if a == c:
                continue
            extra, missing = a - c, c - a
            assert len(extra) == len(missing) == 1, (b, j, got[b, j], want[b, j])
            kth = s[b, j, want[b, j, -1]].item()
            for p in extra | missing:
                assert abs(s[b, j, p].item() - kth) <= eps * max(1.0, abs(kth)), (b, j, p, kth)


@needs_native
@pytest.mark.parametrize("similarity,shrink,select", [KINDS[0], KINDS[4]])
def test_native_views_and_transposed_layouts(similarity, shrink, select):
    """Non-contiguous inputs and (B, N, C) tensors passed as (B, C, N) views give the same read."""
    q, k, v, w, e = inputs(2, 6, 5, (17,), (23,), D, shrink, select)
    want = read(q, k, v, w, e, similarity, 3)
    t = lambda x: None if x is None else x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, C) storage
    n = lambda x: None if x is None else torch.stack([x, x], -1)[..., 0]                  # strided
    for f in (t, n):
        got = read(f(q), f(k), f(v), f(w), f(e), similarity, 3)
        assert not f(k).is_contiguous()
        for a, b in zip(got, want):
            assert_close(a, b, 1e-12)


@needs_native
@pytest.mark.parametrize("topk", [0, 3])
def test_native_batch_zero_and_k_equals_memory(topk):
    q, k, v, w, e = inputs(0, 4, 3, (5,), (6,), F, True, True)
    out, usage = read(q, k, v, w, e, "l2", topk)
    assert out.shape == (0, 3, 5) and usage.shape == (0, 6)
    # k = Nm: the top-k read is the full read
    q, k, v, w, e = inputs(2, 4, 3, (5,), (6,), D, True, True)
    full = read(q, k, v, w, e, "l2", 0)
    every = read(q, k, v, w, e, "l2", 6)
    for a, b in zip(full, every):
        assert_close(a, b, 1e-12)


@needs_native
@pytest.mark.parametrize("similarity,shrink,select", KINDS)
def test_native_ties_go_to_the_smaller_index(similarity, shrink, select):
    """Integer-valued inputs give exact ties: native and reference select the same indices."""
    B, Ck, Nq, Nm = 2, 3, 20, 40
    q = torch.randint(-1, 2, (B, Ck, Nq)).float()
    k = torch.randint(-1, 2, (B, Ck, Nm)).float()
    v = torch.randn(B, 4, Nm)
    w = torch.randint(1, 3, (B, Nm)).float() if shrink else None
    e = torch.randint(1, 3, (B, Ck, Nq)).float() if select else None
    for topk in (1, 5, 17):
        got = OPS.memory_read(q, k, v, w, e, similarity, 1.0, topk, True)
        want = ref.memory_read(q, k, v, w, e, similarity, 1.0, topk, True)
        assert torch.equal(got[2], want[2])
        brute = brute_force(q.double(), k.double(), v.double(), similarity, None if w is None else w.double(),
                            None if e is None else e.double(), 1.0, topk)
        assert torch.equal(got[2], brute[2])
        assert_close(got[0], brute[0], 1e-5)
        assert_close(got[3], brute[1], 1e-5)


@needs_native
def test_native_no_nan_when_every_score_is_hugely_negative():
    """scale 1e4 and distant keys: exp underflows for every memory token of a query."""
    for dtype in (F, D):
        q, k, v, w, e = inputs(1, 4, 3, (6,), (9,), dtype, True, True)
        k = k + 30.0
        for topk in (0, 2):
            for backend in ("native", "reference"):
                out, usage = read(q, k, v, w, e, "l2", topk, backend=backend, scale=1e4)
                assert torch.isfinite(out).all() and torch.isfinite(usage).all()
                assert (out.abs() <= v.abs().amax() * (1 + 1e-6)).all()  # a convex combination of values
                if dtype == D:  # (in float32, scores of 1e7 round to units: the softmax is that coarse)
                    assert_close(usage.sum(-1), torch.full((1,), 6.0, dtype=D), 1e-9)


_THREADS_SCRIPT = """
import torch, hmmn_ops
OPS = torch.ops.hmmn_ops
g = torch.Generator().manual_seed(SEED)
r = lambda *s: torch.rand(*s, generator=g) + 0.2
args = (r(2, 8, 150), r(2, 8, 700), r(2, 6, 700), r(2, 700), r(2, 8, 150))
res = []
for n in (1, 2):
    torch.set_num_threads(n)
    run = []
    for topk in (0, 5):
        out, lse, idx, usage = OPS.memory_read(*args, "l2", 0.3, topk, True)
        run += [out, lse, idx, usage]
        run += OPS.memory_read_backward(torch.ones_like(out), *args, out, lse, idx, "l2", 0.3)
    res.append(run)
print(all(torch.equal(a, b) for a, b in zip(*res)))
"""


@needs_native
def test_native_results_do_not_depend_on_thread_count():
    """Task boundaries depend on the shapes only. MKL itself may round differently inside and
    outside a parallel region unless told not to (MKL_CBWR), hence the subprocess."""
    env = dict(os.environ, MKL_CBWR="COMPATIBLE")
    script = _THREADS_SCRIPT.replace("SEED", str(torch.randint(0, 2**31, ()).item()))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("similarity,shrink,select", KINDS)
@pytest.mark.parametrize("topk", [0, 3])
def test_gradcheck(backend, similarity, shrink, select, topk):
    if backend == "native" and not HAS_NATIVE:
        pytest.skip("no native CPU kernel for memory_read")
    q, k, v, w, e = inputs(2, 4, 3, (2, 3), (7,), D, shrink, select)
    tensors = [x.requires_grad_() for x in (q, k, v, w, e) if x is not None]

    def f(*xs):
        it = iter(xs)
        q, k, v = next(it), next(it), next(it)
        w_ = next(it) if shrink else None
        e_ = next(it) if select else None
        return read(q, k, v, w_, e_, similarity, topk, backend=backend, usage=False)

    assert torch.autograd.gradcheck(f, tensors)


@needs_native
def test_native_gradients_match_reference_float32():
    q, k, v, w, e = inputs(2, 16, 8, (40,), (300,), F, True, True)
    for topk in (0, 30):
        grads = []
        for backend in ("native", "reference"):
            xs = [x.detach().double().requires_grad_() if backend == "reference" else x.detach().requires_grad_()
                  for x in (q, k, v, w, e)]
            out = read(*xs, "l2", topk, backend=backend, usage=False)
            out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
            grads.append([x.grad for x in xs])
            if topk and backend == "native":
                selected = OPS.memory_read(*flat(*xs), "l2", 0.25, topk, False)[2]
        if topk:  # a float32 near-tie at the k-th score may swap a candidate: then only the forward rule holds
            want = ref.memory_read(*(x.double() for x in flat(q, k, v, w, e)), "l2", 0.25, topk, False)[2]
            if not torch.equal(selected, want):
                assert_topk_agrees(selected, want, flat(q, k, v, w, e), "l2", 0.25)
                continue
        for a, b in zip(*grads):
            assert_close(a, b.float(), 2e-4)


def test_usage_is_not_differentiable():
    q, k, v, w, e = inputs(1, 3, 2, (4,), (5,), D)
    out, usage = read(q.requires_grad_(), k, v, w, e, "dot")
    assert out.requires_grad and not usage.requires_grad


# ---------------------------------------------------------------- registration


def test_opcheck():
    q, k, v, w, e = flat(*inputs(2, 3, 2, (4,), (5,), D, True, True))
    for topk in (0, 2):
        out, lse, idx, _ = ref.memory_read(q, k, v, w, e, "l2", 0.5, topk, False)
        grad = (torch.randn_like(out), q, k, v, w, e, out, lse, idx, "l2", 0.5)
        torch.library.opcheck(OPS.memory_read.default,
                              tuple(x.clone().requires_grad_() if isinstance(x, torch.Tensor) else x
                                    for x in (q, k, v, w, e)) + ("l2", 0.5, topk, True))
        torch.library.opcheck(OPS.memory_read_backward.default, grad)
    torch.library.opcheck(OPS.memory_read.default, (q, k, v, None, None, "dot", 0.5, 0, False))


def test_torch_compile_fullgraph():
    q, k, v, w, e = inputs(2, 4, 3, (3, 4), (2, 3, 4), F, True, True)

    def step(q, k, v, w, e):
        out, usage = hmmn_ops.memory_read(q, k, v, similarity="l2", memory_shrinkage=w, query_selection=e, topk=5,
                                          return_usage=True)
        return out * 2, usage

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    for a, b in zip(compiled(q, k, v, w, e), step(q, k, v, w, e)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- errors


def test_bad_inputs_name_the_argument():
    q, k, v, w, e = inputs(2, 4, 3, (5,), (2, 3), F, True, True)
    cases = [
        (dict(memory_shrinkage=w), "memory_shrinkage.*similarity"),                       # with "dot"
        (dict(query_selection=e), "query_selection.*similarity"),
        (dict(similarity="cos"), "similarity"),
        (dict(similarity="l2", memory_shrinkage=w[..., :2]), r"memory_shrinkage: expected shape \(2, 1, 2, 3\)"),
        (dict(similarity="l2", memory_shrinkage=w[:, 0]), "memory_shrinkage"),
        (dict(similarity="l2", query_selection=e[:, :2]), r"query_selection: expected shape \(2, 4, 5\)"),
        (dict(topk=7), r"topk: expected 0 .* \[1, Nm = 6\], got 7"),
        (dict(topk=-1), "topk"),
        (dict(topk=2.0), "topk"),
        (dict(scale=float("nan")), "scale"),
        (dict(backend="cuda"), "backend"),
        (dict(return_usage=1), "return_usage"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            hmmn_ops.memory_read(q, k, v, **kwargs)
    bad = [
        ((q, k[:, :3], v), r"memory_key: expected shape \(2, 4, \*M\)"),
        ((q, k, v[..., :2]), r"memory_value: expected shape \(2, Cv, 2, 3\)"),
        ((q, k, v[:1]), "memory_value"),
        ((q, k.double(), v), "memory_key: expected dtype torch.float32"),
        ((q[:, :, 0], k, v), "query_key: expected a tensor"),
        ((q, k, v.int()), "memory_value"),
        ((q, k[..., :0], v[..., :0]), "at least one memory token"),
        (([1.0], k, v), "query_key"),
    ]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            hmmn_ops.memory_read(*args)


@needs_native
def test_native_checks_name_the_argument():
    q, k, v, w, e = flat(*inputs(2, 4, 3, (5,), (6,), F, True, True))
    with pytest.raises(RuntimeError, match="memory_shrinkage"):
        OPS.memory_read(q, k, v, w, None, "dot", 0.5, 0, False)
    with pytest.raises(RuntimeError, match="topk"):
        OPS.memory_read(q, k, v, None, None, "dot", 0.5, 7, False)
    with pytest.raises(RuntimeError, match="memory_value"):
        OPS.memory_read(q, k, v[..., :3], None, None, "dot", 0.5, 0, False)
    out, lse, idx, _ = OPS.memory_read(q, k, v, None, None, "dot", 0.5, 2, False)
    with pytest.raises(RuntimeError, match="topk_indices"):
        OPS.memory_read_backward(out, q, k, v, None, None, out, lse, idx + 6, "dot", 0.5)
