"""Shared test configuration: markers, fresh seeds, device helpers."""
import os
import random

import pytest
import torch

import hmmn_ops  # noqa: F401  (registers the ops)


def pytest_configure(config):
    # The suite runs tiny shapes: one thread is as fast and immune to oversubscribed shared cores
    # (two OpenMP threads made small-shape tests up to 50x slower there). Tests that need more
    # threads (determinism across thread counts) set them explicitly.
    torch.set_num_threads(1)
    # Fresh seeds every run (printed, so a failure can be replayed with HMMN_OPS_SEED=...).
    seed = int(os.environ.get("HMMN_OPS_SEED", random.SystemRandom().randrange(2**31)))
    config._hmmn_seed = seed


def pytest_report_header(config):
    return f"hmmn_ops seed: {config._hmmn_seed} (replay with HMMN_OPS_SEED={config._hmmn_seed}); " \
           f"torch {torch.__version__}; build {hmmn_ops.BUILD_CONFIG['torch_version']} cuda_built={hmmn_ops.BUILD_CONFIG['cuda_built']}"


@pytest.fixture(autouse=True)
def _seed(request):
    seed = request.config._hmmn_seed
    torch.manual_seed(seed)
    random.seed(seed)
    yield


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
