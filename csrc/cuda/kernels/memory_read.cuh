// memory_read (docs/internals.md, docs/cuda.md): forward with split-memory combine, usage,
// streaming top-k and the top-k read, and the backward of both. Torch-free; the glue allocates
// and checks.
//
// Layouts (contiguous): q (B, Ck, Nq), k (B, Ck, Nm), v (B, Cv, Nm), shrinkage w (B, Nm),
// selection e (B, Ck, Nq). Outputs: out (B, Cv, Nq), lse (B, Nq) acc, topk indices
// (B, Nq, topk) int64, usage (B, Nm) acc.
//
// Logits s[p, q] (p memory, q query):
//   dot: scale * <K_p, Q_q>
//   l2:  -u_p * d2,  u_p = scale * w_p,  d2 = sum_c e (K - Q)^2
//        = -u_p * (sum_c e K^2 - 2 sum_c K e Q + rowsq_q),  rowsq_q = sum_c e Q^2
// The full-softmax kernels run the tile engine with operand views whose channels carry the
// l2 terms (u is folded into the memory side, so the engine's logit is r + bias):
//   query side [2 e Q, -e] x memory side [u K, u K^2] = u (2 <K, eQ> - <K^2, e>),
//   bias = -u_p (colsq_p + rowsq_q), colsq_p = |K_p|^2 when there is no selection (else the
//   K^2 channels carry it and colsq = 0). The top-k kernels work one (query, candidate) pair at
//   a time and compute d2 directly.
#pragma once

#include "kernel_guided_read.cuh"

