"""Op benchmark: hmmn_ops backends against naive released-style and dense PyTorch baselines.

For every op of docs/ops.md at the DAVIS shapes (HMMN's three levels), on the current device:
median time, peak extra memory, max error against the float64 reference, and the speedup
over each baseline. Prints a table, writes JSON (one record per backend x baseline row) and a
PNG of time and memory against memory frames T. See benchmarks/README.md.

    python benchmarks/bench_ops.py                      # 480p table + 1080p memory row + T sweep
    python benchmarks/bench_ops.py --quick              # tiny shapes, seconds
    python benchmarks/bench_ops.py --device cuda --dtype bfloat16 --objects 3 --frames 2,6,21
"""
import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines as bl  # noqa: E402
import common  # noqa: E402
from plot_ops import plot_memory_read, plot_t_sweep  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

OPS = (
    "kernel_guided_read",
    "topk_guided_read",
    "local_track",
    "global_track",
    "gaussian_softmax",
    "kernel_guided_read_backward",
    "topk_guided_read_backward",
    "memory_read",
)
BACKENDS = ("native", "triton", "reference", "auto")
BASELINES = ("naive", "dense", "bmm_softmax_bmm", "sdpa", "flex")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

# HMMN's levels (docs/ops.md "Sizes to keep in mind"): res4 read over T frames, top-k reads at res3/res2
# over the first and previous frame with the top-k of res4; "train" is a 384x384 crop, B=4.
SHAPES = {
    "small": dict(res4=(6, 10), T=3, key4=16, val4=32, key3=16, val3=24, k3=4, key2=8, val2=16, k2=2),
    "480p": dict(res4=(30, 54), T=6, key4=128, val4=512, key3=128, val3=256, k3=32, key2=64, val2=128, k2=8),
    "1080p": dict(res4=(68, 120), T=10, key4=128, val4=512, key3=128, val3=256, k3=32, key2=64, val2=128, k2=8),
    "train": dict(res4=(24, 24), T=2, key4=128, val4=512, key3=128, val3=256, k3=32, key2=64, val2=128, k2=8, B=4),
}
# memory_read (docs/recipes.md) at 1/16 of the frame: XMem / Cutie / DEVA (key 64, value 512,
# top-30, shrinkage and selection, working + long-term memory as Nm tokens, usage), STCN (top-20,
# memory frames (T, H, W), no shrinkage), and full reads (topk=0) of both similarities.
# Q / M: the trailing shapes of the query and the memory.
MEMORY_READS = {
    "480p": {
        "xmem": dict(Q=(30, 54), M=(28000,), Ck=64, Cv=512, topk=30, similarity="l2", terms=True, usage=True),
        "stcn": dict(Q=(30, 54), M=(16, 30, 54), Ck=64, Cv=512, topk=20, similarity="l2", terms=False, usage=False),
        "full-dot": dict(Q=(30, 54), M=(28000,), Ck=64, Cv=512, topk=0, similarity="dot", terms=False, usage=False),
        "full-l2": dict(Q=(30, 54), M=(28000,), Ck=64, Cv=512, topk=0, similarity="l2", terms=True, usage=False),
    },
    "1080p": {
        "xmem": dict(Q=(68, 120), M=(92000,), Ck=64, Cv=512, topk=30, similarity="l2", terms=True, usage=True),
    },
    "small": {
        "xmem": dict(Q=(5, 8), M=(300,), Ck=8, Cv=16, topk=5, similarity="l2", terms=True, usage=True),
        "stcn": dict(Q=(5, 8), M=(3, 5, 8), Ck=8, Cv=16, topk=4, similarity="l2", terms=False, usage=False),
        "full-dot": dict(Q=(5, 8), M=(300,), Ck=8, Cv=16, topk=0, similarity="dot", terms=False, usage=False),
        "full-l2": dict(Q=(5, 8), M=(300,), Ck=8, Cv=16, topk=0, similarity="l2", terms=True, usage=False),
    },
}
WINDOW = 7
SIGMA_INIT, SIGMA_FACTOR = 3.0, 0.5


# ---------------------------------------------------------------- cases


@dataclasses.dataclass(eq=False)  # hashed by identity: keys of the results dict
class Baseline:
    name: str
    fn: Callable            # fn(*tensors) -> outputs
    same_function: bool = True
    need_mb: float = 0.0    # rough peak estimate: skipped when it would not fit
    skip: str = ""          # a reason not to run it here (then only need_mb is reported)
    flag: str = ""          # the --baselines name that selects it (default: name)

    def __post_init__(self):
        self.flag = self.flag or self.name


@dataclasses.dataclass
class Setup:
    tensors: tuple
    call: Callable          # call(backend, *tensors) -> outputs of our op
    baselines: list


