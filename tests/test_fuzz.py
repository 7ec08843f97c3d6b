"""Property-based fuzzing of every op on every CPU backend (hypothesis).

Draws shapes, strides (non-contiguous views), dtypes, k, r, window, sigma, centers, scales and
NaN / inf / huge values, sometimes out of range, and checks the rules of docs/reliability.md:

- bad input: a ValueError / RuntimeError whose message names an argument of the op;
- otherwise: the right shapes and dtypes; indices in range; no NaN where the inputs are finite;
  a read is a convex combination of the values (inside their range per channel); at moderate
  magnitudes the result equals the float64 reference within tolerance and the selected top-k /
  argmax scores equal the float64 ones; with exactly representable inputs (small integers,
  scale 1, sigma a power of two) every backend returns the very same indices, NaN ranking as -inf.

Backends: native and reference always; cuda_emulated when this build has it; Triton under its
interpreter (TRITON_INTERPRET=1) at tiny sizes, in the ``triton``-marked tests.

CI runs a fixed, derandomized set of examples (about a minute on two cores). A longer, random
run: ``HMMN_FUZZ=long python -m pytest tests/test_fuzz.py`` (HMMN_FUZZ_EXAMPLES=n sets the count).
"""
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hmmn_ops  # noqa: E402
from hmmn_ops.backends import refusal  # noqa: E402

LONG = os.environ.get("HMMN_FUZZ") == "long"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=int(os.environ.get("HMMN_FUZZ_EXAMPLES", 2000)), deadline=None,
                          database=None, suppress_health_check=list(HealthCheck))
PROFILE = "long" if LONG else "ci"
TRITON_EXAMPLES = None if LONG else 10  # the interpreter is slow: a few tiny examples in CI

OPS = ("kernel_guided_read", "gaussian_softmax", "local_track", "global_track", "topk_guided_read")
# The argument names an error may name (with the words of the front's messages).
ARGS = {
    "kernel_guided_read": ("query_key", "memory_key", "memory_value", "centers", "sigma", "scale", "topk",
                           "topk_frames"),
    "gaussian_softmax": ("affinity", "centers", "sigma", "size"),
    "local_track": ("memory_key", "query_key", "window"),
    "global_track": ("memory_key", "query_key"),
    "topk_guided_read": ("query_key", "memory_key", "memory_value", "topk_indices", "scale", "topk_frames"),
}


def _available(backend, op):
    try:
        return refusal(backend, op, "cpu") is None
    except Exception:
        return False


def cpu_backends(op):
    return [b for b in ("native", "reference", "cuda_emulated") if _available(b, op)]


# ---------------------------------------------------------------- drawing inputs


