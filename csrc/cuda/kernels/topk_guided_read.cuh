// topk_guided_read (docs/ops.md section 5, docs/internals.md): every fine query of coarse cell c attends over
// the k*r*r fine memory pixels of its k coarse indices. Torch-free; the glue allocates.
//
// Layouts (contiguous): q and dout/out (B, C, N) channels-first; memory k (B, M, Ck) and
// v (B, M, Cv) channels-LAST, so a gathered candidate's channels are one coalesced run;
// idx (B, Nc, K) int64 with values in [0, T*Nc); N = H*W, M = T*N, Nc = Hc*Wc, H = Hc*r.
//
// Forward / dQ: one block per (coarse cell, chunk of <= 16 of its r*r fine queries); the
// cell's candidates stream through shared memory once per block and serve all its queries.
// dK/dV, two paths:
//   atomic:        one block per (cell, 64 candidates) recomputes P and dS for the cell's
//                  queries and atomically adds into fp32/fp64 channels-last accumulators;
//   deterministic: one block per (coarse memory cell, its r*r fine pixels) streams the
//                  queries of every cell that lists it (a CSR built by the glue with a stable
//                  sort), in a fixed order, and writes dK/dV once. No atomics.
#pragma once

#include "attend.cuh"

namespace hmmn {

template <typename T> struct TopkParams {
  const T* q;
  const T* k;
  const T* v;
  const int64_t* idx;
  acc_of<T> scale;
  int64_t B, Ck, Cv, H, W, Tm, N, M, r, Hc, Wc, Nc, K;  // Tm: memory frames

  __device__ __forceinline__ int64_t rr() const { return r * r; }
  // Fine query li (0 <= li < r*r, row-major in the cell) of coarse cell `cell`.
  __device__ __forceinline__ int64_t fine_query(int64_t cell, int64_t li) const {
    return ((cell / Wc) * r + li / r) * W + (cell % Wc) * r + li % r;
  }
  // Fine pixel li of coarse memory index ci = t*Nc + my*Wc + mx.
  __device__ __forceinline__ int64_t fine_memory(int64_t ci, int64_t li) const {
    const int64_t t = ci / Nc, rem = ci % Nc;
    return t * N + ((rem / Wc) * r + li / r) * W + (rem % Wc) * r + li % r;
  }
  // Candidate kc (0 <= kc < K*r*r) of cell `cell` of batch item b.
  // An index outside [0, Tm*Nc) (rejected by the Python front) becomes padding, never a wild read.
  __device__ __forceinline__ int64_t candidate(int64_t b, int64_t cell, int64_t kc) const {
    const int64_t ci = idx[(b * Nc + cell) * K + kc / rr()];
    return ci >= 0 && ci < Tm * Nc ? fine_memory(ci, kc % rr()) : -1;
  }
};

// Columns = the candidates of one cell; no bias.
template <typename Cfg, typename T> struct TopkCandidateCols {
  const TopkParams<T>& p;
  int64_t b, cell;
  __device__ __forceinline__ void cols(typename Cfg::Smem& sm, int64_t k0, int64_t k1) const {
    for (int j = threadIdx.x; j < Cfg::CB; j += Cfg::NT)
      sm.col[j] = k0 + j < k1 ? p.candidate(b, cell, k0 + j) : -1;
  }
  __device__ __forceinline__ acc_of<T> bias(int, int) const { return acc_of<T>(0); }
};

// Columns = the fine queries of one cell; no bias.
template <typename Cfg, typename T> struct TopkCellQueryCols {
  const TopkParams<T>& p;
  int64_t cell;
  __device__ __forceinline__ void cols(typename Cfg::Smem& sm, int64_t k0, int64_t k1) const {
    for (int j = threadIdx.x; j < Cfg::CB; j += Cfg::NT) sm.col[j] = k0 + j < k1 ? p.fine_query(cell, k0 + j) : -1;
  }
  __device__ __forceinline__ acc_of<T> bias(int, int) const { return acc_of<T>(0); }
};

// Columns = the fine queries of every cell listed in ref_cell[0, nref), r*r per entry.
template <typename Cfg, typename T> struct TopkReferringQueryCols {
  const TopkParams<T>& p;
  const int64_t* ref_cell;
  __device__ __forceinline__ void cols(typename Cfg::Smem& sm, int64_t k0, int64_t k1) const {
    for (int j = threadIdx.x; j < Cfg::CB; j += Cfg::NT) {
      const int64_t k = k0 + j;
      sm.col[j] = k < k1 ? p.fine_query(ref_cell[k / p.rr()], k % p.rr()) : -1;
    }
  }
  __device__ __forceinline__ acc_of<T> bias(int, int) const { return acc_of<T>(0); }
};

template <typename T> __host__ __device__ inline Mat<T> topk_q(const TopkParams<T>& p, int64_t b) {
  return channels_first(p.q + b * p.Ck * p.N, p.Ck, p.N);
}
template <typename T> __host__ __device__ inline Mat<T> topk_k(const TopkParams<T>& p, int64_t b) {
  return channels_last(p.k + b * p.M * p.Ck, p.Ck);
}
template <typename T> __host__ __device__ inline Mat<T> topk_v(const TopkParams<T>& p, int64_t b) {
  return channels_last(p.v + b * p.M * p.Cv, p.Cv);
}

// Rows = fine queries qc*RB.. of `cell`.
template <typename Cfg, typename T>
__device__ __forceinline__ void cell_query_rows(typename Cfg::Smem& sm, const TopkParams<T>& p, int64_t cell, int64_t qc) {
  for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) {
    const int64_t li = qc * Cfg::RB + i;
    sm.row[i] = li < p.rr() ? p.fine_query(cell, li) : -1;
  }
}

