// CUDA launchers of memory_read and its backward (docs/internals.md, docs/cuda.md). Device
// code: kernels/memory_read.cuh.
#include <torch/library.h>

#include <array>
#include <string>

#include "cuda_utils.h"
#include "kernels/memory_read.cuh"

namespace hmmn_cuda {
namespace {

constexpr const char* kOp = "memory_read";

struct MrDims {
  int64_t B, Ck, Cv, Nq, Nm;
  bool l2;
};

// Checks the shared arguments of the forward and backward.
MrDims check_mr(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& w,
                const c10::optional<at::Tensor>& e, c10::string_view similarity) {
  check_device(q, kOp, "query_key");
  check_floating(q, kOp, "query_key");
  check_tensor(q, kOp, "query_key", 3, q);
  check_tensor(k, kOp, "memory_key", 3, q);
  check_tensor(v, kOp, "memory_value", 3, q);
  const int64_t B = q.size(0), Ck = q.size(1), Nq = q.size(2), Nm = k.size(2), Cv = v.size(1);
  check_shape(k, kOp, "memory_key", {B, Ck, Nm});
  check_shape(v, kOp, "memory_value", {B, Cv, Nm});
  TORCH_CHECK(Ck >= 1 && Cv >= 1 && Nm >= 1, "hmmn_ops.", kOp, ": need Ck >= 1, Cv >= 1 and Nm >= 1, got Ck=", Ck,
              ", Cv=", Cv, ", Nm=", Nm);
  TORCH_CHECK(similarity == "dot" || similarity == "l2", "hmmn_ops.", kOp,
              ": similarity must be \"dot\" or \"l2\", got \"", std::string(similarity), "\"");
  const bool l2 = similarity == "l2";
  TORCH_CHECK(l2 || (!w && !e), "hmmn_ops.", kOp,
              ": memory_shrinkage and query_selection must be None for similarity \"dot\"");
  if (w) {
    check_tensor(*w, kOp, "memory_shrinkage", 2, q);
    check_shape(*w, kOp, "memory_shrinkage", {B, Nm});
  }
  if (e) {
    check_tensor(*e, kOp, "query_selection", 3, q);
    check_shape(*e, kOp, "query_selection", {B, Ck, Nq});
  }
  return {B, Ck, Cv, Nq, Nm, l2};
}

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

template <typename T>
hmmn::MrParams<T> make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& e, const MrDims& d,
                              double scale) {
  hmmn::MrParams<T> p{};
  p.q = ptr<const T>(q);
  p.k = ptr<const T>(k);
  p.v = ptr<const T>(v);
  p.w = w ? ptr<const T>(*w) : nullptr;
  p.e = e ? ptr<const T>(*e) : nullptr;
  p.scale = hmmn::acc_of<T>(scale);
  p.l2 = d.l2;
  p.B = d.B, p.Ck = d.Ck, p.Cv = d.Cv, p.Nq = d.Nq, p.Nm = d.Nm;
  return p;
}

// l2: computes the per-position terms the full-softmax kernels read into p (rowsq; colsq
// without a selection); the returned tensors hold them.
template <typename T>
std::array<at::Tensor, 2> l2_terms(hmmn::MrParams<T>& p, const at::TensorOptions& acc_opts, cudaStream_t stream) {
  using A = hmmn::acc_of<T>;
  if (!p.l2) return {};
  auto rowsq = at::empty({p.B, p.Nq}, acc_opts), colsq = at::empty({p.e ? 0 : p.B, p.Nm}, acc_opts);
  C10_CUDA_CHECK(hmmn::mr_l2_terms(p, ptr<A>(rowsq), p.e ? nullptr : ptr<A>(colsq), stream));
  return {rowsq, colsq};
}

// (B, C, N) -> (B, N, C) contiguous: the top-k kernels gather whole positions.
at::Tensor channels_last(const at::Tensor& t) { return t.transpose(1, 2).contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_read_cuda(
    const at::Tensor& query_key, const at::Tensor& memory_key, const at::Tensor& memory_value,
    const c10::optional<at::Tensor>& shrinkage_in, const c10::optional<at::Tensor>& selection_in,
    c10::string_view similarity, double scale, int64_t topk, bool return_usage) {
  const MrDims d = check_mr(query_key, memory_key, memory_value, shrinkage_in, selection_in, similarity);
  TORCH_CHECK(topk >= 0 && topk <= d.Nm, "hmmn_ops.", kOp, ": topk must be 0 or in [1, Nm=", d.Nm, "], got ", topk);

  const c10::cuda::CUDAGuard guard(query_key.device());
  const auto q = query_key.contiguous(), k = memory_key.contiguous(), v = memory_value.contiguous();
  const auto w = contiguous(shrinkage_in), e = contiguous(selection_in);
  const auto acc_opts = q.options().dtype(acc_dtype(q.scalar_type()));
  auto out = at::empty({d.B, d.Cv, d.Nq}, q.options());
  auto lse = at::empty({d.B, d.Nq}, acc_opts);
  auto idx = at::empty({d.B, d.Nq, topk}, q.options().dtype(at::kLong));
  auto usage = return_usage ? at::zeros({d.B, d.Nm}, acc_opts) : at::empty({d.B, 0}, acc_opts);
  if (d.B * d.Nq == 0) return {out, lse, idx, usage};
  const DeviceInfo dev = device_info(q, kOp);

  HMMN_DISPATCH(q.scalar_type(), kOp, [&] {
    using A = hmmn::acc_of<T>;
    auto p = make_params<T>(q, k, v, w, e, d, scale);
    if (topk > 0) {
      if (return_usage) at::globalContext().alertNotDeterministic("hmmn_ops.memory_read (CUDA, topk > 0, usage)");
      const auto vcl = channels_last(v);
      auto keys = at::empty({d.B * d.Nq * topk}, acc_opts);
      C10_CUDA_CHECK(hmmn::mr_topk_forward(p, ptr<const T>(vcl), topk, ptr<A>(keys), ptr<int64_t>(idx), ptr<T>(out),
                                           ptr<A>(lse), return_usage ? ptr<A>(usage) : nullptr, dev.stream));
      return;
    }
    const auto terms = l2_terms(p, acc_opts, dev.stream);
    const auto plan = hmmn::mr_forward_plan(p, dev.num_sms, dev.smem_optin);
    auto ws = at::empty({plan.workspace}, acc_opts);
    C10_CUDA_CHECK(hmmn::mr_forward(p, plan, ptr<T>(out), ptr<A>(lse), ptr<A>(ws), dev.stream));
    if (return_usage) C10_CUDA_CHECK(hmmn::mr_usage(p, ptr<const A>(lse), ptr<A>(usage), dev.stream));
  });
  return {out, lse, idx, usage};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_read_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& query_key, const at::Tensor& memory_key,
    const at::Tensor& memory_value, const c10::optional<at::Tensor>& shrinkage_in,
    const c10::optional<at::Tensor>& selection_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& idx_in, c10::string_view similarity, double scale) {
  const MrDims d = check_mr(query_key, memory_key, memory_value, shrinkage_in, selection_in, similarity);
  check_tensor(grad_out_in, kOp, "grad_out", 3, query_key);
  check_shape(grad_out_in, kOp, "grad_out", {d.B, d.Cv, d.Nq});
  check_tensor(out_in, kOp, "out", 3, query_key);
  check_shape(out_in, kOp, "out", {d.B, d.Cv, d.Nq});
  check_tensor(lse_in, kOp, "lse", 2, query_key, acc_dtype(query_key.scalar_type()));
  check_shape(lse_in, kOp, "lse", {d.B, d.Nq});
  check_tensor(idx_in, kOp, "topk_indices", 3, query_key, at::kLong);
  const int64_t topk = idx_in.size(2);
  check_shape(idx_in, kOp, "topk_indices", {d.B, d.Nq, topk});
  TORCH_CHECK(topk <= d.Nm, "hmmn_ops.", kOp, ": topk_indices must have at most Nm=", d.Nm, " entries per query, got ",
              topk);

  const c10::cuda::CUDAGuard guard(query_key.device());
  const auto q = query_key.contiguous(), k = memory_key.contiguous(), v = memory_value.contiguous();
  const auto w = contiguous(shrinkage_in), e = contiguous(selection_in);
  const auto dout = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  const auto acc_opts = q.options().dtype(acc_dtype(q.scalar_type()));
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto dw = w ? at::empty_like(*w) : q.new_empty({0});
  auto de = e ? at::empty_like(*e) : q.new_empty({0});
  if (d.B == 0) return {dq, dk, dv, dw, de};
  const DeviceInfo dev = device_info(q, kOp);
  auto D = at::empty({d.B, d.Nq}, acc_opts);

  HMMN_DISPATCH(q.scalar_type(), kOp, [&] {
    using A = hmmn::acc_of<T>;
    auto p = make_params<T>(q, k, v, w, e, d, scale);
    if (topk > 0) {
      at::globalContext().alertNotDeterministic("hmmn_ops.memory_read_backward (CUDA, topk > 0)");
      const auto idx = idx_in.contiguous();
      const auto qcl = channels_last(q), kcl = channels_last(k), vcl = channels_last(v), docl = channels_last(dout);
      const auto ecl = e ? channels_last(*e) : at::Tensor();
      auto gq = at::zeros({d.B, d.Nq, d.Ck}, acc_opts), gk = at::zeros({d.B, d.Nm, d.Ck}, acc_opts);
      auto gv = at::zeros({d.B, d.Nm, d.Cv}, acc_opts);
      auto ge = e ? at::zeros({d.B, d.Nq, d.Ck}, acc_opts) : at::Tensor();
      auto gw = w ? at::zeros({d.B, d.Nm}, acc_opts) : at::Tensor();
      const hmmn::MrTopkGrads<T> g{ptr<A>(gq), e ? ptr<A>(ge) : nullptr, ptr<A>(gk), ptr<A>(gv),
                                   w ? ptr<A>(gw) : nullptr};
      C10_CUDA_CHECK(hmmn::mr_topk_backward(p, ptr<const T>(dout), ptr<const T>(out), ptr<const A>(lse), ptr<A>(D),
                                            ptr<const T>(qcl), e ? ptr<const T>(ecl) : nullptr, ptr<const T>(kcl),
                                            ptr<const T>(vcl), ptr<const T>(docl), ptr<const int64_t>(idx), topk, g,
                                            dev.stream));
      dq.copy_(gq.transpose(1, 2));
      dk.copy_(gk.transpose(1, 2));
      dv.copy_(gv.transpose(1, 2));
      if (e) de.copy_(ge.transpose(1, 2));
      if (w) dw.copy_(gw);
      return;
    }
    const auto terms = l2_terms(p, acc_opts, dev.stream);
    const auto plan = hmmn::mr_backward_plan(p, dev.smem_optin);
    auto dw_part = w ? at::empty({plan.nck, d.B, d.Nm}, acc_opts) : at::Tensor();
    C10_CUDA_CHECK(hmmn::mr_backward(p, plan, ptr<const T>(dout), ptr<const T>(out), ptr<const A>(lse), ptr<A>(D),
                                     ptr<T>(dq), e ? ptr<T>(de) : nullptr, ptr<T>(dk), ptr<T>(dv),
                                     w ? ptr<A>(dw_part) : nullptr, dev.stream));
    if (w) dw.copy_(dw_part.sum(0));
  });
  return {dq, dk, dv, dw, de};
}

}  // namespace
}  // namespace hmmn_cuda

HMMN_CUDA_LIBRARY_IMPL(m) {
  m.impl("memory_read", &hmmn_cuda::memory_read_cuda);
  m.impl("memory_read_backward", &hmmn_cuda::memory_read_backward_cuda);
}