namespace hmmn {

template <typename T> struct MrParams {
  using A = acc_of<T>;
  const T* q;
  const T* k;
  const T* v;
  const T* w;       // shrinkage (B, Nm) or nullptr
  const T* e;       // selection (B, Ck, Nq) or nullptr
  const A* rowsq;   // l2: (B, Nq) sum_c e Q^2; nullptr for dot
  const A* colsq;   // l2 without selection: (B, Nm) |K|^2; else nullptr (read as 0)
  A scale;
  bool l2;
  int64_t B, Ck, Cv, Nq, Nm;

  // u_p = scale * w_p (l2), 0 for dot (the bias vanishes).
  __device__ __forceinline__ A u(int64_t b, int64_t p) const {
    return l2 ? scale * (w != nullptr ? to_acc(w[b * Nm + p]) : A(1)) : A(0);
  }
  __device__ __forceinline__ A row_term(int64_t b, int64_t q) const { return rowsq != nullptr ? rowsq[b * Nq + q] : A(0); }
  __device__ __forceinline__ A col_term(int64_t b, int64_t p) const { return colsq != nullptr ? colsq[b * Nm + p] : A(0); }
  // Scale the engine applies to its dot product (l2 folds it into the views).
  __device__ __forceinline__ A logit_scale() const { return l2 ? A(1) : scale; }
  // Channels of the logit views: l2 with selection has the K^2 / e channels as well.
  __host__ __device__ __forceinline__ int64_t key_channels() const { return l2 && e != nullptr ? 2 * Ck : Ck; }
};

// ------------------------------------------------------------------------------------------
// Operand views (tile.cuh: at(c, id), C, sc) of one batch item. sc is the staging hint: the
// underlying tensors are channels-first, so sc = positions (1 only for a single position).

// Query side of the logit: dot: Q; l2: [2 e Q (Ck channels), -e (Ck, with selection only)].
template <typename T> struct MrQueryKey {
  using A = acc_of<T>;
  const T* q;
  const T* e;
  int64_t Ck, N, C, sc;
  bool l2;
  __device__ __forceinline__ A at(int64_t c, int64_t id) const {
    if (!l2) return to_acc(q[c * N + id]);
    if (c >= Ck) return -to_acc(e[(c - Ck) * N + id]);
    const A x = A(2) * to_acc(q[c * N + id]);
    return e != nullptr ? x * to_acc(e[c * N + id]) : x;
  }
};

// Memory side of the logit: dot: K; l2: [u K (Ck), u K^2 (Ck, with selection only)].
template <typename T> struct MrMemoryKey {
  using A = acc_of<T>;
  const MrParams<T>* p;
  int64_t b, C, sc;
  __device__ __forceinline__ A at(int64_t c, int64_t id) const {
    const T* k = p->k + b * p->Ck * p->Nm;
    if (!p->l2) return to_acc(k[c * p->Nm + id]);
    const A u = p->u(b, id);
    if (c < p->Ck) return u * to_acc(k[c * p->Nm + id]);
    const A x = to_acc(k[(c - p->Ck) * p->Nm + id]);
    return u * x * x;
  }
};

template <typename T>
__device__ __forceinline__ MrQueryKey<T> mr_query_key(const MrParams<T>& p, int64_t b) {
  const int64_t off = b * p.Ck * p.Nq;
  return {p.q + off, p.e != nullptr ? p.e + off : nullptr, p.Ck, p.Nq, p.key_channels(), p.Nq, p.l2};
}
template <typename T>
__device__ __forceinline__ MrMemoryKey<T> mr_memory_key(const MrParams<T>& p, int64_t b) {
  return {&p, b, p.key_channels(), p.Nm};
}

// What the dQ blocks accumulate against dS, over memory positions, for key channels
// [c0, c0 + cb): dot: K; l2: [u K (cb), u K^2 (cb, with selection only), u (1)].
template <typename T> struct MrMemoryGrad {
  using A = acc_of<T>;
  const MrParams<T>* p;
  int64_t b, c0, cb, C, sc;
  __device__ __forceinline__ A at(int64_t x, int64_t id) const {
    const T* k = p->k + b * p->Ck * p->Nm;
    if (!p->l2) return c0 + x < p->Ck ? to_acc(k[(c0 + x) * p->Nm + id]) : A(0);
    const A u = p->u(b, id);
    if (x == C - 1) return u;
    const int64_t c = c0 + (x < cb ? x : x - cb);
    if (c >= p->Ck) return A(0);
    const A kv = to_acc(k[c * p->Nm + id]);
    return x < cb ? u * kv : u * kv * kv;
  }
};

// What the dK blocks accumulate against dS, over queries, for key channels [c0, c0 + cb):
// dot: Q; l2: [e Q (cb), e (cb with selection; else one channel of 1), rowsq (1)].
template <typename T> struct MrQueryGrad {
  using A = acc_of<T>;
  const MrParams<T>* p;
  int64_t b, c0, cb, C, sc;
  __device__ __forceinline__ A at(int64_t x, int64_t id) const {
    const int64_t off = b * p->Ck * p->Nq;
    if (p->l2 && x == C - 1) return p->row_term(b, id);
    if (p->l2 && x >= cb) {
      if (p->e == nullptr) return A(1);
      const int64_t c = c0 + x - cb;
      return c < p->Ck ? to_acc(p->e[off + c * p->Nq + id]) : A(0);
    }
    const int64_t c = c0 + x;
    if (c >= p->Ck) return A(0);
    const A qv = to_acc(p->q[off + c * p->Nq + id]);
    return p->l2 && p->e != nullptr ? qv * to_acc(p->e[off + c * p->Nq + id]) : qv;
  }
};

// One channel of ones: accumulating P against it sums P over the stream (usage).
struct OnesOperand {
  int64_t C = 1, sc = 0;
  __device__ __forceinline__ float at(int64_t, int64_t) const { return 1.0f; }
};

// Accumulator widths of the backward blocks for a chunk of cb key channels.
template <typename T> __host__ __device__ inline int64_t mr_dq_width(const MrParams<T>& p, int64_t cb) {
  return !p.l2 ? cb : (p.e != nullptr ? 2 * cb : cb) + 1;
}
template <typename T> __host__ __device__ inline int64_t mr_dk_width(const MrParams<T>& p, int64_t cb) {
  return !p.l2 ? cb : cb + (p.e != nullptr ? cb : 1) + 1;
}

// ------------------------------------------------------------------------------------------
// Problems (attend.cuh): per-row data cached per block, per-column data per tile.

// Rows = queries (row data rs = rowsq), columns = memory positions (u, colsq).
template <typename Cfg, typename T> struct MrMemoryCols {
  using A = acc_of<T>;
  const MrParams<T>& p;
  int64_t b;
  const A* rs;
  A* uc;
  A* cs;
  __device__ __forceinline__ void cols(typename Cfg::Smem& sm, int64_t k0, int64_t k1) const {
    for (int j = threadIdx.x; j < Cfg::CB; j += Cfg::NT) {
      const int64_t pos = k0 + j < k1 ? k0 + j : -1;
      sm.col[j] = pos;
      uc[j] = pos >= 0 ? p.u(b, pos) : A(0);
      cs[j] = pos >= 0 ? p.col_term(b, pos) : A(0);
    }
  }
  __device__ __forceinline__ A bias(int i, int j) const { return -uc[j] * (cs[j] + rs[i]); }
};

// Rows = memory positions (u, colsq cached by mr_memory_rows), columns = queries (rowsq).
template <typename Cfg, typename T> struct MrQueryCols {
  using A = acc_of<T>;
  const MrParams<T>& p;
  int64_t b;
  const A* ur;
  const A* cr;
  A* rs;
  __device__ __forceinline__ void cols(typename Cfg::Smem& sm, int64_t k0, int64_t k1) const {
    for (int j = threadIdx.x; j < Cfg::CB; j += Cfg::NT) {
      const int64_t q = k0 + j < k1 ? k0 + j : -1;
      sm.col[j] = q;
      rs[j] = q >= 0 ? p.row_term(b, q) : A(0);
    }
  }
  __device__ __forceinline__ A bias(int i, int j) const { return -ur[i] * (cr[i] + rs[j]); }
};

template <typename Cfg, typename T>
__device__ __forceinline__ void mr_query_rows(typename Cfg::Smem& sm, const MrParams<T>& p, int64_t b, int64_t q0,
                                              acc_of<T>* rs) {
  for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) {
    const int64_t q = q0 + i < p.Nq ? q0 + i : -1;
    sm.row[i] = q;
    rs[i] = q >= 0 ? p.row_term(b, q) : acc_of<T>(0);
  }
}

