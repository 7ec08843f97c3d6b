"""memory_read's CUDA kernels (csrc/cuda/memory_read.cu) against the reference, forward and backward.

Runs on every ``cuda_target`` (tests/conftest.py): the GPU (``backend="native"`` on CUDA
tensors, skipped without one) and the CUDA emulator (``backend="cuda_emulated"``: the same device
code run on CPU tensors). Accuracy rules as in test_cuda.py:

- float32 / float64: close to the reference at the same dtype;
- float16 / bfloat16: error against the float64 reference at most twice the reference's own
  error at that precision (the flash-attention rule);
- top-k indices exactly on integer inputs (every score exact: ties go to the smaller index); on
  random floats a near-tie at the k-th score may swap one candidate (checked by score).

Shapes are tiny (the emulator runs every CUDA thread on the CPU) but reach every launch-plan
branch: under the emulator its knobs (test_cuda.py's PLAN_KNOBS) force memory splits and smaller
channel chunks, and its launch log shows the grids that ran.

    python -m pytest -q tests/test_cuda_memory_read.py
"""
import pytest
import torch

from hmmn_ops import reference

from test_cuda import _grid, _launches

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
TOL = {F32: dict(rtol=2e-5, atol=2e-5), F64: dict(rtol=1e-10, atol=1e-10)}

# name: (similarity, shrinkage, selection)
KINDS = {"dot": ("dot", False, False), "l2": ("l2", False, False), "l2+w": ("l2", True, False),
         "l2+e": ("l2", False, True), "l2+w+e": ("l2", True, True)}
# Emulator knobs: a memory split per memory tile, and accumulators of 32 values per row (2-3 key
# chunks for Ck = 40, 3 value chunks in the backward and 2 in the forward for Cv = 70).
FORCED = {"HMMN_EMU_NUM_SMS": "100000", "HMMN_EMU_SMEM_BUDGET": "8448"}


class _Ops:
    """memory_read / memory_read_backward of a cuda_target (canonical arguments)."""

    def __init__(self, target):
        self.memory_read, self.memory_read_backward = target.op("memory_read"), target.op("memory_read_backward")


def _ops(target):
    return _Ops(target)


def _args(target, kind, B=2, Ck=5, Cv=6, Nq=11, Nm=37, dtype=F32, values=None, layout=None):
    """Canonical (q, k, v, w, e, similarity, scale), built in float64 and cast to dtype."""
    sim, has_w, has_e = KINDS[kind]
    values = values or (lambda *s: torch.randn(*s, dtype=F64))
    q, k, v = values(B, Ck, Nq), values(B, Ck, Nm), torch.randn(B, Cv, Nm, dtype=F64)
    w = torch.rand(B, Nm, dtype=F64) * 2 + 0.2 if has_w else None
    e = torch.rand(B, Ck, Nq, dtype=F64) + 0.5 if has_e else None
    tensors = [None if t is None else t.to(device=target.device, dtype=dtype) for t in (q, k, v, w, e)]
    if layout is not None:
        tensors = [None if t is None else layout(t) for t in tensors]
    return tensors + [sim, 0.5 if values is _ints_fn else Ck ** -0.5]


def _ints_fn(*shape):
    return torch.randint(-1, 2, shape).to(F64)


def _cast(args, dtype):
    return [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args]


def _close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    torch.testing.assert_close(got, want, **TOL.get(want.dtype, {}))


def _scores64(q, k, w, e, sim, scale):
    """(B, Nq, Nm) float64 scores, for checking near-ties."""
    q, k = q.double(), k.double()
    if sim == "dot":
        return scale * torch.einsum("bcq,bcp->bqp", q, k)
    e = torch.ones_like(q) if e is None else e.double()
    d2 = (e.unsqueeze(3) * (k.unsqueeze(2) - q.unsqueeze(3)) ** 2).sum(1)
    w = torch.ones(k.shape[0], k.shape[2], dtype=F64, device=k.device) if w is None else w.double()
    return -scale * w.unsqueeze(1) * d2


def _check_forward(got, want, args, exact_indices):
    """out, lse, usage close; indices equal, or (random floats) equal up to near-ties, whose
    queries are then left out of the out/lse comparison (usage only when no query differs)."""
    out, lse, idx, usage = got
    w_out, w_lse, w_idx, w_usage = want
    assert idx.dtype == torch.int64 and idx.shape == w_idx.shape
    same = (idx == w_idx).all(-1)
    if exact_indices:
        assert same.all(), "top-k indices differ on exact scores"
    elif not same.all():
        s = _scores64(*args[:2], *args[3:7])
        got_s, want_s = s.gather(2, idx), s.gather(2, w_idx)
        torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-5)  # only near-ties may differ
    keep = same.to(out.device)
    _close(out.transpose(1, 2)[keep], w_out.transpose(1, 2)[keep])
    _close(lse[keep], w_lse[keep])
    if same.all():
        _close(usage, w_usage)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("topk", [0, 1, 30, 37])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_forward(cuda_target, kind, topk, dtype):
    args = _args(cuda_target, kind, dtype=dtype)
    got = _ops(cuda_target).memory_read(*args, topk, True)
    want = reference.memory_read(*args, topk, True)
    _check_forward(got, want, args, exact_indices=False)


