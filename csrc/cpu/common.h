// Shared glue of the CPU kernels: argument checks, dtype handling, ISA selection.
//
// Hot loops live in torch-free *_kernels.h files that isa.h compiles once per x86 ISA level
// (baseline SSE2, AVX2+FMA, AVX-512) inside namespaces isa_base / isa_avx2 / isa_avx512; the
// glue here picks one at run time (HMMN_OPS_CPU_ISA=base|avx2|avx512 overrides the choice).
// The .cpp files keep the tensor work (checks, layout copies, BLAS calls through at::mm).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace hmmn_ops::cpu {

// ---------------------------------------------------------------- ISA selection

enum class Isa { base, avx2, avx512 };

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define HMMN_X86_MULTIVERSION 1
#else
#define HMMN_X86_MULTIVERSION 0
#endif

inline Isa detect_isa() {
  Isa best = Isa::base;
#if HMMN_X86_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
  if (best == Isa::avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    best = Isa::avx512;
#endif
  // An override can only lower the level: asking for more than the CPU has would crash.
  if (const char* want = std::getenv("HMMN_OPS_CPU_ISA")) {
    std::string w(want);
    Isa asked = w == "base" ? Isa::base : w == "avx2" ? Isa::avx2 : Isa::avx512;
    if (asked < best) best = asked;
  }
  return best;
}

inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

#if HMMN_X86_MULTIVERSION
// The instance of a kernel template compiled for the ISA of this CPU (variadic: template
// arguments may contain commas).
#define HMMN_PICK(...)                                                                         \
  (::hmmn_ops::cpu::cpu_isa() == ::hmmn_ops::cpu::Isa::avx512 ? isa_avx512::__VA_ARGS__      \
   : ::hmmn_ops::cpu::cpu_isa() == ::hmmn_ops::cpu::Isa::avx2 ? isa_avx2::__VA_ARGS__        \
                                                                : isa_base::__VA_ARGS__)
#else
#define HMMN_PICK(...) (isa_base::__VA_ARGS__)
#endif

// ---------------------------------------------------------------- argument checks
// The Python front checks everything with friendly messages; these cheap checks keep a
// direct torch.ops call from reading out of bounds. Messages name the argument.

inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor ", layout, ", got None");
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor ", layout, ", got shape ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, name,
              ": expected float32, float64, bfloat16 or float16, got ", s);
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(), " (the dtype of ",
              like_name, "), got ", t.scalar_type());
}

// expected[i] < 0 means "any size".
inline void check_sizes(const at::Tensor& t, const char* name, std::initializer_list<int64_t> expected,
                        const char* layout) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  int64_t i = 0;
  for (int64_t e : expected) {
    if (ok && e >= 0 && t.size(i) != e) ok = false;
    ++i;
  }
  if (!ok) {
    std::string want = "(";
    i = 0;
    for (int64_t e : expected) want += (i++ ? ", " : "") + (e < 0 ? std::string("*") : std::to_string(e));
    TORCH_CHECK(false, name, ": expected shape ", want, ") ", layout, ", got ", t.sizes());
  }
}

// The saved forward results and incoming gradient of a read's backward (both reads have them).
inline void check_read_backward(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse, int64_t B,
                                int64_t Cv, int64_t H, int64_t W) {
  auto check_map = [&](const at::Tensor& t, const char* name) {
    check_tensor(t, name, 4, "(B, Cv, H, W)");
    check_sizes(t, name, {B, Cv, H, W}, "(B, Cv, H, W)");
    check_floating(t, name);
  };
  check_map(grad_out, "grad_out");
  check_map(out, "out");
  check_tensor(lse, "lse", 2, "(B, H*W)");
  check_sizes(lse, "lse", {B, H * W}, "(B, H*W)");
  check_floating(lse, "lse");
}

inline void check_int64(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, ": expected dtype int64, got ", t.scalar_type());
}

// ---------------------------------------------------------------- dtypes

// Kernels are compiled for float and double; bfloat16/float16 are computed in float.
inline at::ScalarType compute_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// Contiguous copy in the compute dtype (no copy when it already is).
inline at::Tensor to_compute(const at::Tensor& t) { return t.to(compute_dtype(t.scalar_type())).contiguous(); }

// The accumulation dtype of docs/ops.md (float64 for float64, float32 otherwise): what lse uses.
inline at::ScalarType acc_dtype(at::ScalarType s) { return compute_dtype(s); }

template <typename F>
inline void dispatch_compute(at::ScalarType s, const F& f) {
  if (compute_dtype(s) == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

// A (rows x cols) matrix view on raw memory with row stride ld, for at::mm on blocks.
inline at::Tensor matrix(const void* data, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                         at::ScalarType dtype) {
  return at::from_blob(const_cast<void*>(data), {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(dtype));
}

// data_ptr<T>() that also reads well inside generic lambdas (no `.template`).
template <typename T>
inline T* ptr(const at::Tensor& t) {
  return t.data_ptr<T>();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace hmmn_ops::cpu
