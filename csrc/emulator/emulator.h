// Host emulation of the CUDA subset hmmn_ops' kernels use (backend "cuda_emulated",
// docs/cuda.md): the kernels' own .cuh device code, compiled by the host compiler against the
// CUDA headers (types and host half/bfloat16 conversions only), runs on the CPU with one host
// thread per CUDA thread and one block at a time. It checks what a GPU or a sanitizer would:
// divergent barriers, warp operations with missing lanes, launch limits, the dynamic
// shared-memory opt-in, hangs; shared memory is fresh and poisoned (NaN pattern) per block.
// Errors become a failed launch (cudaGetLastError), never a crash or a silent pass.
//
// Must be included before the CUDA headers: it renames the runtime API functions it
// implements, so they never bind to a real libcudart loaded in the same process.
#pragma once

#if defined(__CUDACC__)
#error "emulator/emulator.h is for the host compiler; nvcc builds the real kernels"
#endif
#if defined(__CUDA_RUNTIME_H__)
#error "include emulator/emulator.h before the CUDA headers"
#endif

#define cudaGetLastError hmmn_emu_cudaGetLastError
#define cudaPeekAtLastError hmmn_emu_cudaPeekAtLastError
#define cudaGetErrorString hmmn_emu_cudaGetErrorString
#define cudaFuncGetAttributes hmmn_emu_cudaFuncGetAttributes
#define cudaFuncSetAttribute hmmn_emu_cudaFuncSetAttribute
#define cudaDeviceGetAttribute hmmn_emu_cudaDeviceGetAttribute

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __launch_bounds__(...)

// Device bit casts math_constants.h uses (CUDART_INF_F, CUDART_INF).
inline float __int_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline double __longlong_as_double(unsigned long long x) { double d; std::memcpy(&d, &x, 8); return d; }

namespace hmmn_emu {

// The CUDA thread a host thread is running.
struct Thread {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  int linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  struct Block* block;
};
Thread& current();  // fails outside a kernel; ends a shared-memory probe (see launch)

// Builtins. Warp exchange: every lane of the calling warp deposits `mine` (all 32 lanes of
// `mask`, which must be full) and receives all 32 values; `op` names the call for errors.
void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
void warp_exchange(unsigned mask, uint64_t mine, uint64_t (&all)[32], const char* op, const char* file, int line);

template <typename V> uint64_t to_bits(V v) {
  static_assert(sizeof(V) <= 8 && std::is_trivially_copyable_v<V>, "warp operations move values of at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(V));
  return b;
}
template <typename V> V from_bits(uint64_t b) {
  V v;
  std::memcpy(&v, &b, sizeof(V));
  return v;
}
inline int lane_id() { return current().linear % 32; }

// Value of lane `src(lane)` within segments of `width` lanes (CUDA's shfl rules).
template <typename V, typename Src>
V shuffle(unsigned mask, V v, int width, Src src, const char* op, const char* file, int line) {
  uint64_t all[32];
  warp_exchange(mask, to_bits(v), all, op, file, line);
  const int lane = lane_id(), base = lane & ~(width - 1);
  const int s = src(lane - base);
  return s < 0 || s >= width ? v : from_bits<V>(all[base + s]);
}

// Per-block shared memory: the storage of the declaration at `site` (one per block, poisoned),
// and the launch's dynamic shared memory.
void* shared(const void* site, size_t bytes, size_t align);
unsigned char* dynamic_shared();

// Kernel registry: a zero-argument probe runs the kernel's shared declarations (up to its first
// builtin) to learn its static shared memory, as nvcc knows it at compile time.
using Probe = void (*)(const void* kernel);
void note_kernel(const void* kernel, Probe probe);
void launch_kernel(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(const void*), const void* ctx);

template <typename... P> void probe_kernel(const void* kernel) {
  auto fn = reinterpret_cast<void (*)(P...)>(const_cast<void*>(kernel));
  std::tuple<std::decay_t<P>...> zero{};
  std::apply(fn, zero);
}

template <typename... P> struct Call {
  void (*fn)(P...);
  std::tuple<std::decay_t<P>...> args;  // copied like CUDA's kernel parameters
  static void run(const void* self) {
    const Call& c = *static_cast<const Call*>(self);
    std::apply(c.fn, c.args);  // each thread gets its own by-value parameters
  }
};

template <typename... P, typename... Args>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args&&... args) {
  static_assert(sizeof...(P) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  const Call<P...> call{kernel, std::tuple<std::decay_t<P>...>(std::forward<Args>(args)...)};
  note_kernel(reinterpret_cast<const void*>(kernel), &probe_kernel<P...>);
  launch_kernel(reinterpret_cast<const void*>(kernel), grid, block, smem, &Call<P...>::run, &call);
}

// Test hook (HMMN_EMU_SMEM_BUDGET bytes): caps a kernel's dynamic shared-memory budget so
// small channel counts take several accumulator chunks, as large ones do on a GPU.
int64_t cap_dynamic_smem_budget(int64_t budget);

// Detail of the most recent error (the glue's C10_CUDA_CHECK adds it to its message).
const char* error_detail();

}  // namespace hmmn_emu

// Kernel attributes through the emulator's registry (more specialised than cuda_runtime.h's
// templates, so chosen for kernel pointers).
template <typename... P>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*kernel)(P...)) {
  ::hmmn_emu::note_kernel(reinterpret_cast<const void*>(kernel), &::hmmn_emu::probe_kernel<P...>);
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(kernel));
}
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  ::hmmn_emu::note_kernel(reinterpret_cast<const void*>(kernel), &::hmmn_emu::probe_kernel<P...>);
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