template <typename Cfg, typename T>
__global__ void __launch_bounds__(Cfg::NT, 1)
    topk_fwd_kernel(TopkParams<T> p, int64_t nqc, int64_t cvb, T* out, acc_of<T>* lse) {
  using A = acc_of<T>;
  HMMN_SHARED(typename Cfg::Smem, sm, );
  HMMN_SHARED(A, m, [Cfg::RB]);
  HMMN_SHARED(A, l, [Cfg::RB]);
  HMMN_SHARED(A, alpha, [Cfg::RB]);
  HMMN_DYNAMIC_SMEM(dyn_smem);
  A* O = reinterpret_cast<A*>(dyn_smem);

  const int64_t qc = blockIdx.x % nqc, bc = blockIdx.x / nqc, b = bc / p.Nc, cell = bc % p.Nc;
  const int64_t v0 = blockIdx.y * cvb, v1 = imin(v0 + cvb, p.Cv), ldo = cvb + 1;
  cell_query_rows<Cfg>(sm, p, cell, qc);
  const TopkCandidateCols<Cfg, T> prob{p, b, cell};
  attend_forward<Cfg>(prob, sm, topk_q(p, b), topk_k(p, b), topk_v(p, b), p.scale, 0, p.K * p.rr(), v0, v1, O, ldo,
                      m, l, alpha);
  for (int64_t e = threadIdx.x; e < (v1 - v0) * Cfg::RB; e += Cfg::NT) {
    const int i = int(e % Cfg::RB);
    const int64_t v = e / Cfg::RB, q = sm.row[i];
    if (q >= 0) store(out + (b * p.Cv + v0 + v) * p.N + q, l[i] > A(0) ? O[i * ldo + v] / l[i] : A(0));
  }
  if (blockIdx.y == 0) {
    for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) {
      const int64_t q = sm.row[i];
      if (q >= 0) lse[b * p.N + q] = l[i] > A(0) ? m[i] + acc_log(l[i]) : neg_inf<A>();
    }
  }
}

