#!/usr/bin/env bash
# The GPU bring-up in device calls of at most 10 minutes each (the device tool's limit). Each call
# builds against the machine's CUDA torch (incremental after the first) and writes into $OUT
# (set by the device tool; at most 8 files come back):
#   bash scripts/gpu_session.sh tests   # env.txt, build.log, cuda-tests.log, sanitizer-{memcheck,racecheck}.log
#   bash scripts/gpu_session.sh bench   # env.txt, build.log, ops.json + its PNG (bf16, 3 objects, T = 2, 6, 21)
#   bash scripts/gpu_session.sh model   # env.txt, build.log, model.json (end to end, naive baseline too)
# Unverified until a GPU session runs it: written without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
PART=${1:?usage: gpu_session.sh tests|bench|model}
SAMPLE=${SAMPLE:-"kernel_guided_read or topk_guided_read or local_track"}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

# sm_90 only: the machine is an H100/H200 and one arch halves the build
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -c "import hmmn_ops; print(hmmn_ops.backends())" >> "$OUT/env.txt" 2>&1

case "$PART" in
tests)
    timeout 200 python3 -m pytest -q -m cuda --durations=10 2>&1 | tee "$OUT/cuda-tests.log" | tail -5
    for tool in memcheck racecheck; do
        timeout 90 compute-sanitizer --tool "$tool" --error-exitcode 9 \
            python3 -m pytest -q -m cuda -k "$SAMPLE" -p no:cacheprovider tests/test_cuda.py \
            > "$OUT/sanitizer-$tool.log" 2>&1
        echo "compute-sanitizer $tool: exit $? (0 = clean, 9 = errors, 124 = timed out)" | tee -a "$OUT/env.txt"
    done ;;
bench)
    timeout 400 python3 benchmarks/bench_ops.py --device cuda --dtype bfloat16 --objects 3 --frames 2,6,21 \
        --json "$OUT/ops.json" --plot "$OUT" 2>&1 | tail -40 ;;
model)
    timeout 400 python3 benchmarks/bench_model.py --device cuda --objects 1,3 --dtype float32,bfloat16 \
        --baseline naive --json "$OUT/model.json" 2>&1 | tail -40 ;;
*)
    echo "gpu_session.sh: unknown part $PART (tests, bench or model)" >&2; exit 2 ;;
esac
