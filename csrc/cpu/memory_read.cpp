// memory_read (docs/ops.md section 7) and its backward on CPU: flash-style, never the Nm x Nq
// scores.
//
// prepare() brings both similarities to one affine form of a block product,
//   s[p, q] = u[p] * ((Ka^T Qa)[p, q] + kb[p] + qb[q])
//   dot:            Ka = K,          Qa = Q,           u = scale,          kb = qb = 0
//   l2:             Ka = K,          Qa = -2 Q,        u = -scale * w,     kb = |K_p|^2, qb = |Q_q|^2
//   l2 + selection: Ka = [K^2; K],   Qa = [e; -2 e Q], u = -scale * w,     kb = 0,       qb = sum_c e Q^2
// so every score tile is one BLAS product (the l2 terms included) followed by one element-wise
// pass, and the backward gets dKa, dQa, du, dkb, dqb, turned into dK, dQ, dw, de at the end.
//
// Forward: a task is (batch item, block of kQueryBlock queries) streaming the memory in chunks
// of kMemoryChunk: score tile (BLAS), then either the online softmax and O += V P^T (full read)
// or the streaming top-k (ties: smaller index). The top-k read then gathers, per value channel
// (whose Nm values stay in cache), the k selected values of every query: nothing else of V is
// read. Usage: a second pass over memory blocks with the final lse (full read), or a sum over
// the selected lists (top-k read).
// Backward (P recomputed from lse): full read as kernel_guided_read's (tasks own blocks of
// memory, partial dQ per group summed in group order); top-k read sparse: per query, then per
// memory position over the (query, slot) pairs that selected it (a counting sort), so no
// atomics and no dependence on the thread count.
#include "common.h"

#define HMMN_KERNELS "memory_read_kernels.h"
#include "isa.h"

