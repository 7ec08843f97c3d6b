// CUDA launchers of topk_guided_read and its backward (docs/internals.md). Device code:
// kernels/topk_guided_read.cuh. Memory keys/values are gathered per candidate, so they are
// passed channels-last (one copy; free when the caller's tensors already are).
#include <ATen/Context.h>
#include <torch/library.h>

#include "cuda_utils.h"
#include "kernels/topk_guided_read.cuh"

namespace hmmn_cuda {
namespace {

constexpr const char* kOp = "topk_guided_read";

struct TopkDims {
  int64_t B, Ck, Cv, Tm, H, W, r, K;
};

TopkDims check_topk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                    int64_t ratio) {
  check_device(q, kOp, "query_key");
  check_floating(q, kOp, "query_key");
  check_tensor(q, kOp, "query_key", 4, q);
  check_tensor(k, kOp, "memory_key", 5, q);
  check_tensor(v, kOp, "memory_value", 5, q);
  check_tensor(idx, kOp, "topk_indices", 3, q, at::kLong);
  const int64_t B = q.size(0), Ck = q.size(1), H = q.size(2), W = q.size(3), Tm = k.size(2), Cv = v.size(1);
  check_shape(k, kOp, "memory_key", {B, Ck, Tm, H, W});
  check_shape(v, kOp, "memory_value", {B, Cv, Tm, H, W});
  TORCH_CHECK(ratio >= 1 && H % ratio == 0 && W % ratio == 0, "hmmn_ops.", kOp, ": ratio must be >= 1 and divide H=", H,
              " and W=", W, ", got ", ratio);
  const int64_t Nc = (H / ratio) * (W / ratio), K = idx.size(2);
  TORCH_CHECK(idx.size(0) == B && idx.size(1) == Nc && K >= 1, "hmmn_ops.", kOp, ": topk_indices must have shape (", B,
              ", ", Nc, ", k >= 1), got ", shape_str(idx));
  TORCH_CHECK(Ck >= 1 && Cv >= 1 && Tm >= 1, "hmmn_ops.", kOp, ": need Ck >= 1, Cv >= 1 and T >= 1, got Ck=", Ck,
              ", Cv=", Cv, ", T=", Tm);
  return {B, Ck, Cv, Tm, H, W, ratio, K};
}

// (B, C, T, H, W) -> (B, T*H*W, C) contiguous.
at::Tensor channels_last(const at::Tensor& x) { return x.permute({0, 2, 3, 4, 1}).contiguous(); }

template <typename T>
hmmn::TopkParams<T> make_params(const TopkDims& d, const at::Tensor& q, const at::Tensor& kcl, const at::Tensor& vcl,
                                const at::Tensor& idx, double scale) {
  hmmn::TopkParams<T> p{};
  p.q = ptr<const T>(q);
  p.k = ptr<const T>(kcl);
  p.v = ptr<const T>(vcl);
  p.idx = ptr<const int64_t>(idx);
  p.scale = hmmn::acc_of<T>(scale);
  p.B = d.B, p.Ck = d.Ck, p.Cv = d.Cv, p.H = d.H, p.W = d.W, p.Tm = d.Tm, p.r = d.r, p.K = d.K;
  p.N = d.H * d.W;
  p.M = d.Tm * p.N;
  p.Hc = d.H / d.r;
  p.Wc = d.W / d.r;
  p.Nc = p.Hc * p.Wc;
  return p;
}

std::tuple<at::Tensor, at::Tensor> topk_guided_read_cuda(const at::Tensor& query_key, const at::Tensor& memory_key,
                                                         const at::Tensor& memory_value, const at::Tensor& topk_indices,
                                                         double scale, int64_t ratio) {
  const TopkDims d = check_topk(query_key, memory_key, memory_value, topk_indices, ratio);
  const c10::cuda::CUDAGuard guard(query_key.device());
  const auto q = query_key.contiguous(), idx = topk_indices.contiguous();
  const auto kcl = channels_last(memory_key), vcl = channels_last(memory_value);
  auto out = at::empty({d.B, d.Cv, d.H, d.W}, q.options());
  auto lse = at::empty({d.B, d.H * d.W}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (d.B * d.H * d.W == 0) return {out, lse};
  const DeviceInfo dev = device_info(q, kOp);
  HMMN_DISPATCH(q.scalar_type(), kOp, [&] {
    const auto p = make_params<T>(d, q, kcl, vcl, idx, scale);
    C10_CUDA_CHECK(hmmn::topk_forward(p, ptr<T>(out), ptr<hmmn::acc_of<T>>(lse), dev.smem_optin, dev.stream));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_guided_read_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& query_key, const at::Tensor& memory_key,
    const at::Tensor& memory_value, const at::Tensor& topk_indices, const at::Tensor& out_in, const at::Tensor& lse_in,
    double scale, int64_t ratio) {
  const TopkDims d = check_topk(query_key, memory_key, memory_value, topk_indices, ratio);
  check_tensor(grad_out_in, kOp, "grad_out", 4, query_key);
  check_shape(grad_out_in, kOp, "grad_out", {d.B, d.Cv, d.H, d.W});
  check_tensor(out_in, kOp, "out", 4, query_key);
  check_shape(out_in, kOp, "out", {d.B, d.Cv, d.H, d.W});
  check_tensor(lse_in, kOp, "lse", 2, query_key, acc_dtype(query_key.scalar_type()));
  check_shape(lse_in, kOp, "lse", {d.B, d.H * d.W});

  const c10::cuda::CUDAGuard guard(query_key.device());
  const auto q = query_key.contiguous(), idx = topk_indices.contiguous();
  const auto kcl = channels_last(memory_key), vcl = channels_last(memory_value);
  const auto dout = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  auto dq = at::empty_like(q);
  auto dk = at::empty(memory_key.sizes(), q.options()), dv = at::empty(memory_value.sizes(), q.options());
  if (d.B * d.H * d.W == 0) return {dq, dk, dv};
  const DeviceInfo dev = device_info(q, kOp);
  const auto acc_opts = lse.options();
  auto D = at::empty({d.B, d.H * d.W}, acc_opts);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  HMMN_DISPATCH(q.scalar_type(), kOp, [&] {
    using A = hmmn::acc_of<T>;
    const auto p = make_params<T>(d, q, kcl, vcl, idx, scale);
    C10_CUDA_CHECK(hmmn::topk_backward_dq(p, ptr<const T>(dout), ptr<const T>(out), ptr<const A>(lse), ptr<A>(D),
                                          ptr<T>(dq), dev.smem_optin, dev.stream));
    if (deterministic) {
      // CSR of "which (cell, slot) lists coarse memory index m", in ascending (cell, slot)
      // order per m: a stable sort of the flattened indices (offset per batch item).
      const int64_t Mc = d.Tm * p.Nc;
      const auto flat = (idx + at::arange(d.B, idx.options()).view({d.B, 1, 1}) * Mc).view({-1});
      const auto sorted = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      const auto ref_cell = (std::get<1>(sorted).div(d.K, "floor")).remainder(p.Nc).contiguous();
      const auto ref_off = at::searchsorted(std::get<0>(sorted), at::arange(d.B * Mc + 1, idx.options())).contiguous();
      C10_CUDA_CHECK(hmmn::topk_backward_dkdv_deterministic(p, ptr<const T>(dout), ptr<const A>(lse), ptr<const A>(D),
                                                            ptr<const int64_t>(ref_off), ptr<const int64_t>(ref_cell),
                                                            ptr<T>(dk), ptr<T>(dv), dev.smem_optin, dev.stream));
    } else {
      auto gk = at::zeros({d.B, p.M, d.Ck}, acc_opts), gv = at::zeros({d.B, p.M, d.Cv}, acc_opts);
      C10_CUDA_CHECK(hmmn::topk_backward_dkdv_atomic(p, ptr<const T>(dout), ptr<const A>(lse), ptr<const A>(D),
                                                     ptr<A>(gk), ptr<A>(gv), dev.stream));
      // channels-last accumulators -> (B, C, T, H, W) in the input dtype, one copy each
      dk.copy_(gk.view({d.B, d.Tm, d.H, d.W, d.Ck}).permute({0, 4, 1, 2, 3}));
      dv.copy_(gv.view({d.B, d.Tm, d.H, d.W, d.Cv}).permute({0, 4, 1, 2, 3}));
    }
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace hmmn_cuda

HMMN_CUDA_LIBRARY_IMPL(m) {
  m.impl("topk_guided_read", &hmmn_cuda::topk_guided_read_cuda);
  m.impl("topk_guided_read_backward", &hmmn_cuda::topk_guided_read_backward_cuda);
}
