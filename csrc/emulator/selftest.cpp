// Kernels that must fail (or, with their barrier, pass) under the emulator: they prove the
// harness catches a missing barrier, a divergent barrier, missing lanes and launch-limit
// violations (tests/test_cuda.py::test_emulator_*). Op hmmn_ops_emulated::_emulator_selftest.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <string>

#include "emulator/emulator.h"

namespace {

constexpr int kLanes = 32;

// Warp 1 computes for a while, then publishes values in shared memory; warp 0 reads them after
// the barrier. Built without it (kBarrier = false), warp 0 reads the poisoned memory first.
template <bool kBarrier>
__global__ void publish_kernel(float* out) {
  HMMN_SHARED(float, box, [kLanes]);
  const int lane = threadIdx.x % kLanes;
  if (threadIdx.x >= kLanes) {
    volatile float x = 0.f;
    for (int i = 0; i < 2000000; ++i) x = x + 1e-7f;  // slow writer (~ms)
    box[lane] = float(lane) + 0.f * x;
  }
  if constexpr (kBarrier) __syncthreads();
  if (threadIdx.x < kLanes) out[lane] = box[lane];
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void missing_lane_kernel(float* out) {
  if (threadIdx.x % kLanes >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

__global__ void divergent_warp_kernel(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 2) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void shuffle_kernel(float* out) {  // every lane present: a plain warp sum
  float v = float(threadIdx.x % kLanes);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v + float(__builtin_popcount(__ballot_sync(0xffffffffu, threadIdx.x % 2 == 0)));
}

__global__ void dynamic_smem_kernel(float* out) {
  HMMN_DYNAMIC_SMEM(buf);
  const unsigned t = threadIdx.x;
  out[t] = buf[0] == 0 ? 0.f : 1.f;
}

at::Tensor emulator_selftest(const std::string& name) {
  auto out = at::zeros({2 * kLanes}, at::kFloat);
  float* o = out.data_ptr<float>();
  if (name == "barrier") HMMN_LAUNCH(publish_kernel<true>, 1, 2 * kLanes, 0, nullptr, o);
  else if (name == "barrier_dropped") HMMN_LAUNCH(publish_kernel<false>, 1, 2 * kLanes, 0, nullptr, o);
  else if (name == "divergent_barrier") HMMN_LAUNCH(divergent_barrier_kernel, 1, 2 * kLanes, 0, nullptr, o);
  else if (name == "missing_lane") HMMN_LAUNCH(missing_lane_kernel, 1, 2 * kLanes, 0, nullptr, o);
  else if (name == "divergent_warp") HMMN_LAUNCH(divergent_warp_kernel, 1, 2 * kLanes, 0, nullptr, o);
  else if (name == "shuffle") HMMN_LAUNCH(shuffle_kernel, 1, 2 * kLanes, 0, nullptr, o);
  else if (name == "too_many_threads") HMMN_LAUNCH(shuffle_kernel, 1, 2048, 0, nullptr, o);
  else if (name == "grid_y_too_large") HMMN_LAUNCH(shuffle_kernel, dim3(1, 70000), 32, 0, nullptr, o);
  else if (name == "smem_without_optin") HMMN_LAUNCH(dynamic_smem_kernel, 1, 32, 64 << 10, nullptr, o);
  else if (name == "smem_with_optin") {
    const auto kernel = dynamic_smem_kernel;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10));
    HMMN_LAUNCH(kernel, 1, 32, 64 << 10, nullptr, o);
  } else TORCH_CHECK(false, "_emulator_selftest: unknown case ", name);
  C10_CUDA_CHECK(cudaGetLastError());
  return out;
}

}  // namespace

// No tensor arguments: a composite kernel, so the dispatcher needs no device to pick it.
TORCH_LIBRARY_IMPL(hmmn_ops_emulated, CompositeExplicitAutograd, m) { m.impl("_emulator_selftest", &emulator_selftest); }
