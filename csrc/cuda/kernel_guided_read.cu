// CUDA launchers of kernel_guided_read and its backward (docs/internals.md). Device code:
// kernels/kernel_guided_read.cuh.
#include <torch/library.h>

#include "cuda_utils.h"
#include "kernels/kernel_guided_read.cuh"

namespace hmmn_cuda {
namespace {

constexpr const char* kOp = "kernel_guided_read";

// Checks the shared arguments of the forward and backward; returns (B, Ck, Cv, T, H, W).
std::array<int64_t, 6> check_kgr(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& centers, const c10::optional<at::Tensor>& sigma) {
  check_device(q, kOp, "query_key");
  check_floating(q, kOp, "query_key");
  check_tensor(q, kOp, "query_key", 4, q);
  check_tensor(k, kOp, "memory_key", 5, q);
  check_tensor(v, kOp, "memory_value", 5, q);
  const int64_t B = q.size(0), Ck = q.size(1), H = q.size(2), W = q.size(3), Tm = k.size(2), Cv = v.size(1);
  check_shape(k, kOp, "memory_key", {B, Ck, Tm, H, W});
  check_shape(v, kOp, "memory_value", {B, Cv, Tm, H, W});
  TORCH_CHECK(Ck >= 1 && Cv >= 1 && Tm >= 1, "hmmn_ops.", kOp, ": need Ck >= 1, Cv >= 1 and T >= 1, got Ck=", Ck,
              ", Cv=", Cv, ", T=", Tm);
  TORCH_CHECK(centers.has_value() == sigma.has_value(), "hmmn_ops.", kOp,
              ": centers and sigma must both be given or both be None");
  if (centers) {
    check_tensor(*centers, kOp, "centers", 4, q, at::kLong);
    check_shape(*centers, kOp, "centers", {B, Tm, H, W});
    check_tensor(*sigma, kOp, "sigma", 2, q, acc_dtype(q.scalar_type()));
    check_shape(*sigma, kOp, "sigma", {B, Tm});
  }
  return {B, Ck, Cv, Tm, H, W};
}

template <typename T>
hmmn::KgrParams<T> make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const c10::optional<at::Tensor>& centers, const c10::optional<at::Tensor>& sigma,
                               double scale, const std::array<int64_t, 6>& dims) {
  using A = hmmn::acc_of<T>;
  hmmn::KgrParams<T> p{};
  p.q = ptr<const T>(q);
  p.k = ptr<const T>(k);
  p.v = ptr<const T>(v);
  p.centers = centers ? ptr<const int64_t>(*centers) : nullptr;
  p.sigma = sigma ? ptr<const A>(*sigma) : nullptr;
  p.scale = A(scale);
  p.B = dims[0], p.Ck = dims[1], p.Cv = dims[2], p.Tm = dims[3], p.H = dims[4], p.W = dims[5];
  p.N = p.H * p.W;
  p.M = p.Tm * p.N;
  return p;
}

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_guided_read_cuda(
    const at::Tensor& query_key, const at::Tensor& memory_key, const at::Tensor& memory_value,
    const c10::optional<at::Tensor>& centers_in, const c10::optional<at::Tensor>& sigma_in, double scale, int64_t topk,
    at::IntArrayRef topk_frames) {
  const auto dims = check_kgr(query_key, memory_key, memory_value, centers_in, sigma_in);
  const int64_t B = dims[0], Cv = dims[2], Tm = dims[3], H = dims[4], W = dims[5];
  const int64_t N = H * W, F = int64_t(topk_frames.size());
  TORCH_CHECK(topk >= 0, "hmmn_ops.", kOp, ": topk must be >= 0, got ", topk);
  TORCH_CHECK(topk == 0 || (F >= 1 && topk <= F * N), "hmmn_ops.", kOp, ": topk must be <= len(topk_frames) * H * W = ",
              F * N, ", got topk=", topk);
  std::vector<bool> seen(size_t(Tm), false);
  for (const int64_t f : topk_frames) {
    TORCH_CHECK(f >= 0 && f < Tm && !seen[size_t(f)], "hmmn_ops.", kOp,
                ": topk_frames must be distinct frames in [0, T=", Tm, "), got ", topk_frames);
    seen[size_t(f)] = true;
  }

  const c10::cuda::CUDAGuard guard(query_key.device());
  const auto q = query_key.contiguous(), k = memory_key.contiguous(), v = memory_value.contiguous();
  const auto centers = contiguous(centers_in), sigma = contiguous(sigma_in);
  const auto acc_opts = q.options().dtype(acc_dtype(q.scalar_type()));
  auto out = at::empty({B, Cv, H, W}, q.options());
  auto lse = at::empty({B, N}, acc_opts);
  auto idx = at::empty({B, N, topk}, q.options().dtype(at::kLong));
  if (B * N == 0) return {out, lse, idx};
  const DeviceInfo dev = device_info(q, kOp);

  HMMN_DISPATCH(q.scalar_type(), kOp, [&] {
    using A = hmmn::acc_of<T>;
    const auto p = make_params<T>(q, k, v, centers, sigma, scale, dims);
    const auto plan = hmmn::kgr_forward_plan(p, dev.num_sms, dev.smem_optin);
    auto ws = at::empty({plan.workspace}, acc_opts);
    C10_CUDA_CHECK(hmmn::kgr_forward(p, plan, ptr<T>(out), ptr<A>(lse), ptr<A>(ws), dev.stream));
    if (topk > 0) {
      // A few bytes: a pageable host-to-device copy is ordered on the stream and safe.
      const auto frames = at::tensor(topk_frames, at::kLong).to(q.device(), /*non_blocking=*/true);
      auto keys = at::empty({B * N * topk}, acc_opts);
      C10_CUDA_CHECK(hmmn::kgr_topk(p, ptr<const int64_t>(frames), F, topk, ptr<A>(keys), ptr<int64_t>(idx), dev.stream));
    }
  });
  return {out, lse, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_guided_read_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& query_key, const at::Tensor& memory_key,
    const at::Tensor& memory_value, const c10::optional<at::Tensor>& centers_in,
    const c10::optional<at::Tensor>& sigma_in, const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  const auto dims = check_kgr(query_key, memory_key, memory_value, centers_in, sigma_in);
  const int64_t B = dims[0], Cv = dims[2], H = dims[4], W = dims[5];
  check_tensor(grad_out_in, kOp, "grad_out", 4, query_key);
  check_shape(grad_out_in, kOp, "grad_out", {B, Cv, H, W});
  check_tensor(out_in, kOp, "out", 4, query_key);
  check_shape(out_in, kOp, "out", {B, Cv, H, W});
  check_tensor(lse_in, kOp, "lse", 2, query_key, acc_dtype(query_key.scalar_type()));
  check_shape(lse_in, kOp, "lse", {B, H * W});

  const c10::cuda::CUDAGuard guard(query_key.device());
  const auto q = query_key.contiguous(), k = memory_key.contiguous(), v = memory_value.contiguous();
  const auto centers = contiguous(centers_in), sigma = contiguous(sigma_in);
  const auto dout = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (B == 0) return {dq, dk, dv};
  const DeviceInfo dev = device_info(q, kOp);
  auto D = at::empty({B, H * W}, lse.options());
  HMMN_DISPATCH(q.scalar_type(), kOp, [&] {
    using A = hmmn::acc_of<T>;
    const auto p = make_params<T>(q, k, v, centers, sigma, scale, dims);
    C10_CUDA_CHECK(hmmn::kgr_backward(p, ptr<const T>(dout), ptr<const T>(out), ptr<const A>(lse), ptr<A>(D), ptr<T>(dq),
                                      ptr<T>(dk), ptr<T>(dv), dev.smem_optin, dev.stream));
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace hmmn_cuda

HMMN_CUDA_LIBRARY_IMPL(m) {
  m.impl("kernel_guided_read", &hmmn_cuda::kernel_guided_read_cuda);
  m.impl("kernel_guided_read_backward", &hmmn_cuda::kernel_guided_read_backward_cuda);
}
