// topk_guided_read (docs/ops.md section 5) and its backward on CPU.
//
// Forward: a task is a group of up to kCellGroup neighbouring coarse cells. Their k*r*r
// candidate rows of the channel-last keys and values are copied once into per-task buffers
// (the r fine pixels of a candidate row are contiguous) and shared by the r*r fine queries of
// each cell; scores and outputs are two batched matrix products (BLAS), the softmax runs on
// the scores in cache. Nothing gathered outlives the group.
// Backward: pass one (per cell) recomputes P, stores P and dS (rr x m per cell, the size of the
// sparse attention) and writes dQ; pass two (per coarse memory position) sums the dK / dV
// contributions of every (cell, slot) listing it, in (cell, slot) order: no atomics, and the
// result does not depend on the thread count.
#include "common.h"

#define HMMN_KERNELS "topk_guided_read_kernels.h"
#include "isa.h"

namespace hmmn_ops::cpu {
namespace {

// Cells per forward task: their gathered keys and values (4 * k*r*r * (Ck + Cv) elements,
// 0.8 MB at res3) stay in L2 between the two batched matrix products.
constexpr int64_t kCellGroup = 4;

// (B, C, N) -> contiguous (B, N, C) in dtype, one pass; no copy when x is already stored
// channel-last (e.g. a channels_last_3d memory tensor).
at::Tensor channels_last(const at::Tensor& x, at::ScalarType dtype) {
  if (x.scalar_type() == dtype && x.transpose(1, 2).is_contiguous()) return x.transpose(1, 2);
  auto out = at::empty({x.size(0), x.size(2), x.size(1)}, x.options().dtype(dtype));
  out.copy_(x.transpose(1, 2));
  return out;
}

struct TopkRead {
  int64_t B, Ck, Cv, T, H, W, HW, M, r, Hc, Wc, Nc, k;
  at::ScalarType dtype;
  at::Tensor qt, kt, vt, idx;  // (B, HW, Ck), (B, M, Ck), (B, M, Cv), (B, Nc, k)
};

TopkRead prepare(const at::Tensor& query_key, const at::Tensor& memory_key, const at::Tensor& memory_value,
                 const at::Tensor& topk_indices, int64_t ratio) {
  check_tensor(query_key, "query_key", 4, "(B, Ck, H, W)");
  check_tensor(memory_key, "memory_key", 5, "(B, Ck, T, H, W)");
  check_tensor(memory_value, "memory_value", 5, "(B, Cv, T, H, W)");
  check_tensor(topk_indices, "topk_indices", 3, "(B, Hc*Wc, k) int64");
  check_floating(query_key, "query_key");
  check_same_dtype(memory_key, "memory_key", query_key, "query_key");
  check_same_dtype(memory_value, "memory_value", query_key, "query_key");
  check_int64(topk_indices, "topk_indices");
  TopkRead t;
  t.B = query_key.size(0), t.Ck = query_key.size(1), t.H = query_key.size(2), t.W = query_key.size(3);
  check_sizes(memory_key, "memory_key", {t.B, t.Ck, -1, t.H, t.W}, "(B, Ck, T, H, W) matching query_key (B, Ck, H, W)");
  t.T = memory_key.size(2);
  check_sizes(memory_value, "memory_value", {t.B, -1, t.T, t.H, t.W}, "(B, Cv, T, H, W) matching memory_key");
  t.Cv = memory_value.size(1);
  TORCH_CHECK(ratio >= 1 && t.H % ratio == 0 && t.W % ratio == 0, "ratio: expected an int >= 1 dividing H = ", t.H,
              " and W = ", t.W, ", got ", ratio);
  t.r = ratio, t.Hc = t.H / ratio, t.Wc = t.W / ratio, t.Nc = t.Hc * t.Wc;
  t.HW = t.H * t.W, t.M = t.T * t.HW;
  check_sizes(topk_indices, "topk_indices", {t.B, t.Nc, -1}, "(B, Hc*Wc, k) for the coarse grid H/ratio x W/ratio");
  t.k = topk_indices.size(2);
  TORCH_CHECK(t.k >= 1, "topk_indices: expected k >= 1 candidates per cell, got shape ", topk_indices.sizes());
  t.idx = topk_indices.contiguous();
  if (t.idx.numel() > 0) {
    auto [lo, hi] = at::aminmax(t.idx);
    const int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
    TORCH_CHECK(l >= 0 && h < t.T * t.Nc, "topk_indices: values must lie in [0, T*Hc*Wc = ", t.T * t.Nc,
                "), got range [", l, ", ", h, "]");
  }
  t.dtype = compute_dtype(query_key.scalar_type());
  t.qt = channels_last(query_key.reshape({t.B, t.Ck, t.HW}), t.dtype);
  t.kt = channels_last(memory_key.reshape({t.B, t.Ck, t.M}), t.dtype);
  t.vt = channels_last(memory_value.reshape({t.B, t.Cv, t.M}), t.dtype);
  return t;
}

// First fine memory row (t, my*r, mx*r) of coarse memory index i = t*Hc*Wc + my*Wc + mx.
inline int64_t first_fine_row(const TopkRead& t, int64_t i) {
  const int64_t f = i / t.Nc, rem = i % t.Nc;
  return f * t.HW + (rem / t.Wc) * t.r * t.W + (rem % t.Wc) * t.r;
}

// Flat fine memory rows of a cell's m = k*r*r candidates, slot kk*r*r + a*r + b.
void fine_rows(const TopkRead& t, const int64_t* idx, int64_t* fine) {
  const int64_t r = t.r;
  for (int64_t kk = 0; kk < t.k; ++kk) {
    const int64_t base = first_fine_row(t, idx[kk]);
    for (int64_t a = 0; a < r; ++a)
      for (int64_t b = 0; b < r; ++b) fine[(kk * r + a) * r + b] = base + a * t.W + b;
  }
}

// Flat fine query index of the i-th (of r*r) query of a cell.
inline int64_t cell_query(const TopkRead& t, int64_t cell, int64_t i) {
  return ((cell / t.Wc) * t.r + i / t.r) * t.W + (cell % t.Wc) * t.r + i % t.r;
}

std::tuple<at::Tensor, at::Tensor> topk_guided_read(const at::Tensor& query_key, const at::Tensor& memory_key,
                                                    const at::Tensor& memory_value, const at::Tensor& topk_indices,
                                                    double scale, int64_t ratio) {
  TopkRead t = prepare(query_key, memory_key, memory_value, topk_indices, ratio);
  auto out = at::empty({t.B, t.Cv, t.H, t.W}, t.qt.options());
  auto lse = at::empty({t.B, t.HW}, t.qt.options());
  if (t.B == 0 || t.Nc == 0) return {out.to(query_key.scalar_type()), lse};
  const int64_t rr = t.r * t.r, m = t.k * rr, Ck = t.Ck, Cv = t.Cv, HW = t.HW, M = t.M, Nc = t.Nc;

  dispatch_compute(t.dtype, [&](auto zero) {
    using T_ = decltype(zero);
    const auto dtype = t.dtype;
    const T_* qt = ptr<T_>(t.qt);
    const T_* kt = ptr<T_>(t.kt);
    const T_* vt = ptr<T_>(t.vt);
    const int64_t* idx = ptr<int64_t>(t.idx);
    T_* out_ptr = ptr<T_>(out);
    T_* lse_ptr = ptr<T_>(lse);
    auto softmax_k = HMMN_PICK(softmax_rows<T_>);
    // groups of up to kCellGroup cells along a coarse row
    const int64_t gpr = ceil_div(t.Wc, kCellGroup), ng = t.Hc * gpr, r = t.r, W = t.W;
    at::parallel_for(0, t.B * ng, 1, [&](int64_t begin, int64_t end) {
      // One group of cells at a time: their queries, candidate keys / values gathered
      // contiguous (candidate (kk, a, b) at row kk*r*r + a*r + b), scores, outputs.
      std::vector<T_> q(kCellGroup * rr * Ck), k(kCellGroup * m * Ck), v(kCellGroup * m * Cv);
      std::vector<T_> s(kCellGroup * rr * m), o(kCellGroup * rr * Cv), l(kCellGroup * rr);
      auto copy_rows = [&](const T_* src, int64_t first, int64_t C, T_* dst) {  // the r*r block at `first`
        for (int64_t a = 0; a < r; ++a)
          std::memcpy(dst + a * r * C, src + (first + a * W) * C, r * C * sizeof(T_));
      };
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / ng, row = (task % ng) / gpr, x0 = ((task % ng) % gpr) * kCellGroup;
        const int64_t c0 = row * t.Wc + x0, gc = std::min(kCellGroup, t.Wc - x0);
        for (int64_t g = 0; g < gc; ++g) {
          const int64_t cell = c0 + g;
          copy_rows(qt + b * HW * Ck, cell_query(t, cell, 0), Ck, q.data() + g * rr * Ck);
          for (int64_t kk = 0; kk < t.k; ++kk) {
            const int64_t first = first_fine_row(t, idx[(b * Nc + cell) * t.k + kk]);
            copy_rows(kt + b * M * Ck, first, Ck, k.data() + (g * m + kk * rr) * Ck);
            copy_rows(vt + b * M * Cv, first, Cv, v.data() + (g * m + kk * rr) * Cv);
          }
        }
        auto as3 = [&](T_* data, int64_t rows, int64_t cols) {
          return at::from_blob(data, {gc, rows, cols}, at::TensorOptions().dtype(dtype));
        };
        auto scores = as3(s.data(), rr, m);
        at::bmm_out(scores, as3(q.data(), rr, Ck), as3(k.data(), m, Ck).transpose(1, 2));
        softmax_k(s.data(), gc * rr, m, static_cast<T_>(scale), l.data());
        auto outs = as3(o.data(), rr, Cv);
        at::bmm_out(outs, scores, as3(v.data(), m, Cv));
        // The group's queries, row a of cell g at column b, form r runs of gc*r neighbouring
        // pixels (cells of a group share their coarse row): write each channel run by run.
        const int64_t q00 = cell_query(t, c0, 0);
        for (int64_t g = 0; g < gc; ++g)
          for (int64_t i = 0; i < rr; ++i) lse_ptr[b * HW + q00 + (i / r) * W + g * r + i % r] = l[g * rr + i];
        for (int64_t c = 0; c < Cv; ++c) {
          for (int64_t a = 0; a < r; ++a) {
            T_* dst = out_ptr + (b * Cv + c) * HW + q00 + a * W;
            for (int64_t g = 0; g < gc; ++g)
              for (int64_t x = 0; x < r; ++x) dst[g * r + x] = o[(g * rr + a * r + x) * Cv + c];
          }
        }
      }
    });
  });
  return {out.to(query_key.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_guided_read_backward(
    const at::Tensor& grad_out, const at::Tensor& query_key, const at::Tensor& memory_key,
    const at::Tensor& memory_value, const at::Tensor& topk_indices, const at::Tensor& out, const at::Tensor& lse,
    double scale, int64_t ratio) {
  TopkRead t = prepare(query_key, memory_key, memory_value, topk_indices, ratio);
  const int64_t B = t.B, rr = t.r * t.r, m = t.k * rr, Ck = t.Ck, Cv = t.Cv, HW = t.HW, M = t.M, Nc = t.Nc;
  check_read_backward(grad_out, out, lse, B, Cv, t.H, t.W);

  auto dq = at::empty({B, Ck, HW}, t.qt.options());
  auto dkt = at::zeros({B, M, Ck}, t.qt.options());
  auto dvt = at::zeros({B, M, Cv}, t.qt.options());
  auto finish = [&]() {
    return std::make_tuple(dq.view(query_key.sizes()).to(query_key.scalar_type()),
                           dkt.transpose(1, 2).reshape(memory_key.sizes()).to(memory_key.scalar_type()).contiguous(),
                           dvt.transpose(1, 2).reshape(memory_value.sizes()).to(memory_value.scalar_type()).contiguous());
  };
  if (B == 0 || Nc == 0) return finish();
  auto d_out = channels_last(grad_out.reshape({B, Cv, HW}), t.dtype);
  auto o = channels_last(out.reshape({B, Cv, HW}), t.dtype);
  auto lse_c = lse.to(t.dtype).contiguous();
  auto probs = at::empty({B, Nc, rr, m}, t.qt.options());
  auto d_scores = at::empty({B, Nc, rr, m}, t.qt.options());

  // Entries (cell, slot) of every coarse memory position, in (cell, slot) order (counting sort).
  const int64_t coarse = t.T * Nc;
  std::vector<int64_t> start(B * (coarse + 1)), entries(2 * B * Nc * t.k);
  const int64_t* idx = ptr<int64_t>(t.idx);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* st = start.data() + b * (coarse + 1);
      const int64_t* ib = idx + b * Nc * t.k;
      for (int64_t e = 0; e < Nc * t.k; ++e) ++st[ib[e] + 1];
      for (int64_t i = 0; i < coarse; ++i) st[i + 1] += st[i];
      std::vector<int64_t> fill(st, st + coarse);
      int64_t* eb = entries.data() + 2 * b * Nc * t.k;
      for (int64_t e = 0; e < Nc * t.k; ++e) {
        const int64_t pos = fill[ib[e]]++;
        eb[2 * pos] = e / t.k;      // cell
        eb[2 * pos + 1] = e % t.k;  // slot
      }
    }
  });