template <typename Cfg, typename T>
__global__ void __launch_bounds__(Cfg::NT, 1)
    topk_dq_kernel(TopkParams<T> p, const T* dout, const acc_of<T>* lse, const acc_of<T>* D, T* dq, int64_t nqc,
                   int64_t ckb) {
  using A = acc_of<T>;
  HMMN_SHARED(typename Cfg::Smem, sm, );
  HMMN_SHARED(A, lse_r, [Cfg::RB]);
  HMMN_SHARED(A, D_r, [Cfg::RB]);
  HMMN_DYNAMIC_SMEM(dyn_smem);
  A* acc = reinterpret_cast<A*>(dyn_smem);

  const int64_t qc = blockIdx.x % nqc, bc = blockIdx.x / nqc, b = bc / p.Nc, cell = bc % p.Nc;
  const int64_t c0 = blockIdx.y * ckb, c1 = imin(c0 + ckb, p.Ck), ld = ckb + 1;
  cell_query_rows<Cfg>(sm, p, cell, qc);
  const TopkCandidateCols<Cfg, T> prob{p, b, cell};
  attend_backward_rows<Cfg>(prob, sm, topk_q(p, b), topk_k(p, b), topk_v(p, b),
                            channels_first(dout + b * p.Cv * p.N, p.Cv, p.N), lse + b * p.N, D + b * p.N, p.scale, 0,
                            p.K * p.rr(), c0, c1, acc, ld, lse_r, D_r);
  for (int64_t e = threadIdx.x; e < (c1 - c0) * Cfg::RB; e += Cfg::NT) {
    const int i = int(e % Cfg::RB);
    const int64_t c = e / Cfg::RB, q = sm.row[i];
    if (q >= 0) store(dq + (b * p.Ck + c0 + c) * p.N + q, p.scale * acc[i * ld + c]);
  }
}

__device__ __forceinline__ void atomic_add(float* p, float x) { atomicAdd(p, x); }
__device__ __forceinline__ void atomic_add(double* p, double x) { atomicAdd(p, x); }

// Atomic dK/dV: gk (B, M, Ck) and gv (B, M, Cv) acc, channels-last, zero-initialised.
template <typename Cfg, typename T>
__global__ void __launch_bounds__(Cfg::NT, 1)
    topk_dkdv_atomic_kernel(TopkParams<T> p, const T* dout, const acc_of<T>* lse, const acc_of<T>* D, acc_of<T>* gk,
                            acc_of<T>* gv, int64_t nrt, int64_t ob, int64_t ncv) {
  using A = acc_of<T>;
  HMMN_SHARED(typename Cfg::Smem, sm, );
  HMMN_SHARED(A, lse_c, [Cfg::CB]);
  HMMN_SHARED(A, D_c, [Cfg::CB]);

  const int64_t rt = blockIdx.x % nrt, bc = blockIdx.x / nrt, b = bc / p.Nc, cell = bc % p.Nc;
  const bool want_dv = blockIdx.y < ncv;
  const int64_t c0 = (want_dv ? blockIdx.y : blockIdx.y - ncv) * ob;
  const int64_t C = want_dv ? p.Cv : p.Ck, c1 = imin(c0 + ob, C);
  for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) {
    const int64_t kc = rt * Cfg::RB + i;
    sm.row[i] = kc < p.K * p.rr() ? p.candidate(b, cell, kc) : -1;
  }
  A* g = (want_dv ? gv : gk) + b * p.M * C;
  const A mult = want_dv ? A(1) : p.scale;
  const TopkCellQueryCols<Cfg, T> prob{p, cell};
  attend_backward_cols<Cfg>(prob, sm, topk_q(p, b), topk_k(p, b), topk_v(p, b),
                            channels_first(dout + b * p.Cv * p.N, p.Cv, p.N), lse + b * p.N, D + b * p.N, p.scale, 0,
                            p.rr(), want_dv, c0, c1, lse_c, D_c, [&](int i, int64_t c, A x) {
                              const int64_t pos = sm.row[i];
                              if (pos >= 0) atomic_add(g + pos * C + c0 + c, mult * x);
                            });
}