namespace hmmn_ops::cpu {
namespace {

// Forward query blocks of up to kQueryBlock queries: each memory chunk (V: Cv x kMemoryChunk)
// is read once per block, so the block must be large for the V P^T products to run at the
// GEMM rate rather than the memory bandwidth (64 queries: 0.6 of it; 256: 1.0).
constexpr int64_t kQueryBlock = 256;
constexpr int64_t kMemoryChunk = 512;
constexpr int64_t kGatherChannels = 16;   // value channels per gather task
constexpr int64_t kUsageMemoryBlock = 256;
constexpr int64_t kUsageQueryBlock = 512;
constexpr int64_t kBwdMemoryBlock = 256;
constexpr int64_t kBwdQueryBlock = 256;
constexpr int64_t kBwdTasks = 16;         // memory groups per call (split over the batch)
constexpr int64_t kBwdTopkQueryBlock = 64;

struct MemoryRead {
  int64_t B, Ck, Cv, Nq, Nm, Ca;
  at::ScalarType dtype;
  bool l2;
  at::Tensor q, k, v, e;          // compute dtype, contiguous; e undefined without selection
  at::Tensor ka, qa, u, kb, qb;   // the affine form: (B, Ca, Nm), (B, Ca, Nq), (B, Nm), (B, Nm), (B, Nq)
};

MemoryRead prepare(const at::Tensor& query_key, const at::Tensor& memory_key, const at::Tensor& memory_value,
                   const std::optional<at::Tensor>& shrinkage, const std::optional<at::Tensor>& selection,
                   c10::string_view similarity, double scale) {
  check_tensor(query_key, "query_key", 3, "(B, Ck, Nq)");
  check_tensor(memory_key, "memory_key", 3, "(B, Ck, Nm)");
  check_tensor(memory_value, "memory_value", 3, "(B, Cv, Nm)");
  check_floating(query_key, "query_key");
  check_same_dtype(memory_key, "memory_key", query_key, "query_key");
  check_same_dtype(memory_value, "memory_value", query_key, "query_key");
  MemoryRead r;
  r.B = query_key.size(0), r.Ck = query_key.size(1), r.Nq = query_key.size(2);
  check_sizes(memory_key, "memory_key", {r.B, r.Ck, -1}, "(B, Ck, Nm) matching query_key (B, Ck, Nq)");
  r.Nm = memory_key.size(2);
  check_sizes(memory_value, "memory_value", {r.B, -1, r.Nm}, "(B, Cv, Nm) matching memory_key");
  r.Cv = memory_value.size(1);
  TORCH_CHECK(r.Ck >= 1 && r.Cv >= 1 && r.Nm >= 1, "memory_key, memory_value: expected Ck, Cv, Nm >= 1, got ",
              memory_key.sizes(), " and ", memory_value.sizes());
  TORCH_CHECK(similarity == "dot" || similarity == "l2", "similarity: expected 'dot' or 'l2', got '", similarity, "'");
  r.l2 = similarity == "l2";
  if (shrinkage.has_value()) {
    TORCH_CHECK(r.l2, "memory_shrinkage: only defined for similarity 'l2'");
    check_tensor(*shrinkage, "memory_shrinkage", 2, "(B, Nm)");
    check_sizes(*shrinkage, "memory_shrinkage", {r.B, r.Nm}, "(B, Nm)");
    check_same_dtype(*shrinkage, "memory_shrinkage", query_key, "query_key");
  }
  if (selection.has_value()) {
    TORCH_CHECK(r.l2, "query_selection: only defined for similarity 'l2'");
    check_tensor(*selection, "query_selection", 3, "(B, Ck, Nq)");
    check_sizes(*selection, "query_selection", {r.B, r.Ck, r.Nq}, "(B, Ck, Nq) equal to query_key's");
    check_same_dtype(*selection, "query_selection", query_key, "query_key");
  }
  r.dtype = compute_dtype(query_key.scalar_type());
  r.q = to_compute(query_key), r.k = to_compute(memory_key), r.v = to_compute(memory_value);
  const auto opts = r.q.options();
  r.Ca = r.Ck;
  if (!r.l2) {
    r.ka = r.k, r.qa = r.q;
    r.u = at::full({r.B, r.Nm}, scale, opts);
    r.kb = at::zeros({r.B, r.Nm}, opts), r.qb = at::zeros({r.B, r.Nq}, opts);
    return r;
  }
  r.u = shrinkage.has_value() ? to_compute(*shrinkage).mul(-scale) : at::full({r.B, r.Nm}, -scale, opts);
  if (selection.has_value()) {
    r.e = to_compute(*selection);
    r.Ca = 2 * r.Ck;
    r.ka = at::empty({r.B, r.Ca, r.Nm}, opts);
    auto squares = r.ka.narrow(1, 0, r.Ck);
    at::mul_out(squares, r.k, r.k);
    r.ka.narrow(1, r.Ck, r.Ck).copy_(r.k);
    auto eq = r.e * r.q;
    r.qa = at::cat({r.e, eq * -2.0}, 1);
    r.qb = (eq * r.q).sum(1);
    r.kb = at::zeros({r.B, r.Nm}, opts);
  } else {
    r.ka = r.k, r.qa = r.q * -2.0;
    r.kb = r.k.square().sum(1), r.qb = r.q.square().sum(1);
  }
  return r;
}

void check_topk_range(int64_t topk, int64_t Nm) {
  TORCH_CHECK(topk >= 0 && topk <= Nm, "topk: expected 0 (full softmax) or an int in [1, Nm = ", Nm, "], got ", topk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_read(
    const at::Tensor& query_key, const at::Tensor& memory_key, const at::Tensor& memory_value,
    const std::optional<at::Tensor>& memory_shrinkage, const std::optional<at::Tensor>& query_selection,
    c10::string_view similarity, double scale, int64_t topk, bool return_usage) {
  MemoryRead r = prepare(query_key, memory_key, memory_value, memory_shrinkage, query_selection, similarity, scale);
  const int64_t B = r.B, Cv = r.Cv, Nq = r.Nq, Nm = r.Nm, Ca = r.Ca;
  check_topk_range(topk, Nm);
  const auto opts = r.q.options();
  auto out = at::empty({B, Cv, Nq}, opts);
  auto lse = at::empty({B, Nq}, opts);
  auto indices = at::empty({B, Nq, topk}, opts.dtype(at::kLong));
  auto usage = at::zeros({B, return_usage ? Nm : 0}, opts);
  if (B == 0 || Nq == 0) return {out.to(query_key.scalar_type()), lse, indices, usage};
  auto probs = at::empty({B, Nq, topk}, opts);  // the top-k read's weights

  dispatch_compute(r.dtype, [&](auto zero) {
    using T_ = decltype(zero);
    const auto dtype = r.dtype;
    const T_* ka = ptr<T_>(r.ka);
    const T_* qa = ptr<T_>(r.qa);
    const T_* u = ptr<T_>(r.u);
    const T_* kb = ptr<T_>(r.kb);
    const T_* qb = ptr<T_>(r.qb);
    const T_* v = ptr<T_>(r.v);
    T_* out_ptr = ptr<T_>(out);
    T_* lse_ptr = ptr<T_>(lse);
    T_* probs_ptr = ptr<T_>(probs);
    T_* usage_ptr = ptr<T_>(usage);
    int64_t* idx_ptr = ptr<int64_t>(indices);
    auto affine_k = HMMN_PICK(affine_row<T_>);
    auto softmax_k = HMMN_PICK(softmax_row_update<T_>);
    auto topk_k = HMMN_PICK(topk_offer<T_>);
    auto topk_softmax_k = HMMN_PICK(topk_softmax<T_>);
    auto rescale_k = HMMN_PICK(scale_columns<T_>);
    auto write_k = HMMN_PICK(write_normalised<T_>);
    // Equal blocks, their number a multiple of 4 (balanced over 1, 2 or 4 threads when B = 1),
    // chosen from the shapes only (results do not depend on the thread count).
    const int64_t nqb = std::max<int64_t>(1, std::min(ceil_div(ceil_div(Nq, kQueryBlock), 4) * 4, ceil_div(Nq, 32)));
    const int64_t qblock = ceil_div(Nq, nqb), chunk = std::min(kMemoryChunk, Nm);

    at::parallel_for(0, B * nqb, 1, [&](int64_t begin, int64_t end) {
      std::vector<T_> tile(qblock * chunk), acc(topk > 0 ? 0 : Cv * qblock);
      std::vector<T_> m(qblock), l(qblock), alpha(qblock), tv(qblock * topk);
      std::vector<int64_t> ti(qblock * topk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nqb, q0 = (task % nqb) * qblock, bq = std::min(qblock, Nq - q0);
        if (bq <= 0) continue;
        const T_* kab = ka + b * Ca * Nm;
        const T_* vb = v + b * Cv * Nm;
        std::fill(m.begin(), m.end(), -std::numeric_limits<T_>::infinity());
        std::fill(l.begin(), l.end(), T_(0));
        std::fill(tv.begin(), tv.end(), -std::numeric_limits<T_>::infinity());
        std::fill(ti.begin(), ti.end(), std::numeric_limits<int64_t>::max());
        auto queries = matrix(qa + b * Ca * Nq + q0, bq, Ca, 1, Nq, dtype);  // (bq, Ca) view of (Ca, Nq)
        auto acc_t = matrix(acc.data(), Cv, bq, bq, 1, dtype);
        for (int64_t m0 = 0; m0 < Nm; m0 += chunk) {
          const int64_t bm = std::min(chunk, Nm - m0);
          auto scores = matrix(tile.data(), bq, bm, bm, 1, dtype);
          at::mm_out(scores, queries, matrix(kab + m0, Ca, bm, Nm, 1, dtype));
          for (int64_t j = 0; j < bq; ++j)
            affine_k(tile.data() + j * bm, bm, u + b * Nm + m0, kb + b * Nm + m0, qb[b * Nq + q0 + j]);
          if (topk > 0) {
            for (int64_t j = 0; j < bq; ++j)
              topk_k(tile.data() + j * bm, bm, m0, tv.data() + j * topk, ti.data() + j * topk, topk);
            continue;
          }
          for (int64_t j = 0; j < bq; ++j) alpha[j] = softmax_k(tile.data() + j * bm, bm, m[j], l[j]);
          auto probs_t = matrix(tile.data(), bm, bq, 1, bm, dtype);  // P^T
          auto values = matrix(vb + m0, Cv, bm, Nm, 1, dtype);
          if (m0 == 0) {
            at::mm_out(acc_t, values, probs_t);
          } else {
            rescale_k(acc.data(), Cv, bq, alpha.data());
            acc_t.addmm_(values, probs_t);
          }
        }
        const int64_t row = b * Nq + q0;
        if (topk > 0) {
          for (int64_t j = 0; j < bq; ++j)
            lse_ptr[row + j] = topk_softmax_k(tv.data() + j * topk, topk, probs_ptr + (row + j) * topk);
          std::copy(ti.begin(), ti.begin() + bq * topk, idx_ptr + row * topk);
        } else {
          write_k(acc.data(), Cv, bq, l.data(), out_ptr + b * Cv * Nq + q0, Nq);
          for (int64_t j = 0; j < bq; ++j) lse_ptr[row + j] = m[j] + std::log(l[j]);
        }
      }
    });

    if (topk > 0) {
      // out[c, q] = sum_j P[q, j] V[c, idx[q, j]], one value channel (in cache) at a time.
      auto gather_k = HMMN_PICK(gather_channel<T_>);
      const int64_t ncg = ceil_div(Cv, kGatherChannels);
      at::parallel_for(0, B * ncg, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / ncg, c0 = (task % ncg) * kGatherChannels;
          for (int64_t c = c0; c < std::min(Cv, c0 + kGatherChannels); ++c)
            gather_k(v + (b * Cv + c) * Nm, idx_ptr + b * Nq * topk, probs_ptr + b * Nq * topk, Nq, topk,
                     out_ptr + (b * Cv + c) * Nq);
        }
      });
      if (return_usage) {
        at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b)
            for (int64_t i = b * Nq * topk; i < (b + 1) * Nq * topk; ++i) usage_ptr[b * Nm + idx_ptr[i]] += probs_ptr[i];
        });
      }
    } else if (return_usage) {
      // usage[p] = sum_q exp(s[p, q] - lse[q]): memory blocks against all queries, final lse.
      auto probs_k = HMMN_PICK(affine_col_probs<T_>);
      const int64_t nmb = ceil_div(Nm, kUsageMemoryBlock);
      at::parallel_for(0, B * nmb, 1, [&](int64_t begin, int64_t end) {
        std::vector<T_> tile(kUsageMemoryBlock * std::min(kUsageQueryBlock, Nq));
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / nmb, m0 = (task % nmb) * kUsageMemoryBlock;
          const int64_t bm = std::min(kUsageMemoryBlock, Nm - m0);
          auto keys_t = matrix(ka + b * Ca * Nm + m0, bm, Ca, 1, Nm, dtype);
          for (int64_t q0 = 0; q0 < Nq; q0 += kUsageQueryBlock) {
            const int64_t bq = std::min(kUsageQueryBlock, Nq - q0);
            auto scores = matrix(tile.data(), bm, bq, bq, 1, dtype);
            at::mm_out(scores, keys_t, matrix(qa + b * Ca * Nq + q0, Ca, bq, Nq, 1, dtype));
            for (int64_t i = 0; i < bm; ++i) {
              const int64_t p = b * Nm + m0 + i;
              usage_ptr[p] += probs_k(tile.data() + i * bq, bq, u[p], kb[p], qb + b * Nq + q0, lse_ptr + b * Nq + q0);
            }
          }
        }
      });
    }
  });
  return {out.to(query_key.scalar_type()), lse, indices, usage};
}

