"""Every public op once, on the installed hmmn_ops (scripts/smoke_package.sh runs it outside the
source tree): backend "auto" against backend "reference" (float64), plus a backward and the Tracker.

    python smoke_ops.py [--expect-native | --expect-fallback]
"""
import os
import sys
import warnings

import torch


def main(argv):
    expect = argv[0] if argv else "--expect-native"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import hmmn_ops
    from hmmn_ops._build import NATIVE_REFUSAL

    print(f"hmmn_ops {hmmn_ops.__version__} from {os.path.dirname(hmmn_ops.__file__)}")
    if expect == "--expect-native":
        assert NATIVE_REFUSAL is None and not caught, (NATIVE_REFUSAL, [str(w.message) for w in caught])
    else:  # the wheel's torch differs from the installed one: warned, reference backend
        assert NATIVE_REFUSAL is not None, "expected the compiled kernels not to be loaded"
        assert any("built against torch" in str(w.message) for w in caught), [str(w.message) for w in caught]

    g = torch.Generator().manual_seed(0)
    B, Ck, Cv, T, H, W = 2, 8, 6, 3, 6, 10
    qk = torch.randn(B, Ck, H, W, generator=g, dtype=torch.float64)
    mk = torch.randn(B, Ck, T, H, W, generator=g, dtype=torch.float64)
    mv = torch.randn(B, Cv, T, H, W, generator=g, dtype=torch.float64)
    centers = torch.randint(-1, H * W, (B, T, H, W), generator=g)
    sigma = torch.tensor([3.0, 2.0, 1.5], dtype=torch.float64)
    shrink = torch.rand(B, 1, T, H, W, generator=g, dtype=torch.float64) + 1
    select = torch.rand(B, Ck, H, W, generator=g, dtype=torch.float64)
    coarse = torch.randint(0, T * (H // 2) * (W // 2), (B, (H // 2) * (W // 2), 4), generator=g)

    calls = {
        "kernel_guided_read": lambda backend: hmmn_ops.kernel_guided_read(qk, mk, mv, centers, sigma, topk=5,
                                                                          backend=backend),
        "gaussian_softmax": lambda backend: hmmn_ops.gaussian_softmax(
            torch.einsum("bcp,bcq->bpq", mk.flatten(2), qk.flatten(2)), centers, sigma, size=(H, W), backend=backend),
        "local_track": lambda backend: hmmn_ops.local_track(mk[:, :, -1], qk, 5, backend=backend),
        "global_track": lambda backend: hmmn_ops.global_track(mk, qk, backend=backend),
        "topk_guided_read": lambda backend: hmmn_ops.topk_guided_read(qk, mk, mv, coarse, backend=backend),
        "memory_read": lambda backend: hmmn_ops.memory_read(qk, mk, mv, similarity="l2", memory_shrinkage=shrink,
                                                            query_selection=select, topk=7, return_usage=True,
                                                            backend=backend),
    }
    report = hmmn_ops.backends("cpu")
    for op, run in calls.items():
        got, want = run("auto"), run("reference")
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b)
        print(f"  {op:20s} auto={report['auto'][op]:9s} matches the reference")

    q = qk.clone().requires_grad_()
    hmmn_ops.kernel_guided_read(q, mk, mv, centers, sigma).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()

    tracker = hmmn_ops.Tracker()
    tracker.push()
    c, s = tracker.centers(qk, mk[:, :, :1])
    assert c.shape == (B, 1, H, W) and s.shape == (1,)
    print("  backward and Tracker ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
