"""Shared test configuration: markers, fresh seeds, device helpers."""
import os
import random

import pytest
import torch

import hmmn_ops  # noqa: F401  (registers the ops)


def pytest_configure(config):
    config.addinivalue_line("markers", "emulated: the CUDA kernels run by the host emulator "
                                       "(backend cuda_emulated; needs an HMMN_OPS_CUDA_EMULATION=1 build)")
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


class CudaTarget:
    """Where the CUDA backend's tests run: ``device`` ("cuda" or "cpu") and ``backend`` (the public
    ops' ``backend=`` argument: "native" on a GPU, "cuda_emulated" for the emulated kernels)."""

    def __init__(self, name, device, backend):
        self.name, self.device, self.backend = name, device, backend

    def op(self, name):
        """The compiled op ``name`` (canonical arguments, docs/internals.md) for this target."""
        from hmmn_ops.backends import implementation, native_ops

        if self.backend == "native":
            assert name in native_ops("cuda"), f"the CUDA build registered no kernel for {name}"
        return getattr(implementation(self.backend, name, self.device), name)

    def __repr__(self):
        return self.name


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if not hmmn_ops.BUILD_CONFIG.get("cuda_built"):
        return "hmmn_ops was built without CUDA kernels (HMMN_OPS_CUDA=1 pip install -e . on a CUDA machine)"
    if torch.cuda.get_device_capability() < (8, 0):
        return "the compiled CUDA kernels need sm_80+"
    return None


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.cuda),
                        pytest.param("emulated", marks=pytest.mark.emulated)])
def cuda_target(request):
    """The CUDA kernels on a GPU ("cuda") and emulated on the CPU ("emulated",
    HMMN_OPS_CUDA_EMULATION=1 builds); skips with the reason where one cannot run."""
    if request.param == "cuda":
        why = _cuda_skip_reason()
        if why:
            pytest.skip(why)
        return CudaTarget("cuda", "cuda", "native")
    from hmmn_ops.backends import refusal

    why = refusal("cuda_emulated", "kernel_guided_read", "cpu")
    if why:
        pytest.skip(why)
    return CudaTarget("emulated", "cpu", "cuda_emulated")


_emulated_passed = {}  # dtype -> emulated CUDA tests passed (printed at the end, for CI's log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.passed and "emulated" in item.keywords:
        params = getattr(item, "callspec", None)
        dtype = params.params.get("dtype") if params else None
        key = str(dtype).replace("torch.", "") if dtype is not None else "(no dtype parameter)"
        _emulated_passed[key] = _emulated_passed.get(key, 0) + 1


def pytest_terminal_summary(terminalreporter):
    if _emulated_passed:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(_emulated_passed.items()))
        terminalreporter.write_line(f"emulated CUDA kernels, tests passed per dtype: {counts}")