@st.composite
def values(draw, shape, dtype, exact):
    """A tensor of ``shape`` in a drawn layout (contiguous, permuted storage, strided slice,
    expanded batch), with drawn magnitude and occasional NaN / inf / huge entries. Returns
    (tensor, specials) where specials says whether it holds NaN/inf."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if exact:
        x = torch.randint(-2, 3, shape, generator=g).to(torch.float64)
    else:
        mag = draw(st.sampled_from([1.0, 1.0, 1.0, 30.0, 1e4, 1e19, 1e30]))
        x = torch.randn(shape, generator=g, dtype=torch.float64) * mag
    specials = False
    n = x.numel()
    if n and draw(st.integers(0, 5)) == 0:
        # (no huge finite value when exact: sums of it would round in an order-dependent way)
        kind = draw(st.sampled_from([math.nan, math.inf, -math.inf] + ([] if exact else [3e38])))
        flat = x.view(-1)
        for i in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3)):
            flat[i] = kind
        specials = not math.isfinite(kind) or dtype != torch.float64
    x = x.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "permuted", "strided", "expanded"]))
    if layout == "permuted" and x.dim() > 1:
        perm = list(range(x.dim()))[::-1]
        x = x.permute(*perm).contiguous().permute(*[perm.index(i) for i in range(x.dim())])
    elif layout == "strided":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=dtype)
        wide[..., 1::2] = x
        x = wide[..., 1::2]
    elif layout == "expanded" and x.shape[0] == 2:
        x = x[:1].expand(*x.shape)
    return x, specials


def _dtype(draw, exact):
    if exact:  # small integers: exact in float32 too
        return draw(st.sampled_from([torch.float32, torch.float64]))
    return draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16]))


@st.composite
def read_case(draw, tiny=False):
    exact = draw(st.booleans())
    dtype = _dtype(draw, exact)
    B = draw(st.integers(0 if not tiny else 1, 2))
    Ck, Cv = draw(st.integers(1, 4)) * (draw(st.integers(0, 19)) > 0), draw(st.integers(1, 3))  # Ck = 0 sometimes
    T = draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 4 if tiny else 7)), draw(st.integers(1, 4 if tiny else 7))
    q, sq = draw(values((B, Ck, H, W), dtype, exact))
    k, sk = draw(values((B, Ck, T, H, W), dtype, exact))
    v, sv = draw(values((B, Cv, T, H, W), dtype, exact))
    kwargs = {}
    if draw(st.booleans()):
        c = torch.randint(-1, H * W, (B, T, H, W), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
        if draw(st.integers(0, 9)) == 0:
            c = c + H * W  # out of range
        sigma = draw(st.sampled_from([0.5, 1.0, 2.0] if exact else [0.5, 1.0, 3.0, 0.5, 1.0, 3.0, 1e-19, 1e-30, 1e30,
                                                                    0.0, -1.0]))
        kwargs.update(centers=c, sigma=sigma)
    if exact:
        kwargs["scale"] = 1.0
    elif draw(st.booleans()):
        kwargs["scale"] = draw(st.sampled_from([0.1, 1.0, 10.0, 1e38, -1.0, 0.0]))
    F = T
    if draw(st.booleans()):
        bad = draw(st.integers(0, 9)) == 0  # sometimes out of range or empty
        frames = draw(st.lists(st.integers(-T - 1, T) if bad else st.integers(-T, T - 1), min_size=0 if bad else 1,
                               max_size=4))
        kwargs["topk_frames"] = frames
        F = len({f % T for f in frames if -T <= f < T})
    kwargs["topk"] = draw(st.integers(0, min(F * H * W + 1, 6)))
    return dict(args=(q, k, v), kwargs=kwargs, exact=exact, specials=sq or sk or sv, dtype=dtype)


@st.composite
def softmax_case(draw, tiny=False):
    exact = draw(st.booleans())
    dtype = _dtype(draw, exact)
    B, T = draw(st.integers(0 if not tiny else 1, 2)), draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 4 if tiny else 6)), draw(st.integers(1, 4 if tiny else 6))
    a, sa = draw(values((B, T * H * W, H * W), dtype, exact))
    c = torch.randint(-1, H * W, (B, T, H, W), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    sigma = draw(st.sampled_from([0.5, 1.0, 2.0] if exact else [0.5, 1.0, 3.0, 1e-19, 1e-30, 1e30, 0.0]))
    return dict(args=(a, c, sigma), kwargs=dict(size=(H, W)), exact=exact, specials=sa, dtype=dtype)


@st.composite
def track_case(draw, glob, tiny=False):
    exact = draw(st.booleans())
    dtype = _dtype(draw, exact)
    B, C, T = draw(st.integers(0 if not tiny else 1, 2)), draw(st.integers(0 if not tiny else 1, 4)), draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 4 if tiny else 9)), draw(st.integers(1, 4 if tiny else 9))
    q, sq = draw(values((B, C, H, W), dtype, exact))
    if glob:
        k, sk = draw(values((B, C, T, H, W), dtype, exact))
        return dict(args=(k, q), kwargs={}, exact=exact, specials=sq or sk, dtype=dtype)
    k, sk = draw(values((B, C, H, W), dtype, exact))
    window = draw(st.sampled_from([1, 3, 5, 7, 9, 15, 2, 0, 2**31 + 1, 2**63 + 1]))
    return dict(args=(k, q, window), kwargs={}, exact=exact, specials=sq or sk, dtype=dtype)


@st.composite
def sparse_case(draw, tiny=False):
    exact = draw(st.booleans())
    dtype = _dtype(draw, exact)
    r = draw(st.sampled_from([1, 2]))
    B, Ck, Cv, T = draw(st.integers(0 if not tiny else 1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    Hc, Wc = draw(st.integers(1, 2 if tiny else 3)), draw(st.integers(1, 2 if tiny else 3))
    H, W = Hc * r, Wc * r
    q, sq = draw(values((B, Ck, H, W), dtype, exact))
    k, sk = draw(values((B, Ck, T, H, W), dtype, exact))
    v, sv = draw(values((B, Cv, T, H, W), dtype, exact))
    kwargs = {"scale": 1.0} if exact else {}
    F = T
    if draw(st.booleans()):
        frames = draw(st.lists(st.integers(-T, T - 1), min_size=1, max_size=3))
        kwargs["topk_frames"] = frames
        F = len({f % T for f in frames})
    kk = draw(st.integers(1, 4))
    hi = F * Hc * Wc + (1 if draw(st.integers(0, 9)) == 0 else 0)  # sometimes out of range
    idx = torch.randint(0, hi, (B, Hc * Wc, kk), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return dict(args=(q, k, v, idx), kwargs=kwargs, exact=exact, specials=sq or sk or sv, dtype=dtype)


# ---------------------------------------------------------------- checking


def _run(op, backend, case):
    try:
        return getattr(hmmn_ops, op)(*case["args"], **case["kwargs"], backend=backend), None
    except (ValueError, RuntimeError) as e:
        return None, e


def _names_an_argument(op, e):
    msg = str(e)
    return any(f"{a}" in msg for a in ARGS[op]) or "bfloat16" in msg


def _f64(case):
    args = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in case["args"])
    return dict(case, args=args)


def _scores(q, k, scale):
    """float64 scores (B, M, N) of memory positions against queries, NaN as -inf."""
    B, C = q.shape[:2]
    s = torch.einsum("bcm,bcn->bmn", k.reshape(B, C, -1).double(), q.reshape(B, C, -1).double()) * scale
    return s


def _check_read_out(out, v, case):
    """A softmax read is a convex combination of values: inside their per-channel range."""
    if case["specials"] or out.numel() == 0:
        return
    assert out.isfinite().all(), "NaN/inf from finite inputs"
    B, Cv = v.shape[:2]
    vv = v.reshape(B, Cv, -1).double()
    lo, hi = vv.min(-1).values, vv.max(-1).values
    o = out.reshape(B, Cv, -1).double()
    slack = 1e-2 * (hi - lo).abs() + 1e-3 * vv.abs().amax(-1) + 1e-6
    assert (o >= (lo - slack)[..., None]).all() and (o <= (hi + slack)[..., None]).all(), "outside the values' range"


def _moderate(case):
    """Small enough that float32 and float64 agree (no overflow, no saturated logits)."""
    if case["specials"]:
        return False
    for a in case["args"]:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel() and a.double().abs().max() > 100:
            return False
    s = case["kwargs"].get("sigma", 1.0)
    scale = case["kwargs"].get("scale", 1.0)
    return (not isinstance(s, float) or 0.4 < s < 10) and abs(scale) <= 10


def _tol(dtype):
    return {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 2e-2}[dtype]


def check(op, case, backends):
    results = {b: _run(op, b, case) for b in backends}
    errors = {b: e for b, (r, e) in results.items() if e is not None}
    for b, e in errors.items():
        assert _names_an_argument(op, e), f"{b}: error names no argument: {e}"
    ok = {b: r for b, (r, e) in results.items() if e is None}
    if not ok:
        return
    # The front checks the arguments once for every backend: they fail or pass together,
    # except where a backend refuses a dtype (Triton's interpreter and bfloat16).
    assert all("bfloat16" in str(e) for e in errors.values()), f"some backends ran, others raised: {errors}"
    want = None
    if _moderate(case):
        want = _run(op, "reference", _f64(case))[0]
    for b, got in ok.items():
        CHECKS[op](got, case, want, b)
    if case["exact"] and op != "gaussian_softmax":
        idx = {b: _indices(op, r) for b, r in ok.items()}
        first = next(iter(idx.values()))
        for b, i in idx.items():
            if i is not None:
                assert torch.equal(i, first), f"{b}: indices differ from {next(iter(idx))}'s"


def _indices(op, result):
    if op in ("local_track", "global_track"):
        return result
    if op == "kernel_guided_read" and isinstance(result, tuple):
        return result[1]
    return None


def _check_kgr(got, case, want, backend):
    q, k, v = case["args"]
    kw = case["kwargs"]
    B, Ck, H, W = q.shape
    topk = kw.get("topk", 0)
    out, idx = (got if topk else (got, None))
    assert out.shape == (B, v.shape[1], H, W) and out.dtype == q.dtype
    _check_read_out(out, v, case)
    if want is not None:
        w = want[0] if topk else want
        torch.testing.assert_close(out.double(), w, rtol=_tol(q.dtype), atol=_tol(q.dtype), msg=backend)
    if topk:
        T = k.shape[2]
        frames = list(range(T)) if kw.get("topk_frames") is None else list(dict.fromkeys(f % T for f in kw["topk_frames"]))
        assert idx.shape == (B, H * W, topk) and idx.dtype == torch.int64
        assert idx.numel() == 0 or (idx.min() >= 0 and idx.max() < len(frames) * H * W), "index out of range"
        if want is not None and idx.numel() and kw.get("centers") is None and q.dtype != torch.bfloat16:
            scale = 1 / math.sqrt(Ck) if kw.get("scale") is None else kw["scale"]
            s = _scores(q, k[:, :, frames], scale).transpose(1, 2)  # (B, N, F*HW)
            best = s.sort(-1, descending=True).values[..., :topk]
            torch.testing.assert_close(s.gather(-1, idx), best, rtol=1e-4, atol=1e-4, msg=backend)


def _check_softmax(got, case, want, backend):
    a = case["args"][0]
    assert got.shape == a.shape and got.dtype == a.dtype
    if not case["specials"] and got.numel():
        assert got.isfinite().all(), "NaN/inf from finite inputs"
        assert (got >= 0).all()
        torch.testing.assert_close(got.double().sum(1), torch.ones_like(got.double().sum(1)),
                                   rtol=1e-2, atol=1e-2)
    if want is not None:
        torch.testing.assert_close(got.double(), want, rtol=_tol(a.dtype), atol=_tol(a.dtype), msg=backend)


def _check_track(got, case, want, backend):
    k, q = case["args"][:2]
    glob = k.dim() == 5
    B, C, H, W = q.shape
    assert got.dtype == torch.int64 and got.shape == ((B, k.shape[2], H, W) if glob else (B, H, W))
    assert got.numel() == 0 or (got.min() >= 0 and got.max() < H * W), "index out of range"
    if not glob and got.numel():
        rad = case["args"][2] // 2
        ys = torch.arange(H).view(H, 1)
        xs = torch.arange(W).view(1, W)
        assert ((got // W - ys).abs() <= rad).all() and ((got % W - xs).abs() <= rad).all(), "outside the window"
    if want is not None and got.numel() and q.dtype != torch.bfloat16:
        kk = k if glob else k.unsqueeze(2)
        s = _scores(q, kk, 1.0)  # (B, M, N)
        if not glob:
            rad = case["args"][2] // 2
            n = torch.arange(H * W)
            near = ((n.view(-1, 1) // W - n.view(1, -1) // W).abs() <= rad) & \
                   ((n.view(-1, 1) % W - n.view(1, -1) % W).abs() <= rad)
            s = s.masked_fill(~near, -math.inf)
        picked = s.gather(-1, got.reshape(B, -1, 1)).squeeze(-1)
        torch.testing.assert_close(picked, s.max(-1).values, rtol=1e-4, atol=1e-4, msg=backend)


def _check_sparse(got, case, want, backend):
    q, k, v, _ = case["args"]
    assert got.shape == (q.shape[0], v.shape[1], *q.shape[2:]) and got.dtype == q.dtype
    if not case["specials"] and got.numel():
        assert got.isfinite().all(), "NaN/inf from finite inputs"
    if want is not None:
        torch.testing.assert_close(got.double(), want, rtol=_tol(q.dtype), atol=_tol(q.dtype), msg=backend)


CHECKS = {"kernel_guided_read": _check_kgr, "gaussian_softmax": _check_softmax, "local_track": _check_track,
          "global_track": _check_track, "topk_guided_read": _check_sparse}
CASES = {"kernel_guided_read": read_case, "gaussian_softmax": softmax_case,
         "local_track": lambda tiny=False: track_case(False, tiny), "global_track": lambda tiny=False: track_case(True, tiny),
         "topk_guided_read": sparse_case}


# ---------------------------------------------------------------- the tests


def _fuzz(op, backends, tiny=False, examples=None):
    profile = settings.get_profile(PROFILE)
    chosen = settings(profile, max_examples=examples) if examples else profile

    @chosen
    @given(case=CASES[op](tiny=tiny))
    def run(case):
        check(op, case, backends)

    run()


@pytest.mark.parametrize("op", OPS)
def test_fuzz_cpu_backends(op):
    torch.set_num_threads(1)
    _fuzz(op, cpu_backends(op))


@pytest.mark.triton
@pytest.mark.skipif(not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("op", OPS)
def test_fuzz_triton_interpreter(op):
    if not _available("triton", op):
        pytest.skip(refusal("triton", op, "cpu"))
    _fuzz(op, ["reference", "triton"], tiny=True, examples=TRITON_EXAMPLES)
