// kernel_guided_read (docs/ops.md section 1) and its backward on CPU: flash-style, never the T*H*W x H*W
// affinity. Tiles of scores come from BLAS (at::mm on raw-memory views, one thread each);
// the Gaussian bias, online softmax and streaming top-k run on the tile while it is in cache.
#include "common.h"

#define HMMN_KERNELS "kernel_guided_read_kernels.h"
#include "isa.h"

namespace hmmn_ops::cpu {
namespace {

// Forward: a task is (batch item, block of kQueryBlock queries); it streams the memory in
// chunks of kMemoryChunk positions. Per thread: a kQueryBlock x kMemoryChunk score tile and a
// Cv x kQueryBlock output accumulator.
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kMemoryChunk = 512;
// Backward: a task is (batch item, group of memory blocks of kBwdMemoryBlock positions); it
// owns their dK / dV and sweeps all queries in blocks of kBwdQueryBlock. dQ is summed per
// group, then over groups in a fixed order: the result does not depend on the thread count.
constexpr int64_t kBwdMemoryBlock = 256;
constexpr int64_t kBwdQueryBlock = 256;
constexpr int64_t kBwdTasks = 16;  // groups per call (split over the batch)

// The tensors of a read in the compute dtype, flattened, plus the per-memory-position
// Gaussian parameters (cy, cx, g = 1 / (2 sigma^2); 0 where there is no centre).
struct Read {
  int64_t B, Ck, Cv, T, H, W, HW, M;
  at::ScalarType dtype;
  at::Tensor q, k, v;      // (B, Ck, HW), (B, Ck, M), (B, Cv, M), contiguous
  at::Tensor cy, cx, g;    // (B, M) or undefined for a plain read
};

Read prepare_read(const at::Tensor& query_key, const at::Tensor& memory_key, const at::Tensor& memory_value,
                  const std::optional<at::Tensor>& centers, const std::optional<at::Tensor>& sigma) {
  check_tensor(query_key, "query_key", 4, "(B, Ck, H, W)");
  check_tensor(memory_key, "memory_key", 5, "(B, Ck, T, H, W)");
  check_tensor(memory_value, "memory_value", 5, "(B, Cv, T, H, W)");
  check_floating(query_key, "query_key");
  check_same_dtype(memory_key, "memory_key", query_key, "query_key");
  check_same_dtype(memory_value, "memory_value", query_key, "query_key");
  Read r;
  r.B = query_key.size(0), r.Ck = query_key.size(1), r.H = query_key.size(2), r.W = query_key.size(3);
  check_sizes(memory_key, "memory_key", {r.B, r.Ck, -1, r.H, r.W}, "(B, Ck, T, H, W) matching query_key (B, Ck, H, W)");
  r.T = memory_key.size(2);
  TORCH_CHECK(r.T >= 1, "memory_key: expected at least one memory frame (T >= 1), got shape ", memory_key.sizes());
  check_sizes(memory_value, "memory_value", {r.B, -1, r.T, r.H, r.W}, "(B, Cv, T, H, W) matching memory_key");
  r.Cv = memory_value.size(1);
  r.HW = r.H * r.W;
  r.M = r.T * r.HW;
  r.dtype = compute_dtype(query_key.scalar_type());
  TORCH_CHECK(centers.has_value() == sigma.has_value(),
              "centers and sigma: give both (Gaussian-guided read) or neither (plain read)");
  r.q = to_compute(query_key).view({r.B, r.Ck, r.HW});
  r.k = to_compute(memory_key).view({r.B, r.Ck, r.M});
  r.v = to_compute(memory_value).view({r.B, r.Cv, r.M});
  if (centers.has_value()) {
    const auto& c = *centers;
    check_tensor(c, "centers", 4, "(B, T, H, W) int64");
    check_int64(c, "centers");
    check_sizes(c, "centers", {r.B, r.T, r.H, r.W}, "(B, T, H, W)");
    check_tensor(*sigma, "sigma", 2, "(B, T)");
    check_floating(*sigma, "sigma");
    check_sizes(*sigma, "sigma", {r.B, r.T}, "(B, T)");
    auto flat = c.reshape({r.B, r.M});
    if (flat.numel() > 0) {
      auto [lo, hi] = at::aminmax(flat);
      const int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
      TORCH_CHECK(l >= -1 && h < r.HW, "centers: values must be flat query indices in [0, ", r.HW,
                  ") or -1, got range [", l, ", ", h, "]");
    }
    auto valid = flat >= 0;
    auto cc = flat.clamp_min(0);
    r.cy = at::div(cc, r.W, "floor").to(r.dtype);
    r.cx = at::remainder(cc, r.W).to(r.dtype);
    auto gamma = (0.5 / sigma->to(r.dtype).square()).repeat_interleave(r.HW, 1);  // as reference.py
    r.g = at::where(valid, gamma, at::zeros({}, gamma.options())).contiguous();
  }
  return r;
}

// Query coordinates (qy, qx) of every flat query index.
template <typename T>
std::vector<T> query_coords(int64_t HW, int64_t W) {
  std::vector<T> yx(2 * HW);
  for (int64_t q = 0; q < HW; ++q) {
    yx[q] = static_cast<T>(q / W);
    yx[HW + q] = static_cast<T>(q % W);
  }
  return yx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_guided_read(
    const at::Tensor& query_key, const at::Tensor& memory_key, const at::Tensor& memory_value,
    const std::optional<at::Tensor>& centers, const std::optional<at::Tensor>& sigma, double scale, int64_t topk,
    at::IntArrayRef topk_frames) {
  Read r = prepare_read(query_key, memory_key, memory_value, centers, sigma);
  const int64_t B = r.B, Ck = r.Ck, Cv = r.Cv, HW = r.HW, M = r.M, T = r.T;
  TORCH_CHECK(topk >= 0, "topk: expected an int >= 0, got ", topk);
  // frame -> its position in topk_frames, or -1
  std::vector<int64_t> slot(T, -1);
  for (size_t j = 0; j < topk_frames.size(); ++j) {
    const int64_t f = topk_frames[j];
    TORCH_CHECK(f >= 0 && f < T, "topk_frames: frame indices must lie in [0, ", T, "), got ", f);
    TORCH_CHECK(slot[f] < 0, "topk_frames: a frame is listed twice: ", topk_frames);
    slot[f] = static_cast<int64_t>(j);
  }
  TORCH_CHECK(topk == 0 || !topk_frames.empty(), "topk_frames: expected at least one frame when topk > 0");
  TORCH_CHECK(topk <= static_cast<int64_t>(topk_frames.size()) * HW, "topk: expected at most len(topk_frames) * H * W = ",
              static_cast<int64_t>(topk_frames.size()) * HW, ", got ", topk);

  auto out = at::empty({B, Cv, r.H, r.W}, r.q.options());
  auto lse = at::empty({B, HW}, r.q.options());
  auto indices = at::empty({B, HW, topk}, r.q.options().dtype(at::kLong));
  if (B == 0 || HW == 0) return {out.to(query_key.scalar_type()), lse, indices};

  dispatch_compute(r.dtype, [&](auto zero) {
    using T_ = decltype(zero);
    const auto dtype = r.dtype;
    const T_* q_ptr = ptr<T_>(r.q);
    const T_* k_ptr = ptr<T_>(r.k);
    const T_* v_ptr = ptr<T_>(r.v);
    const bool gaussian = r.g.defined();
    const T_* cy_ptr = gaussian ? ptr<T_>(r.cy) : nullptr;
    const T_* cx_ptr = gaussian ? ptr<T_>(r.cx) : nullptr;
    const T_* g_ptr = gaussian ? ptr<T_>(r.g) : nullptr;
    T_* out_ptr = ptr<T_>(out);
    T_* lse_ptr = ptr<T_>(lse);
    int64_t* idx_ptr = ptr<int64_t>(indices);
    const auto yx = query_coords<T_>(HW, r.W);
    const T_ s = static_cast<T_>(scale);
    auto logit_row_k = HMMN_PICK(logit_row<T_>);
    auto softmax_k = HMMN_PICK(softmax_row_update<T_>);
    auto topk_k = HMMN_PICK(topk_offer<T_>);
    auto rescale_k = HMMN_PICK(scale_columns<T_>);
    auto write_k = HMMN_PICK(write_normalised<T_>);
    const int64_t nqb = ceil_div(HW, kQueryBlock);
    const int64_t chunk = std::min(kMemoryChunk, M);

    at::parallel_for(0, B * nqb, 1, [&](int64_t begin, int64_t end) {
      std::vector<T_> tile(kQueryBlock * chunk), acc(Cv * kQueryBlock);
      std::vector<T_> m(kQueryBlock), l(kQueryBlock), alpha(kQueryBlock);
      std::vector<T_> tv(kQueryBlock * topk);
      std::vector<int64_t> ti(kQueryBlock * topk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nqb, q0 = (task % nqb) * kQueryBlock, bq = std::min(kQueryBlock, HW - q0);
        const T_* qb = q_ptr + b * Ck * HW;
        const T_* kb = k_ptr + b * Ck * M;
        const T_* vb = v_ptr + b * Cv * M;
        std::fill(m.begin(), m.end(), -std::numeric_limits<T_>::infinity());
        std::fill(l.begin(), l.end(), T_(0));
        std::fill(tv.begin(), tv.end(), -std::numeric_limits<T_>::infinity());
        std::fill(ti.begin(), ti.end(), std::numeric_limits<int64_t>::max());
        auto acc_t = matrix(acc.data(), Cv, bq, bq, 1, dtype);
        auto queries = matrix(qb + q0, bq, Ck, 1, HW, dtype);  // (bq, Ck) view of (Ck, HW)
        for (int64_t m0 = 0; m0 < M; m0 += chunk) {
          const int64_t bm = std::min(chunk, M - m0);
          auto scores = matrix(tile.data(), bq, bm, bm, 1, dtype);
          at::mm_out(scores, queries, matrix(kb + m0, Ck, bm, M, 1, dtype));
          for (int64_t j = 0; j < bq; ++j) {
            const int64_t q = q0 + j;
            logit_row_k(tile.data() + j * bm, bm, s, yx[q], yx[HW + q], gaussian ? cy_ptr + b * M + m0 : nullptr,
                        gaussian ? cx_ptr + b * M + m0 : nullptr, gaussian ? g_ptr + b * M + m0 : nullptr);
          }
          if (topk > 0) {
            // the part of each listed frame inside this chunk
            for (int64_t t = m0 / HW; t * HW < m0 + bm; ++t) {
              if (slot[t] < 0) continue;
              const int64_t p0 = std::max(m0, t * HW), p1 = std::min(m0 + bm, (t + 1) * HW);
              const int64_t idx0 = slot[t] * HW + (p0 - t * HW);
              for (int64_t j = 0; j < bq; ++j)
                topk_k(tile.data() + j * bm + (p0 - m0), p1 - p0, idx0, tv.data() + j * topk, ti.data() + j * topk,
                       topk);
            }
          }
          for (int64_t j = 0; j < bq; ++j) alpha[j] = softmax_k(tile.data() + j * bm, bm, m[j], l[j]);
          auto probs_t = matrix(tile.data(), bm, bq, 1, bm, dtype);  // P^T
          auto values = matrix(vb + m0, Cv, bm, M, 1, dtype);
          if (m0 == 0) {
            at::mm_out(acc_t, values, probs_t);
          } else {
            rescale_k(acc.data(), Cv, bq, alpha.data());
            acc_t.addmm_(values, probs_t);
          }
        }
        write_k(acc.data(), Cv, bq, l.data(), out_ptr + b * Cv * HW + q0, HW);
        for (int64_t j = 0; j < bq; ++j) lse_ptr[b * HW + q0 + j] = m[j] + std::log(l[j]);
        if (topk > 0) std::copy(ti.begin(), ti.begin() + bq * topk, idx_ptr + (b * HW + q0) * topk);
      }
    });
  });
  return {out.to(query_key.scalar_type()), lse, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_guided_read_backward(
    const at::Tensor& grad_out, const at::Tensor& query_key, const at::Tensor& memory_key,
    const at::Tensor& memory_value, const std::optional<at::Tensor>& centers, const std::optional<at::Tensor>& sigma,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  Read r = prepare_read(query_key, memory_key, memory_value, centers, sigma);
  const int64_t B = r.B, Ck = r.Ck, Cv = r.Cv, HW = r.HW, M = r.M;
  check_read_backward(grad_out, out, lse, B, Cv, r.H, r.W);

  auto dq = at::empty({B, Ck, HW}, r.q.options());
  auto dk = at::zeros({B, Ck, M}, r.q.options());
  auto dv = at::zeros({B, Cv, M}, r.q.options());
  auto finish = [&]() {
    return std::make_tuple(dq.view(query_key.sizes()).to(query_key.scalar_type()),
                           dk.view(memory_key.sizes()).to(memory_key.scalar_type()),
                           dv.view(memory_value.sizes()).to(memory_value.scalar_type()));
  };
  if (B == 0 || HW == 0) return finish();

  const int64_t nmb = ceil_div(M, kBwdMemoryBlock);
  const int64_t groups = std::clamp<int64_t>(kBwdTasks / B, 1, nmb);
  auto dq_groups = at::zeros({B, groups, Ck, HW}, r.q.options());

  dispatch_compute(r.dtype, [&](auto zero) {
    using T_ = decltype(zero);
    const auto dtype = r.dtype;
    auto d_out = to_compute(grad_out).view({B, Cv, HW});
    auto o = to_compute(out).view({B, Cv, HW});
    auto lse_c = lse.to(dtype).contiguous();
    const T_* q_ptr = ptr<T_>(r.q);
    const T_* k_ptr = ptr<T_>(r.k);
    const T_* v_ptr = ptr<T_>(r.v);
    const T_* do_ptr = ptr<T_>(d_out);
    const T_* o_ptr = ptr<T_>(o);
    const T_* lse_ptr = ptr<T_>(lse_c);
    const bool gaussian = r.g.defined();
    const T_* cy_ptr = gaussian ? ptr<T_>(r.cy) : nullptr;
    const T_* cx_ptr = gaussian ? ptr<T_>(r.cx) : nullptr;
    const T_* g_ptr = gaussian ? ptr<T_>(r.g) : nullptr;
    T_* dq_ptr = ptr<T_>(dq);
    T_* dk_ptr = ptr<T_>(dk);
    T_* dv_ptr = ptr<T_>(dv);
    T_* dqg_ptr = ptr<T_>(dq_groups);
    const auto yx = query_coords<T_>(HW, r.W);
    const T_ s = static_cast<T_>(scale);

    // D[q] = <dO[:, q], O[:, q]>, channels summed in order.
    std::vector<T_> delta(B * HW);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T_* d = delta.data() + b * HW;
        std::fill(d, d + HW, T_(0));
        for (int64_t c = 0; c < Cv; ++c) {
          const T_* x = do_ptr + (b * Cv + c) * HW;
          const T_* y = o_ptr + (b * Cv + c) * HW;
          for (int64_t q = 0; q < HW; ++q) d[q] += x[q] * y[q];
        }
      }
    });

    auto logit_col_k = HMMN_PICK(logit_col<T_>);
    auto grad_k = HMMN_PICK(grad_scores_col<T_>);
    const int64_t bq_max = std::min(kBwdQueryBlock, HW), bm_max = std::min(kBwdMemoryBlock, M);
    at::parallel_for(0, B * groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<T_> ps(bm_max * bq_max), ds(bm_max * bq_max);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / groups, grp = task % groups;
        const T_* qb = q_ptr + b * Ck * HW;
        const T_* kb = k_ptr + b * Ck * M;
        const T_* vb = v_ptr + b * Cv * M;
        const T_* dob = do_ptr + b * Cv * HW;
        T_* dqg = dqg_ptr + (b * groups + grp) * Ck * HW;
        for (int64_t blk = grp * nmb / groups; blk < (grp + 1) * nmb / groups; ++blk) {
          const int64_t m0 = blk * kBwdMemoryBlock, bm = std::min(kBwdMemoryBlock, M - m0);
          auto keys_t = matrix(kb + m0, bm, Ck, 1, M, dtype);    // (bm, Ck)
          auto keys = matrix(kb + m0, Ck, bm, M, 1, dtype);      // (Ck, bm)
          auto values_t = matrix(vb + m0, bm, Cv, 1, M, dtype);  // (bm, Cv)
          auto dk_blk = matrix(dk_ptr + b * Ck * M + m0, Ck, bm, M, 1, dtype);
          auto dv_blk = matrix(dv_ptr + b * Cv * M + m0, Cv, bm, M, 1, dtype);
          for (int64_t q0 = 0; q0 < HW; q0 += kBwdQueryBlock) {
            const int64_t bq = std::min(kBwdQueryBlock, HW - q0);
            auto queries = matrix(qb + q0, Ck, bq, HW, 1, dtype);
            auto d_outs = matrix(dob + q0, Cv, bq, HW, 1, dtype);
            auto p_t = matrix(ps.data(), bm, bq, bq, 1, dtype);
            auto ds_t = matrix(ds.data(), bm, bq, bq, 1, dtype);
            at::mm_out(p_t, keys_t, queries);
            for (int64_t i = 0; i < bm; ++i) {
              const int64_t p = b * M + m0 + i;
              logit_col_k(ps.data() + i * bq, bq, s, yx.data() + q0, yx.data() + HW + q0,
                          gaussian ? cy_ptr[p] : T_(0), gaussian ? cx_ptr[p] : T_(0), gaussian ? g_ptr[p] : T_(0));
            }
            at::mm_out(ds_t, values_t, d_outs);
            for (int64_t i = 0; i < bm; ++i)
              grad_k(ps.data() + i * bq, ds.data() + i * bq, bq, lse_ptr + b * HW + q0, delta.data() + b * HW + q0);
            dv_blk.addmm_(d_outs, p_t.t());
            dk_blk.addmm_(queries, ds_t.t(), 1, scale);
            matrix(dqg + q0, Ck, bq, HW, 1, dtype).addmm_(keys, ds_t, 1, scale);
          }
        }
      }
    });

    // dQ = sum of the groups' partial sums, in group order.
    at::parallel_for(0, B * Ck, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / Ck, c = bc % Ck;
        T_* dst = dq_ptr + bc * HW;
        std::fill(dst, dst + HW, T_(0));
        for (int64_t grp = 0; grp < groups; ++grp) {
          const T_* src = dqg_ptr + ((b * groups + grp) * Ck + c) * HW;
          for (int64_t q = 0; q < HW; ++q) dst[q] += src[q];
        }
      }
    });
  });
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(hmmn_ops, CPU, m) {
  m.impl("kernel_guided_read", &kernel_guided_read);
  m.impl("kernel_guided_read_backward", &kernel_guided_read_backward);
}

}  // namespace hmmn_ops::cpu
