"""Load the compiled extension hmmn_ops._C, or say why it cannot run here.

_C is tied to the torch it was built with (torch's C++ ABI changes between versions: loading a
build made for another torch crashes or fails to link). With another torch installed, _C is not
loaded: a warning names both torches and how to get a matching build, the op schemas that _C would
define (recorded by setup.py in _build_config.py) are defined from Python, and every op runs on the
reference / Triton backends; ``backend="native"`` refuses with ``NATIVE_REFUSAL``.
"""
import importlib.metadata
import os
import warnings

import torch

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCE_ROOT = os.path.dirname(PACKAGE_DIR)
IN_SOURCE_TREE = os.path.isfile(os.path.join(SOURCE_ROOT, "setup.py"))
_REBUILD = f"rebuild it in the source tree {SOURCE_ROOT}: pip install --no-build-isolation --no-deps -e ."

NATIVE_REFUSAL = None  # why the compiled kernels are not loaded, or None when they are
_python_library = None  # the Python-defined hmmn_ops schemas when _C is not loaded (kept alive here)


def _installed_copy():
    """The folder of an installed hmmn_ops other than this one (the case where this unbuilt source
    folder shadows it), or None."""
    for dist in importlib.metadata.distributions(name="hmmn_ops"):
        init = dist.locate_file("hmmn_ops/__init__.py")
        if os.path.isfile(init) and os.path.realpath(os.path.dirname(init)) != os.path.realpath(PACKAGE_DIR):
            return os.path.dirname(str(init))
    return None


def _not_built():
    installed = _installed_copy()
    if installed is not None:
        return (f"`import hmmn_ops` found the source folder {PACKAGE_DIR}, which is not built, instead of the "
                f"installed hmmn_ops in {installed}: the current directory (or PYTHONPATH) puts the source "
                "folder first. Run Python from another directory, or, to work in the source tree, install it "
                "in editable mode there: pip install --no-build-isolation --no-deps -e .")
    if IN_SOURCE_TREE:
        return f"hmmn_ops is not built (no hmmn_ops/_build_config.py): {_REBUILD}"
    return f"hmmn_ops in {PACKAGE_DIR} has no build record (_build_config.py): reinstall it (docs/install.md)"


try:
    from ._build_config import BUILD_CONFIG
except ImportError:
    raise ImportError(_not_built()) from None


def _public(version):
    return version.split("+")[0]


def _mismatch():
    """Why _C cannot run with the installed torch, or None. The local label (+cpu, +cu128) is the
    CPU/CUDA variant of the same release: it shares the C++ ABI, except the CUDA runtime of CUDA kernels."""
    built, installed = BUILD_CONFIG["torch_version"], torch.__version__
    if _public(built) != _public(installed):
        return f"hmmn_ops._C was built against torch {built}, installed is torch {installed}"
    if BUILD_CONFIG["cuda_built"] and torch.version.cuda != BUILD_CONFIG["torch_cuda"]:
        return (f"hmmn_ops._C was built against torch {built} with CUDA {BUILD_CONFIG['torch_cuda']}, "
                f"installed is torch {installed} with CUDA {torch.version.cuda}")
    return None


def _matching_build():
    if IN_SOURCE_TREE:
        return _REBUILD
    pinned = _public(BUILD_CONFIG["torch_version"])
    return (f"install the torch this build is for (pip install torch=={pinned}, from the index of your CPU/CUDA "
            "variant), or build hmmn_ops against your torch from its sdist or a source checkout: "
            "pip install --no-build-isolation --no-deps --force-reinstall <hmmn_ops-*.tar.gz or checkout> "
            "(docs/install.md in the sdist)")


def _define_schemas():
    global _python_library
    if "schemas" not in BUILD_CONFIG:
        raise ImportError(f"{NATIVE_REFUSAL}, and this build does not record its op schemas: {_matching_build()}")
    _python_library = torch.library.Library("hmmn_ops", "DEF")
    for schema in BUILD_CONFIG["schemas"]:
        _python_library.define(schema)


NATIVE_REFUSAL = _mismatch()
if NATIVE_REFUSAL is not None:
    warnings.warn(
        f"{NATIVE_REFUSAL}: the compiled kernels are not loaded, every op runs on the reference (CUDA: Triton) "
        f"backend, much slower. For a matching build: {_matching_build()}",
        RuntimeWarning,
        stacklevel=2,
    )
    _define_schemas()
else:
    try:
        from . import _C  # noqa: F401  (loading it registers the hmmn_ops::* schemas and kernels)
    except ImportError as e:
        raise ImportError(f"hmmn_ops._C failed to load ({e}): "
                          + (_REBUILD if IN_SOURCE_TREE else "reinstall hmmn_ops (docs/install.md)")) from e
