// CUDA launchers of local_track and global_track (docs/internals.md). Device code:
// kernels/track.cuh.
#include <torch/library.h>

#include "cuda_utils.h"
#include "kernels/track.cuh"

namespace hmmn_cuda {
namespace {

at::Tensor local_track_cuda(const at::Tensor& memory_key, const at::Tensor& query_key, int64_t window) {
  constexpr const char* op = "local_track";
  check_device(query_key, op, "query_key");
  check_floating(query_key, op, "query_key");
  check_tensor(query_key, op, "query_key", 4, query_key);
  check_tensor(memory_key, op, "memory_key", 4, query_key);
  check_shape(memory_key, op, "memory_key", query_key.sizes());
  TORCH_CHECK(window >= 1 && window % 2 == 1, "hmmn_ops.", op, ": window must be a positive odd int, got ", window);

  const c10::cuda::CUDAGuard guard(query_key.device());
  const auto mk = memory_key.contiguous(), qk = query_key.contiguous();
  const int64_t B = qk.size(0), C = qk.size(1), H = qk.size(2), W = qk.size(3);
  auto out = at::empty({B, H, W}, qk.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const DeviceInfo dev = device_info(qk, op);
  HMMN_DISPATCH(qk.scalar_type(), op, [&] {
    C10_CUDA_CHECK(hmmn::local_track(ptr<const T>(mk), ptr<const T>(qk), ptr<int64_t>(out), B, C, H, W, window, dev.stream));
  });
  return out;
}

at::Tensor global_track_cuda(const at::Tensor& memory_key, const at::Tensor& query_key) {
  constexpr const char* op = "global_track";
  check_device(query_key, op, "query_key");
  check_floating(query_key, op, "query_key");
  check_tensor(query_key, op, "query_key", 4, query_key);
  check_tensor(memory_key, op, "memory_key", 5, query_key);
  const int64_t B = query_key.size(0), C = query_key.size(1), H = query_key.size(2), W = query_key.size(3);
  const int64_t Tm = memory_key.size(2);
  check_shape(memory_key, op, "memory_key", {B, C, Tm, H, W});

  const c10::cuda::CUDAGuard guard(query_key.device());
  const auto mk = memory_key.contiguous(), qk = query_key.contiguous();
  auto out = at::empty({B, Tm, H, W}, qk.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const DeviceInfo dev = device_info(qk, op);
  HMMN_DISPATCH(qk.scalar_type(), op, [&] {
    C10_CUDA_CHECK(hmmn::global_track(ptr<const T>(mk), ptr<const T>(qk), ptr<int64_t>(out), B, C, H * W, Tm * H * W,
                                      dev.stream));
  });
  return out;
}

}  // namespace
}  // namespace hmmn_cuda

HMMN_CUDA_LIBRARY_IMPL(m) {
  m.impl("local_track", &hmmn_cuda::local_track_cuda);
  m.impl("global_track", &hmmn_cuda::global_track_cuda);
}