template <typename Cfg, typename T>
__device__ __forceinline__ void mr_memory_rows(typename Cfg::Smem& sm, const MrParams<T>& p, int64_t b, int64_t p0,
                                               acc_of<T>* ur, acc_of<T>* cr) {
  for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) {
    const int64_t pos = p0 + i < p.Nm ? p0 + i : -1;
    sm.row[i] = pos;
    ur[i] = pos >= 0 ? p.u(b, pos) : acc_of<T>(0);
    cr[i] = pos >= 0 ? p.col_term(b, pos) : acc_of<T>(0);
  }
}

// ------------------------------------------------------------------------------------------
// l2 per-position terms: rowsq (B, Nq) = sum_c e Q^2 and, without selection, colsq (B, Nm).

template <typename T>
__global__ void mr_l2_terms_kernel(MrParams<T> p, acc_of<T>* rowsq, acc_of<T>* colsq) {
  using A = acc_of<T>;
  const int64_t nr = p.B * p.Nq, total = nr + (colsq != nullptr ? p.B * p.Nm : 0);
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const bool row = t < nr;
    const int64_t r = row ? t : t - nr, n = row ? p.Nq : p.Nm, b = r / n, i = r % n;
    const T* x = (row ? p.q : p.k) + b * p.Ck * n + i;
    const T* e = row && p.e != nullptr ? p.e + b * p.Ck * n + i : nullptr;
    A acc = A(0);
    for (int64_t c = 0; c < p.Ck; ++c) {
      const A xv = to_acc(x[c * n]);
      acc += (e != nullptr ? to_acc(e[c * n]) : A(1)) * xv * xv;
    }
    (row ? rowsq : colsq)[r] = acc;
  }
}

// ------------------------------------------------------------------------------------------
// Full-softmax forward: block (b, query tile, memory split, value chunk), as kernel_guided_read.

template <typename Cfg, typename T>
__global__ void __launch_bounds__(Cfg::NT, 1)
    mr_fwd_kernel(MrParams<T> p, KgrFwdPlan plan, T* out, acc_of<T>* lse, acc_of<T>* part_o, acc_of<T>* part_lse) {
  using A = acc_of<T>;
  HMMN_SHARED(typename Cfg::Smem, sm, );
  HMMN_SHARED(A, m, [Cfg::RB]);
  HMMN_SHARED(A, l, [Cfg::RB]);
  HMMN_SHARED(A, alpha, [Cfg::RB]);
  HMMN_SHARED(A, rs, [Cfg::RB]);
  HMMN_SHARED(A, uc, [Cfg::CB]);
  HMMN_SHARED(A, cs, [Cfg::CB]);
  HMMN_DYNAMIC_SMEM(dyn_smem);
  A* O = reinterpret_cast<A*>(dyn_smem);

  const int64_t b = blockIdx.x / plan.nqt, q0 = (blockIdx.x % plan.nqt) * Cfg::RB;
  const int64_t split = blockIdx.y / plan.ncv, cvc = blockIdx.y % plan.ncv;
  const int64_t v0 = cvc * plan.cvb, v1 = imin(v0 + plan.cvb, p.Cv), ldo = plan.cvb + 1;
  const int64_t k0 = split * plan.tps * Cfg::CB, k1 = imin(k0 + plan.tps * Cfg::CB, p.Nm);
  const auto V = channels_first(p.v + b * p.Cv * p.Nm, p.Cv, p.Nm);

  mr_query_rows<Cfg>(sm, p, b, q0, rs);
  const MrMemoryCols<Cfg, T> prob{p, b, rs, uc, cs};
  attend_forward<Cfg>(prob, sm, mr_query_key(p, b), mr_memory_key(p, b), V, p.logit_scale(), k0, k1, v0, v1, O, ldo,
                      m, l, alpha);
  split_forward_store<Cfg>(sm, O, ldo, m, l, b, v0, v1, split, cvc == 0, p.B, p.Cv, p.Nq, out, lse, part_o,
                           part_lse);
}

// usage[b, p] = sum_q exp(s[p, q] - lse[q]): block per (b, memory tile) streams all queries
// and sums P against a channel of ones. Every usage element has one writer.
template <typename Cfg, typename T>
__global__ void __launch_bounds__(Cfg::NT, 1)
    mr_usage_kernel(MrParams<T> p, const acc_of<T>* lse, acc_of<T>* usage, int64_t nmt) {
  using A = acc_of<T>;
  HMMN_SHARED(typename Cfg::Smem, sm, );
  HMMN_SHARED(A, lse_c, [Cfg::CB]);
  HMMN_SHARED(A, D_c, [Cfg::CB]);
  HMMN_SHARED(A, rs, [Cfg::CB]);
  HMMN_SHARED(A, ur, [Cfg::RB]);
  HMMN_SHARED(A, cr, [Cfg::RB]);
  HMMN_SHARED(A, us, [Cfg::RB]);
  const int64_t b = blockIdx.x / nmt, p0 = (blockIdx.x % nmt) * Cfg::RB;
  mr_memory_rows<Cfg>(sm, p, b, p0, ur, cr);
  for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) us[i] = A(0);
  const MrQueryCols<Cfg, T> prob{p, b, ur, cr, rs};
  const OnesOperand ones;
  attend_backward_cols<Cfg>(prob, sm, mr_query_key(p, b), mr_memory_key(p, b), ones, ones, lse + b * p.Nq,
                            lse + b * p.Nq, p.logit_scale(), 0, p.Nq, true, 0, 1, lse_c, D_c, ones,
                            [&](int i, int64_t, A x) { us[i] += x; });
  for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT)
    if (sm.row[i] >= 0) usage[b * p.Nm + sm.row[i]] = us[i];
}

