#!/usr/bin/env bash
# The test suite as CI runs it: build once (in .venv, scripts/setup.sh, with the CUDA emulator), CPU
# tests, the CUDA kernels emulated on the CPU, Triton tests in the interpreter, the CUDA compile check,
# the package smoke test. Extra arguments go to the CPU pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
export HMMN_OPS_CUDA_EMULATION=1  # also builds hmmn_ops._C_emulated (backend "cuda_emulated")
bash scripts/setup.sh
source .venv/bin/activate  # python3, pytest and hmmn-vos below (and in subprocesses) are the venv's

echo "== CPU tests"
python3 -m pytest -q -m "not cuda and not triton and not emulated" --durations=10 "$@"

# Blocks run in a shuffled order (a new seed each run, printed for a replay).
export HMMN_EMU_SHUFFLE_BLOCKS=${HMMN_EMU_SHUFFLE_BLOCKS:-$((RANDOM + 1))}
echo "== CUDA kernels emulated on the CPU (backend cuda_emulated, docs/cuda.md; HMMN_EMU_SHUFFLE_BLOCKS=$HMMN_EMU_SHUFFLE_BLOCKS)"
python3 -m pytest -q -m emulated -rs --durations=10 tests/test_cuda*.py

echo "== Triton kernels under TRITON_INTERPRET=1 (small shapes, CPU)"
TRITON_INTERPRET=1 python3 -m pytest -q -m "triton and not cuda" --durations=5

echo "== CUDA compile check (nvcc, sm_80 + sm_90, no GPU needed)"
if [ -f scripts/check_cuda_compile.sh ]; then bash scripts/check_cuda_compile.sh; else echo "no CUDA sources yet"; fi

echo "== Package: sdist -> wheel (clean venv) -> install (fresh venv) -> smoke test outside the tree"
# A release build whatever this run exports (smoke_package.sh unsets HMMN_OPS_CUDA_EMULATION too).
(unset HMMN_OPS_CUDA_EMULATION; bash scripts/smoke_package.sh)

echo "== all green in $((SECONDS - start)) s"
