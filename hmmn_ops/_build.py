"""Load the compiled extension, refusing a build made for another torch (an ABI mismatch crashes)."""
import torch

_REBUILD = "rebuild it in the source tree: pip install --no-build-isolation --no-deps -e ."

try:
    from ._build_config import BUILD_CONFIG
except ImportError:
    raise ImportError(f"hmmn_ops is not built (no hmmn_ops/_build_config.py): {_REBUILD}") from None

if BUILD_CONFIG["torch_version"] != torch.__version__:
    raise ImportError(
        f"hmmn_ops._C was built against torch {BUILD_CONFIG['torch_version']} but torch {torch.__version__} "
        f"is installed: {_REBUILD}"
    )

try:
    from . import _C  # noqa: F401  (loading it registers the hmmn_ops::* schemas and kernels)
except ImportError as e:
    raise ImportError(f"hmmn_ops._C failed to load ({e}): {_REBUILD}") from e