// ------------------------------------------------------------------------------------------
// Full-softmax backward (flash style, no atomics): dQ (and de) per query tile and key chunk;
// dV per memory tile and value chunk; dK (and partial dw per key chunk) per memory tile.

struct MrBwdPlan {
  int64_t ckb, nck;  // key channels per block, key chunks (dQ and dK blocks)
  int64_t cvb, ncv;  // value channels per dV block, value chunks
  int64_t dq_smem, dkdv_smem;
};

template <typename Cfg, typename T>
__global__ void __launch_bounds__(Cfg::NT, 1)
    mr_dq_kernel(MrParams<T> p, MrBwdPlan plan, const T* dout, const acc_of<T>* lse, const acc_of<T>* D, T* dq, T* de,
                 int64_t nqt) {
  using A = acc_of<T>;
  HMMN_SHARED(typename Cfg::Smem, sm, );
  HMMN_SHARED(A, lse_r, [Cfg::RB]);
  HMMN_SHARED(A, D_r, [Cfg::RB]);
  HMMN_SHARED(A, rs, [Cfg::RB]);
  HMMN_SHARED(A, uc, [Cfg::CB]);
  HMMN_SHARED(A, cs, [Cfg::CB]);
  HMMN_DYNAMIC_SMEM(dyn_smem);
  A* acc = reinterpret_cast<A*>(dyn_smem);

  const int64_t b = blockIdx.x / nqt, q0 = (blockIdx.x % nqt) * Cfg::RB;
  const int64_t cb = plan.ckb, c0 = blockIdx.y * cb, c1 = imin(c0 + cb, p.Ck);
  const int64_t width = mr_dq_width(p, cb), ld = width + 1;
  const MrMemoryGrad<T> G{&p, b, c0, cb, width, p.Nm};
  mr_query_rows<Cfg>(sm, p, b, q0, rs);
  const MrMemoryCols<Cfg, T> prob{p, b, rs, uc, cs};
  attend_backward_rows<Cfg>(prob, sm, mr_query_key(p, b), mr_memory_key(p, b),
                            channels_first(p.v + b * p.Cv * p.Nm, p.Cv, p.Nm),
                            channels_first(dout + b * p.Cv * p.Nq, p.Cv, p.Nq), lse + b * p.Nq, D + b * p.Nq,
                            p.logit_scale(), 0, p.Nm, 0, width, acc, ld, lse_r, D_r, G);
  // acc holds sum_p dS X for X = the channels of G (dS already times u for l2).
  for (int64_t t = threadIdx.x; t < (c1 - c0) * Cfg::RB; t += Cfg::NT) {
    const int i = int(t % Cfg::RB);
    const int64_t x = t / Cfg::RB, q = sm.row[i];
    if (q < 0) continue;
    const A* a = acc + i * ld;
    const int64_t o = (b * p.Ck + c0 + x) * p.Nq + q;
    if (!p.l2) {
      store(dq + o, p.scale * a[x]);
      continue;
    }
    const A qv = to_acc(p.q[o]), ev = p.e != nullptr ? to_acc(p.e[o]) : A(1), sU = a[width - 1];
    store(dq + o, A(2) * ev * (a[x] - qv * sU));
    if (de != nullptr) store(de + o, -(a[cb + x] - A(2) * qv * a[x] + qv * qv * sU));
  }
}