// The gradients of the affine form: dKa (B, Ca, Nm), dQa (B, Ca, Nq), dv (B, Cv, Nm), du, dkb
// (B, Nm), dqb (B, Nq).
struct AffineGrads {
  at::Tensor dka, dqa, dv, du, dkb, dqb;
};

// Full read: tasks own groups of memory blocks (their dKa, dV, du, dkb) and sweep all queries;
// each group's partial dQa, dqb are summed in group order at the end.
AffineGrads dense_backward(const MemoryRead& r, const at::Tensor& d_out, const at::Tensor& lse,
                           const at::Tensor& delta) {
  const int64_t B = r.B, Ca = r.Ca, Cv = r.Cv, Nq = r.Nq, Nm = r.Nm;
  const auto opts = r.q.options();
  const int64_t nmb = ceil_div(Nm, kBwdMemoryBlock);
  const int64_t groups = std::clamp<int64_t>(kBwdTasks / std::max<int64_t>(B, 1), 1, nmb);
  AffineGrads g{at::zeros({B, Ca, Nm}, opts), at::Tensor(), at::zeros({B, Cv, Nm}, opts),
                at::zeros({B, Nm}, opts), at::zeros({B, Nm}, opts), at::Tensor()};
  auto dqa_groups = at::zeros({B, groups, Ca, Nq}, opts);
  auto dqb_groups = at::zeros({B, groups, Nq}, opts);
  dispatch_compute(r.dtype, [&](auto zero) {
    using T_ = decltype(zero);
    const auto dtype = r.dtype;
    const T_* ka = ptr<T_>(r.ka);
    const T_* qa = ptr<T_>(r.qa);
    const T_* u = ptr<T_>(r.u);
    const T_* kb = ptr<T_>(r.kb);
    const T_* qb = ptr<T_>(r.qb);
    const T_* v = ptr<T_>(r.v);
    const T_* dout = ptr<T_>(d_out);
    const T_* lse_ptr = ptr<T_>(lse);
    const T_* delta_ptr = ptr<T_>(delta);
    T_* dka = ptr<T_>(g.dka);
    T_* dv = ptr<T_>(g.dv);
    T_* du = ptr<T_>(g.du);
    T_* dkb = ptr<T_>(g.dkb);
    T_* dqag = ptr<T_>(dqa_groups);
    T_* dqbg = ptr<T_>(dqb_groups);
    auto grad_k = HMMN_PICK(affine_col_grad<T_>);
    auto colsum_k = HMMN_PICK(add_column_sums<T_>);
    const int64_t bq_max = std::min(kBwdQueryBlock, Nq), bm_max = std::min(kBwdMemoryBlock, Nm);
    at::parallel_for(0, B * groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<T_> ps(bm_max * bq_max), ds(bm_max * bq_max);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / groups, grp = task % groups;
        const T_* kab = ka + b * Ca * Nm;
        const T_* vb = v + b * Cv * Nm;
        T_* dqa_grp = dqag + (b * groups + grp) * Ca * Nq;
        T_* dqb_grp = dqbg + (b * groups + grp) * Nq;
        for (int64_t blk = grp * nmb / groups; blk < (grp + 1) * nmb / groups; ++blk) {
          const int64_t m0 = blk * kBwdMemoryBlock, bm = std::min(kBwdMemoryBlock, Nm - m0);
          auto keys_t = matrix(kab + m0, bm, Ca, 1, Nm, dtype);
          auto keys = matrix(kab + m0, Ca, bm, Nm, 1, dtype);
          auto values_t = matrix(vb + m0, bm, Cv, 1, Nm, dtype);
          auto dka_blk = matrix(dka + b * Ca * Nm + m0, Ca, bm, Nm, 1, dtype);
          auto dv_blk = matrix(dv + b * Cv * Nm + m0, Cv, bm, Nm, 1, dtype);
          for (int64_t q0 = 0; q0 < Nq; q0 += kBwdQueryBlock) {
            const int64_t bq = std::min(kBwdQueryBlock, Nq - q0);
            auto queries = matrix(qa + b * Ca * Nq + q0, Ca, bq, Nq, 1, dtype);
            auto d_outs = matrix(dout + b * Cv * Nq + q0, Cv, bq, Nq, 1, dtype);
            auto p_t = matrix(ps.data(), bm, bq, bq, 1, dtype);
            auto dt_t = matrix(ds.data(), bm, bq, bq, 1, dtype);
            at::mm_out(p_t, keys_t, queries);
            at::mm_out(dt_t, values_t, d_outs);
            for (int64_t i = 0; i < bm; ++i) {
              const int64_t p = b * Nm + m0 + i;
              grad_k(ps.data() + i * bq, ds.data() + i * bq, bq, u[p], kb[p], qb + b * Nq + q0,
                     lse_ptr + b * Nq + q0, delta_ptr + b * Nq + q0, du[p], dkb[p]);
            }
            colsum_k(dqb_grp + q0, ds.data(), bm, bq);
            dv_blk.addmm_(d_outs, p_t.t());
            dka_blk.addmm_(queries, dt_t.t());
            matrix(dqa_grp + q0, Ca, bq, Nq, 1, dtype).addmm_(keys, dt_t);
          }
        }
      }
    });
  });
  g.dqa = dqa_groups.sum(1);
  g.dqb = dqb_groups.sum(1);
  return g;
}

