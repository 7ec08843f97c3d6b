// local_track (docs/ops.md section 3) and global_track (docs/ops.md section 4) on CPU.
#include "common.h"

#define HMMN_KERNELS "track_kernels.h"
#include "isa.h"

namespace hmmn_ops::cpu {
namespace {

at::Tensor local_track(const at::Tensor& memory_key, const at::Tensor& query_key, int64_t window) {
  check_tensor(memory_key, "memory_key", 4, "(B, C, H, W)");
  check_tensor(query_key, "query_key", 4, "(B, C, H, W)");
  check_floating(memory_key, "memory_key");
  check_same_dtype(query_key, "query_key", memory_key, "memory_key");
  const int64_t B = memory_key.size(0), C = memory_key.size(1), H = memory_key.size(2), W = memory_key.size(3);
  check_sizes(query_key, "query_key", {B, C, H, W}, "equal to memory_key's shape");
  TORCH_CHECK(window >= 1 && window % 2 == 1, "window: expected a positive odd int, got ", window);
  auto out = at::empty({B, H, W}, memory_key.options().dtype(at::kLong));
  const int64_t HW = H * W;
  // float lanes carry flat indices in int32 (Vec<float>::index)
  TORCH_CHECK(HW < (int64_t(1) << 31), "memory_key: expected H*W < 2^31 pixels per frame, got shape ",
              memory_key.sizes());
  if (out.numel() == 0) return out;
  const int64_t rad = window / 2;
  // Offsets beyond the frame have no candidate: only visit those that can be inside.
  const int64_t rady = std::min(rad, H - 1), radx = std::min(rad, W - 1);

  dispatch_compute(memory_key.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    const int64_t L = HMMN_PICK(lanes<T>)();
    const auto dtype = c10::CppTypeToScalarType<T>::value;
    // Memory planes padded to a whole vector when the frame is smaller than one.
    const int64_t mstride = std::max(HW, L);
    auto mk = memory_key.reshape({B, C, HW}).to(dtype);
    mk = mstride == HW ? mk.contiguous() : at::constant_pad_nd(mk, {0, mstride - HW});
    // Query planes with a zero border wide enough for every (vector, offset) read.
    const int64_t qoff = rady * W + radx;
    const int64_t qstride = qoff + mstride + rady * W + radx + 8;
    auto qp = at::constant_pad_nd(query_key.reshape({B, C, HW}).to(dtype), {qoff, qstride - qoff - HW});
    const T* mk_ptr = ptr<T>(mk);
    const T* qp_ptr = ptr<T>(qp);
    int64_t* out_ptr = ptr<int64_t>(out);
    // Rows of the frame when a row holds a whole vector (and AVX-512 can tile two rows), else
    // flat vectors (small frames, or one row per tile anyway).
    const bool by_rows = W >= L && cpu_isa() == Isa::avx512;
    auto kernel = !by_rows          ? HMMN_PICK(local_track_vectors<T>)
                  : 2 * radx + 1 == 7 ? HMMN_PICK(local_track_rows<T, 7>)  // no idle accumulator
                                      : HMMN_PICK(local_track_rows<T, 8>);
    const int64_t nv = by_rows ? HMMN_PICK(local_track_row_tiles<T>)(H, W) : ceil_div(HW, L);
    // Work item: (batch, tile); a few tiles per task keeps the scheduling cheap.
    at::parallel_for(0, B * nv, 4, [&](int64_t begin, int64_t end) {
      while (begin < end) {
        const int64_t b = begin / nv, v0 = begin % nv, v1 = std::min(nv, v0 + (end - begin));
        kernel(mk_ptr + b * C * mstride, mstride, qp_ptr + b * C * qstride, qstride, qoff, out_ptr + b * HW, C, H, W,
               rady, radx, rad, v0, v1);
        begin += v1 - v0;
      }
    });
  });
  return out;
}

at::Tensor global_track(const at::Tensor& memory_key, const at::Tensor& query_key) {
  check_tensor(memory_key, "memory_key", 5, "(B, C, T, H, W)");
  check_tensor(query_key, "query_key", 4, "(B, C, H, W)");
  check_floating(memory_key, "memory_key");
  check_same_dtype(query_key, "query_key", memory_key, "memory_key");
  const int64_t B = query_key.size(0), C = query_key.size(1), H = query_key.size(2), W = query_key.size(3);
  check_sizes(memory_key, "memory_key", {B, C, -1, H, W}, "matching query_key (B, C, H, W)");
  const int64_t T = memory_key.size(2), HW = H * W, M = T * HW;
  auto out = at::empty({B, T, H, W}, memory_key.options().dtype(at::kLong));
  if (out.numel() == 0) return out;

  dispatch_compute(memory_key.scalar_type(), [&](auto zero) {
    using T_ = decltype(zero);
    const auto dtype = c10::CppTypeToScalarType<T_>::value;
    auto k = to_compute(memory_key).reshape({B, C, M});
    auto q = to_compute(query_key).reshape({B, C, HW});
    const T_* k_ptr = ptr<T_>(k);
    const T_* q_ptr = ptr<T_>(q);
    int64_t* out_ptr = ptr<int64_t>(out);
    auto argmax = HMMN_PICK(row_argmax<T_>);
    // Scores of a block of memory positions against a block of queries come from BLAS; the
    // running argmax walks the query blocks in order. Never more than BM x BQ scores.
    constexpr int64_t BM = 128, BQ = 1024;
    const int64_t nm = ceil_div(M, BM);
    at::parallel_for(0, B * nm, 1, [&](int64_t begin, int64_t end) {
      std::vector<T_> scores(BM * std::min(BQ, HW));
      std::vector<T_> best(BM);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nm, m0 = (task % nm) * BM, bm = std::min(BM, M - m0);
        auto kt = matrix(k_ptr + b * C * M + m0, bm, C, 1, M, dtype);  // (bm, C)
        std::fill(best.begin(), best.end(), -std::numeric_limits<T_>::infinity());
        int64_t* idx = out_ptr + b * M + m0;
        std::fill(idx, idx + bm, int64_t{0});
        for (int64_t q0 = 0; q0 < HW; q0 += BQ) {
          const int64_t bq = std::min(BQ, HW - q0);
          auto s = matrix(scores.data(), bm, bq, bq, 1, dtype);
          at::mm_out(s, kt, matrix(q_ptr + b * C * HW + q0, C, bq, HW, 1, dtype));
          for (int64_t i = 0; i < bm; ++i) argmax(scores.data() + i * bq, bq, q0, best[i], idx[i]);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hmmn_ops, CPU, m) {
  m.impl("local_track", &local_track);
  m.impl("global_track", &global_track);
}

}  // namespace hmmn_ops::cpu
