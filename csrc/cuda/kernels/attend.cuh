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
template <typename Cfg, typename Prob, typename QOp, typename KOp, typename VOp, typename A = typename Cfg::acc_t>
__device__ __forceinline__ void attend_forward(const Prob& prob, typename Cfg::Smem& sm, const QOp& Q, const KOp& K,
                               const VOp& V, A scale, int64_t k0, int64_t k1, int64_t v0, int64_t v1,
                               A* O, int64_t ldo, A* m, A* l, A* alpha) {
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
        sm.s[i][j] = ok ? saturate(r[a][b] * scale + prob.bias(i, j)) : neg_inf<A>();
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
// acc[i][c - c0] += sum_p dS[i, p] * G(c, p) for c in [c0, c1) over columns [k0, k1), G = K
// (the overload below) or a view of it. The caller multiplies by scale when writing.
template <typename Cfg, typename Prob, typename QOp, typename KOp, typename VOp, typename GOp,
          typename A = typename Cfg::acc_t>
__device__ __forceinline__ void attend_backward_rows(const Prob& prob, typename Cfg::Smem& sm, const QOp& Q, const KOp& K,
                                     const VOp& V, const VOp& dO, const A* lse, const A* D,
                                     A scale, int64_t k0, int64_t k1, int64_t c0, int64_t c1,
                                     A* acc, int64_t ldacc, A* lse_r, A* D_r, const GOp& G) {
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
          const A p = acc_exp(saturate(s[a][b] * scale + prob.bias(i, j)) - lse_r[i]);
          ds = p * (dp[a][b] - D_r[i]);
        }
        sm.s[i][j] = ds;
      }
    Cfg::accum(G, c0, c1, sm, [&](int i, int64_t c, A x) { acc[i * ldacc + c] += x; });
  }
  __syncthreads();
}

// Same, accumulating dS against K itself (G = K).
template <typename Cfg, typename Prob, typename QOp, typename KOp, typename VOp, typename A = typename Cfg::acc_t>
__device__ __forceinline__ void attend_backward_rows(const Prob& prob, typename Cfg::Smem& sm, const QOp& Q, const KOp& K,
                                     const VOp& V, const VOp& dO, const A* lse, const A* D, A scale, int64_t k0,
                                     int64_t k1, int64_t c0, int64_t c1, A* acc, int64_t ldacc, A* lse_r, A* D_r) {
  attend_backward_rows<Cfg>(prob, sm, Q, K, V, dO, lse, D, scale, k0, k1, c0, c1, acc, ldacc, lse_r, D_r, K);
}

// dK/dV-side backward over one block's rows (memory positions, sm.row set) against a column
// stream of queries [k0, k1) (prob.cols fills query ids; lse and D batch-offset):
//   want_dv: epi(i, v, sum_q P[i, q] dO(v, q))          for v in [c0, c1)
//   else:    epi(i, c, sum_q dS[i, q] G(c, q))          for c in [c0, c1)   (caller scales)
// with G = Q (the overload below) or a view of it.
// epi is called once per tile and (i, channel): it adds into a block accumulator or atomically
// into global memory.
template <typename Cfg, typename Prob, typename QOp, typename KOp, typename VOp, typename DOp, typename GOp,
          typename Epi, typename A = typename Cfg::acc_t>
__device__ __forceinline__ void attend_backward_cols(const Prob& prob, typename Cfg::Smem& sm, const QOp& Q, const KOp& K,
                                     const VOp& V, const DOp& dO, const A* lse, const A* D,
                                     A scale, int64_t k0, int64_t k1, bool want_dv, int64_t c0, int64_t c1,
                                     A* lse_c, A* D_c, const GOp& G, Epi&& epi) {
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
        s[a][b] = ok ? acc_exp(saturate(s[a][b] * scale + prob.bias(i, j)) - lse_c[j]) : A(0);
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
      Cfg::accum(G, c0, c1, sm, epi);
    }
  }
  __syncthreads();
}

// Same, accumulating dS against Q itself (G = Q).
template <typename Cfg, typename Prob, typename QOp, typename KOp, typename VOp, typename DOp, typename Epi,
          typename A = typename Cfg::acc_t>
__device__ __forceinline__ void attend_backward_cols(const Prob& prob, typename Cfg::Smem& sm, const QOp& Q, const KOp& K,
                                     const VOp& V, const DOp& dO, const A* lse, const A* D, A scale, int64_t k0,
                                     int64_t k1, bool want_dv, int64_t c0, int64_t c1, A* lse_c, A* D_c, Epi&& epi) {
  attend_backward_cols<Cfg>(prob, sm, Q, K, V, dO, lse, D, scale, k0, k1, want_dv, c0, c1, lse_c, D_c, Q, epi);
}

}  // namespace hmmn