// Deterministic dK/dV: block per (coarse memory cell m of batch b, chunk of its fine pixels);
// ref_cell[ref_off[b*T*Nc + m] .. ref_off[b*T*Nc + m + 1]) are the query cells listing m, in
// ascending (cell, slot) order. Writes dk/dv (B, C, M) channels-first in the input dtype.
template <typename Cfg, typename T>
__global__ void __launch_bounds__(Cfg::NT, 1)
    topk_dkdv_det_kernel(TopkParams<T> p, const T* dout, const acc_of<T>* lse, const acc_of<T>* D,
                         const int64_t* ref_off, const int64_t* ref_cell, T* dk, T* dv, int64_t nrc, int64_t ob,
                         int64_t ncv) {
  using A = acc_of<T>;
  HMMN_SHARED(typename Cfg::Smem, sm, );
  HMMN_SHARED(A, lse_c, [Cfg::CB]);
  HMMN_SHARED(A, D_c, [Cfg::CB]);
  HMMN_DYNAMIC_SMEM(dyn_smem);
  A* acc = reinterpret_cast<A*>(dyn_smem);

  const int64_t rc = blockIdx.x % nrc, bm = blockIdx.x / nrc, b = bm / (p.Tm * p.Nc), mcell = bm % (p.Tm * p.Nc);
  const bool want_dv = blockIdx.y < ncv;
  const int64_t c0 = (want_dv ? blockIdx.y : blockIdx.y - ncv) * ob;
  const int64_t c1 = imin(c0 + ob, want_dv ? p.Cv : p.Ck), ld = ob + 1;
  for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) {
    const int64_t li = rc * Cfg::RB + i;
    sm.row[i] = li < p.rr() ? p.fine_memory(mcell, li) : -1;
  }
  for (int64_t e = threadIdx.x; e < Cfg::RB * ld; e += Cfg::NT) acc[e] = A(0);
  const int64_t r0 = ref_off[bm], r1 = ref_off[bm + 1];
  const TopkReferringQueryCols<Cfg, T> prob{p, ref_cell + r0};
  attend_backward_cols<Cfg>(prob, sm, topk_q(p, b), topk_k(p, b), topk_v(p, b),
                            channels_first(dout + b * p.Cv * p.N, p.Cv, p.N), lse + b * p.N, D + b * p.N, p.scale, 0,
                            (r1 - r0) * p.rr(), want_dv, c0, c1, lse_c, D_c,
                            [&](int i, int64_t c, A x) { acc[i * ld + c] += x; });
  for (int64_t e = threadIdx.x; e < (c1 - c0) * Cfg::RB; e += Cfg::NT) {
    const int i = int(e % Cfg::RB);
    const int64_t c = e / Cfg::RB, pos = sm.row[i];
    if (pos < 0) continue;
    if (want_dv) store(dv + (b * p.Cv + c0 + c) * p.M + pos, acc[i * ld + c]);
    else store(dk + (b * p.Ck + c0 + c) * p.M + pos, p.scale * acc[i * ld + c]);
  }
}

// ------------------------------------------------------------------------------------------
// Launchers (the glue guarantees Ck, Cv, r, K >= 1).

template <typename T>
cudaError_t topk_forward(const TopkParams<T>& p, T* out, acc_of<T>* lse, int64_t smem_optin, cudaStream_t stream) {
  using Cfg = typename Tiles<acc_of<T>>::Narrow;
  if (p.B * p.Nc == 0) return cudaSuccess;
  const auto kernel = topk_fwd_kernel<Cfg, T>;
  const int64_t cvb = accumulator_chunk<Cfg>(p.Cv, dynamic_smem_budget(kernel, smem_optin));
  const int64_t nqc = ceil_div(p.r * p.r, Cfg::RB);
  cudaError_t err = allow_dynamic_smem(kernel, accumulator_bytes<Cfg>(cvb));
  if (err != cudaSuccess) return err;
  HMMN_LAUNCH(kernel, dim3(unsigned(p.B * p.Nc * nqc), unsigned(ceil_div(p.Cv, cvb))), Cfg::NT,
              size_t(accumulator_bytes<Cfg>(cvb)), stream, p, nqc, cvb, out, lse);
  return cudaGetLastError();
}

