// gaussian_softmax (docs/ops.md section 2) and its backward on CPU.
#include "common.h"

#define HMMN_KERNELS "gaussian_softmax_kernels.h"
#include "isa.h"

namespace hmmn_ops::cpu {
namespace {

// Query columns per task: row segments of 1 KB, so the strided walk down the rows touches few
// pages per element.
int64_t slab_width(int64_t elem_size) { return 1024 / elem_size; }

// Cheap range check of the centres (a bad value would only give a wrong bias, but the
// contract says -1 or a flat query index).
void check_centers(const at::Tensor& centers, int64_t HW) {
  if (centers.numel() == 0) return;
  auto [lo, hi] = at::aminmax(centers);
  const int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
  TORCH_CHECK(l >= -1 && h < HW, "centers: values must be flat query indices in [0, ", HW, ") or -1, got range [", l,
              ", ", h, "]");
}

at::Tensor gaussian_softmax(const at::Tensor& affinity, const at::Tensor& centers, const at::Tensor& sigma,
                            int64_t height, int64_t width) {
  check_tensor(affinity, "affinity", 3, "(B, T*H*W, H*W)");
  check_floating(affinity, "affinity");
  TORCH_CHECK(height >= 1 && width >= 1, "height, width: expected positive sizes, got (", height, ", ", width, ")");
  const int64_t B = affinity.size(0), M = affinity.size(1), HW = affinity.size(2);
  TORCH_CHECK(HW == height * width && M % HW == 0 && M > 0, "affinity: expected shape (B, T*", height, "*", width,
              ", ", height, "*", width, "), got ", affinity.sizes());
  const int64_t T = M / HW;
  check_tensor(centers, "centers", 4, "(B, T, H, W) int64");
  check_int64(centers, "centers");
  check_sizes(centers, "centers", {B, T, height, width}, "(B, T, H, W)");
  check_tensor(sigma, "sigma", 2, "(B, T)");
  check_floating(sigma, "sigma");
  check_sizes(sigma, "sigma", {B, T}, "(B, T)");
  check_centers(centers, HW);
  if (affinity.numel() == 0) return at::empty_like(affinity, at::MemoryFormat::Contiguous);

  at::Tensor result;
  dispatch_compute(affinity.scalar_type(), [&](auto zero) {
    using T_ = decltype(zero);
    const auto dtype = c10::CppTypeToScalarType<T_>::value;
    auto a = to_compute(affinity);
    auto out = at::empty_like(a);
    auto c = centers.contiguous();
    auto gamma = (0.5 / sigma.to(dtype).square()).contiguous();  // 1 / (2 sigma^2), as reference.py
    const int64_t n = slab_width(sizeof(T_)), ns = ceil_div(HW, n);
    const T_* a_ptr = ptr<T_>(a);
    T_* o_ptr = ptr<T_>(out);
    const int64_t* c_ptr = ptr<int64_t>(c);
    const T_* g_ptr = ptr<T_>(gamma);
    auto kernel = HMMN_PICK(gaussian_softmax_slab<T_>);
    const int64_t work_size = (5 + isa_base::kSoftmaxRows) * n;
    at::parallel_for(0, B * ns, 1, [&](int64_t begin, int64_t end) {
      std::vector<T_> work(work_size);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / ns, q0 = (task % ns) * n;
        kernel(a_ptr + b * M * HW, o_ptr + b * M * HW, c_ptr + b * M, g_ptr + b * T, M, HW, width, q0,
               std::min(n, HW - q0), work.data());
      }
    });
    result = out.scalar_type() == affinity.scalar_type() ? out : out.to(affinity.scalar_type());
  });
  return result;
}

at::Tensor gaussian_softmax_backward(const at::Tensor& grad_output, const at::Tensor& output) {
  check_tensor(output, "output", 3, "(B, T*H*W, H*W)");
  check_tensor(grad_output, "grad_output", 3, "(B, T*H*W, H*W)");
  check_floating(output, "output");
  check_same_dtype(grad_output, "grad_output", output, "output");
  const int64_t B = output.size(0), M = output.size(1), HW = output.size(2);
  check_sizes(grad_output, "grad_output", {B, M, HW}, "equal to output's shape");
  if (output.numel() == 0) return at::empty_like(output, at::MemoryFormat::Contiguous);

  at::Tensor result;
  dispatch_compute(output.scalar_type(), [&](auto zero) {
    using T_ = decltype(zero);
    auto y = to_compute(output);
    auto g = to_compute(grad_output);
    auto grad = at::empty_like(y);
    const int64_t n = slab_width(sizeof(T_)), ns = ceil_div(HW, n);
    const T_* y_ptr = ptr<T_>(y);
    const T_* g_ptr = ptr<T_>(g);
    T_* o_ptr = ptr<T_>(grad);
    auto kernel = HMMN_PICK(softmax_backward_slab<T_>);
    at::parallel_for(0, B * ns, 1, [&](int64_t begin, int64_t end) {
      std::vector<T_> work(n);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / ns, q0 = (task % ns) * n;
        kernel(g_ptr + b * M * HW + q0, y_ptr + b * M * HW + q0, o_ptr + b * M * HW + q0, M, HW,
               std::min(n, HW - q0), work.data());
      }
    });
    result = grad.scalar_type() == output.scalar_type() ? grad : grad.to(output.scalar_type());
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(hmmn_ops, CPU, m) {
  m.impl("gaussian_softmax", &gaussian_softmax);
  m.impl("gaussian_softmax_backward", &gaussian_softmax_backward);
}

}  // namespace hmmn_ops::cpu