#define threadIdx (::hmmn_emu::current().thread_idx)
#define blockIdx (::hmmn_emu::current().block_idx)
#define blockDim (::hmmn_emu::current().block_dim)
#define gridDim (::hmmn_emu::current().grid_dim)

#define __syncthreads() ::hmmn_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::hmmn_emu::syncwarp(::hmmn_emu::mask_or_full(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_sync(mask, v, src, ...)                                                                       \
  ::hmmn_emu::shuffle(mask, v, ::hmmn_emu::width_or_32(__VA_ARGS__), [&](int) { return int(src); }, "__shfl_sync", \
                      __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...)                                                                          \
  ::hmmn_emu::shuffle(mask, v, ::hmmn_emu::width_or_32(__VA_ARGS__), [&](int l) { return l ^ int(m); }, \
                      "__shfl_xor_sync", __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...)                                                                         \
  ::hmmn_emu::shuffle(mask, v, ::hmmn_emu::width_or_32(__VA_ARGS__), [&](int l) { return l + int(d); }, \
                      "__shfl_down_sync", __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...)                                                                         \
  ::hmmn_emu::shuffle(mask, v, ::hmmn_emu::width_or_32(__VA_ARGS__), [&](int l) { return l - int(d); }, \
                      "__shfl_up_sync", __FILE__, __LINE__)
#define __ballot_sync(mask, pred) ::hmmn_emu::ballot(mask, bool(pred), __FILE__, __LINE__)

namespace hmmn_emu {
inline unsigned mask_or_full() { return 0xffffffffu; }
inline unsigned mask_or_full(unsigned m) { return m; }
inline int width_or_32() { return 32; }
inline int width_or_32(int w) { return w; }
inline unsigned ballot(unsigned mask, bool pred, const char* file, int line) {
  uint64_t all[32];
  warp_exchange(mask, pred ? 1u : 0u, all, "__ballot_sync", file, line);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= all[l] ? 1u << l : 0u;
  return bits & mask;
}
}  // namespace hmmn_emu

inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
template <typename V> inline V atomicAdd(V* p, V x) {
  return std::atomic_ref<V>(*p).fetch_add(x, std::memory_order_relaxed);
}

#define HMMN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::hmmn_emu::launch(kernel, dim3(grid), dim3(block), size_t(smem), stream, __VA_ARGS__)
#define HMMN_SHARED(Type, name, dims)                                   \
  using hmmn_shared_##name##_t = Type dims;                             \
  static const char hmmn_shared_##name##_site = 0;                      \
  hmmn_shared_##name##_t& name = *static_cast<hmmn_shared_##name##_t*>( \
      ::hmmn_emu::shared(&hmmn_shared_##name##_site, sizeof(hmmn_shared_##name##_t), alignof(hmmn_shared_##name##_t)))
#define HMMN_DYNAMIC_SMEM(name) unsigned char* const name = ::hmmn_emu::dynamic_shared()
