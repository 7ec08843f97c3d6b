"""The benchmark baselines compute the same function as hmmn_ops (so none is faster because it
computes something else), and benchmarks/bench_ops.py --quick runs end to end."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from hmmn_ops import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import baselines as bl  # noqa: E402

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _read_inputs(seed, B=2, Ck=5, Cv=3, T=3, H=5, W=7, dtype=F64):
    g = _gen(seed)
    qk = torch.randn(B, Ck, H, W, generator=g, dtype=dtype)
    mk = torch.randn(B, Ck, T, H, W, generator=g, dtype=dtype)
    mv = torch.randn(B, Cv, T, H, W, generator=g, dtype=dtype)
    centers = torch.randint(-1, H * W, (B, T, H, W), generator=g)
    sigma = torch.rand(B, T, generator=g, dtype=dtype) * 2 + 0.7
    return qk, mk, mv, centers, sigma


def _chain(seed, B, T, H, W):
    return torch.randint(0, H * W, (B, T - 1, H, W), generator=_gen(seed))


def _ref_read(qk, mk, mv, centers=None, sigma=None, topk=0, frames=()):
    B, T = mk.shape[0], mk.shape[2]
    if sigma is not None:
        sigma = sigma.expand(B, T).to(F64)
    scale = qk.shape[1] ** -0.5
    out, _, idx = ref.kernel_guided_read(qk, mk, mv, centers, sigma, scale, topk, list(frames))
    return out, idx


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------- kernel_guided_read


@pytest.mark.parametrize("per_batch_sigma", [True, False])
@pytest.mark.parametrize("fn", [bl.naive_kernel_read, bl.dense_read, bl.sdpa_read], ids=lambda f: f.__name__)
def test_gaussian_topk_read_matches_reference(fn, per_batch_sigma):
    qk, mk, mv, centers, sigma = _read_inputs(1)
    if not per_batch_sigma:
        sigma = sigma[0]
    T = mk.shape[2]
    out, idx = fn(qk, mk, mv, centers, sigma, topk=4, topk_frames=(T - 1, 0))
    r_out, r_idx = _ref_read(qk, mk, mv, centers, sigma, 4, (T - 1, 0))
    _close(out, r_out)
    assert torch.equal(idx, r_idx)


@pytest.mark.parametrize("fn", [bl.naive_kernel_read, bl.dense_read, bl.sdpa_read], ids=lambda f: f.__name__)
def test_stm_read_matches_reference(fn):
    qk, mk, mv, _, _ = _read_inputs(2, T=1, H=3, W=4)
    _close(fn(qk, mk, mv, scale=0.7), ref.kernel_guided_read(qk, mk, mv, None, None, 0.7, 0, [])[0])


def test_flex_read_matches_reference():
    qk, mk, mv, centers, sigma = _read_inputs(3, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        out, idx = bl.flex_read(qk, mk, mv, centers, sigma, topk=3, topk_frames=(0, 2), compiled=False)
        plain = bl.flex_read(qk, mk, mv, compiled=False)
    r_out, r_idx = _ref_read(qk.double(), mk.double(), mv.double(), centers, sigma, 3, (0, 2))
    _close(out.double(), r_out, tol=1e-5)
    assert torch.equal(idx, r_idx)
    _close(plain.double(), _ref_read(qk.double(), mk.double(), mv.double())[0], tol=1e-5)


@pytest.mark.parametrize("fn", [bl.naive_tracked_read, bl.dense_tracked_read], ids=lambda f: f.__name__)
@pytest.mark.parametrize("T,window", [(1, 3), (4, 7)])
def test_tracked_read_matches_local_track_then_reference(fn, T, window):
    qk, mk, mv, _, sigma = _read_inputs(4, T=T, H=6, W=9)
    B, H, W = qk.shape[0], 6, 9
    chain = _chain(5, B, T, H, W)
    frames = (0,) if T == 1 else (0, T - 1)
    out, idx = fn(qk, mk, mv, chain, sigma, topk=5, topk_frames=frames, window=window)
    centers = bl.chain_centers(ref.local_track(mk[:, :, -1], qk, window), chain)
    r_out, r_idx = _ref_read(qk, mk, mv, centers, sigma, 5, frames)
    _close(out, r_out)
    assert torch.equal(idx, r_idx)


def test_chain_centers_by_hand():
    step = torch.tensor([[[3, 2], [1, 0]]])          # (1, 2, 2): previous frame -> query
    chain = torch.tensor([[[[1, 1], [3, 0]]]])       # (1, 1, 2, 2): older frame -> previous frame
    centers = bl.chain_centers(step, chain)
    assert centers.tolist() == [[[[2, 2], [0, 3]], [[3, 2], [1, 0]]]]


def test_naive_gaussian_underflow_is_the_documented_difference():
    # Small sigma and no memory position near the query: softmax * G underflows to 0 for every
    # position, the renormalisation gives 0/0. The log-space op stays finite.
    qk, mk, mv, _, _ = _read_inputs(6, B=1, T=1, H=30, W=40, dtype=torch.float32)
    centers = torch.zeros(1, 1, 30, 40, dtype=torch.int64)  # every Gaussian centred at (0, 0)
    sigma = torch.tensor([0.5])
    naive = bl.naive_kernel_read(qk, mk, mv, centers, sigma)
    ours = _ref_read(qk, mk, mv, centers, sigma)[0]
    assert torch.isnan(naive).any()
    assert torch.isfinite(ours).all()


# ---------------------------------------------------------------- gaussian_softmax


@pytest.mark.parametrize("fn", [bl.naive_gaussian_softmax, bl.dense_gaussian_softmax], ids=lambda f: f.__name__)
def test_gaussian_softmax_matches_reference(fn):
    B, T, H, W = 2, 3, 4, 5
    g = _gen(7)
    affinity = torch.randn(B, T * H * W, H * W, generator=g, dtype=F64) * 3
    centers = torch.randint(-1, H * W, (B, T, H, W), generator=g)
    sigma = torch.rand(T, generator=g, dtype=F64) + 0.8
    out = fn(affinity, centers, sigma, size=(H, W))
    _close(out, ref.gaussian_softmax(affinity, centers, sigma.expand(B, T), H, W))


# ---------------------------------------------------------------- tracking


@pytest.mark.parametrize("H,W,window", [(5, 7, 3), (6, 9, 7), (2, 3, 9), (4, 4, 1)])
def test_local_track_matches_reference(H, W, window):
    g = _gen(8)
    mk = torch.randn(2, 6, H, W, generator=g, dtype=F64)
    qk = torch.randn(2, 6, H, W, generator=g, dtype=F64)
    assert torch.equal(bl.naive_local_track(mk, qk, window), ref.local_track(mk, qk, window))


def test_window_mask_is_the_clipped_window():
    mask = bl.window_mask(4, 5, 3, "cpu").view(4, 5, 4, 5)
    assert not mask[0, 0, :2, :2].any() and mask[0, 0].sum() == 20 - 4  # corner: 2x2 inside
    assert not mask[2, 2, 1:4, 1:4].any() and mask[2, 2].sum() == 20 - 9


def test_global_track_matches_reference():
    g = _gen(9)
    mk = torch.randn(2, 4, 3, 5, 6, generator=g, dtype=F64)
    qk = torch.randn(2, 4, 5, 6, generator=g, dtype=F64)
    assert torch.equal(bl.naive_global_track(mk, qk), ref.global_track(mk, qk))


# ---------------------------------------------------------------- topk_guided_read


@pytest.mark.parametrize("r,k,T", [(1, 3, 1), (2, 4, 2), (4, 2, 2), (3, 5, 3)])
def test_topk_read_matches_reference(r, k, T):
    B, Ck, Cv, Hc, Wc = 2, 5, 3, 3, 4
    H, W = Hc * r, Wc * r
    g = _gen(10 + r)
    qk = torch.randn(B, Ck, H, W, generator=g, dtype=F64)
    mk = torch.randn(B, Ck, T, H, W, generator=g, dtype=F64)
    mv = torch.randn(B, Cv, T, H, W, generator=g, dtype=F64)
    # distinct indices per cell, as torch.topk gives them in HMMN, in no particular order
    idx = torch.rand(B, Hc * Wc, T * Hc * Wc, generator=g).argsort(dim=2)[:, :, :k]
    out = bl.naive_topk_read(qk, mk, mv, idx, scale=0.4)
    _close(out, ref.topk_guided_read(qk, mk, mv, idx, 0.4, r)[0])


# ---------------------------------------------------------------- measurement plumbing


def test_cpu_peak_memory_sees_a_known_allocation():
    import common

    peak, seconds, out = common.peak_memory(lambda: torch.ones(16 * 1024 * 1024), "cpu")  # 64 MB
    if peak is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert out.numel() == 16 * 1024 * 1024 and seconds >= 0
    assert 60 < peak < 100, peak


def test_atomic_json_and_table(tmp_path):
    import common

    path = tmp_path / "sub" / "r.json"
    common.write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left behind
    text = common.format_table([{"x": "ab", "y": "1.50"}, {"x": "c", "y": "12.00"}], [("x", "name"), ("y", "ms")])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "ms"] and lines[3].endswith("12.00") and lines[2].endswith(" 1.50")


# ---------------------------------------------------------------- bench_ops.py --quick


def test_bench_ops_quick_smoke(tmp_path):
    import hmmn_ops

    if not hasattr(hmmn_ops, "kernel_guided_read"):
        pytest.skip("hmmn_ops public API not importable yet")
    out_json, plot_dir = tmp_path / "ops.json", tmp_path / "plots"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_ops.py"), "--quick",
           "--backends", "reference", "--json", str(out_json), "--plot", str(plot_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out_json.read_text())
    records = data["records"]
    ops = {r["op"] for r in records}
    assert {"kernel_guided_read", "topk_guided_read", "local_track", "global_track", "gaussian_softmax"} <= ops
    for r in records:
        for key in ("op", "backend", "baseline", "shape", "dtype", "device", "torch", "triton",
                    "ms", "baseline_ms", "speedup", "peak_mb", "max_err", "date", "command"):
            assert key in r, key
        assert r["ms"] > 0
        assert r["baseline_ms"] is not None, (r["op"], r["baseline"], r["baseline_note"])
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["ms"])
        if r["max_err"] is not None and r["same_function"]:
            assert r["max_err"] < 1e-3, r  # float32 vs the float64 reference
    assert (plot_dir / "t_sweep_float32.png").stat().st_size > 0
    assert "kernel_guided_read" in proc.stdout and "speedup" in proc.stdout


# ---------------------------------------------------------------- memory_read


@pytest.mark.parametrize("similarity,terms", [("dot", ""), ("l2", ""), ("l2", "we"), ("l2", "w"), ("l2", "e")])
@pytest.mark.parametrize("topk", [0, 1, 7])
def test_dense_memory_read_matches_reference(similarity, terms, topk):
    g = _gen(11)
    B, Ck, Cv, Q, M = 2, 5, 3, (3, 4), (2, 3, 4)
    qk, mk = torch.randn(B, Ck, *Q, generator=g, dtype=F64), torch.randn(B, Ck, *M, generator=g, dtype=F64)
    mv = torch.randn(B, Cv, *M, generator=g, dtype=F64)
    w = torch.rand(B, 1, *M, generator=g, dtype=F64) + 1 if "w" in terms else None
    e = torch.rand(B, Ck, *Q, generator=g, dtype=F64) if "e" in terms else None
    out, usage = bl.dense_memory_read(qk, mk, mv, w, e, similarity=similarity, topk=topk, return_usage=True)
    want, want_usage, _ = _ref_memory_read(qk, mk, mv, w, e, similarity, topk)
    _close(out, want)
    _close(usage, want_usage)


def _ref_memory_read(qk, mk, mv, w, e, similarity, topk):
    B, Ck, Cv = qk.shape[0], qk.shape[1], mv.shape[1]
    out, _, idx, usage = ref.memory_read(qk.flatten(2), mk.flatten(2), mv.flatten(2),
                                         None if w is None else w.flatten(1), None if e is None else e.flatten(2),
                                         similarity, Ck ** -0.5, topk, True)
    return out.view(B, Cv, *qk.shape[2:]), usage.view(B, *mk.shape[2:]), idx


def test_gemm_bound_is_the_two_products():
    g = _gen(12)
    qk, mk, mv = (torch.randn(2, c, n, generator=g, dtype=F64) for c, n in ((4, 6), (4, 9), (3, 9)))
    _close(bl.gemm_bound(qk, mk, mv), torch.einsum("bcp,bdp,bdq->bcq", mv, mk, qk))


def test_bench_ops_memory_read_quick_smoke(tmp_path):
    import hmmn_ops

    if not hasattr(hmmn_ops, "memory_read"):
        pytest.skip("hmmn_ops.memory_read not importable yet")
    out_json = tmp_path / "mr.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_ops.py"), "--quick", "--ops", "memory_read",
           "--backends", "reference", "--json", str(out_json), "--plot", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads(out_json.read_text())["records"]
    assert {r["variant"] for r in records} == {"xmem", "stcn", "full-dot", "full-l2"}
    assert {r["baseline"] for r in records} == {"dense", "gemm_bound"}
    for r in records:
        assert r["op"] == "memory_read" and r["ms"] > 0 and r["baseline_ms"] > 0, r
        assert r["peak_mb"] is None or r["peak_mb"] >= 0
        if r["same_function"]:
            assert r["max_err"] < 1e-4 and r["baseline_max_err"] < 1e-4, r  # float32 vs float64
    assert (tmp_path / "memory_read_float32.png").stat().st_size > 0
    assert "memory_read [xmem]" in proc.stdout
