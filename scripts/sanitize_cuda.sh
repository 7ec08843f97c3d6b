#!/usr/bin/env bash
# The CUDA kernels under sanitizers, on the CPU, through the CUDA emulator (csrc/emulator,
# docs/cuda.md). Run it before landing any change under csrc/cuda; not part of CI (slow).
#
#   bash scripts/sanitize_cuda.sh         # asan, then tsan
#   bash scripts/sanitize_cuda.sh asan    # ASan + UBSan over the emulated CUDA tests (all of them)
#   bash scripts/sanitize_cuda.sh tsan    # ThreadSanitizer, strict warp mode: a torch-free driver
#
# asan builds hmmn_ops._C_emulated with the sanitizers (HMMN_OPS_CUDA_EMULATION=only: the
# kernels, glue and emulator are instrumented; torch and Python are not) in a private copy of the
# tree under $SAN_DIR (default /tmp/hmmn-sanitize), so this worktree's build is untouched, and
# runs pytest with the runtime preloaded. tsan compiles the kernels and the emulator, without
# torch, into a driver that runs the warp-heavy kernels on small inputs. In the strict warp mode
# (the default under TSan) shuffles and ballots wait for every lane but order no memory, so a
# race between lanes that only a shuffle separates is reported. Any report fails (exit code 66).
#
# Knobs: SAN_DIR, MAX_JOBS, ASAN_TESTS (a pytest -k expression).
# Needs: this tree built once (hmmn_ops/_C*.so, as scripts/setup.sh or setup.py build_ext do),
# the CUDA headers (as for HMMN_OPS_CUDA_EMULATION=1), gcc's libasan/libubsan/libtsan.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
which=${1:-all}
work=${SAN_DIR:-/tmp/hmmn-sanitize}
ls hmmn_ops/_C.*so > /dev/null || { echo "sanitize_cuda: build this tree first (hmmn_ops/_C*.so missing)" >&2; exit 1; }

run() {  # run NAME CXXFLAGS PRELOAD PYTEST_K ENV...: build in a copy, pytest -m emulated there
    local name=$1 flags=$2 preload=$3 k=$4; shift 4
    local dir=$work/$name t0=$SECONDS
    mkdir -p "$dir"
    rm -f "$dir"/report.*
    tar -C "$root" --exclude=./.git --exclude=./build --exclude='_C_emulated*.so' --exclude=__pycache__ -cf - . \
        | tar -C "$dir" -xf -  # (its build/ is kept: a rerun is incremental)
    echo "== $name: building hmmn_ops._C_emulated with $flags"
    (cd "$dir" && HMMN_OPS_CUDA_EMULATION=only HMMN_EMU_CXXFLAGS="$flags -g -fno-omit-frame-pointer" \
        HMMN_EMU_LDFLAGS="$flags" MAX_JOBS=${MAX_JOBS:-2} python3 setup.py build_ext --inplace > build.log 2>&1) \
        || { tail -30 "$dir/build.log"; exit 1; }
    echo "== $name: built in $((SECONDS - t0)) s; running the emulated CUDA tests${k:+ (-k \"$k\")}"
    local t1=$SECONDS status=0
    (cd "$dir" && env "$@" LD_PRELOAD="$preload" PYTHONPATH="$dir" \
        python3 -m pytest -q -m emulated -p no:cacheprovider ${k:+-k "$k"} tests/test_cuda.py tests/test_cuda_memory_read.py) || status=$?
    echo "== $name: tests ran in $((SECONDS - t1)) s (exit $status; 0 = clean)"
    cat "$dir"/report.* 2>/dev/null | grep -v "makecontext/swapcontext" | head -60 || true
    return $status
}

status=0
if [ "$which" = all ] || [ "$which" = asan ]; then
    # libstdc++ preloaded too: ASan's __cxa_throw interceptor must find the real one at start-up.
    # Reports go to $SAN_DIR/asan/report.* as well (pytest's capture may hide a dying process's).
    run asan "-fsanitize=address,undefined -fno-sanitize-recover=undefined" \
        "$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" "${ASAN_TESTS:-}" \
        ASAN_OPTIONS=detect_leaks=0:exitcode=66:log_path="$work/asan/report" \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:exitcode=66:log_path="$work/asan/report" \
        || status=$?
fi
if [ "$which" = all ] || [ "$which" = tsan ]; then
    # The warp-heavy kernels on small inputs, strict warps (seconds to build and run; this is
    # what reports the kgr_topk race without its __syncwarp).
    t0=$SECONDS
    mkdir -p "$work/tsan-driver"
    cat > "$work/tsan-driver/driver.cpp" <<'CPP'
