"""Builds hmmn_ops._C: C++ CPU kernels always, CUDA kernels when nvcc and a CUDA torch are there.

Knobs (environment variables):
  HMMN_OPS_CUDA=auto|0|1   build the CUDA kernels (auto: when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST     archs to build, default "8.0;8.6;8.9;9.0+PTX"
  MAX_JOBS                 parallel compile jobs (ninja), default: the number of cores
  HMMN_OPS_DEBUG=1         -O0 -g, not stripped (release builds: -O3, no debug info, stripped)

The wheel is tied to the torch it is built with (an ABI does not survive a torch upgrade): its
Requires-Dist pins that torch version, and hmmn_ops/_build_config.py records it for the import
check (docs/install.md). Build with --no-build-isolation against the torch you will run.
"""
import glob
import os
import re
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


def schemas():
    """The op schemas csrc/ops.cpp defines (its m.def string literals, joined): recorded in the build
    config so that, when _C cannot be loaded (another torch), hmmn_ops defines the same ops in Python
    and runs them on the reference / Triton backends."""
    with open(os.path.join(ROOT, "csrc", "ops.cpp"), encoding="utf-8") as f:
        text = f.read()
    return ["".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call)) for call in re.findall(r"\bm\.def\((.*?)\);", text, re.S)]


def torch_requirement():
    """The wheel runs on the torch it was built with: pin its public version (2.13.0 for 2.13.0+cpu
    or +cu128: the local label is the CPU/CUDA variant, which shares the C++ ABI)."""
    return f"torch=={torch.__version__.split('+')[0]}"


def license_metadata():
    """MIT, as an SPDX expression (PEP 639) where setuptools knows it (>= 77), else the legacy
    License field: builds run with --no-build-isolation, on whatever setuptools the machine has
    (pyproject.toml's static form works on only one side of 77)."""
    import setuptools

    if tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2]) >= (77, 0):
        return dict(license_expression="MIT", license_files=["LICENSE"])
    return dict(license="MIT")


def extension():
    cuda = want_cuda()
    debug = os.environ.get("HMMN_OPS_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    release_cxx = [] if debug else ["-g0"]  # last, so it wins over a -g in Python's own CFLAGS
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx = opt + ["-fopenmp", "-DHMMN_OPS_PY_MODULE"] + release_cxx
    args = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"] + ([] if debug else ["-Wl,--strip-all"]),
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
        "schemas": schemas(),
    }
    print("hmmn_ops build configuration:")
    for k, v in config.items():
        if k not in ("sources", "schemas"):
            print(f"  {k:14s} {v}")
    print(f"  {'sources':14s} {len(sources)} files; MAX_JOBS={os.environ.get('MAX_JOBS', os.cpu_count())}")
    if "sdist" in sys.argv:  # an sdist carries no build record: leave the checkout's own build alone
        return ext
    with open(os.path.join(ROOT, "hmmn_ops", "_build_config.py"), "w") as f:
        f.write("# Written by setup.py at build time; read by hmmn_ops at import to catch a stale build.\n")
        f.write(f"BUILD_CONFIG = {config!r}\n")
    return ext


os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

setup(
    ext_modules=[extension()],
    install_requires=[torch_requirement(), "numpy>=1.24"],
    **license_metadata(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