  dispatch_compute(t.dtype, [&](auto zero) {
    using T_ = decltype(zero);
    const T_ s = static_cast<T_>(scale);
    const T_* qt = ptr<T_>(t.qt);
    const T_* kt = ptr<T_>(t.kt);
    const T_* vt = ptr<T_>(t.vt);
    const T_* do_ptr = ptr<T_>(d_out);
    const T_* o_ptr = ptr<T_>(o);
    const T_* lse_ptr = ptr<T_>(lse_c);
    T_* p_ptr = ptr<T_>(probs);
    T_* ds_ptr = ptr<T_>(d_scores);
    T_* dq_ptr = ptr<T_>(dq);
    auto cell_k = HMMN_PICK(topk_cell_backward<T_>);
    auto dot_k = HMMN_PICK(dot<T_>);
    at::parallel_for(0, B * Nc, 4, [&](int64_t begin, int64_t end) {
      std::vector<T_> q(rr * Ck), g(rr * Cv), l(rr), delta(rr), dqc(rr * Ck);
      std::vector<int64_t> fine(m);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / Nc, cell = task % Nc;
        for (int64_t i = 0; i < rr; ++i) {
          const int64_t qf = b * HW + cell_query(t, cell, i);
          std::copy(qt + qf * Ck, qt + (qf + 1) * Ck, q.data() + i * Ck);
          std::copy(do_ptr + qf * Cv, do_ptr + (qf + 1) * Cv, g.data() + i * Cv);
          l[i] = lse_ptr[qf];
          delta[i] = dot_k(do_ptr + qf * Cv, o_ptr + qf * Cv, Cv);
        }
        fine_rows(t, idx + task * t.k, fine.data());
        cell_k(q.data(), g.data(), l.data(), delta.data(), rr, kt + b * M * Ck, vt + b * M * Cv, fine.data(), m, Ck,
               Cv, s, p_ptr + task * rr * m, ds_ptr + task * rr * m, dqc.data());
        for (int64_t i = 0; i < rr; ++i) {
          T_* dst = dq_ptr + b * Ck * HW + cell_query(t, cell, i);
          for (int64_t c = 0; c < Ck; ++c) dst[c * HW] = dqc[i * Ck + c];
        }
      }
    });

    auto mem_k = HMMN_PICK(topk_memory_backward<T_>);
    T_* dkt_ptr = ptr<T_>(dkt);
    T_* dvt_ptr = ptr<T_>(dvt);
    at::parallel_for(0, B * coarse, 16, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / coarse, i = task % coarse;
        const int64_t* st = start.data() + b * (coarse + 1);
        if (st[i] == st[i + 1]) continue;
        const int64_t base = first_fine_row(t, i);
        mem_k(entries.data() + 2 * (b * Nc * t.k + st[i]), st[i + 1] - st[i], p_ptr + b * Nc * rr * m,
              ds_ptr + b * Nc * rr * m, t.r, t.W, t.Wc, m, qt + b * HW * Ck, do_ptr + b * HW * Cv, Ck, Cv, base, s,
              dkt_ptr + b * M * Ck, dvt_ptr + b * M * Cv);
      }
    });
  });
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(hmmn_ops, CPU, m) {
  m.impl("topk_guided_read", &topk_guided_read);
  m.impl("topk_guided_read_backward", &topk_guided_read_backward);
}

}  // namespace hmmn_ops::cpu
