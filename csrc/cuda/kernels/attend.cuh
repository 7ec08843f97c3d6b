// Flash-style attention block routines shared by kernel_guided_read and topk_guided_read.
// A "problem" tells which columns a tile holds and the additive logit bias:
//
//   struct Prob {
//     // Fill sm.col[j] (position id, -1 for padding) and any per-column data the bias needs,
//     // for stream entries k0 + j (j < CB; entries >= k1 are padding). Called by all threads.
//     __device__ void cols(Smem& sm, int64_t k0, int64_t k1) const;
//     // Bias added to scale * <row, col> for tile entry (i, j).
//     __device__ A bias(int i, int j) const;
//   };
//
// Forward (rows = queries): online softmax over the column stream, O accumulated in shared
// memory per block (RB x channel chunk), probabilities never leave the block.
// Backward (flash style): P is recomputed from lse; dS = P * (<dO, V> - D), D = <dO, O>.
#pragma once

#include "tile.cuh"

namespace hmmn {

// D[n] = sum_c dO[c, n] * O[c, n] over (B, C, N) channels-first tensors; D is (B, N) acc.
template <typename T>
__global__ void softmax_bwd_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out, acc_of<T>* __restrict__ D,
                                         int64_t B, int64_t C, int64_t N) {
  using A = acc_of<T>;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < B * N; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / N, n = e % N;
    const T* x = dout + b * C * N + n;
    const T* y = out + b * C * N + n;
    A acc = A(0);
    for (int64_t c = 0; c < C; ++c) acc += to_acc(x[c * N]) * to_acc(y[c * N]);
    D[e] = acc;
  }
}

template <typename T>
inline void launch_softmax_bwd_delta(const T* dout, const T* out, acc_of<T>* D, int64_t B, int64_t C, int64_t N,
                                     cudaStream_t stream) {
  if (B * N == 0) return;
  const int threads = 256;
  const int64_t blocks = ceil_div(B * N, threads) < 65535 ? ceil_div(B * N, threads) : 65535;
  HMMN_LAUNCH(softmax_bwd_delta_kernel<T>, unsigned(blocks), threads, 0, stream, dout, out, D, B, C, N);
}

// Forward over one block's rows (sm.row already set): streams columns [k0, k1) and leaves
// unnormalised O (ldo-strided, channels [v0, v1)) and the running max m / sum l per row.
template <typename Cfg, typename T, typename Prob>
__device__ __forceinline__ void attend_forward(const Prob& prob, typename Cfg::Smem& sm, const Mat<T>& Q, const Mat<T>& K,
                               const Mat<T>& V, acc_of<T> scale, int64_t k0, int64_t k1, int64_t v0, int64_t v1,
                               acc_of<T>* O, int64_t ldo, acc_of<T>* m, acc_of<T>* l, acc_of<T>* alpha) {
  using A = acc_of<T>;
  for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) {
    m[i] = neg_inf<A>();
    l[i] = A(0);
    alpha[i] = A(1);
  }
  for (int64_t e = threadIdx.x; e < Cfg::RB * ldo; e += Cfg::NT) O[e] = A(0);
  for (int64_t t0 = k0; t0 < k1; t0 += Cfg::CB) {
    __syncthreads();  // the previous tile is done with col ids, per-column data and s
    prob.cols(sm, t0, k1);
    __syncthreads();
    A r[Cfg::RI][Cfg::RJ];
    Cfg::dot(r, Q, K, sm);
#pragma unroll
    for (int a = 0; a < Cfg::RI; ++a)
#pragma unroll
      for (int b = 0; b < Cfg::RJ; ++b) {
        const int i = Cfg::ty() + Cfg::TY * a, j = Cfg::tx() + Cfg::TX * b;
        const bool ok = sm.row[i] >= 0 && sm.col[j] >= 0;
        sm.s[i][j] = ok ? r[a][b] * scale + prob.bias(i, j) : neg_inf<A>();
      }
    __syncthreads();
    Cfg::online_softmax(sm, m, l, alpha);
    Cfg::accum(V, v0, v1, sm, [&](int i, int64_t v, A x) {
      A& o = O[i * ldo + v];
      o = o * alpha[i] + x;
    });
  }
  __syncthreads();  // O, m, l complete for the caller's epilogue
}