#include "cuda/kernels/gaussian_softmax.cuh"
#include "cuda/kernels/kernel_guided_read.cuh"
#include "cuda/kernels/memory_read.cuh"
#include "cuda/kernels/track.cuh"
#include <cstdio>
#include <random>
#include <vector>
int main() {
  const int64_t B = 1, Ck = 5, Cv = 7, H = 3, W = 5, T = 3, N = H * W, M = T * N, K = 6;
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> d(-1, 1);  // small integers: ties in the top-k
  auto vec = [&](size_t n) { std::vector<float> x(n); for (auto& e : x) e = float(d(rng)); return x; };
  auto q = vec(B * Ck * N), k = vec(B * Ck * M), v = vec(B * Cv * M), dout = vec(B * Cv * N);
  std::vector<float> out(B * Cv * N), lse(B * N), D(B * N), dq(q.size()), dk(k.size()), dv(v.size()), keys(B * N * K);
  std::vector<int64_t> idx(B * N * K), frames{2, 0}, arg(B * M);
  const hmmn::KgrParams<float> p{q.data(), k.data(), v.data(), nullptr, nullptr, 0.5f, B, Ck, Cv, H, W, T, N, M};
  const auto plan = hmmn::kgr_forward_plan(p, 1000, 232448);  // many SMs: memory splits
  std::vector<float> ws(size_t(plan.workspace) + 1);
  int bad = 0;
  bad |= hmmn::kgr_forward(p, plan, out.data(), lse.data(), ws.data(), nullptr);
  bad |= hmmn::kgr_backward(p, dout.data(), out.data(), lse.data(), D.data(), dq.data(), dk.data(), dv.data(), 232448,
                            nullptr);
  {  // top-k on tied small integers: insertions at rank k-1 into a full list (the race it had)
    std::mt19937 r2(1);
    std::uniform_int_distribution<int> d2(-1, 1);
    std::vector<float> tq(3 * 12), tk(3 * 24);
    for (auto& e : tq) e = float(d2(r2));
    for (auto& e : tk) e = float(d2(r2));
    std::vector<int64_t> tf{1, 0}, tidx(60);
    std::vector<float> tkeys(60);
    const hmmn::KgrParams<float> tp{tq.data(), tk.data(), nullptr, nullptr, nullptr, 0.5f, 1, 3, 1, 3, 4, 2, 12, 24};
    bad |= hmmn::kgr_topk(tp, tf.data(), 2, 5, tkeys.data(), tidx.data(), nullptr);
  }
  {  // memory_read, l2 with shrinkage and selection: split forward, usage, top-k read, backward
    const int64_t Nq = N, Nm = M, k2 = 7;
    auto w = vec(B * Nm), e = vec(B * Ck * Nq);
    for (auto& x : w) x = x + 2.f;
    for (auto& x : e) x = x + 2.f;
    std::vector<float> rowsq(B * Nq), colsq(B * Nm), mout(B * Cv * Nq), mlse(B * Nq), usage(B * Nm);
    hmmn::MrParams<float> mp{q.data(), k.data(), v.data(), w.data(), e.data(), nullptr, nullptr, 0.5f, true,
                             B, Ck, Cv, Nq, Nm};
    bad |= hmmn::mr_l2_terms(mp, rowsq.data(), colsq.data(), nullptr);
    const auto mplan = hmmn::mr_forward_plan(mp, 1000, 232448);
    std::vector<float> mws(size_t(mplan.workspace) + 1);
    bad |= hmmn::mr_forward(mp, mplan, mout.data(), mlse.data(), mws.data(), nullptr);
    bad |= hmmn::mr_usage(mp, mlse.data(), usage.data(), nullptr);
    std::vector<float> de(e.size()), mdq(q.size()), mdk(k.size()), mdv(v.size());
    const auto bplan = hmmn::mr_backward_plan(mp, 232448);
    std::vector<float> dw(size_t(bplan.nck * B * Nm));
    bad |= hmmn::mr_backward(mp, bplan, dout.data(), mout.data(), mlse.data(), D.data(), mdq.data(), de.data(),
                             mdk.data(), mdv.data(), dw.data(), nullptr);
    std::vector<float> vcl(B * Nm * Cv), mkeys(B * Nq * k2);
    for (int64_t c = 0; c < Cv; ++c)
      for (int64_t j = 0; j < Nm; ++j) vcl[j * Cv + c] = v[c * Nm + j];
    std::vector<int64_t> midx(B * Nq * k2);
    std::fill(usage.begin(), usage.end(), 0.f);
    bad |= hmmn::mr_topk_forward(mp, vcl.data(), k2, mkeys.data(), midx.data(), mout.data(), mlse.data(), usage.data(),
                                 nullptr);
  }
  bad |= hmmn::global_track(k.data(), q.data(), arg.data(), B, Ck, N, M, nullptr);
  std::vector<float> aff = vec(B * M * N), y(aff.size()), sig(B * T, 1.f);
  std::vector<int64_t> cen(B * M, 2);
  const hmmn::GsmParams<float> g{aff.data(), nullptr, cen.data(), sig.data(), y.data(), B, T, H, W, N, M};
  bad |= hmmn::gaussian_softmax_forward(g, nullptr);
  std::printf("tsan driver: %s %s\n", bad ? "launch error:" : "ran", hmmn_emu::error_detail());
  return bad ? 1 : 0;
}
CPP
    g++ -std=c++20 -O1 -g -fsanitize=thread -Icsrc -isystem "${HMMN_CUDA_INCLUDE:-/usr/local/cuda/include}" \
        -Wno-unknown-pragmas -Wno-attributes "$work/tsan-driver/driver.cpp" csrc/emulator/emulator.cpp \
        -o "$work/tsan-driver/driver"
    rc=0
    TSAN_OPTIONS=exitcode=66 HMMN_EMU_STRICT_WARP=1 "$work/tsan-driver/driver" || rc=$?
    echo "== tsan: driver built and ran in $((SECONDS - t0)) s (exit $rc; 0 = clean)"
    [ $rc -eq 0 ] || status=$rc
fi
exit $status