@dataclasses.dataclass
class Case:
    op: str
    variant: str
    shape: dict
    setup: Callable[[], Setup]
    work: tuple = (0.0, "")  # (amount, unit): FLOP -> TFLOP/s, bytes -> GB/s
    check: bool = True       # compare with the float64 reference
    budget_scale: float = 1.0
    sweep: Optional[str] = None
    only: tuple = ()          # restrict to these baselines (the sweep plots naive vs ours)

    @property
    def label(self):
        s = self.shape
        dims = [f"B{s['B']}"]
        if "Ck" in s:
            dims.append(f"{s['Ck']}/{s['Cv']}" if "Cv" in s else f"C{s['Ck']}")
        if "T" in s:
            dims.append(f"T{s['T']}")
        if "Nq" in s:
            dims.append(f"Nq{s['Nq']} Nm{s['Nm']}")
        else:
            dims.append(f"{s['H']}x{s['W']}")
        for key, fmt in (("r", "r{}"), ("k", "k{}"), ("topk", "top{}"), ("window", "w{}")):
            if s.get(key):
                dims.append(fmt.format(s[key]))
        return " ".join(dims)


class Builder:
    """Makes the cases of one (device, dtype, objects) run."""

    def __init__(self, device, dtype, objects, baselines, explicit):
        self.device, self.dtype, self.B, self.wanted = device, dtype, objects, baselines
        self.cuda = device.type == "cuda"
        self.explicit = explicit  # --baselines given: SDPA/Flex run on the CPU too when named

    # -- inputs
    def randn(self, *shape):
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    def near(self, B, T, H, W, radius=3):
        """Flat indices of pixels a few pixels away from each pixel: realistic centres / chains."""
        dev = self.device
        y = torch.arange(H, device=dev).view(H, 1) + torch.randint(-radius, radius + 1, (B, T, H, W), device=dev)
        x = torch.arange(W, device=dev) + torch.randint(-radius, radius + 1, (B, T, H, W), device=dev)
        return y.clamp(0, H - 1) * W + x.clamp(0, W - 1)

    def sigma(self, T):
        """The released code's schedule: sigma_init * (1 + factor * slots from the newest)."""
        h = torch.arange(T - 1, -1, -1, device=self.device, dtype=torch.float32)
        return SIGMA_INIT * (1 + SIGMA_FACTOR * h)

    def read_tensors(self, B, Ck, Cv, T, H, W):
        return self.randn(B, Ck, H, W), self.randn(B, Ck, T, H, W), self.randn(B, Cv, T, H, W)

    def dense_mb(self, B, rows, cols, copies):
        """MB of `copies` dense (B, rows, cols) matrices: a baseline's rough peak."""
        return copies * B * rows * cols * max(4, self.dtype.itemsize) / common.MB

    def extra(self, names_and_fns):
        """The attention-kernel baselines that apply here: SDPA/Flex on CUDA, or when named."""
        return [(n, f) for n, f in names_and_fns if n in self.wanted and (self.cuda or self.explicit)]

    # -- kernel_guided_read (docs/ops.md section 1)
    def read(self, s, T, variant, **case_kw):
        H, W = s["res4"]
        Ck, Cv, k = s["key4"], s["val4"], s["k3"]
        B = s.get("B", self.B)
        HW, M = H * W, T * H * W
        frames = (0,) if T == 1 else (0, T - 1)
        shape = dict(B=B, Ck=Ck, Cv=Cv, T=T, H=H, W=W)
        if variant != "stm":
            shape.update(topk=k, topk_frames=list(frames))
        if variant.endswith("track"):
            shape.update(window=WINDOW)
        kw = dict(topk=k, topk_frames=frames)

        def setup():
            import hmmn_ops

            qk, mk, mv = self.read_tensors(B, Ck, Cv, T, H, W)
            sigma = self.sigma(T)
            plain = Baseline("bmm_softmax_bmm", bl.dense_read, variant == "stm", self.dense_mb(B, M, HW, 2))
            if variant == "stm":
                def call(backend, qk, mk, mv):
                    return hmmn_ops.kernel_guided_read(qk, mk, mv, backend=backend)
                base = [plain]
                base += [Baseline(n, f, True, self.dense_mb(B, M, HW, 1)) for n, f in self.extra(
                    [("sdpa", bl.sdpa_read), ("flex", bl.flex_read)])]
                return Setup((qk, mk, mv), call, base)

            if variant == "gauss+top":
                centers = self.near(B, T, H, W)

                def call(backend, qk, mk, mv, centers, sigma):
                    return hmmn_ops.kernel_guided_read(qk, mk, mv, centers, sigma, **kw, backend=backend)

                def gauss(fn):
                    return lambda qk, mk, mv, c, s: fn(qk, mk, mv, c, s, **kw)
                base = [
                    Baseline("naive", gauss(bl.naive_kernel_read), True, self.dense_mb(B, M, HW, 4)),
                    Baseline("dense", gauss(bl.dense_read), True, self.dense_mb(B, M, HW, 4)),
                    dataclasses.replace(plain, fn=lambda qk, mk, mv, c, s: bl.dense_read(qk, mk, mv)),
                ]
                need = self.dense_mb(B, M, HW, 2) + self.dense_mb(B, len(frames) * HW, HW, 2)  # bias, top-k pass
                base += [Baseline(n, gauss(f), True, need)
                         for n, f in self.extra([("sdpa", bl.sdpa_read), ("flex", bl.flex_read)])]
                return Setup((qk, mk, mv, centers, sigma), call, base)

            # gauss+top+track: the newest frame tracked into the query, older frames chained to it
            chain = self.near(B, T - 1, H, W)

            def call(backend, qk, mk, mv, chain, sigma):
                step = hmmn_ops.local_track(mk[:, :, -1], qk, WINDOW, backend=backend)
                centers = bl.chain_centers(step, chain)
                return hmmn_ops.kernel_guided_read(qk, mk, mv, centers, sigma, **kw, backend=backend)

            def tracked(fn):
                return lambda qk, mk, mv, ch, s: fn(qk, mk, mv, ch, s, **kw, window=WINDOW)
            base = [
                Baseline("naive", tracked(bl.naive_tracked_read), True, self.dense_mb(B, M, HW, 5)),
                Baseline("dense", tracked(bl.dense_tracked_read), True, self.dense_mb(B, M, HW, 4)),
                dataclasses.replace(plain, fn=lambda qk, mk, mv, ch, s: bl.dense_read(qk, mk, mv)),
            ]
            return Setup((qk, mk, mv, chain, sigma), call, base)

        flops = 2 * B * M * HW * (Ck + Cv)
        return Case("kernel_guided_read", variant, shape, setup, (flops, "TFLOP/s"), **case_kw)

    # -- topk_guided_read (docs/ops.md section 5): memory = first and previous frame, indices from res4's top-k
    def topk_shape(self, s, level):
        Hc, Wc = s["res4"]
        r = 2 if level == "res3" else 4
        Ck, Cv, k = (s["key3"], s["val3"], s["k3"]) if level == "res3" else (s["key2"], s["val2"], s["k2"])
        return dict(B=s.get("B", self.B), Ck=Ck, Cv=Cv, T=2, H=Hc * r, W=Wc * r, r=r, k=k)

    def topk_tensors(self, d):
        """query/memory keys and values, and distinct indices like the torch.topk output HMMN uses."""
        B, T, Nc = d["B"], d["T"], (d["H"] // d["r"]) * (d["W"] // d["r"])
        idx = torch.rand(B, Nc, T * Nc, device=self.device).topk(d["k"], dim=2).indices
        return (self.randn(B, d["Ck"], d["H"], d["W"]), self.randn(B, d["Ck"], T, d["H"], d["W"]),
                self.randn(B, d["Cv"], T, d["H"], d["W"]), idx)

    def topk_naive_mb(self, d, copies):
        """The one-hot (B, Nc, T*Nc) plus `copies` gathered (B, Nc, k*r*r, Ck+Cv) tensors."""
        B, T, Nc = d["B"], d["T"], (d["H"] // d["r"]) * (d["W"] // d["r"])
        gathered = copies * B * Nc * d["k"] * d["r"] ** 2 * (d["Ck"] + d["Cv"]) * max(4, self.dtype.itemsize)
        return self.dense_mb(B, Nc, T * Nc, 1) + gathered / common.MB

    def topk_flops(self, d):
        return 2 * d["B"] * d["H"] * d["W"] * d["k"] * d["r"] ** 2 * (d["Ck"] + d["Cv"])

    def topk_read(self, s, level, **case_kw):
        d = self.topk_shape(s, level)

        def setup():
            import hmmn_ops

            def call(backend, qk, mk, mv, idx):
                return hmmn_ops.topk_guided_read(qk, mk, mv, idx, backend=backend)
            base = [Baseline("naive", lambda qk, mk, mv, idx: bl.naive_topk_read(qk, mk, mv, idx), True,
                             self.topk_naive_mb(d, 2))]
            # yardstick only: dense attention over the whole 2-frame fine memory
            HW = d["H"] * d["W"]
            base += [Baseline(f"{n}_dense", lambda qk, mk, mv, idx, f=f: f(qk, mk, mv), False,
                              self.dense_mb(d["B"], d["T"] * HW, HW, 1), flag=n)
                     for n, f in self.extra([("sdpa", bl.sdpa_read)])]
            return Setup(self.topk_tensors(d), call, base)

        return Case("topk_guided_read", level, d, setup, (self.topk_flops(d), "TFLOP/s"), **case_kw)

    # -- local_track (docs/ops.md section 3)
    def local(self, s, **case_kw):
        H, W = s["res4"]
        C, B = s["key4"], s.get("B", self.B)

        def setup():
            import hmmn_ops

            def call(backend, mk, qk):
                return hmmn_ops.local_track(mk, qk, WINDOW, backend=backend)
            base = [Baseline("naive", lambda mk, qk: bl.naive_local_track(mk, qk, WINDOW), True,
                             self.dense_mb(B, H * W, H * W, 2))]
            return Setup((self.randn(B, C, H, W), self.randn(B, C, H, W)), call, base)

        shape = dict(B=B, Ck=C, H=H, W=W, window=WINDOW)
        return Case("local_track", "", shape, setup, (2 * B * H * W * WINDOW ** 2 * C, "TFLOP/s"), **case_kw)

    # -- global_track (docs/ops.md section 4)
    def global_(self, s, T, **case_kw):
        H, W = s["res4"]
        C, B = s["key4"], s.get("B", self.B)

        def setup():
            import hmmn_ops

            def call(backend, mk, qk):
                return hmmn_ops.global_track(mk, qk, backend=backend)
            base = [Baseline("naive", bl.naive_global_track, True, self.dense_mb(B, T * H * W, H * W, 1))]
            return Setup((self.randn(B, C, T, H, W), self.randn(B, C, H, W)), call, base)

        shape = dict(B=B, Ck=C, T=T, H=H, W=W)
        return Case("global_track", "", shape, setup, (2 * B * T * (H * W) ** 2 * C, "TFLOP/s"), **case_kw)

    # -- gaussian_softmax (docs/ops.md section 2)
    def gsoftmax(self, s, T, **case_kw):
        H, W = s["res4"]
        B, HW = s.get("B", self.B), H * W

        def setup():
            import hmmn_ops

            affinity = self.randn(B, T * HW, HW)
            centers = self.near(B, T, H, W)

            def call(backend, affinity, centers, sigma):
                return hmmn_ops.gaussian_softmax(affinity, centers, sigma, size=(H, W), backend=backend)
            base = [
                Baseline("naive", lambda a, c, s: bl.naive_gaussian_softmax(a, c, s, size=(H, W)), True,
                         self.dense_mb(B, T * HW, HW, 4)),
                Baseline("dense", lambda a, c, s: bl.dense_gaussian_softmax(a, c, s, size=(H, W)), True,
                         self.dense_mb(B, T * HW, HW, 4)),
            ]
            return Setup((affinity, centers, self.sigma(T)), call, base)

        shape = dict(B=B, T=T, H=H, W=W)
        nbytes = 2 * B * T * HW * HW * self.dtype.itemsize  # one read, one write
        return Case("gaussian_softmax", "", shape, setup, (nbytes, "GB/s"), **case_kw)

    # -- backward: forward + backward of the differentiable reads at the training shape
    def read_backward(self, s, **case_kw):
        H, W = s["res4"]
        Ck, Cv, T, B = s["key4"], s["val4"], s["T"], s.get("B", self.B)
        HW, M = H * W, T * H * W

        def setup():
            import hmmn_ops

            def call(backend, qk, mk, mv, grad):
                return _forward_backward(
                    lambda q, k, v: hmmn_ops.kernel_guided_read(q, k, v, backend=backend), (qk, mk, mv), grad)
            base = [Baseline("naive", lambda qk, mk, mv, g: _forward_backward(bl.dense_read, (qk, mk, mv), g), True,
                             self.dense_mb(B, M, HW, 4))]
            base += [Baseline(n, lambda qk, mk, mv, g, f=f: _forward_backward(f, (qk, mk, mv), g), True,
                              self.dense_mb(B, M, HW, 1))
                     for n, f in self.extra([("sdpa", bl.sdpa_read), ("flex", bl.flex_read)])]
            return Setup(self.read_tensors(B, Ck, Cv, T, H, W) + (self.randn(B, Cv, H, W),), call, base)

        shape = dict(B=B, Ck=Ck, Cv=Cv, T=T, H=H, W=W)
        flops = 2 * B * M * HW * (Ck + Cv) * 3.5  # forward + backward (recomputed scores)
        return Case("kernel_guided_read_backward", "stm", shape, setup, (flops, "TFLOP/s"), **case_kw)

    def topk_read_backward(self, s, **case_kw):
        d = self.topk_shape(s, "res3")

        def setup():
            import hmmn_ops

            def call(backend, qk, mk, mv, idx, grad):
                return _forward_backward(
                    lambda q, k, v: hmmn_ops.topk_guided_read(q, k, v, idx, backend=backend), (qk, mk, mv), grad)

            def naive(qk, mk, mv, idx, grad):
                return _forward_backward(lambda q, k, v: bl.naive_topk_read(q, k, v, idx), (qk, mk, mv), grad)
            tensors = self.topk_tensors(d) + (self.randn(d["B"], d["Cv"], d["H"], d["W"]),)
            return Setup(tensors, call, [Baseline("naive", naive, True, self.topk_naive_mb(d, 4))])

        flops = self.topk_flops(d) * 3.5  # forward + backward (recomputed scores)
        return Case("topk_guided_read_backward", "res3", d, setup, (flops, "TFLOP/s"), **case_kw)


    # -- memory_read: the fused read against the released codes' dense read
    def memory_read(self, res, variant, big=False, **case_kw):
        d = MEMORY_READS[res][variant]
        Q, M, Ck, Cv, topk, sim = d["Q"], d["M"], d["Ck"], d["Cv"], d["topk"], d["similarity"]
        B, Nq, Nm = self.B, math.prod(d["Q"]), math.prod(d["M"])
        shape = dict(B=B, Ck=Ck, Cv=Cv, Nq=Nq, Nm=Nm, topk=topk, similarity=sim, Q=list(Q), M=list(M),
                     shrinkage=d["terms"], selection=d["terms"], usage=d["usage"])
        kw = dict(similarity=sim, topk=topk, return_usage=d["usage"])

        def setup():
            import hmmn_ops

            tensors = (self.randn(B, Ck, *Q), self.randn(B, Ck, *M), self.randn(B, Cv, *M))
            if d["terms"]:  # XMem: shrinkage = s^2 + 1 >= 1, selection = sigmoid(.) in (0, 1)
                tensors += (torch.rand(B, 1, *M, device=self.device, dtype=self.dtype) + 1,
                            torch.rand(B, Ck, *Q, device=self.device, dtype=self.dtype))

            def call(backend, q, k, v, w=None, e=None):
                return hmmn_ops.memory_read(q, k, v, memory_shrinkage=w, query_selection=e, **kw, backend=backend)

            dense = Baseline("dense", lambda q, k, v, w=None, e=None: bl.dense_memory_read(q, k, v, w, e, **kw), True,
                             self.dense_mb(B, Nm, Nq, 2))
            if big and not self.cuda and not self.explicit:
                dense.skip = (f"skipped on the CPU: needs ~{dense.need_mb / 1024:.1f} GB for the score matrix and "
                              f"its temporaries (name it in --baselines to run it)")
            base = [dense]
            if topk == 0:  # the two products alone, as one yardstick for both similarities
                base.append(Baseline("gemm_bound", lambda q, k, v, *terms: bl.gemm_bound(q, k, v), False,
                                     self.dense_mb(B, Nm, Nq, 1), flag="dense"))
            if topk == 0 and sim == "dot":  # SDPA computes exactly this read (CUDA, or when named)
                base += [Baseline(n, lambda q, k, v: f(q, k, v)) for n, f in self.extra([("sdpa", bl.sdpa_memory_read)])]
            return Setup(tensors, call, base)

        # score products over all memory (+ the read of the k selected, or the full value product)
        flops = 2 * B * Nq * Nm * Ck + 2 * B * Nq * (topk * (Ck + Cv) if topk else Nm * Cv)
        return Case("memory_read", variant, shape, setup, (flops, "TFLOP/s"), **case_kw)


def _forward_backward(fn, inputs, grad):
    """Gradients of <fn(*inputs), grad> with respect to the inputs (fresh leaves each call)."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    fn(*leaves).backward(grad)
    return tuple(x.grad for x in leaves)


def build_cases(args, device, dtype):
    builder = Builder(device, dtype, args.objects, args.baselines, args.baselines_explicit)
    cases = []
    for res in args.res:
        s = SHAPES[res]
        frames = args.frames or [s["T"]]
        if "kernel_guided_read" in args.ops:
            for T in frames:
                cases += [builder.read(s, T, "stm"), builder.read(s, T, "gauss+top"),
                          builder.read(s, T, "gauss+top+track")]
        if "topk_guided_read" in args.ops:
            cases += [builder.topk_read(s, "res3"), builder.topk_read(s, "res2")]
        if "local_track" in args.ops:
            cases.append(builder.local(s))
        if "global_track" in args.ops:
            cases.append(builder.global_(s, frames[0]))
        if "gaussian_softmax" in args.ops:
            cases.append(builder.gsoftmax(s, frames[0]))
    train = SHAPES["small"] if args.quick else SHAPES["train"]
    if "kernel_guided_read_backward" in args.ops:
        cases.append(builder.read_backward(train))
    if "topk_guided_read_backward" in args.ops:
        cases.append(builder.topk_read_backward(train))
    if args.big and "kernel_guided_read" in args.ops:
        # the long-video / high-resolution memory row: one timed call is enough; checking it
        # against float64 on a CPU would cost more than the whole table
        cases.append(builder.read(SHAPES["1080p"], SHAPES["1080p"]["T"], "gauss+top",
                                  check=device.type == "cuda", budget_scale=0.0,
                                  only=("naive", "dense", "sdpa", "flex")))
    if "memory_read" in args.ops:
        for res in args.res:
            for variant in MEMORY_READS[res]:
                big = res == "1080p"
                # one timed call at 1080p, unchecked on a CPU (the float64 reference costs minutes there)
                cases.append(builder.memory_read(res, variant, big, check=not big or device.type == "cuda",
                                                 budget_scale=0.0 if big else 1.0))
        if args.big:
            cases.append(builder.memory_read("1080p", "xmem", True, check=device.type == "cuda", budget_scale=0.0))
    for T in args.sweep:
        cases.append(builder.read(SHAPES["small" if args.quick else "480p"], T, "gauss+top+track",
                                  check=False, sweep="T", budget_scale=0.5, only=("naive",)))
    return cases


# ---------------------------------------------------------------- measuring


@dataclasses.dataclass
class Result:
    ms: Optional[float] = None
    n: int = 0
    peak_mb: Optional[float] = None
    max_err: Optional[float] = None
    idx_mismatch: Optional[float] = None
    note: str = ""


def _compare(out, ref):
    """Max abs error over the floating outputs; fraction of differing entries over index outputs."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    max_err = idx_mismatch = None
    for o, r in zip(outs, refs):
        if o is None or r is None or o.numel() == 0:
            continue
        if o.is_floating_point():
            err = (o.double() - r.double()).abs().max().item()
            max_err = err if max_err is None or not math.isfinite(err) else max(max_err, err)
        else:
            frac = (o != r).double().mean().item()
            idx_mismatch = frac if idx_mismatch is None else max(idx_mismatch, frac)
    return max_err, idx_mismatch


def _is_oom(err):
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def measure(fn, device, args, budget, reference):
    """Peak memory, median time, error against the reference.

    The first call is the warm-up (compilation, autotuning, lazy loading) and sizes the run;
    when it is cheap the peak is taken from a second, warm call, else from the first (where
    one-time costs are small next to the call itself). Timing follows without another warm-up.
    """
    res = Result()
    try:
        if device.type == "cuda":
            fn()  # compilation and autotuning happen outside the memory measurement
        res.peak_mb, seconds, out = common.peak_memory(fn, device)
        if budget == 0:  # a single-call row (1080p): that call is the timing too
            res.ms, res.n = seconds * 1e3, 1
        else:
            if seconds < budget / 3:
                del out
                res.peak_mb, seconds, out = common.peak_memory(fn, device)
            res.ms, res.n = common.time_fn(fn, device, repeats=args.repeats, budget_s=budget, estimate_s=seconds)
    except Exception as err:  # a backend that refuses these inputs, or out of memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        res.note = "out of memory" if _is_oom(err) else f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return res
    if reference is not None:
        res.max_err, res.idx_mismatch = _compare(out, reference())
        if res.max_err is not None and not math.isfinite(res.max_err):
            res.max_err, res.note = None, "non-finite output"
    return res


def run_case(case, args, device, backends, log):
    setup = case.setup()
    ref_cache = {}

    def reference():
        if "out" not in ref_cache:
            wide = [t.double() if t.is_floating_point() else t for t in setup.tensors]
            ref_cache["out"] = setup.call("reference", *wide)
        return ref_cache["out"]

    check = reference if case.check and not args.no_check else None
    budget = args.budget * case.budget_scale
    ours = {}
    for backend in backends:
        why = refusal(backend, case.op.removesuffix("_backward"), device)
        if why is None:
            r = measure(lambda b=backend: setup.call(b, *setup.tensors), device, args, budget, check)
        else:
            r = Result(note=why)
        ours[backend] = r
        if r.ms is None:
            log(f"  {case.op} [{case.variant}] backend={backend} skipped: {r.note}")
    bases = {}
    for b in setup.baselines:
        if b.flag not in args.baselines or (case.only and b.name not in case.only):
            continue
        limit = args.mem_limit * 1024 if args.mem_limit else 0.4 * common.available_memory_mb(device)
        if b.skip:
            bases[b] = Result(note=b.skip)
        elif b.need_mb > limit:
            bases[b] = Result(note=f"skipped: needs ~{b.need_mb / 1024:.1f} GB (estimated), "
                                   f"limit {limit / 1024:.1f} GB (--mem-limit)")
        else:
            bases[b] = measure(lambda b=b: b.fn(*setup.tensors), device, args, budget,
                               check if b.same_function else None)
        if bases[b].ms is None:
            log(f"  {case.op} [{case.variant}] baseline={b.name}: {bases[b].note}")
    return ours, bases


# ---------------------------------------------------------------- records and table


def make_records(case, ours, bases, dtype_name, env):
    amount, unit = case.work
    records = []
    for backend, r in ours.items():
        if r.ms is None:
            continue
        rate = None
        if amount:
            rate = amount / (r.ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
        pairs = list(bases.items()) or [(None, Result())]
        for b, br in pairs:
            records.append(dict(
                op=case.op, variant=case.variant, sweep=case.sweep, shape=case.shape, label=case.label,
                dtype=dtype_name, backend=backend,
                baseline=None if b is None else b.name, same_function=True if b is None else b.same_function,
                ms=r.ms, n=r.n, peak_mb=r.peak_mb, max_err=r.max_err, idx_mismatch=r.idx_mismatch,
                rate=rate, rate_unit=unit or None,
                baseline_ms=br.ms, baseline_n=br.n, baseline_peak_mb=br.peak_mb,
                baseline_max_err=br.max_err, baseline_idx_mismatch=br.idx_mismatch, baseline_note=br.note or None,
                speedup=None if br.ms is None else br.ms / r.ms,
                device=env["device"], torch=env["torch"], triton=env["triton"], cuda=env["cuda"],
                date=env["date"], command=env["command"],
            ))
    return records


def _num(x, fmt):
    return "-" if x is None else format(x, fmt)


def _err(max_err, mismatch):
    parts = []
    if max_err is not None:
        parts.append(f"{max_err:.1e}")
    if mismatch is not None:
        parts.append(f"idx {mismatch * 100:.2g}%")
    return " ".join(parts) or "-"


def _rate(value, unit):
    return "-" if value is None else f"{value:.3g} {unit}"


def table(records):
    """One line per implementation of each case: ours first, then the baselines with the
    speedup of each of our backends over them (baseline ms / backend ms)."""
    groups = {}
    for r in records:
        groups.setdefault((r["dtype"], r["op"], r["variant"], r["label"]), []).append(r)
    backends = list(dict.fromkeys(r["backend"] for r in records))
    rows = []
    for (dtype, op, variant, label), recs in groups.items():
        first = dict(op=op + (f" [{variant}]" if variant else ""), shape=label, dtype=dtype)
        ms = {}
        for r in recs:
            if r["backend"] in ms:
                continue
            ms[r["backend"]] = r["ms"]
            rows.append(dict(first, impl=r["backend"], ms=_num(r["ms"], ".2f"), rate=_rate(r["rate"], r["rate_unit"]),
                             mb=_num(r["peak_mb"], ".1f"), err=_err(r["max_err"], r["idx_mismatch"])))
            first = {}
        seen = set()
        for r in recs:
            if r["baseline"] is None or r["baseline"] in seen:
                continue
            seen.add(r["baseline"])
            row = dict(first, impl=r["baseline"] + ("" if r["same_function"] else "*"))
            first = {}
            if r["baseline_ms"] is None:
                rows.append(dict(row, ms="-", note=r["baseline_note"] or ""))
                continue
            rate = None if r["rate"] is None else r["rate"] * r["ms"] / r["baseline_ms"]
            row.update(ms=_num(r["baseline_ms"], ".2f"), rate=_rate(rate, r["rate_unit"]),
                       mb=_num(r["baseline_peak_mb"], ".1f"),
                       err=_err(r["baseline_max_err"], r["baseline_idx_mismatch"]) if r["same_function"] else "")
            for b in backends:
                if ms.get(b):
                    row[b] = f"{r['baseline_ms'] / ms[b]:.2f}x"
            rows.append(row)
    columns = [("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("impl", "implementation"), ("ms", "ms"),
               ("rate", "throughput"), ("mb", "peak MB"), ("err", "max err")]
    columns += [(b, f"{b} speedup") for b in backends] + [("note", "note")]
    return common.format_table(rows, columns)


def matmul_tflops(device, dtype):
    """Dense matmul throughput on this device and dtype: the yardstick for the read's TFLOP/s."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    ms, _ = common.time_fn(lambda: a @ a, device, repeats=20, budget_s=0.3)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def refusal(backend, op, device):
    """Why hmmn_ops says `backend` cannot run `op` here, or None (then a failure is caught when run)."""
    try:
        from hmmn_ops.backends import refusal as why
    except ImportError:
        return None
    return why(backend, op, device)


def backends_summary(device):
    """One line per backend from hmmn_ops.backends(): the ops it runs here, or why not."""
    import hmmn_ops

    try:
        info = hmmn_ops.backends(device)
    except Exception as err:  # an older or broken registry should not stop the benchmark
        return [f"hmmn_ops.backends() failed: {err}"]
    lines = []
    for backend, ops in info.items():
        if backend == "auto":
            lines.append("auto -> " + ", ".join(f"{op}: {choice}" for op, choice in ops.items()))
            continue
        ok = [op for op, why in ops.items() if why is None]
        reasons = sorted({why for why in ops.values() if why is not None})
        text = "all ops" if len(ok) == len(ops) else (", ".join(ok) or "no ops")
        if reasons:
            text += " (" + "; ".join(r[:90] for r in reasons[:2]) + ("; ..." if len(reasons) > 2 else "") + ")"
        lines.append(f"{backend}: {text}")
    return lines


# ---------------------------------------------------------------- main


def _csv(kind, choices=None):
    def parse(text):
        if text.strip().lower() == "none":
            return []
        items = [x.strip() for x in text.split(",") if x.strip()]
        items = [kind(x) for x in items]
        if choices is not None:
            bad = [x for x in items if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(map(str, choices))}")
        return items
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=_csv(str, OPS), default=None,
                   help="comma-separated ops (default: all but memory_read; the *_backward ones only on CUDA); "
                        "--ops memory_read: the XMem / STCN / full-read table")
    p.add_argument("--res", "--shapes", dest="res", type=_csv(str, ("small", "480p", "1080p")), default=None,
                   help="shape presets: small, 480p, 1080p (default 480p; small with --quick)")
    p.add_argument("--frames", type=_csv(int), default=None,
                   help="memory frames T of the res4 reads, e.g. 2,6,21 (default: the preset's)")
    p.add_argument("--dtype", type=_csv(str, DTYPES), default=None,
                   help="float32, float64, float16, bfloat16 (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--backends", type=_csv(str, BACKENDS), default=None,
                   help="our backends to time (default native,reference, plus triton on CUDA)")
    p.add_argument("--baselines", type=_csv(str, BASELINES), default=None,
                   help="naive,dense,bmm_softmax_bmm (default), sdpa,flex (default on CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--objects", "-B", type=int, default=1, help="objects (the batch), default 1")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's; 1 with --quick, where tiny ops only suffer from sharing)")
    p.add_argument("--repeats", type=int, default=None, help="most timed calls per row (default 10 CPU, 50 CUDA)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed calls per row (1 CPU, 0.5 CUDA)")
    p.add_argument("--sweep", type=_csv(int), default=None, help="T values of the sweep plot, or 'none'")
    p.add_argument("--no-1080p", dest="big", action="store_false", help="skip the 1080p memory row")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the float64 reference")
    p.add_argument("--mem-limit", type=float, default=None,
                   help="GB: skip a baseline whose estimated peak exceeds it (default 40%% of the available memory)")
    p.add_argument("--json", help="output JSON (default benchmarks/results/<device>/ops_<res>_<dtype>.json)")
    p.add_argument("--plot", help="folder for the PNG (default: the JSON's folder)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke test in seconds")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    return p.parse_args(argv)


def resolve(args):
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available here")
    cuda = device.type == "cuda"
    if args.ops is None:
        # memory_read has its own table (--ops memory_read); the backward rows run on CUDA
        args.ops = [op for op in OPS if op != "memory_read" and (cuda or args.quick or not op.endswith("_backward"))]
    if args.res is None:
        args.res = ["small"] if args.quick else ["480p"]
    if args.dtype is None:
        args.dtype = ["bfloat16" if cuda else "float32"]
    args.baselines_explicit = args.baselines is not None
    if args.baselines is None:
        args.baselines = ["naive", "dense", "bmm_softmax_bmm"] + (["sdpa", "flex"] if cuda else [])
    if args.backends is None:
        args.backends = ["native", "triton", "reference"] if cuda else ["native", "reference"]
    if args.repeats is None:
        args.repeats = 3 if args.quick else (50 if cuda else 10)
    if args.budget is None:
        args.budget = 0.05 if args.quick else (0.5 if cuda else 1.0)
    if args.sweep is None:  # the sweep is of kernel_guided_read
        args.sweep = [] if "kernel_guided_read" not in args.ops else [1, 2, 3] if args.quick else [2, 5, 10, 15, 20]
    if args.quick or "480p" not in args.res or "1080p" in args.res:
        args.big = False
    if args.objects < 1:
        sys.exit(f"--objects must be >= 1, got {args.objects}")
    if args.threads is None and args.quick:
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return device


def main(argv=None):
    args = parse_args(argv)
    device = resolve(args)
    from tqdm import tqdm

    import hmmn_ops  # noqa: F401  (fails early and clearly if the package is missing)

    env = common.environment(device, None if argv is None else ["benchmarks/bench_ops.py", *argv])
    start = time.time()
    records, skipped = [], []
    meta = dict(env, res=args.res, objects=args.objects, backends_info=backends_summary(device), matmul_tflops={},
                skipped=skipped)

    def log(message):
        skipped.append(message.strip())
        tqdm.write(message, file=sys.stderr)

    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        meta["matmul_tflops"][dtype_name] = matmul_tflops(device, dtype)
        cases = build_cases(args, device, dtype)
        bar = tqdm(cases, desc=dtype_name, unit="case", file=sys.stderr, dynamic_ncols=True)
        for case in bar:
            bar.set_postfix_str(f"{case.op} {case.variant} {case.label}"[:60])
            torch.manual_seed(0)
            ours, bases = run_case(case, args, device, args.backends, log)
            records += make_records(case, ours, bases, dtype_name, env)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    meta["seconds"] = round(time.time() - start, 1)
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    header = [
        f"device: {env['device']}   threads: {env['threads']}   dtypes: {', '.join(args.dtype)}   "
        f"objects: {args.objects}   load average: {env['loadavg']}",
        f"torch {env['torch']}   cuda {env['cuda']}   triton {env['triton']}   "
        f"hmmn_ops build {env['hmmn_ops_build']}",
        "matmul TFLOP/s: " + ", ".join(f"{k} {v:.3g}" for k, v in meta["matmul_tflops"].items()),
        f"{env['date']}   {env['command']}   ({meta['seconds']} s)",
    ]
    header += [f"  {line}" for line in meta["backends_info"]]
    main_rows = [r for r in records if r["sweep"] is None]
    print("\n".join(header))
    print(table(main_rows))
    sweep_rows = [r for r in records if r["sweep"] == "T"]
    if sweep_rows:
        print("\nT sweep (kernel_guided_read, Gaussian + top-k, tracking included):")
        print(table(sweep_rows))
    print("* yardstick: not the same function (no error). speedup = baseline ms / backend ms. "
          "max err: vs float64 reference; idx: share of indices that differ")

    # --quick saves only where told to, so it never replaces a recorded run
    json_path = args.json
    if json_path is None and not (args.quick or args.no_save):
        name = "memory_read" if args.ops == ["memory_read"] else "ops"
        json_path = os.path.join(HERE, "results", common.device_slug(device),
                                 f"{name}_{'-'.join(args.res)}_{'-'.join(args.dtype)}.json")
    if json_path:
        common.write_json(json_path, dict(meta=meta, records=records))
        print(f"wrote {json_path}")
    plot_dir = args.plot or (json_path and os.path.dirname(os.path.abspath(json_path)))
    if plot_dir and sweep_rows:
        for path in plot_t_sweep(records, plot_dir):
            print(f"wrote {path}")
    if plot_dir and any(r["op"] == "memory_read" for r in records):
        for path in plot_memory_read(records, plot_dir):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