template <typename Cfg, typename T>
__global__ void __launch_bounds__(Cfg::NT, 1)
    mr_dkdv_kernel(MrParams<T> p, MrBwdPlan plan, const T* dout, const acc_of<T>* lse, const acc_of<T>* D, T* dk, T* dv,
                   acc_of<T>* dw_part, int64_t nmt) {
  using A = acc_of<T>;
  HMMN_SHARED(typename Cfg::Smem, sm, );
  HMMN_SHARED(A, lse_c, [Cfg::CB]);
  HMMN_SHARED(A, D_c, [Cfg::CB]);
  HMMN_SHARED(A, rs, [Cfg::CB]);
  HMMN_SHARED(A, ur, [Cfg::RB]);
  HMMN_SHARED(A, cr, [Cfg::RB]);
  HMMN_DYNAMIC_SMEM(dyn_smem);
  A* acc = reinterpret_cast<A*>(dyn_smem);

  const int64_t b = blockIdx.x / nmt, p0 = (blockIdx.x % nmt) * Cfg::RB;
  const bool want_dv = blockIdx.y < plan.ncv;
  const int64_t chunk = want_dv ? blockIdx.y : blockIdx.y - plan.ncv;
  const int64_t cb = want_dv ? plan.cvb : plan.ckb, c0 = chunk * cb, c1 = imin(c0 + cb, want_dv ? p.Cv : p.Ck);
  const int64_t width = want_dv ? c1 - c0 : mr_dk_width(p, cb), ld = width + 1;
  const MrQueryGrad<T> G{&p, b, c0, cb, width, p.Nq};
  mr_memory_rows<Cfg>(sm, p, b, p0, ur, cr);
  for (int64_t t = threadIdx.x; t < Cfg::RB * ld; t += Cfg::NT) acc[t] = A(0);
  const MrQueryCols<Cfg, T> prob{p, b, ur, cr, rs};
  attend_backward_cols<Cfg>(prob, sm, mr_query_key(p, b), mr_memory_key(p, b),
                            channels_first(p.v + b * p.Cv * p.Nm, p.Cv, p.Nm),
                            channels_first(dout + b * p.Cv * p.Nq, p.Cv, p.Nq), lse + b * p.Nq, D + b * p.Nq,
                            p.logit_scale(), 0, p.Nq, want_dv, want_dv ? c0 : 0, want_dv ? c1 : width, lse_c, D_c, G,
                            [&](int i, int64_t c, A x) { acc[i * ld + c] += x; });
  for (int64_t t = threadIdx.x; t < (c1 - c0) * Cfg::RB; t += Cfg::NT) {
    const int i = int(t % Cfg::RB);
    const int64_t x = t / Cfg::RB, pos = sm.row[i];
    if (pos < 0) continue;
    const A* a = acc + i * ld;
    if (want_dv) {
      store(dv + (b * p.Cv + c0 + x) * p.Nm + pos, a[x]);
    } else if (!p.l2) {
      store(dk + (b * p.Ck + c0 + x) * p.Nm + pos, p.scale * a[x]);
    } else {  // a[x] = sum_q dS e Q, a[cb (+ x)] = sum_q dS e (or dS)
      const int64_t o = (b * p.Ck + c0 + x) * p.Nm + pos;
      const A kv = to_acc(p.k[o]), A1 = a[cb + (p.e != nullptr ? x : 0)];
      store(dk + o, A(-2) * ur[i] * (kv * A1 - a[x]));
    }
  }
  // dw[p] = -scale sum_q dS d2 = -scale (sum_c (K^2 A1 - 2 K A2) + sum_q dS rowsq); this key
  // chunk's part (the rowsq term in chunk 0), summed over chunks by the glue.
  if (!want_dv && p.l2 && dw_part != nullptr) {
    for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) {
      const int64_t pos = sm.row[i];
      if (pos < 0) continue;
      const A* a = acc + i * ld;
      A sum = chunk == 0 ? a[width - 1] : A(0);
      for (int64_t x = 0; x < c1 - c0; ++x) {
        const A kv = to_acc(p.k[(b * p.Ck + c0 + x) * p.Nm + pos]), A1 = a[cb + (p.e != nullptr ? x : 0)];
        sum += kv * (kv * A1 - A(2) * a[x]);
      }
      dw_part[(chunk * p.B + b) * p.Nm + pos] = -p.scale * sum;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Top-k. Selection: one warp per query (kTopkWarps per block) streams all memory positions in
// chunks of 32 (one per lane), keys staged once for the block's queries, and keeps its list
// with WarpTopk (kernel_guided_read.cuh); keys (B, Nq, k) acc hold the selected logits, sorted.

// The logit of one (query, candidate) pair from per-channel partial sums: dot: scale * sum K Q;
// l2: -u * sum e (K - Q)^2.
template <typename A> __device__ __forceinline__ A mr_pair_term(bool l2, A kv, A qv, A ev) {
  if (!l2) return kv * qv;
  const A d = kv - qv;
  return ev * d * d;
}

template <typename T>
__global__ void __launch_bounds__(kTopkWarps * 32, 1)
    mr_topk_kernel(MrParams<T> p, int64_t k, acc_of<T>* keys, int64_t* idx) {
  using A = acc_of<T>;
  HMMN_SHARED(A, ks, [kTopkCC][33]);
  HMMN_SHARED(A, qs, [kTopkWarps][kTopkCC]);
  HMMN_SHARED(A, es, [kTopkWarps][kTopkCC]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t groups = ceil_div(p.Nq, kTopkWarps);
  const int64_t b = blockIdx.x / groups, qbase = (blockIdx.x % groups) * kTopkWarps, q = qbase + warp;
  const bool q_ok = q < p.Nq;
  WarpTopk<A> list{keys + (b * p.Nq + (q_ok ? q : 0)) * k, idx + (b * p.Nq + (q_ok ? q : 0)) * k, k};
  const T* kb = p.k + b * p.Ck * p.Nm;
  const T* qb = p.q + b * p.Ck * p.Nq;
  const T* eb = p.e != nullptr ? p.e + b * p.Ck * p.Nq : nullptr;
  for (int64_t base = 0; base < p.Nm; base += 32) {
    A d = A(0);
    for (int64_t c0 = 0; c0 < p.Ck; c0 += kTopkCC) {
      __syncthreads();  // the previous chunk is done with ks, qs, es
      for (int t = threadIdx.x; t < kTopkCC * 32; t += blockDim.x) {
        const int cc = t / 32, j = t % 32;
        const int64_t c = c0 + cc, pos = base + j;
        ks[cc][j] = (pos < p.Nm && c < p.Ck) ? to_acc(kb[c * p.Nm + pos]) : A(0);
      }
      for (int t = threadIdx.x; t < kTopkWarps * kTopkCC; t += blockDim.x) {
        const int w = t / kTopkCC, cc = t % kTopkCC;
        const int64_t c = c0 + cc, qq = qbase + w;
        const bool ok = qq < p.Nq && c < p.Ck;
        qs[w][cc] = ok ? to_acc(qb[c * p.Nq + qq]) : A(0);
        es[w][cc] = ok && eb != nullptr ? to_acc(eb[c * p.Nq + qq]) : A(ok ? 1 : 0);
      }
      __syncthreads();
#pragma unroll 8
      for (int cc = 0; cc < kTopkCC; ++cc) d += mr_pair_term(p.l2, ks[cc][lane], qs[warp][cc], es[warp][cc]);
    }
    const int64_t mine = base + lane;
    const bool ok = q_ok && mine < p.Nm;
    const A key = list.rank_key(saturate(!ok ? A(0) : p.l2 ? -p.u(b, mine) * d : p.scale * d));
    list.offer(key, base, ok && list.wants(key, mine));
  }
}

// The top-k read: one warp per query; lse over the k selected logits, out = sum_j P_j V[:, idx_j]
// gathered from channels-last values vcl (B, Nm, Cv), and usage[idx_j] += P_j (atomic; usage
// zeroed by the caller, nullptr when not wanted).
template <typename T>
__global__ void __launch_bounds__(kTopkWarps * 32, 1)
    mr_topk_read_kernel(MrParams<T> p, const T* vcl, int64_t k, const acc_of<T>* keys, const int64_t* idx, T* out,
                        acc_of<T>* lse, acc_of<T>* usage) {
  using A = acc_of<T>;
  const int lane = threadIdx.x % 32;
  const int64_t bq = blockIdx.x * int64_t(kTopkWarps) + threadIdx.x / 32;
  if (bq >= p.B * p.Nq) return;  // warp-uniform
  const int64_t b = bq / p.Nq, q = bq % p.Nq;
  const A* lk = keys + bq * k;
  const int64_t* li = idx + bq * k;
  const A mx = lk[0];  // sorted: the largest
  A sum = A(0);
  for (int64_t j = lane; j < k; j += 32) sum += acc_exp(lk[j] - mx);
  sum = warp_sum(sum);
  if (lane == 0) lse[bq] = mx + acc_log(sum);
  // P_j = exp(l_j - max) / sum, not exp(l_j - lse): at saturated magnitudes lse cannot hold log(sum).
  const A inv = A(1) / sum;
  for (int64_t v0 = 0; v0 < p.Cv; v0 += 32) {
    const int64_t v = v0 + lane;
    A o = A(0);
    for (int64_t j = 0; j < k; ++j)
      if (v < p.Cv) o += acc_exp(lk[j] - mx) * inv * to_acc(vcl[(b * p.Nm + li[j]) * p.Cv + v]);
    if (v < p.Cv) store(out + (b * p.Cv + v) * p.Nq + q, o);
  }
  if (usage != nullptr)
    for (int64_t j = lane; j < k; j += 32) atomicAdd(usage + b * p.Nm + li[j], acc_exp(lk[j] - mx) * inv);
}

// Top-k backward: one warp per query over its fixed selected set. Channels-last inputs
// qcl/ecl (B, Nq, Ck), kcl (B, Nm, Ck), vcl (B, Nm, Cv), docl (B, Nq, Cv). The warp owns
// dq_acc/de_acc (B, Nq, Ck) of its query; dk_acc (B, Nm, Ck), dv_acc (B, Nm, Cv) and dw_acc
// (B, Nm) are shared between queries (atomic adds; all five zeroed by the caller).
template <typename T> struct MrTopkGrads {
  using A = acc_of<T>;
  A* dq;
  A* de;  // nullptr without selection
  A* dk;
  A* dv;
  A* dw;  // nullptr without shrinkage
};

template <typename T>
__global__ void __launch_bounds__(kTopkWarps * 32, 1)
    mr_topk_bwd_kernel(MrParams<T> p, const T* qcl, const T* ecl, const T* kcl, const T* vcl, const T* docl,
                       const acc_of<T>* lse, const acc_of<T>* D, const int64_t* idx, int64_t k, MrTopkGrads<T> g) {
  using A = acc_of<T>;
  const int lane = threadIdx.x % 32;
  const int64_t bq = blockIdx.x * int64_t(kTopkWarps) + threadIdx.x / 32;
  if (bq >= p.B * p.Nq) return;  // warp-uniform
  const int64_t b = bq / p.Nq;
  const T* qr = qcl + bq * p.Ck;
  const T* er = ecl != nullptr ? ecl + bq * p.Ck : nullptr;
  const T* dor = docl + bq * p.Cv;
  A* dqr = g.dq + bq * p.Ck;
  A* der = g.de != nullptr ? g.de + bq * p.Ck : nullptr;
  const A L = lse[bq], Dq = D[bq];
  for (int64_t j = 0; j < k; ++j) {
    const int64_t pos = idx[bq * k + j];
    const T* kr = kcl + (b * p.Nm + pos) * p.Ck;
    const T* vr = vcl + (b * p.Nm + pos) * p.Cv;
    A d = A(0), dp = A(0);
    for (int64_t c = lane; c < p.Ck; c += 32)
      d += mr_pair_term(p.l2, to_acc(kr[c]), to_acc(qr[c]), er != nullptr ? to_acc(er[c]) : A(1));
    for (int64_t v = lane; v < p.Cv; v += 32) dp += to_acc(vr[v]) * to_acc(dor[v]);
    d = warp_sum(d);
    dp = warp_sum(dp);
    const A u = p.u(b, pos), s = saturate(p.l2 ? -u * d : p.scale * d);
    const A P = acc_exp(s - L), dS = P * (dp - Dq);
    for (int64_t v = lane; v < p.Cv; v += 32) atomicAdd(g.dv + (b * p.Nm + pos) * p.Cv + v, P * to_acc(dor[v]));
    for (int64_t c = lane; c < p.Ck; c += 32) {
      const A kv = to_acc(kr[c]), qv = to_acc(qr[c]);
      A* dkc = g.dk + (b * p.Nm + pos) * p.Ck + c;
      if (!p.l2) {
        atomicAdd(dkc, p.scale * dS * qv);
        dqr[c] += p.scale * dS * kv;
        continue;
      }
      const A ev = er != nullptr ? to_acc(er[c]) : A(1), diff = kv - qv, gu = dS * u;
      atomicAdd(dkc, A(-2) * gu * ev * diff);
      dqr[c] += A(2) * gu * ev * diff;
      if (der != nullptr) der[c] -= gu * diff * diff;
    }
    if (p.l2 && g.dw != nullptr && lane == 0) atomicAdd(g.dw + b * p.Nm + pos, -p.scale * dS * d);
  }
}

// ------------------------------------------------------------------------------------------
// Launchers. The glue guarantees Ck, Cv, Nm >= 1 and 1 <= k <= Nm for the top-k ones.

// rowsq: B * Nq acc elements; colsq: B * Nm, or nullptr with a selection. Sets p.rowsq/colsq.
template <typename T>
cudaError_t mr_l2_terms(MrParams<T>& p, acc_of<T>* rowsq, acc_of<T>* colsq, cudaStream_t stream) {
  if (p.e != nullptr) colsq = nullptr;
  const int64_t total = p.B * p.Nq + (colsq != nullptr ? p.B * p.Nm : 0);
  if (total > 0) {
    const int threads = 256;
    HMMN_LAUNCH(mr_l2_terms_kernel<T>, grid_stride_blocks(total, threads), threads, 0, stream, p, rowsq, colsq);
  }
  p.rowsq = rowsq;
  p.colsq = colsq;
  return cudaGetLastError();
}

template <typename T>
KgrFwdPlan mr_forward_plan(const MrParams<T>& p, int num_sms, int64_t smem_optin) {
  using Cfg = typename Tiles<acc_of<T>>::Square;
  return split_forward_plan<Cfg>(p.B, p.Nq, p.Nm, p.Cv, dynamic_smem_budget(mr_fwd_kernel<Cfg, T>, smem_optin), num_sms);
}

// Full-softmax forward (out, lse); `workspace` holds plan.workspace acc elements.
template <typename T>
cudaError_t mr_forward(const MrParams<T>& p, const KgrFwdPlan& plan, T* out, acc_of<T>* lse, acc_of<T>* workspace,
                       cudaStream_t stream) {
  using Cfg = typename Tiles<acc_of<T>>::Square;
  if (p.B * p.Nq == 0) return cudaSuccess;
  const auto kernel = mr_fwd_kernel<Cfg, T>;
  cudaError_t err = allow_dynamic_smem(kernel, plan.dyn_smem);
  if (err != cudaSuccess) return err;
  acc_of<T>* part_o = plan.nsplit > 1 ? workspace : nullptr;
  acc_of<T>* part_lse = plan.nsplit > 1 ? workspace + plan.nsplit * p.B * p.Cv * p.Nq : nullptr;
  const dim3 grid(unsigned(p.B * plan.nqt), unsigned(plan.nsplit * plan.ncv));
  HMMN_LAUNCH(kernel, grid, Cfg::NT, size_t(plan.dyn_smem), stream, p, plan, out, lse, part_o, part_lse);
  if (plan.nsplit > 1) return split_forward_combine(part_o, part_lse, out, lse, plan.nsplit, p.B, p.Cv, p.Nq, stream);
  return cudaGetLastError();
}

// usage (B, Nm) acc from the full softmax's lse.
template <typename T>
cudaError_t mr_usage(const MrParams<T>& p, const acc_of<T>* lse, acc_of<T>* usage, cudaStream_t stream) {
  using Cfg = typename Tiles<acc_of<T>>::Square;
  if (p.B == 0) return cudaSuccess;
  const int64_t nmt = ceil_div(p.Nm, Cfg::RB);
  const auto kernel = mr_usage_kernel<Cfg, T>;
  HMMN_LAUNCH(kernel, unsigned(p.B * nmt), Cfg::NT, 0, stream, p, lse, usage, nmt);
  return cudaGetLastError();
}

// Top-k forward: selection into keys (B * Nq * k acc workspace) and idx, then the read.
template <typename T>
cudaError_t mr_topk_forward(const MrParams<T>& p, const T* vcl, int64_t k, acc_of<T>* keys, int64_t* idx, T* out,
                            acc_of<T>* lse, acc_of<T>* usage, cudaStream_t stream) {
  if (p.B * p.Nq == 0) return cudaSuccess;
  HMMN_LAUNCH(mr_topk_kernel<T>, unsigned(p.B * ceil_div(p.Nq, kTopkWarps)), kTopkWarps * 32, 0, stream, p, k, keys,
              idx);
  HMMN_LAUNCH(mr_topk_read_kernel<T>, unsigned(ceil_div(p.B * p.Nq, kTopkWarps)), kTopkWarps * 32, 0, stream, p, vcl,
              k, keys, idx, out, lse, usage);
  return cudaGetLastError();
}

template <typename T>
MrBwdPlan mr_backward_plan(const MrParams<T>& p, int64_t smem_optin) {
  using Cfg = typename Tiles<acc_of<T>>::Square;
  using A = acc_of<T>;
  const int64_t budget = imin(dynamic_smem_budget(mr_dq_kernel<Cfg, T>, smem_optin),
                              dynamic_smem_budget(mr_dkdv_kernel<Cfg, T>, smem_optin));
  // Widest accumulator row a block may hold (the +1 pads rows onto different banks).
  const int64_t values = imax(budget / (Cfg::RB * int64_t(sizeof(A))) - 1, 3);
  MrBwdPlan plan{};
  plan.ckb = imin(p.Ck, imax(!p.l2 ? values : p.e != nullptr ? (values - 1) / 2 : values - 2, 1));
  plan.nck = ceil_div(p.Ck, plan.ckb);
  plan.cvb = imin(p.Cv, values);
  plan.ncv = ceil_div(p.Cv, plan.cvb);
  plan.dq_smem = Cfg::RB * (mr_dq_width(p, plan.ckb) + 1) * int64_t(sizeof(A));
  plan.dkdv_smem = Cfg::RB * (imax(mr_dk_width(p, plan.ckb), plan.cvb) + 1) * int64_t(sizeof(A));
  return plan;
}

// Full-softmax backward. D: B * Nq acc workspace; dq/dk/dv (and de with a selection) shaped
// like their inputs; dw_part: plan.nck * B * Nm acc (l2 with shrinkage), else nullptr.
template <typename T>
cudaError_t mr_backward(const MrParams<T>& p, const MrBwdPlan& plan, const T* dout, const T* out,
                        const acc_of<T>* lse, acc_of<T>* D, T* dq, T* de, T* dk, T* dv, acc_of<T>* dw_part,
                        cudaStream_t stream) {
  using Cfg = typename Tiles<acc_of<T>>::Square;
  if (p.B == 0) return cudaSuccess;
  launch_softmax_bwd_delta(dout, out, D, p.B, p.Cv, p.Nq, stream);
  const auto dq_kernel = mr_dq_kernel<Cfg, T>;
  cudaError_t err = allow_dynamic_smem(dq_kernel, plan.dq_smem);
  if (err != cudaSuccess) return err;
  const int64_t nqt = ceil_div(p.Nq, Cfg::RB);
  if (p.Nq > 0)
    HMMN_LAUNCH(dq_kernel, dim3(unsigned(p.B * nqt), unsigned(plan.nck)), Cfg::NT, size_t(plan.dq_smem), stream, p,
                plan, dout, lse, D, dq, de, nqt);
  const auto dkdv_kernel = mr_dkdv_kernel<Cfg, T>;
  err = allow_dynamic_smem(dkdv_kernel, plan.dkdv_smem);
  if (err != cudaSuccess) return err;
  const int64_t nmt = ceil_div(p.Nm, Cfg::RB);
  HMMN_LAUNCH(dkdv_kernel, dim3(unsigned(p.B * nmt), unsigned(plan.ncv + plan.nck)), Cfg::NT, size_t(plan.dkdv_smem),
              stream, p, plan, dout, lse, D, dk, dv, dw_part, nmt);
  return cudaGetLastError();
}

// Top-k backward (see mr_topk_bwd_kernel); D: B * Nq acc workspace; out/dout channels-first.
template <typename T>
cudaError_t mr_topk_backward(const MrParams<T>& p, const T* dout, const T* out, const acc_of<T>* lse, acc_of<T>* D,
                             const T* qcl, const T* ecl, const T* kcl, const T* vcl, const T* docl,
                             const int64_t* idx, int64_t k, const MrTopkGrads<T>& g, cudaStream_t stream) {
  if (p.B * p.Nq == 0) return cudaSuccess;
  launch_softmax_bwd_delta(dout, out, D, p.B, p.Cv, p.Nq, stream);
  HMMN_LAUNCH(mr_topk_bwd_kernel<T>, unsigned(ceil_div(p.B * p.Nq, kTopkWarps)), kTopkWarps * 32, 0, stream, p, qcl,
              ecl, kcl, vcl, docl, lse, D, idx, k, g);
  return cudaGetLastError();
}

}  // namespace hmmn