@pytest.mark.parametrize("kind", ["dot", "l2+w+e"])
def test_forward_without_usage(cuda_target, kind):
    args = _args(cuda_target, kind)
    for topk in (0, 4):
        out, lse, idx, usage = _ops(cuda_target).memory_read(*args, topk, False)
        assert usage.shape == (2, 0) and idx.shape == (2, 11, topk)
        _close(out, reference.memory_read(*args, topk, False)[0])


@pytest.mark.parametrize("kind", ["dot", "l2", "l2+w+e"])
@pytest.mark.parametrize("topk", [1, 3, 40])
def test_topk_ties_exact(cuda_target, kind, topk):
    """Integer keys: many equal scores; indices must match the reference exactly (ties to the
    smaller memory index), and so must out / lse / usage. Nm = 45 > 32 candidates per chunk,
    topk = 40 > 32 list entries per shift round."""
    args = _args(cuda_target, kind, Ck=3, Nq=9, Nm=45, values=_ints_fn)
    got = _ops(cuda_target).memory_read(*args, topk, True)
    want = reference.memory_read(*args, topk, True)
    _check_forward(got, want, args, exact_indices=True)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["dot", "l2+w+e"])
@pytest.mark.parametrize("topk", [0, 5])
def test_forward_half(cuda_target, kind, topk, dtype):
    args64 = _args(cuda_target, kind, dtype=F64)
    exact = reference.memory_read(*args64, topk, True)
    ref_lo = reference.memory_read(*_cast(args64, dtype), topk, True)
    got = _ops(cuda_target).memory_read(*_cast(args64, dtype), topk, True)
    keep = (got[2] == exact[2]).all(-1) if topk else torch.ones(got[1].shape, dtype=torch.bool, device=got[1].device)
    if topk:  # a near-tie at half precision may swap a candidate: compare the queries that agree
        assert keep.float().mean() > 0.5
    for i, (g, r, x) in enumerate(zip(got, ref_lo, exact)):
        if i == 2:
            continue
        assert g.dtype == r.dtype and g.shape == r.shape
        if i in (0, 1):
            g, r, x = (t.transpose(1, 2)[keep] if i == 0 else t[keep] for t in (g, r, x))
        elif not keep.all():
            continue
        e_got, e_ref = (g.double() - x.double()).abs().max().item(), (r.double() - x.double()).abs().max().item()
        assert e_got <= 2 * e_ref + 1e-6, f"output {i}: error {e_got:.3g} > 2 x reference error {e_ref:.3g}"


def _forced(target, monkeypatch, tmp_path, fn):
    """Runs fn with the emulator's plan knobs; returns the grids launched per kernel name."""
    if target.backend != "cuda_emulated":  # a GPU takes its own plans for these shapes
        fn()
        return None
    grids = {}
    for line in _launches(monkeypatch, tmp_path, FORCED, fn):
        grids.setdefault(line.split("<")[0].split("::")[-1].strip(), []).append(_grid(line))
    return grids


