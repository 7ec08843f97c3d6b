// CUDA launchers of gaussian_softmax and its backward (docs/internals.md). Device code:
// kernels/gaussian_softmax.cuh.
#include <torch/library.h>

#include "cuda_utils.h"
#include "kernels/gaussian_softmax.cuh"

namespace hmmn_cuda {
namespace {

constexpr const char* kOp = "gaussian_softmax";

at::Tensor gaussian_softmax_cuda(const at::Tensor& affinity, const at::Tensor& centers_in, const at::Tensor& sigma_in,
                                 int64_t height, int64_t width) {
  check_device(affinity, kOp, "affinity");
  check_floating(affinity, kOp, "affinity");
  check_tensor(affinity, kOp, "affinity", 3, affinity);
  check_tensor(centers_in, kOp, "centers", 4, affinity, at::kLong);
  const int64_t B = affinity.size(0), Tm = centers_in.size(1), H = height, W = width, N = H * W;
  check_shape(centers_in, kOp, "centers", {B, Tm, H, W});
  check_shape(affinity, kOp, "affinity", {B, Tm * N, N});
  check_tensor(sigma_in, kOp, "sigma", 2, affinity, acc_dtype(affinity.scalar_type()));
  check_shape(sigma_in, kOp, "sigma", {B, Tm});

  const c10::cuda::CUDAGuard guard(affinity.device());
  const auto x = affinity.contiguous(), centers = centers_in.contiguous(), sigma = sigma_in.contiguous();
  auto out = at::empty_like(x);
  if (out.numel() == 0) return out;
  const DeviceInfo dev = device_info(x, kOp);
  HMMN_DISPATCH(x.scalar_type(), kOp, [&] {
    using A = hmmn::acc_of<T>;
    const hmmn::GsmParams<T> p{ptr<const T>(x), nullptr, ptr<const int64_t>(centers), ptr<const A>(sigma), ptr<T>(out),
                               B, Tm, H, W, N, Tm * N};
    C10_CUDA_CHECK(hmmn::gaussian_softmax_forward(p, dev.stream));
  });
  return out;
}

at::Tensor gaussian_softmax_backward_cuda(const at::Tensor& grad_output, const at::Tensor& output) {
  constexpr const char* op = "gaussian_softmax_backward";
  check_device(output, op, "output");
  check_floating(output, op, "output");
  check_tensor(output, op, "output", 3, output);
  check_tensor(grad_output, op, "grad_output", 3, output);
  check_shape(grad_output, op, "grad_output", output.sizes());

  const c10::cuda::CUDAGuard guard(output.device());
  const auto gy = grad_output.contiguous(), y = output.contiguous();
  auto gx = at::empty_like(y);
  if (gx.numel() == 0) return gx;
  const DeviceInfo dev = device_info(y, op);
  const int64_t B = y.size(0), M = y.size(1), N = y.size(2);
  HMMN_DISPATCH(y.scalar_type(), op, [&] {
    // Only the column structure matters here: T = 1, H = 1, W = N.
    const hmmn::GsmParams<T> p{ptr<const T>(gy), ptr<const T>(y), nullptr, nullptr, ptr<T>(gx), B, 1, 1, N, N, M};
    C10_CUDA_CHECK(hmmn::gaussian_softmax_backward(p, dev.stream));
  });
  return gx;
}

}  // namespace
}  // namespace hmmn_cuda

HMMN_CUDA_LIBRARY_IMPL(m) {
  m.impl("gaussian_softmax", &hmmn_cuda::gaussian_softmax_cuda);
  m.impl("gaussian_softmax_backward", &hmmn_cuda::gaussian_softmax_backward_cuda);
}
