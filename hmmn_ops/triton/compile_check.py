"""Compile every Triton kernel for NVIDIA GPUs on a machine without one (Triton's bundled ptxas).

    python -m hmmn_ops.triton.compile_check [--arch 80,90] [--dtype float16,bfloat16,float32] [--all-configs]

Runs every op's host code on small CPU tensors with Triton's launches intercepted, then compiles
each intercepted kernel ahead of time for each architecture: the first autotune config that the
kernel's pruning keeps for that dtype, or all of them with ``--all-configs`` (slow: minutes).
Prints registers, spill stack and shared memory per kernel when ``cuobjdump`` is bundled too.
Exits non-zero if any kernel fails to compile. Must run without TRITON_INTERPRET=1.

It catches what the CPU interpreter cannot: code that the interpreter accepts but the compiler
rejects (layouts, dtypes, shapes of tl.dot), and register or shared-memory blow-ups.
"""
import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile

import torch

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32"}


@contextlib.contextmanager
def _intercepted_launches():
    """Record (JITFunction, configs, args, kwargs) of every launch instead of running it."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches = []

    def tuned(self, *args, **kwargs):
        configs = self.configs
        if self.early_config_prune:
            configs = self.early_config_prune(configs, dict(zip(self.arg_names, args)), **kwargs)
        launches.append((self.fn, configs, args, kwargs))

    def plain(self, *args, grid=None, warmup=False, **kwargs):
        launches.append((self, [None], args, kwargs))

    saved = Autotuner.run, JITFunction.run
    Autotuner.run, JITFunction.run = tuned, plain
    try:
        yield launches
    finally:
        Autotuner.run, JITFunction.run = saved


def _run_every_op(dtype):
    """Every op and backward at shapes that reach every kernel (memory split, value tiles, top-k)."""
    from . import (
        gaussian_softmax,
        gaussian_softmax_backward,
        global_track,
        kernel_guided_read,
        kernel_guided_read_backward,
        local_track,
        memory_read,
        memory_read_backward,
        topk_guided_read,
        topk_guided_read_backward,
    )

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    B, Ck, Cv, T, H, W = 1, 128, 256, 4, 8, 16
    q, k = torch.randn(B, Ck, H, W).to(dtype), torch.randn(B, Ck, T, H, W).to(dtype)
    v = torch.randn(B, Cv, T, H, W).to(dtype)
    centers, sigma = torch.randint(-1, H * W, (B, T, H, W)), torch.ones(B, T, dtype=acc)
    for c, s in ((None, None), (centers, sigma)):
        out, lse, _ = kernel_guided_read(q, k, v, c, s, 0.1, 32, [0, T - 1])
        kernel_guided_read_backward(out, q, k, v, c, s, out, lse, 0.1)
    for r, kk in ((2, 32), (4, 8)):
        idx = torch.randint(0, T * (H // r) * (W // r), (B, (H // r) * (W // r), kk))
        out, lse = topk_guided_read(q, k, v, idx, 0.1, r)
        topk_guided_read_backward(out, q, k, v, idx, out, lse, 0.1, r)
    y = gaussian_softmax(torch.randn(B, T * H * W, H * W).to(dtype), centers, sigma, H, W)
    gaussian_softmax_backward(y, y)
    local_track(q, q, 7)
    global_track(k, q)
    # memory_read at XMem's channels (key 64, value 512).
    Nq, Nm, Ck, Cv = 96, 700, 64, 512
    q, k, v = torch.randn(B, Ck, Nq).to(dtype), torch.randn(B, Ck, Nm).to(dtype), torch.randn(B, Cv, Nm).to(dtype)
    w, e = torch.rand(B, Nm).to(dtype), torch.rand(B, Ck, Nq).to(dtype)
    # Every constexpr branch once: dot / l2 / l2 + shrinkage + selection, full (with usage) / top-30.
    for sim, ww, ee, topk in (("dot", None, None, 0), ("l2", None, None, 30), ("l2", w, e, 0), ("l2", w, e, 30)):
        # No usage with top-k: its host scatter would read the (never computed) indices.
        out, lse, idx, _ = memory_read(q, k, v, ww, ee, sim, 0.125, topk, topk == 0)
        memory_read_backward(out, q, k, v, ww, ee, out, lse, idx, sim, 0.125)


def _signature(fn, args, kwargs, config):
    values = dict(zip(fn.arg_names, args), **kwargs, **(config.kwargs if config else {}))
    signature, constants = {}, {}
    for param in fn.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    return signature, constants


def _resources(kernel, cuobjdump):
    if not os.path.exists(cuobjdump):
        return f"shared={kernel.metadata.shared}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    regs = f"registers={found.group(1)} spill_stack={found.group(2)} " if found else ""
    return f"{regs}shared={kernel.metadata.shared}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma separated")
    parser.add_argument("--dtype", default="float16,bfloat16,float32", help="input dtypes, comma separated")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not the first")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    failures = 0
    for dtype_name in args.dtype.split(","):
        with _intercepted_launches() as launches:
            _run_every_op(getattr(torch, dtype_name))
        for arch in (int(a) for a in args.arch.split(",")):
            target = GPUTarget("cuda", arch, 32)
            for fn, configs, call_args, kwargs in launches:
                for config in configs if args.all_configs else configs[:1]:
                    name = f"sm_{arch} {dtype_name} {fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
                    options = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {}
                    try:
                        kernel = triton.compile(ASTSource(fn, *_signature(fn, call_args, kwargs, config)),
                                                target=target, options=options)
                        print(f"ok   {name} {config.kwargs if config else ''} {_resources(kernel, cuobjdump)}",
                              flush=True)
                    except Exception as e:  # report every kernel, then fail
                        failures += 1
                        print(f"FAIL {name} {config.kwargs if config else ''}: {type(e).__name__}: {e}", flush=True)
    print(f"{failures} kernel(s) failed to compile" if failures else "every kernel compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
