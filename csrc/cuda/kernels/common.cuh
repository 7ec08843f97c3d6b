// Torch-free helpers shared by every hmmn_ops CUDA kernel: accumulator types, conversions,
// math overloads, warp reductions. Built with torch's flags (-D__CUDA_NO_HALF_CONVERSIONS__
// etc.), so every half/bfloat16 conversion here is explicit.
#pragma once

#if !defined(__CUDACC__)
#include "emulator/emulator.h"  // first: it renames the runtime API it implements (see there)
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

// Launch and shared-memory spellings. Device code writes these instead of `<<<...>>>`,
// `__shared__` and `extern __shared__`, so the same .cuh source compiles with nvcc (where they
// expand to exactly that CUDA syntax) and with the host compiler for the CUDA emulator
// (backend "cuda_emulated", csrc/emulator/), where they expand to the emulator's launch and
// per-block shared memory.
//   HMMN_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)   kernel: a name or a local
//                                                                     pointer (no commas)
//   HMMN_SHARED(Type, name, dims)   e.g. HMMN_SHARED(float, m, [64]); HMMN_SHARED(Smem, sm, )
//   HMMN_DYNAMIC_SMEM(name)         unsigned char* view of the launch's dynamic shared memory
#if defined(__CUDACC__)
#define HMMN_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define HMMN_SHARED(Type, name, dims) __shared__ Type name dims
#define HMMN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif  // the host compiler's come from emulator/emulator.h, included above

namespace hmmn {

// Accumulation type: float64 for float64 inputs, float32 otherwise (docs/internals.md).
template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };
template <typename T> using acc_of = typename AccT<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Rounds an accumulator to the storage type (round to nearest even).
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(double* p, double x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

__device__ __forceinline__ float acc_exp(float x) { return __expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return __logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -CUDART_INF_F; }
template <> __device__ __forceinline__ double neg_inf<double>() { return -CUDART_INF; }

template <typename A> __device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A y = __shfl_xor_sync(0xffffffffu, x, o);
    x = y > x ? y : x;
  }
  return x;
}

template <typename A> __device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Centre of memory position `pos` of batch item b (docs/ops.md section 1): (cy, cx) and g = 1 / (2 sigma^2);
// cy = -1 when there is no centre (centers == nullptr, centers[pos] == -1, or pos < 0).
// centers is (B, M) and sigma (B, T), both contiguous.
template <typename A>
__device__ __forceinline__ void load_center(const int64_t* centers, const A* sigma, int64_t b, int64_t pos, int64_t M,
                                            int64_t N, int64_t W, int64_t T, int& cy, int& cx, A& g) {
  cy = -1;
  cx = 0;
  g = A(0);
  if (centers == nullptr || pos < 0) return;
  const int64_t c = centers[b * M + pos];
  if (c < 0) return;
  cy = int(c / W);
  cx = int(c % W);
  const A s = sigma[b * T + pos / N];
  g = A(0.5) / (s * s);
}

// Logits saturate at +-1e36 (float) / +-1e300 (double), NaN kept, as on every backend
// (docs/reliability.md): an overflow (a huge scale, a sigma so tiny that 1 / (2 sigma^2) is inf)
// saturates instead of making inf - inf = NaN in a softmax.
__device__ __forceinline__ float saturate(float x) { return x > 1e36f ? 1e36f : x < -1e36f ? -1e36f : x; }
__device__ __forceinline__ double saturate(double x) { return x > 1e300 ? 1e300 : x < -1e300 ? -1e300 : x; }

// Log-Gaussian bias of docs/ops.md section 1 for query pixel (qy, qx) and a memory position whose centre is
// (cy, cx) (cy < 0: no centre) with g = 1 / (2 sigma^2). d2 == 0 returns exactly 0 so that a
// huge g (tiny sigma) never gives 0 * inf = NaN.
template <typename A>
__device__ __forceinline__ A gauss_bias(int qy, int qx, int cy, int cx, A g) {
  if (cy < 0) return A(0);
  const int64_t dy = qy - cy, dx = qx - cx;
  const int64_t d2 = dy * dy + dx * dx;
  return d2 == 0 ? A(0) : -A(d2) * g;
}

}  // namespace hmmn
