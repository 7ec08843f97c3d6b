#!/usr/bin/env bash
# The CUDA kernels under sanitizers, on the CPU, through the CUDA emulator (csrc/emulator,
# docs/cuda.md). Run it before landing any change under csrc/cuda; not part of CI (slow).
#
#   bash scripts/sanitize_cuda.sh         # asan, then tsan
#   bash scripts/sanitize_cuda.sh asan    # ASan + UBSan over the emulated CUDA tests (all of them)
#   bash scripts/sanitize_cuda.sh tsan    # ThreadSanitizer, strict warp mode, over a subset
#
# Each builds hmmn_ops._C_emulated with the sanitizer (HMMN_OPS_CUDA_EMULATION=only: the kernels,
# glue and emulator are instrumented; torch and Python are not) in a private copy of the tree
# under $SAN_DIR (default /tmp/hmmn-sanitize), so this worktree's build is untouched, and runs
# pytest with the sanitizer runtime preloaded. Any report fails the run (exit code 66).
# In the strict warp mode (the default under TSan) shuffles and ballots wait for every lane but
# order no memory, so a race between lanes that only a shuffle separates is reported.
#
# Knobs: SAN_DIR, MAX_JOBS, ASAN_TESTS / TSAN_TESTS (pytest -k expressions).
# Needs: this tree built once (hmmn_ops/_C*.so, as scripts/setup.sh or setup.py build_ext do),
# the CUDA headers (as for HMMN_OPS_CUDA_EMULATION=1), gcc's libasan/libubsan/libtsan.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
which=${1:-all}
work=${SAN_DIR:-/tmp/hmmn-sanitize}
TSAN_TESTS=${TSAN_TESTS:-"emulator or (kernel_guided_read and (topk or small or T=1) and not half) or (topk_guided_read and r=2 and not half) or gaussian_softmax-shape0 or global_track"}
ls hmmn_ops/_C.*so > /dev/null || { echo "sanitize_cuda: build this tree first (hmmn_ops/_C*.so missing)" >&2; exit 1; }

run() {  # run NAME CXXFLAGS PRELOAD PYTEST_K ENV...
    local name=$1 flags=$2 preload=$3 k=$4; shift 4
    local dir=$work/$name t0=$SECONDS
    mkdir -p "$dir"
    rsync -a --delete --exclude .git --exclude build --exclude '_C_emulated*.so' --exclude __pycache__ "$root/" "$dir/"
    echo "== $name: building hmmn_ops._C_emulated with $flags"
    (cd "$dir" && HMMN_OPS_CUDA_EMULATION=only HMMN_EMU_CXXFLAGS="$flags -g -fno-omit-frame-pointer" \
        HMMN_EMU_LDFLAGS="$flags" MAX_JOBS=${MAX_JOBS:-2} python3 setup.py build_ext --inplace > build.log 2>&1) \
        || { tail -30 "$dir/build.log"; exit 1; }
    echo "== $name: built in $((SECONDS - t0)) s; running the emulated CUDA tests${k:+ (-k \"$k\")}"
    local t1=$SECONDS status=0
    (cd "$dir" && env "$@" LD_PRELOAD="$preload" PYTHONPATH="$dir" \
        python3 -m pytest -q -m emulated -p no:cacheprovider ${k:+-k "$k"} tests/test_cuda.py) || status=$?
    echo "== $name: tests ran in $((SECONDS - t1)) s (exit $status; 0 = clean)"
    return $status
}

status=0
if [ "$which" = all ] || [ "$which" = asan ]; then
    run asan "-fsanitize=address,undefined -fno-sanitize-recover=undefined" \
        "$(gcc -print-file-name=libasan.so)" "${ASAN_TESTS:-}" \
        ASAN_OPTIONS=detect_leaks=0:exitcode=66 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:exitcode=66 \
        || status=$?
fi
if [ "$which" = all ] || [ "$which" = tsan ]; then
    run tsan "-fsanitize=thread" "$(gcc -print-file-name=libtsan.so)" "$TSAN_TESTS" \
        TSAN_OPTIONS=exitcode=66:halt_on_error=1:report_signal_unsafe=0 HMMN_EMU_STRICT_WARP=1 \
        HMMN_EMU_WATCHDOG_S=600 || status=$?
fi
exit $status
