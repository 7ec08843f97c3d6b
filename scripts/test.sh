#!/usr/bin/env bash
# The test suite as CI runs it: build once (with the CUDA emulator), CPU tests, the CUDA kernels
# emulated on the CPU, Triton tests in the interpreter, the CUDA compile check. Extra arguments
# go to the CPU pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
export HMMN_OPS_CUDA_EMULATION=1  # also builds hmmn_ops._C_emulated (backend "cuda_emulated")
bash scripts/setup.sh

echo "== CPU tests"
python3 -m pytest -q -m "not cuda and not triton and not emulated" --durations=10 "$@"

echo "== CUDA kernels emulated on the CPU (backend cuda_emulated, docs/cuda.md)"
python3 -m pytest -q -m emulated -rs --durations=10 tests/test_cuda.py

echo "== Triton kernels under TRITON_INTERPRET=1 (small shapes, CPU)"
TRITON_INTERPRET=1 python3 -m pytest -q -m "triton and not cuda" --durations=5

echo "== CUDA compile check (nvcc, sm_80 + sm_90, no GPU needed)"
if [ -f scripts/check_cuda_compile.sh ]; then bash scripts/check_cuda_compile.sh; else echo "no CUDA sources yet"; fi

echo "== all green in $((SECONDS - start)) s"
