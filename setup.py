"""Builds hmmn_ops._C: C++ CPU kernels always, CUDA kernels when nvcc and a CUDA torch are there.

Knobs (environment variables):
  HMMN_OPS_CUDA=auto|0|1   build the CUDA kernels (auto: when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST     archs to build, default "8.0;8.6;8.9;9.0+PTX"
  MAX_JOBS                 parallel compile jobs (ninja), default: the number of cores
  HMMN_OPS_DEBUG=1         -O0 -g
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def want_cuda():
    flag = os.environ.get("HMMN_OPS_CUDA", "auto").lower()
    if flag not in ("auto", "0", "1"):
        sys.exit(f"HMMN_OPS_CUDA must be auto, 0 or 1, got {flag!r}")
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not have:
        sys.exit(
            "HMMN_OPS_CUDA=1 but this torch has no CUDA "
            f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found (CUDA_HOME={CUDA_HOME})"
        )
    return have if flag == "auto" else flag == "1"


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extension():
    cuda = want_cuda()
    debug = os.environ.get("HMMN_OPS_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx = opt + ["-fopenmp", "-DHMMN_OPS_PY_MODULE"]
    args = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    archs = ""
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        nvcc = opt + ["--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-DHMMN_OPS_WITH_CUDA"]
        ext = CUDAExtension("hmmn_ops._C", sources, extra_compile_args={"cxx": cxx + ["-DHMMN_OPS_WITH_CUDA"], "nvcc": nvcc}, **args)
    else:
        ext = CppExtension("hmmn_ops._C", sources, extra_compile_args={"cxx": cxx}, **args)
    config = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_built": cuda,
        "cuda_archs": archs,
        "debug": debug,
        "sources": sources,
    }
    print("hmmn_ops build configuration:")
    for k, v in config.items():
        if k != "sources":
            print(f"  {k:14s} {v}")
    print(f"  {'sources':14s} {len(sources)} files; MAX_JOBS={os.environ.get('MAX_JOBS', os.cpu_count())}")
    with open(os.path.join(ROOT, "hmmn_ops", "_build_config.py"), "w") as f:
        f.write("# Written by setup.py at build time; read by hmmn_ops at import to catch a stale build.\n")
        f.write(f"BUILD_CONFIG = {config!r}\n")
    return ext


os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
