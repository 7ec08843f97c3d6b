#!/usr/bin/env bash
# The GPU bring-up in ONE device call of about 8 minutes on a 16-core H100/H200 (GPU time is
# scarce: 15 minutes in all, the machine's start included). Writes everything into $OUT (set by
# the device tool):
#   bash scripts/gpu_session.sh          # = all: build, CUDA tests, memcheck subset, op benchmark
#   bash scripts/gpu_session.sh model    # end-to-end model benchmark (a second call, if time is left)
# Run it with the device tool's timeout_s = 600. Steps and their time limits (about 8 min in all):
#   env.txt                 versions, GPU, hmmn_ops.backends(); one line per step with its exit code
#   build.log               pip install -e . for sm_90 only (about 2 min with 16 jobs)
#   cuda-tests.log          pytest -m cuda over all tests (tests/test_cuda*.py), 150 s
#   junit-cuda.xml          the same, machine-readable
#   sanitizer-memcheck.log  compute-sanitizer memcheck over a subset of test_cuda*.py, 75 s
#   ops.json, *.png, bench.log   benchmarks/bench_ops.py (bf16, 3 objects, T = 2, 6, 21), 110 s
#   memory_read.json, memory_read_*.png, bench-memory-read.log   bench_ops.py --ops memory_read
#                           (XMem / STCN at 480p and 1080p against the dense released-style read,
#                           full reads against the two GEMMs and SDPA), 90 s
# A step that times out is recorded (exit 124) and the next one runs. Unverified until a GPU
# session runs it: written without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
PART=${1:-all}
SAMPLE=${SAMPLE:-"(kernel_guided_read or topk_guided_read or local_track or gaussian_softmax or memory_read) and not hmmn"}
start=$SECONDS
step() {  # step NAME EXIT_CODE: one line in env.txt
    echo "step $1: exit $2 at $((SECONDS - start)) s" | tee -a "$OUT/env.txt"
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

# sm_90 only: the machine is an H100/H200 and one arch halves the build
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} HMMN_OPS_CUDA=1 \
    python3 -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?; step build $rc
[ $rc -eq 0 ] || { tail -50 "$OUT/build.log"; exit 1; }
python3 -c "import hmmn_ops; print(hmmn_ops.backends())" >> "$OUT/env.txt" 2>&1

case "$PART" in
all)
    timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider --durations=15 --junitxml="$OUT/junit-cuda.xml" \
        > "$OUT/cuda-tests.log" 2>&1
    step cuda-tests $?
    tail -5 "$OUT/cuda-tests.log"
    timeout 75 compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 -m pytest -q -m cuda -k "$SAMPLE" -p no:cacheprovider tests/test_cuda.py tests/test_cuda_memory_read.py \
        > "$OUT/sanitizer-memcheck.log" 2>&1
    step "compute-sanitizer memcheck (0 clean, 9 errors, 124 timed out)" $?
    timeout 110 python3 benchmarks/bench_ops.py --device cuda --dtype bfloat16 --objects 3 --frames 2,6,21 \
        --json "$OUT/ops.json" --plot "$OUT" > "$OUT/bench.log" 2>&1
    step bench-ops $?
    tail -30 "$OUT/bench.log"
    timeout 90 python3 benchmarks/bench_ops.py --device cuda --dtype bfloat16 --ops memory_read --res 480p,1080p \
        --json "$OUT/memory_read.json" --plot "$OUT" > "$OUT/bench-memory-read.log" 2>&1
    step bench-memory-read $?
    tail -20 "$OUT/bench-memory-read.log" ;;
model)
    timeout 400 python3 benchmarks/bench_model.py --device cuda --objects 1,3 --dtype float32,bfloat16 \
        --baseline naive --json "$OUT/model.json" 2>&1 | tail -40
    step bench-model $? ;;
*)
    echo "gpu_session.sh: unknown part $PART (all or model)" >&2; exit 2 ;;
esac
echo "gpu_session.sh: $((SECONDS - start)) s" | tee -a "$OUT/env.txt"