// dQ-side backward over one block's rows (queries, sm.row set; lse and D batch-offset):
// acc[i][c - c0] += sum_p dS[i, p] * K(c, p) for c in [c0, c1) over columns [k0, k1).
// The caller multiplies by scale when writing.
template <typename Cfg, typename T, typename Prob>
__device__ __forceinline__ void attend_backward_rows(const Prob& prob, typename Cfg::Smem& sm, const Mat<T>& Q, const Mat<T>& K,
                                     const Mat<T>& V, const Mat<T>& dO, const acc_of<T>* lse, const acc_of<T>* D,
                                     acc_of<T> scale, int64_t k0, int64_t k1, int64_t c0, int64_t c1,
                                     acc_of<T>* acc, int64_t ldacc, acc_of<T>* lse_r, acc_of<T>* D_r) {
  using A = acc_of<T>;
  __syncthreads();  // sm.row complete
  for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) {
    const int64_t q = sm.row[i];
    lse_r[i] = q >= 0 ? lse[q] : neg_inf<A>();
    D_r[i] = q >= 0 ? D[q] : A(0);
  }
  for (int64_t e = threadIdx.x; e < Cfg::RB * ldacc; e += Cfg::NT) acc[e] = A(0);
  for (int64_t t0 = k0; t0 < k1; t0 += Cfg::CB) {
    __syncthreads();
    prob.cols(sm, t0, k1);
    __syncthreads();
    A s[Cfg::RI][Cfg::RJ], dp[Cfg::RI][Cfg::RJ];
    Cfg::dot(s, Q, K, sm);
    Cfg::dot(dp, dO, V, sm);
#pragma unroll
    for (int a = 0; a < Cfg::RI; ++a)
#pragma unroll
      for (int b = 0; b < Cfg::RJ; ++b) {
        const int i = Cfg::ty() + Cfg::TY * a, j = Cfg::tx() + Cfg::TX * b;
        A ds = A(0);
        if (sm.row[i] >= 0 && sm.col[j] >= 0 && lse_r[i] != neg_inf<A>()) {
          const A p = acc_exp(s[a][b] * scale + prob.bias(i, j) - lse_r[i]);
          ds = p * (dp[a][b] - D_r[i]);
        }
        sm.s[i][j] = ds;
      }
    Cfg::accum(K, c0, c1, sm, [&](int i, int64_t c, A x) { acc[i * ldacc + c] += x; });
  }
  __syncthreads();
}

// dK/dV-side backward over one block's rows (memory positions, sm.row set) against a column
// stream of queries [k0, k1) (prob.cols fills query ids; lse and D batch-offset):
//   want_dv: epi(i, v, sum_q P[i, q] dO(v, q))          for v in [c0, c1)
//   else:    epi(i, c, sum_q dS[i, q] Q(c, q))          for c in [c0, c1)   (caller scales)
// epi is called once per tile and (i, channel): it adds into a block accumulator or atomically
// into global memory.
template <typename Cfg, typename T, typename Prob, typename Epi>
__device__ __forceinline__ void attend_backward_cols(const Prob& prob, typename Cfg::Smem& sm, const Mat<T>& Q, const Mat<T>& K,
                                     const Mat<T>& V, const Mat<T>& dO, const acc_of<T>* lse, const acc_of<T>* D,
                                     acc_of<T> scale, int64_t k0, int64_t k1, bool want_dv, int64_t c0, int64_t c1,
                                     acc_of<T>* lse_c, acc_of<T>* D_c, Epi&& epi) {
  using A = acc_of<T>;
  for (int64_t t0 = k0; t0 < k1; t0 += Cfg::CB) {
    __syncthreads();
    prob.cols(sm, t0, k1);
    __syncthreads();
    for (int j = threadIdx.x; j < Cfg::CB; j += Cfg::NT) {
      const int64_t q = sm.col[j];
      lse_c[j] = q >= 0 ? lse[q] : neg_inf<A>();
      D_c[j] = q >= 0 ? D[q] : A(0);
    }
    __syncthreads();
    A s[Cfg::RI][Cfg::RJ];
    Cfg::dot(s, K, Q, sm);
#pragma unroll
    for (int a = 0; a < Cfg::RI; ++a)
#pragma unroll
      for (int b = 0; b < Cfg::RJ; ++b) {
        const int i = Cfg::ty() + Cfg::TY * a, j = Cfg::tx() + Cfg::TX * b;
        const bool ok = sm.row[i] >= 0 && sm.col[j] >= 0 && lse_c[j] != neg_inf<A>();
        s[a][b] = ok ? acc_exp(s[a][b] * scale + prob.bias(i, j) - lse_c[j]) : A(0);
      }
    if (want_dv) {
#pragma unroll
      for (int a = 0; a < Cfg::RI; ++a)
#pragma unroll
        for (int b = 0; b < Cfg::RJ; ++b) sm.s[Cfg::ty() + Cfg::TY * a][Cfg::tx() + Cfg::TX * b] = s[a][b];
      Cfg::accum(dO, c0, c1, sm, epi);
    } else {
      A dp[Cfg::RI][Cfg::RJ];
      Cfg::dot(dp, V, dO, sm);
#pragma unroll
      for (int a = 0; a < Cfg::RI; ++a)
#pragma unroll
        for (int b = 0; b < Cfg::RJ; ++b) {
          const int j = Cfg::tx() + Cfg::TX * b;
          sm.s[Cfg::ty() + Cfg::TY * a][j] = s[a][b] * (dp[a][b] - D_c[j]);
        }
      Cfg::accum(Q, c0, c1, sm, epi);
    }
  }
  __syncthreads();
}

}  // namespace hmmn