@pytest.mark.parametrize("kind", ["dot", "l2+w+e"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_forward_forced_plans(cuda_target, kind, dtype, monkeypatch, tmp_path):
    """Split memory (a split per memory tile + combine), forward value chunks, top-k over several
    key-channel chunks of the selection kernel (Ck = 40 > 32) and value chunks of the read
    (Cv = 70 > 32)."""
    args = _args(cuda_target, kind, B=1, Ck=40, Cv=70, Nq=7, Nm=150, dtype=dtype)
    want = {t: reference.memory_read(*args, t, True) for t in (0, 6)}

    def run():
        for t in (0, 6):
            _check_forward(_ops(cuda_target).memory_read(*args, t, True), want[t], args, exact_indices=False)

    grids = _forced(cuda_target, monkeypatch, tmp_path, run)
    if grids is not None:
        tiles, chunk = (3, 64) if dtype == F32 else (5, 32)  # memory tiles of 150; VC-wide value chunks
        assert grids["mr_fwd_kernel"][0][1] == tiles * -(-70 // chunk)  # memory splits x value chunks
        assert "kgr_combine_kernel" in grids and "mr_usage_kernel" in grids
        assert "mr_topk_kernel" in grids and "mr_topk_read_kernel" in grids


def test_all_equal_logits_keep_index_order(cuda_target):
    args = _args(cuda_target, "dot", B=1, Ck=2, Nq=3, Nm=70, values=lambda *s: torch.ones(*s, dtype=F64))
    out, lse, idx, usage = _ops(cuda_target).memory_read(*args, 33, True)
    assert idx.cpu().tolist() == [[list(range(33))] * 3]


@pytest.mark.parametrize("kind", ["dot", "l2+w+e"])
def test_empty_and_noncontiguous(cuda_target, kind):
    ops = _ops(cuda_target)
    # B = 0 and Nq = 0: empty outputs; usage of no queries is 0.
    for B, Nq in ((0, 4), (2, 0)):
        args = _args(cuda_target, kind, B=B, Nq=Nq)
        for topk in (0, 3):
            got = ops.memory_read(*args, topk, True)
            want = reference.memory_read(*args, topk, True)
            assert [tuple(g.shape) for g in got] == [tuple(x.shape) for x in want]
            _close(got[3], want[3])
            dout = torch.randn_like(got[0])
            gg = ops.memory_read_backward(dout, *args[:5], got[0], got[1], got[2], args[5], args[6])
            gw = reference.memory_read_backward(dout, *args[:5], want[0], want[1], want[2], args[5], args[6])
            for g, x in zip(gg, gw):
                _close(g, x)
    # Strided and transposed views.
    def layout(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2) if t.dim() == 3 else t.repeat_interleave(2, -1)[..., ::2]
    args = _args(cuda_target, kind, layout=layout)
    assert not args[0].is_contiguous()
    for topk in (0, 4):
        _check_forward(ops.memory_read(*args, topk, True), reference.memory_read(*args, topk, True), args, False)


# ---------------------------------------------------------------- backward


def _check_backward(target, args, topk, dtype):
    out, lse, idx, _ = reference.memory_read(*args, topk, False)
    dout = torch.randn_like(out)
    want = reference.memory_read_backward(dout, *args[:5], out, lse, idx, args[5], args[6])
    got = _ops(target).memory_read_backward(dout, *args[:5], out, lse, idx, args[5], args[6])
    for name, g, x in zip(("dq", "dk", "dv", "dw", "de"), got, want):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        torch.testing.assert_close(g, x, **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("topk", [0, 1, 30])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_backward(cuda_target, kind, topk, dtype):
    _check_backward(cuda_target, _args(cuda_target, kind, dtype=dtype), topk, dtype)


@pytest.mark.parametrize("kind", ["dot", "l2", "l2+w+e"])
def test_backward_forced_chunks(cuda_target, kind, monkeypatch, tmp_path):
    """Several key chunks (dQ, dK, partial dw summed) and value chunks (dV) per block row."""
    args = _args(cuda_target, kind, B=1, Ck=40, Cv=70, Nq=9, Nm=70, dtype=F64)
    grids = _forced(cuda_target, monkeypatch, tmp_path, lambda: _check_backward(cuda_target, args, 0, F64))
    if grids is not None:  # 32 accumulator values a row: key chunks of 32 (dot), 30 (l2), 15 (l2+e)
        nck = {"dot": 2, "l2": 2, "l2+w+e": 3}[kind]
        assert grids["mr_dq_kernel"][0][1] == nck
        assert grids["mr_dkdv_kernel"][0][1] == 3 + nck  # 3 value chunks of dV, then dK's


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["dot", "l2+w+e"])
@pytest.mark.parametrize("topk", [0, 5])
def test_backward_half(cuda_target, kind, topk, dtype):
    args64 = _args(cuda_target, kind, dtype=F64)
    out, lse, idx, _ = reference.memory_read(*args64, topk, False)
    dout = torch.randn_like(out)

    def grads(impl, dt):
        a = _cast(args64, dt)
        o = out.to(dt)
        l = lse.to(reference.acc_dtype(dt))
        return impl.memory_read_backward(dout.to(dt), *a[:5], o, l, idx, a[5], a[6])

    exact, ref_lo, got = grads(reference, F64), grads(reference, dtype), grads(_ops(cuda_target), dtype)
    for name, g, r, x in zip(("dq", "dk", "dv", "dw", "de"), got, ref_lo, exact):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        if not g.numel():
            continue
        e_got, e_ref = (g.double() - x).abs().max().item(), (r.double() - x).abs().max().item()
        assert e_got <= 2 * e_ref + 1e-6, f"{name}: error {e_got:.3g} > 2 x reference error {e_ref:.3g} in {dtype}"


@pytest.mark.parametrize("topk", [0, 3])
def test_gradcheck_public_front(cuda_target, topk):
    """Autograd through hmmn_ops.memory_read (float64, l2 with shrinkage and selection)."""
    import hmmn_ops

    dev = cuda_target.device
    q = torch.randn(1, 3, 2, 2, dtype=F64, device=dev, requires_grad=True)
    k = torch.randn(1, 3, 7, dtype=F64, device=dev, requires_grad=True)
    v = torch.randn(1, 2, 7, dtype=F64, device=dev, requires_grad=True)
    w = (torch.rand(1, 1, 7, dtype=F64, device=dev) + 0.5).requires_grad_()
    e = (torch.rand(1, 3, 2, 2, dtype=F64, device=dev) + 0.5).requires_grad_()

    def f(q, k, v, w, e):
        return hmmn_ops.memory_read(q, k, v, similarity="l2", memory_shrinkage=w, query_selection=e, topk=topk,
                                    backend=cuda_target.backend)

    assert torch.autograd.gradcheck(f, (q, k, v, w, e), eps=1e-6, atol=1e-7)