// Top-k read: pass one per query (P, dT, dS * d of its k slots, and its dQa, dqb); pass two per
// memory position over the (query, slot) pairs that selected it, in query order.
AffineGrads sparse_backward(const MemoryRead& r, const at::Tensor& d_out, const at::Tensor& lse,
                            const at::Tensor& delta, const at::Tensor& indices) {
  const int64_t B = r.B, Ca = r.Ca, Cv = r.Cv, Nq = r.Nq, Nm = r.Nm, k = indices.size(2);
  const auto opts = r.q.options();
  auto kat = r.ka.transpose(1, 2).contiguous(), qat = r.qa.transpose(1, 2).contiguous();
  auto vt = r.v.transpose(1, 2).contiguous(), dot_ = d_out.transpose(1, 2).contiguous();
  auto dkat = at::zeros({B, Nm, Ca}, opts), dqat = at::zeros({B, Nq, Ca}, opts), dvt = at::zeros({B, Nm, Cv}, opts);
  AffineGrads g{at::Tensor(), at::Tensor(), at::Tensor(), at::zeros({B, Nm}, opts), at::zeros({B, Nm}, opts),
                at::zeros({B, Nq}, opts)};
  auto slots = at::empty({3, B, Nq, k}, opts);  // P, dT, dS * d per (query, slot)
  std::vector<int64_t> start(B * (Nm + 1), 0), order(B * Nq * k);
  const int64_t* idx = ptr<int64_t>(indices);
  dispatch_compute(r.dtype, [&](auto zero) {
    using T_ = decltype(zero);
    const T_* ka_t = ptr<T_>(kat);
    const T_* qa_t = ptr<T_>(qat);
    const T_* v_t = ptr<T_>(vt);
    const T_* do_t = ptr<T_>(dot_);
    const T_* u = ptr<T_>(r.u);
    const T_* kb = ptr<T_>(r.kb);
    const T_* qb = ptr<T_>(r.qb);
    const T_* lse_ptr = ptr<T_>(lse);
    const T_* delta_ptr = ptr<T_>(delta);
    T_* sp = ptr<T_>(slots);
    T_* st = sp + B * Nq * k;
    T_* sw = st + B * Nq * k;
    T_* dqa_t = ptr<T_>(dqat);
    T_* dka_t = ptr<T_>(dkat);
    T_* dv_t = ptr<T_>(dvt);
    T_* du = ptr<T_>(g.du);
    T_* dkb = ptr<T_>(g.dkb);
    T_* dqb = ptr<T_>(g.dqb);
    auto query_k = HMMN_PICK(topk_grad_query<T_>);
    auto axpy_k = HMMN_PICK(axpy<T_>);
    const int64_t nqb = ceil_div(Nq, kBwdTopkQueryBlock);
    at::parallel_for(0, B * nqb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nqb, q0 = (task % nqb) * kBwdTopkQueryBlock;
        for (int64_t q = b * Nq + q0; q < b * Nq + std::min(Nq, q0 + kBwdTopkQueryBlock); ++q)
          query_k(qa_t + q * Ca, do_t + q * Cv, qb[q], lse_ptr[q], delta_ptr[q], idx + q * k, k, ka_t + b * Nm * Ca,
                  v_t + b * Nm * Cv, u + b * Nm, kb + b * Nm, Ca, Cv, sp + q * k, st + q * k, sw + q * k,
                  dqa_t + q * Ca, dqb[q]);
      }
    });
    // (query, slot) pairs of each memory position, in query order: a counting sort per batch item.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t* st_b = start.data() + b * (Nm + 1);
        const int64_t* ib = idx + b * Nq * k;
        for (int64_t i = 0; i < Nq * k; ++i) ++st_b[ib[i] + 1];
        for (int64_t p = 0; p < Nm; ++p) st_b[p + 1] += st_b[p];
        std::vector<int64_t> fill(st_b, st_b + Nm);
        for (int64_t i = 0; i < Nq * k; ++i) order[b * Nq * k + fill[ib[i]]++] = i;
      }
    });
    const int64_t nmb = ceil_div(Nm, kBwdMemoryBlock);
    at::parallel_for(0, B * nmb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nmb, m0 = (task % nmb) * kBwdMemoryBlock;
        const int64_t* st_b = start.data() + b * (Nm + 1);
        for (int64_t p = m0; p < std::min(Nm, m0 + kBwdMemoryBlock); ++p) {
          const int64_t row = b * Nm + p;
          for (int64_t o = st_b[p]; o < st_b[p + 1]; ++o) {
            const int64_t i = b * Nq * k + order[b * Nq * k + o], q = b * Nq + i % (Nq * k) / k;
            axpy_k(dv_t + row * Cv, sp[i], do_t + q * Cv, Cv);
            axpy_k(dka_t + row * Ca, st[i], qa_t + q * Ca, Ca);
            du[row] += sw[i];
            dkb[row] += st[i];
          }
        }
      }
    });
  });
  g.dka = dkat.transpose(1, 2), g.dqa = dqat.transpose(1, 2), g.dv = dvt.transpose(1, 2);
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_read_backward(
    const at::Tensor& grad_out, const at::Tensor& query_key, const at::Tensor& memory_key,
    const at::Tensor& memory_value, const std::optional<at::Tensor>& memory_shrinkage,
    const std::optional<at::Tensor>& query_selection, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& topk_indices, c10::string_view similarity, double scale) {
  MemoryRead r = prepare(query_key, memory_key, memory_value, memory_shrinkage, query_selection, similarity, scale);
  const int64_t B = r.B, Ck = r.Ck, Cv = r.Cv, Nq = r.Nq, Nm = r.Nm;
  for (auto [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    check_tensor(*t, name, 3, "(B, Cv, Nq)");
    check_sizes(*t, name, {B, Cv, Nq}, "(B, Cv, Nq)");
    check_floating(*t, name);
  }
  check_tensor(lse, "lse", 2, "(B, Nq)");
  check_sizes(lse, "lse", {B, Nq}, "(B, Nq)");
  check_floating(lse, "lse");
  check_tensor(topk_indices, "topk_indices", 3, "(B, Nq, topk) int64");
  check_int64(topk_indices, "topk_indices");
  check_sizes(topk_indices, "topk_indices", {B, Nq, -1}, "(B, Nq, topk)");
  check_topk_range(topk_indices.size(2), Nm);
  auto indices = topk_indices.contiguous();
  if (indices.numel() > 0) {
    auto [lo, hi] = at::aminmax(indices);
    const int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
    TORCH_CHECK(l >= 0 && h < Nm, "topk_indices: values must lie in [0, Nm = ", Nm, "), got range [", l, ", ", h, "]");
  }
  auto d_out = to_compute(grad_out);
  auto lse_c = lse.to(r.dtype).contiguous();
  auto delta = (d_out * to_compute(out)).sum(1);  // D[q] = <dO[:, q], out[:, q]>
  AffineGrads g = indices.size(2) > 0 ? sparse_backward(r, d_out, lse_c, delta, indices)
                                      : dense_backward(r, d_out, lse_c, delta);
  // From the affine form back to the inputs (see the top of this file).
  at::Tensor dq, dk, dw = r.q.new_empty({0}), de = r.q.new_empty({0});
  if (!r.l2) {
    dq = g.dqa, dk = g.dka;
  } else if (r.e.defined()) {
    auto dqa_e = g.dqa.narrow(1, 0, Ck), dqa_q = g.dqa.narrow(1, Ck, Ck), dqb = g.dqb.unsqueeze(1);
    dk = 2 * r.k * g.dka.narrow(1, 0, Ck) + g.dka.narrow(1, Ck, Ck);
    dq = r.e * (2 * r.q * dqb - 2 * dqa_q);
    de = dqa_e - 2 * r.q * dqa_q + r.q.square() * dqb;
  } else {
    dk = g.dka + 2 * r.k * g.dkb.unsqueeze(1);
    dq = 2 * r.q * g.dqb.unsqueeze(1) - 2 * g.dqa;
  }
  if (memory_shrinkage.has_value()) dw = g.du * -scale;
  const auto dtype = query_key.scalar_type();
  return {dq.to(dtype).contiguous(), dk.to(dtype).contiguous(), g.dv.to(dtype).contiguous(), dw.to(dtype),
          de.to(dtype).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(hmmn_ops, CPU, m) {
  m.impl("memory_read", &memory_read);
  m.impl("memory_read_backward", &memory_read_backward);
}

}  // namespace hmmn_ops::cpu
