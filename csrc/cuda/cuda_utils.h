// Glue helpers shared by the CUDA launchers in csrc/cuda/*.cu: argument checks with messages
// that name the argument, the sm_80+ check, the current stream, and the dtype dispatch that
// maps at::Half / at::BFloat16 to the CUDA types the torch-free kernels use.
//
// The same glue also builds for the CUDA emulator (backend "cuda_emulated", csrc/emulator/,
// HMMN_CUDA_EMULATION defined): kernels run on the CPU, tensors are CPU tensors, the c10/cuda
// headers come from csrc/emulator/shim, and the ops register under hmmn_ops_emulated.
#pragma once

#if defined(HMMN_CUDA_EMULATION)
#include "emulator/emulator.h"  // before the CUDA headers
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <vector>

namespace hmmn_cuda {

template <typename T> struct Native { using type = T; };
template <> struct Native<at::Half> { using type = __half; };
template <> struct Native<at::BFloat16> { using type = __nv_bfloat16; };

// Raw pointer of a contiguous tensor in the kernels' element type.
template <typename T> T* ptr(const at::Tensor& t) { return static_cast<T*>(t.data_ptr()); }

// Accumulation dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct DeviceInfo {
  cudaStream_t stream;
  int num_sms;
  int64_t smem_optin;  // bytes of shared memory one block may use (static + dynamic)
};

// For the tensors' device (guard already set): the stream and properties the launchers need.
// The kernels use sm_80 features and are built for sm_80+ only; older GPUs get a clear error
// (the Python side routes them to Triton or the reference before getting here).
inline DeviceInfo device_info(const at::Tensor& like, const char* op) {
  const int dev = like.get_device();
  int major = 0, minor = 0, sms = 0, optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  TORCH_CHECK(major >= 8, "hmmn_ops.", op, ": the compiled CUDA kernels need a GPU of compute capability >= 8.0 (sm_80+), but ",
              like.device(), " is sm_", major, minor, "; use backend=\"triton\" or backend=\"reference\"");
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return {c10::cuda::getCurrentCUDAStream(dev).stream(), sms, optin};
}

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

// Tensors the kernels run on: CUDA tensors, or CPU tensors in the emulated build.
#if defined(HMMN_CUDA_EMULATION)
constexpr const char* kDeviceKind = "CPU (backend cuda_emulated)";
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
#else
constexpr const char* kDeviceKind = "CUDA";
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
#endif

// t is a tensor the kernels run on, else an error naming it.
inline void check_device(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(on_kernel_device(t), "hmmn_ops.", op, ": ", name, " must be a ", kDeviceKind, " tensor, got ", t.device());
}

// t is a CUDA tensor on like's device with `dim` dims and, when dtype is given, that dtype.
inline void check_tensor(const at::Tensor& t, const char* op, const char* name, int64_t dim, const at::Tensor& like,
                         c10::optional<at::ScalarType> dtype = c10::nullopt) {
  TORCH_CHECK(on_kernel_device(t) && t.device() == like.device(), "hmmn_ops.", op, ": ", name, " must be on ", like.device(),
              ", got ", t.device());
  TORCH_CHECK(t.dim() == dim, "hmmn_ops.", op, ": ", name, " must have ", dim, " dims, got shape ", shape_str(t));
  const at::ScalarType want = dtype ? *dtype : like.scalar_type();
  TORCH_CHECK(t.scalar_type() == want, "hmmn_ops.", op, ": ", name, " must be ", want, ", got ", t.scalar_type());
}

// t.sizes() == expected.
inline void check_shape(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "hmmn_ops.", op, ": ", name, " must have shape ", expected, ", got ", shape_str(t));
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, "hmmn_ops.", op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", s);
}

}  // namespace hmmn_cuda

// Registers a glue file's kernels: `hmmn_ops` ops for CUDA tensors, or (emulated build)
// `hmmn_ops_emulated` ops for CPU tensors (schemas: hmmn_ops/backends.py copies hmmn_ops').
#if defined(HMMN_CUDA_EMULATION)
#define HMMN_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(hmmn_ops_emulated, CPU, m)
#else
#define HMMN_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(hmmn_ops, CUDA, m)
#endif

// Runs the lambda body with T = the kernels' element type of `dtype`.
#define HMMN_DISPATCH(dtype, op, ...)                                                  \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, [&] {           \
    using T = typename ::hmmn_cuda::Native<scalar_t>::type;                            \
    __VA_ARGS__();                                                                     \
  })