// D: B*N acc workspace (filled here). dq: (B, Ck, N).
template <typename T>
cudaError_t topk_backward_dq(const TopkParams<T>& p, const T* dout, const T* out, const acc_of<T>* lse, acc_of<T>* D,
                             T* dq, int64_t smem_optin, cudaStream_t stream) {
  using Cfg = typename Tiles<acc_of<T>>::Narrow;
  if (p.B * p.Nc == 0) return cudaSuccess;
  launch_softmax_bwd_delta(dout, out, D, p.B, p.Cv, p.N, stream);
  const auto kernel = topk_dq_kernel<Cfg, T>;
  const int64_t ckb = accumulator_chunk<Cfg>(p.Ck, dynamic_smem_budget(kernel, smem_optin));
  const int64_t nqc = ceil_div(p.r * p.r, Cfg::RB);
  cudaError_t err = allow_dynamic_smem(kernel, accumulator_bytes<Cfg>(ckb));
  if (err != cudaSuccess) return err;
  HMMN_LAUNCH(kernel, dim3(unsigned(p.B * p.Nc * nqc), unsigned(ceil_div(p.Ck, ckb))), Cfg::NT,
              size_t(accumulator_bytes<Cfg>(ckb)), stream, p, dout, lse, D, dq, nqc, ckb);
  return cudaGetLastError();
}

// After topk_backward_dq (uses its D). gk (B, M, Ck), gv (B, M, Cv): acc, zeroed by the caller.
template <typename T>
cudaError_t topk_backward_dkdv_atomic(const TopkParams<T>& p, const T* dout, const acc_of<T>* lse, const acc_of<T>* D,
                                      acc_of<T>* gk, acc_of<T>* gv, cudaStream_t stream) {
  using Cfg = typename Tiles<acc_of<T>>::Tall;
  if (p.B * p.Nc == 0) return cudaSuccess;
  const int64_t ob = 4 * Cfg::VC;  // no block accumulator: results go straight to the atomics
  const int64_t nrt = ceil_div(p.K * p.r * p.r, Cfg::RB), ncv = ceil_div(p.Cv, ob), nck = ceil_div(p.Ck, ob);
  const auto kernel = topk_dkdv_atomic_kernel<Cfg, T>;
  HMMN_LAUNCH(kernel, dim3(unsigned(p.B * p.Nc * nrt), unsigned(ncv + nck)), Cfg::NT, 0, stream, p, dout, lse, D, gk,
              gv, nrt, ob, ncv);
  return cudaGetLastError();
}

// After topk_backward_dq. ref_off (B*T*Nc + 1), ref_cell (B*Nc*K): see topk_dkdv_det_kernel.
template <typename T>
cudaError_t topk_backward_dkdv_deterministic(const TopkParams<T>& p, const T* dout, const acc_of<T>* lse,
                                             const acc_of<T>* D, const int64_t* ref_off, const int64_t* ref_cell,
                                             T* dk, T* dv, int64_t smem_optin, cudaStream_t stream) {
  using Cfg = typename Tiles<acc_of<T>>::Narrow;
  if (p.B * p.M == 0) return cudaSuccess;
  const auto kernel = topk_dkdv_det_kernel<Cfg, T>;
  const int64_t ob = accumulator_chunk<Cfg>(imax(p.Ck, p.Cv), dynamic_smem_budget(kernel, smem_optin));
  const int64_t nrc = ceil_div(p.r * p.r, Cfg::RB), ncv = ceil_div(p.Cv, ob), nck = ceil_div(p.Ck, ob);
  cudaError_t err = allow_dynamic_smem(kernel, accumulator_bytes<Cfg>(ob));
  if (err != cudaSuccess) return err;
  HMMN_LAUNCH(kernel, dim3(unsigned(p.B * p.Tm * p.Nc * nrc), unsigned(ncv + nck)), Cfg::NT,
              size_t(accumulator_bytes<Cfg>(ob)), stream, p, dout, lse, D, ref_off, ref_cell, dk, dv, nrc, ob, ncv);
  return cudaGetLastError();
}

}  // namespace hmmn
