// kernel_guided_read (docs/ops.md section 1, docs/internals.md): forward with split-memory log-sum-exp combine,
// streaming top-k, and the flash-style backward. Torch-free; the glue allocates and checks.
//
// Layouts (all contiguous): q (B, Ck, N), k (B, Ck, M), v (B, Cv, M), centers (B, M) int64,
// sigma (B, T) acc, N = H*W, M = T*N. Outputs: out (B, Cv, N), lse (B, N) acc,
// topk indices (B, N, topk) int64.
#pragma once

#include "attend.cuh"

namespace hmmn {

template <typename T> struct KgrParams {
  const T* q;
  const T* k;
  const T* v;
  const int64_t* centers;       // nullptr: no Gaussian
  const acc_of<T>* sigma;       // nullptr exactly when centers is
  acc_of<T> scale;
  int64_t B, Ck, Cv, H, W, Tm, N, M;  // Tm: memory frames
};

// Rows = queries q0.., with their pixel coordinates for the bias.
template <typename Cfg>
__device__ __forceinline__ void query_rows(typename Cfg::Smem& sm, int64_t q0, int64_t N, int64_t W, int* qy, int* qx) {
  for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) {
    const int64_t q = q0 + i;
    const bool ok = q < N;
    sm.row[i] = ok ? q : -1;
    qy[i] = ok ? int(q / W) : 0;
    qx[i] = ok ? int(q % W) : 0;
  }
}

// Columns = memory positions k0.. (rows are queries): bias from each column's centre.
template <typename Cfg, typename T> struct KgrMemoryCols {
  using A = acc_of<T>;
  const int64_t* centers;
  const A* sigma;
  int64_t b, M, N, W, Tm;
  const int* qy;
  const int* qx;
  int* cy;
  int* cx;
  A* g;
  __device__ __forceinline__ void cols(typename Cfg::Smem& sm, int64_t k0, int64_t k1) const {
    for (int j = threadIdx.x; j < Cfg::CB; j += Cfg::NT) {
      const int64_t pos = k0 + j < k1 ? k0 + j : -1;
      sm.col[j] = pos;
      load_center(centers, sigma, b, pos, M, N, W, Tm, cy[j], cx[j], g[j]);
    }
  }
  __device__ __forceinline__ A bias(int i, int j) const { return gauss_bias(qy[i], qx[i], cy[j], cx[j], g[j]); }
};

// Columns = queries k0.. (rows are memory positions with their centres).
template <typename Cfg, typename T> struct KgrQueryCols {
  using A = acc_of<T>;
  int64_t W;
  const int* cy;
  const int* cx;
  const A* g;
  int* qy;
  int* qx;
  __device__ __forceinline__ void cols(typename Cfg::Smem& sm, int64_t k0, int64_t k1) const {
    for (int j = threadIdx.x; j < Cfg::CB; j += Cfg::NT) {
      const int64_t q = k0 + j < k1 ? k0 + j : -1;
      sm.col[j] = q;
      qy[j] = q >= 0 ? int(q / W) : 0;
      qx[j] = q >= 0 ? int(q % W) : 0;
    }
  }
  __device__ __forceinline__ A bias(int i, int j) const { return gauss_bias(qy[j], qx[j], cy[i], cx[i], g[i]); }
};

// ------------------------------------------------------------------------------------------
// Forward. Block (b, query tile, memory split, value chunk). With one split the block writes
// out and lse; with several it writes its normalised partial output and partial lse, and
// kgr_combine_kernel merges them: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s.

struct KgrFwdPlan {
  int64_t nqt;       // query tiles per batch item
  int64_t cvb, ncv;  // value channels per block, value chunks
  int64_t tps;       // memory tiles per split
  int64_t nsplit;
  int64_t dyn_smem;  // bytes of the O accumulator
  int64_t workspace; // acc elements: nsplit * B * (Cv + 1) * N when nsplit > 1, else 0
};

// Epilogue of a split forward block (rows = queries sm.row of batch item b, value channels
// [v0, v1)): the normalised output, or with part_o its split's partial; the lse (first value
// chunk only), or with part_lse its split's partial. Consecutive threads take consecutive
// queries: coalesced stores.
template <typename Cfg, typename T, typename A>
__device__ __forceinline__ void split_forward_store(const typename Cfg::Smem& sm, const A* O, int64_t ldo, const A* m,
                                                    const A* l, int64_t b, int64_t v0, int64_t v1, int64_t split,
                                                    bool first_chunk, int64_t B, int64_t Cv, int64_t N, T* out, A* lse,
                                                    A* part_o, A* part_lse) {
  for (int64_t e = threadIdx.x; e < (v1 - v0) * Cfg::RB; e += Cfg::NT) {
    const int i = int(e % Cfg::RB);
    const int64_t v = e / Cfg::RB, q = sm.row[i];
    if (q < 0) continue;
    const A val = l[i] > A(0) ? O[i * ldo + v] / l[i] : A(0);
    const int64_t o = (b * Cv + v0 + v) * N + q;
    if (part_o != nullptr) part_o[split * B * Cv * N + o] = val;
    else store(out + o, val);
  }
  if (first_chunk) {
    for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) {
      const int64_t q = sm.row[i];
      if (q < 0) continue;
      const A L = l[i] > A(0) ? m[i] + acc_log(l[i]) : neg_inf<A>();
      if (part_lse != nullptr) part_lse[(split * B + b) * N + q] = L;
      else lse[b * N + q] = L;
    }
  }
}

template <typename Cfg, typename T>
__global__ void __launch_bounds__(Cfg::NT, 1)
    kgr_fwd_kernel(KgrParams<T> p, KgrFwdPlan plan, T* out, acc_of<T>* lse, acc_of<T>* part_o, acc_of<T>* part_lse) {
  using A = acc_of<T>;
  HMMN_SHARED(typename Cfg::Smem, sm, );
  HMMN_SHARED(A, m, [Cfg::RB]);
  HMMN_SHARED(A, l, [Cfg::RB]);
  HMMN_SHARED(A, alpha, [Cfg::RB]);
  HMMN_SHARED(A, g, [Cfg::CB]);
  HMMN_SHARED(int, qy, [Cfg::RB]);
  HMMN_SHARED(int, qx, [Cfg::RB]);
  HMMN_SHARED(int, cy, [Cfg::CB]);
  HMMN_SHARED(int, cx, [Cfg::CB]);
  HMMN_DYNAMIC_SMEM(dyn_smem);
  A* O = reinterpret_cast<A*>(dyn_smem);

  const int64_t b = blockIdx.x / plan.nqt, q0 = (blockIdx.x % plan.nqt) * Cfg::RB;
  const int64_t split = blockIdx.y / plan.ncv, cvc = blockIdx.y % plan.ncv;
  const int64_t v0 = cvc * plan.cvb, v1 = imin(v0 + plan.cvb, p.Cv), ldo = plan.cvb + 1;
  const int64_t k0 = split * plan.tps * Cfg::CB, k1 = imin(k0 + plan.tps * Cfg::CB, p.M);
  const auto Q = channels_first(p.q + b * p.Ck * p.N, p.Ck, p.N);
  const auto K = channels_first(p.k + b * p.Ck * p.M, p.Ck, p.M);
  const auto V = channels_first(p.v + b * p.Cv * p.M, p.Cv, p.M);

  query_rows<Cfg>(sm, q0, p.N, p.W, qy, qx);
  const KgrMemoryCols<Cfg, T> prob{p.centers, p.sigma, b, p.M, p.N, p.W, p.Tm, qy, qx, cy, cx, g};
  attend_forward<Cfg>(prob, sm, Q, K, V, p.scale, k0, k1, v0, v1, O, ldo, m, l, alpha);

  split_forward_store<Cfg>(sm, O, ldo, m, l, b, v0, v1, split, cvc == 0, p.B, p.Cv, p.N, out, lse, part_o, part_lse);
}

template <typename T>
__global__ void kgr_combine_kernel(const acc_of<T>* __restrict__ part_o, const acc_of<T>* __restrict__ part_lse,
                                   T* __restrict__ out, acc_of<T>* __restrict__ lse, int64_t nsplit, int64_t B,
                                   int64_t Cv, int64_t N) {
  using A = acc_of<T>;
  const int64_t total = B * Cv * N;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = e % N, v = (e / N) % Cv, b = e / (Cv * N);
    A mx = neg_inf<A>();
    for (int64_t s = 0; s < nsplit; ++s) {
      const A x = part_lse[(s * B + b) * N + q];
      mx = x > mx ? x : mx;
    }
    A L = neg_inf<A>(), val = A(0);
    if (mx != neg_inf<A>()) {
      A sum = A(0);
      for (int64_t s = 0; s < nsplit; ++s) sum += acc_exp(part_lse[(s * B + b) * N + q] - mx);
      L = mx + acc_log(sum);
      for (int64_t s = 0; s < nsplit; ++s)
        val += acc_exp(part_lse[(s * B + b) * N + q] - L) * part_o[s * total + e];
    }
    store(out + e, val);
    if (v == 0) lse[b * N + q] = L;
  }
}

inline int grid_stride_blocks(int64_t n, int threads) { return int(imin(imax(ceil_div(n, threads), 1), 65535)); }

// Merges nsplit partial outputs and lse (kgr_combine_kernel) into out and lse.
template <typename T>
cudaError_t split_forward_combine(const acc_of<T>* part_o, const acc_of<T>* part_lse, T* out, acc_of<T>* lse,
                                  int64_t nsplit, int64_t B, int64_t Cv, int64_t N, cudaStream_t stream) {
  const int threads = 256;
  HMMN_LAUNCH(kgr_combine_kernel<T>, grid_stride_blocks(B * Cv * N, threads), threads, 0, stream, part_o, part_lse, out,
              lse, nsplit, B, Cv, N);
  return cudaGetLastError();
}

// The launch plan of a split-memory forward (B batch items, N queries, M memory positions, Cv
// value channels) whose O accumulator may use `smem_budget` bytes.
template <typename Cfg>
KgrFwdPlan split_forward_plan(int64_t B, int64_t N, int64_t M, int64_t Cv, int64_t smem_budget, int num_sms) {
  KgrFwdPlan plan{};
  plan.nqt = ceil_div(N, Cfg::RB);
  plan.cvb = accumulator_chunk<Cfg>(Cv, smem_budget);
  plan.ncv = ceil_div(Cv, plan.cvb);  // the glue guarantees Cv >= 1 and Ck >= 1
  plan.dyn_smem = accumulator_bytes<Cfg>(plan.cvb);
  // Few queries (HMMN: 1620) and long memory: split the memory axis until ~2 waves of blocks.
  const int64_t ntiles = imax(ceil_div(M, Cfg::CB), 1), blocks = imax(B * plan.nqt * plan.ncv, 1);
  const int64_t want = imin(imin(ceil_div(2 * int64_t(num_sms), blocks), ntiles), 64);
  plan.tps = ceil_div(ntiles, imax(want, 1));
  plan.nsplit = ceil_div(ntiles, plan.tps);  // no empty split
  plan.workspace = plan.nsplit > 1 ? plan.nsplit * B * (Cv + 1) * N : 0;
  return plan;
}

template <typename T>
KgrFwdPlan kgr_forward_plan(const KgrParams<T>& p, int num_sms, int64_t smem_optin) {
  using Cfg = typename Tiles<acc_of<T>>::Square;
  return split_forward_plan<Cfg>(p.B, p.N, p.M, p.Cv, dynamic_smem_budget(kgr_fwd_kernel<Cfg, T>, smem_optin), num_sms);
}

// Launches the forward (out, lse); `workspace` holds plan.workspace acc elements.
template <typename T>
cudaError_t kgr_forward(const KgrParams<T>& p, const KgrFwdPlan& plan, T* out, acc_of<T>* lse, acc_of<T>* workspace,
                        cudaStream_t stream) {
  using Cfg = typename Tiles<acc_of<T>>::Square;
  if (p.B * p.N == 0) return cudaSuccess;
  const auto kernel = kgr_fwd_kernel<Cfg, T>;
  cudaError_t err = allow_dynamic_smem(kernel, plan.dyn_smem);
  if (err != cudaSuccess) return err;
  acc_of<T>* part_o = plan.nsplit > 1 ? workspace : nullptr;
  acc_of<T>* part_lse = plan.nsplit > 1 ? workspace + plan.nsplit * p.B * p.Cv * p.N : nullptr;
  const dim3 grid(unsigned(p.B * plan.nqt), unsigned(plan.nsplit * plan.ncv));
  HMMN_LAUNCH(kernel, grid, Cfg::NT, size_t(plan.dyn_smem), stream, p, plan, out, lse, part_o, part_lse);
  if (plan.nsplit > 1) return split_forward_combine(part_o, part_lse, out, lse, plan.nsplit, p.B, p.Cv, p.N, stream);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------
// Top-k: one warp per query keeps the best `k` (logit, index) pairs seen so far, sorted by
// descending logit then ascending index, in its slice of keys (B, N, k) acc and idx (B, N, k).
// The candidates of `frames` stream through in chunks of 32 (one per lane), their keys staged
// in shared memory once for the block's 8 queries. A candidate is inserted only if it beats
// the current k-th entry; the warp finds its rank and shifts the tail down by one. Candidates
// arrive in increasing index order, so an equal logit already in the list keeps its place.
// Never more than N*k floats of state: the score matrix is not materialised.

constexpr int kTopkWarps = 8;
constexpr int kTopkCC = 32;

template <typename A>
__device__ __forceinline__ bool topk_better(A ka, int64_t ia, A kb, int64_t ib) {
  return ka > kb || (ka == kb && ia < ib);
}

// One warp's top-k list (keys lk[0, k), indices li[0, k), global memory private to the warp),
// sorted by descending key then ascending index. All 32 lanes call offer() together with one
// candidate each, (key, base + lane), offered only where `pass`; candidates arrive in
// increasing index order, so an equal key already in the list keeps its place (ties to the
// smaller index).
template <typename A> struct WarpTopk {
  A* lk;
  int64_t* li;
  int64_t k;
  int64_t cnt = 0, tail_i = 0;  // list length; the k-th entry once full
  A tail_k = neg_inf<A>();

  // A NaN key ranks as -inf (docs/reliability.md): callers pass rank_key(score).
  __device__ __forceinline__ static A rank_key(A key) { return key != key ? neg_inf<A>() : key; }

  __device__ __forceinline__ bool wants(A key, int64_t i) const { return cnt < k || topk_better(key, i, tail_k, tail_i); }

  __device__ __forceinline__ void offer(A key, int64_t base, bool pass) {
    const int lane = threadIdx.x % 32;
    unsigned todo = __ballot_sync(0xffffffffu, pass);
    while (todo != 0u) {  // warp-uniform: every lane sees the same list and candidate
      const int src = __ffs(todo) - 1;
      todo &= todo - 1u;
      const A ck = __shfl_sync(0xffffffffu, key, src);
      const int64_t ci = base + src;
      if (!wants(ck, ci)) continue;
      int64_t rank = 0;  // entries that beat the candidate
      for (int64_t e = lane; e < cnt; e += 32) rank += topk_better(lk[e], li[e], ck, ci) ? 1 : 0;
      for (int o = 16; o > 0; o >>= 1) rank += __shfl_xor_sync(0xffffffffu, rank, o);
      // Every lane has read the list before lane 0 writes lk[rank]: when rank == k - 1 the
      // shift (and its __syncwarp) is skipped, and shuffles do not order memory.
      __syncwarp();
      const int64_t grown = imin(cnt + 1, k);
      // Shift entries [rank, grown - 1) down by one, 32 at a time from the end: each round
      // reads before it writes, and never reads what an earlier round wrote.
      for (int64_t hi = grown - 1; hi > rank; hi -= 32) {
        const int64_t e = hi - lane;
        const bool mv = e > rank;
        A kk = A(0);
        int64_t ii = 0;
        if (mv) {
          kk = lk[e - 1];
          ii = li[e - 1];
        }
        __syncwarp();
        if (mv) {
          lk[e] = kk;
          li[e] = ii;
        }
        __syncwarp();
      }
      if (lane == 0) {
        lk[rank] = ck;
        li[rank] = ci;
      }
      __syncwarp();
      cnt = grown;
      if (cnt == k) {
        tail_k = lk[k - 1];
        tail_i = li[k - 1];
      }
    }
  }
};

template <typename T>
__global__ void __launch_bounds__(kTopkWarps * 32, 1)
    kgr_topk_kernel(KgrParams<T> p, const int64_t* __restrict__ frames, int64_t F, int64_t k, acc_of<T>* keys,
                    int64_t* idx) {
  using A = acc_of<T>;
  HMMN_SHARED(A, ks, [kTopkCC][33]);
  HMMN_SHARED(A, qs, [kTopkWarps][kTopkCC]);
  HMMN_SHARED(int64_t, cpos, [32]);
  HMMN_SHARED(int, cy, [32]);
  HMMN_SHARED(int, cx, [32]);
  HMMN_SHARED(A, g, [32]);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t groups = ceil_div(p.N, kTopkWarps);
  const int64_t b = blockIdx.x / groups, qbase = (blockIdx.x % groups) * kTopkWarps, q = qbase + warp;
  const bool q_ok = q < p.N;
  const int qy = q_ok ? int(q / p.W) : 0, qx = q_ok ? int(q % p.W) : 0;
  WarpTopk<A> list{keys + (b * p.N + (q_ok ? q : 0)) * k, idx + (b * p.N + (q_ok ? q : 0)) * k, k};
  const int64_t L = F * p.N;

  for (int64_t base = 0; base < L; base += 32) {
    __syncthreads();  // previous chunk is done with cpos, centres and ks
    if (threadIdx.x < 32) {
      const int64_t i = base + threadIdx.x;
      const int64_t pos = i < L ? frames[i / p.N] * p.N + i % p.N : -1;
      cpos[threadIdx.x] = pos;
      load_center(p.centers, p.sigma, b, pos, p.M, p.N, p.W, p.Tm, cy[threadIdx.x], cx[threadIdx.x], g[threadIdx.x]);
    }
    __syncthreads();
    A dot = A(0);
    for (int64_t c0 = 0; c0 < p.Ck; c0 += kTopkCC) {
      __syncthreads();
      for (int e = threadIdx.x; e < kTopkCC * 32; e += blockDim.x) {
        const int cc = e / 32, j = e % 32;
        const int64_t c = c0 + cc, pos = cpos[j];
        ks[cc][j] = (pos >= 0 && c < p.Ck) ? to_acc(p.k[(b * p.Ck + c) * p.M + pos]) : A(0);
      }
      for (int e = threadIdx.x; e < kTopkWarps * kTopkCC; e += blockDim.x) {
        const int w = e / kTopkCC, cc = e % kTopkCC;
        const int64_t c = c0 + cc, qq = qbase + w;
        qs[w][cc] = (qq < p.N && c < p.Ck) ? to_acc(p.q[(b * p.Ck + c) * p.N + qq]) : A(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int cc = 0; cc < kTopkCC; ++cc) dot += ks[cc][lane] * qs[warp][cc];
    }
    const int64_t mine = base + lane;
    const A key = list.rank_key(saturate(dot * p.scale + gauss_bias(qy, qx, cy[lane], cx[lane], g[lane])));
    list.offer(key, base, q_ok && mine < L && list.wants(key, mine));
  }
}

// keys: B * N * k acc elements of workspace; idx: the (B, N, k) int64 output.
template <typename T>
cudaError_t kgr_topk(const KgrParams<T>& p, const int64_t* frames, int64_t F, int64_t k, acc_of<T>* keys, int64_t* idx,
                     cudaStream_t stream) {
  if (p.B * p.N == 0 || k == 0) return cudaSuccess;
  HMMN_LAUNCH(kgr_topk_kernel<T>, unsigned(p.B * ceil_div(p.N, kTopkWarps)), kTopkWarps * 32, 0, stream, p, frames, F,
              k, keys, idx);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------
// Backward: D = <dO, O>; dQ per query tile (streams all memory); dK, dV per memory tile
// (streams all queries). No atomics: every output element has one writer (deterministic).

template <typename Cfg, typename T>
__global__ void __launch_bounds__(Cfg::NT, 1)
    kgr_dq_kernel(KgrParams<T> p, const T* dout, const acc_of<T>* lse, const acc_of<T>* D, T* dq, int64_t nqt,
                  int64_t ckb) {
  using A = acc_of<T>;
  HMMN_SHARED(typename Cfg::Smem, sm, );
  HMMN_SHARED(A, lse_r, [Cfg::RB]);
  HMMN_SHARED(A, D_r, [Cfg::RB]);
  HMMN_SHARED(A, g, [Cfg::CB]);
  HMMN_SHARED(int, qy, [Cfg::RB]);
  HMMN_SHARED(int, qx, [Cfg::RB]);
  HMMN_SHARED(int, cy, [Cfg::CB]);
  HMMN_SHARED(int, cx, [Cfg::CB]);
  HMMN_DYNAMIC_SMEM(dyn_smem);
  A* acc = reinterpret_cast<A*>(dyn_smem);

  const int64_t b = blockIdx.x / nqt, q0 = (blockIdx.x % nqt) * Cfg::RB;
  const int64_t c0 = blockIdx.y * ckb, c1 = imin(c0 + ckb, p.Ck), ld = ckb + 1;
  const auto Q = channels_first(p.q + b * p.Ck * p.N, p.Ck, p.N);
  const auto K = channels_first(p.k + b * p.Ck * p.M, p.Ck, p.M);
  const auto V = channels_first(p.v + b * p.Cv * p.M, p.Cv, p.M);
  const auto dO = channels_first(dout + b * p.Cv * p.N, p.Cv, p.N);

  query_rows<Cfg>(sm, q0, p.N, p.W, qy, qx);
  const KgrMemoryCols<Cfg, T> prob{p.centers, p.sigma, b, p.M, p.N, p.W, p.Tm, qy, qx, cy, cx, g};
  attend_backward_rows<Cfg>(prob, sm, Q, K, V, dO, lse + b * p.N, D + b * p.N, p.scale, 0, p.M, c0, c1, acc, ld,
                            lse_r, D_r);
  for (int64_t e = threadIdx.x; e < (c1 - c0) * Cfg::RB; e += Cfg::NT) {
    const int i = int(e % Cfg::RB);
    const int64_t c = e / Cfg::RB, q = sm.row[i];
    if (q >= 0) store(dq + (b * p.Ck + c0 + c) * p.N + q, p.scale * acc[i * ld + c]);
  }
}

template <typename Cfg, typename T>
__global__ void __launch_bounds__(Cfg::NT, 1)
    kgr_dkdv_kernel(KgrParams<T> p, const T* dout, const acc_of<T>* lse, const acc_of<T>* D, T* dk, T* dv,
                    int64_t nmt, int64_t ob, int64_t ncv) {
  using A = acc_of<T>;
  HMMN_SHARED(typename Cfg::Smem, sm, );
  HMMN_SHARED(A, lse_c, [Cfg::CB]);
  HMMN_SHARED(A, D_c, [Cfg::CB]);
  HMMN_SHARED(A, g, [Cfg::RB]);
  HMMN_SHARED(int, qy, [Cfg::CB]);
  HMMN_SHARED(int, qx, [Cfg::CB]);
  HMMN_SHARED(int, cy, [Cfg::RB]);
  HMMN_SHARED(int, cx, [Cfg::RB]);
  HMMN_DYNAMIC_SMEM(dyn_smem);
  A* acc = reinterpret_cast<A*>(dyn_smem);

  const int64_t b = blockIdx.x / nmt, p0 = (blockIdx.x % nmt) * Cfg::RB;
  const bool want_dv = blockIdx.y < ncv;
  const int64_t c0 = (want_dv ? blockIdx.y : blockIdx.y - ncv) * ob;
  const int64_t c1 = imin(c0 + ob, want_dv ? p.Cv : p.Ck), ld = ob + 1;
  const auto Q = channels_first(p.q + b * p.Ck * p.N, p.Ck, p.N);
  const auto K = channels_first(p.k + b * p.Ck * p.M, p.Ck, p.M);
  const auto V = channels_first(p.v + b * p.Cv * p.M, p.Cv, p.M);
  const auto dO = channels_first(dout + b * p.Cv * p.N, p.Cv, p.N);

  for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) {
    const int64_t pos = p0 + i < p.M ? p0 + i : -1;
    sm.row[i] = pos;
    load_center(p.centers, p.sigma, b, pos, p.M, p.N, p.W, p.Tm, cy[i], cx[i], g[i]);
  }
  for (int64_t e = threadIdx.x; e < Cfg::RB * ld; e += Cfg::NT) acc[e] = A(0);
  const KgrQueryCols<Cfg, T> prob{p.W, cy, cx, g, qy, qx};
  attend_backward_cols<Cfg>(prob, sm, Q, K, V, dO, lse + b * p.N, D + b * p.N, p.scale, 0, p.N, want_dv, c0, c1,
                            lse_c, D_c, [&](int i, int64_t c, A x) { acc[i * ld + c] += x; });
  for (int64_t e = threadIdx.x; e < (c1 - c0) * Cfg::RB; e += Cfg::NT) {
    const int i = int(e % Cfg::RB);
    const int64_t c = e / Cfg::RB, pos = sm.row[i];
    if (pos < 0) continue;
    if (want_dv) store(dv + (b * p.Cv + c0 + c) * p.M + pos, acc[i * ld + c]);
    else store(dk + (b * p.Ck + c0 + c) * p.M + pos, p.scale * acc[i * ld + c]);
  }
}

// D: B * N acc elements of workspace. dq/dk/dv: outputs shaped like q/k/v (contiguous).
template <typename T>
cudaError_t kgr_backward(const KgrParams<T>& p, const T* dout, const T* out, const acc_of<T>* lse, acc_of<T>* D,
                         T* dq, T* dk, T* dv, int64_t smem_optin, cudaStream_t stream) {
  using Cfg = typename Tiles<acc_of<T>>::Square;
  if (p.B == 0) return cudaSuccess;
  launch_softmax_bwd_delta(dout, out, D, p.B, p.Cv, p.N, stream);

  const auto dq_kernel = kgr_dq_kernel<Cfg, T>;
  const int64_t ckb = accumulator_chunk<Cfg>(p.Ck, dynamic_smem_budget(dq_kernel, smem_optin));
  const int64_t nqt = ceil_div(p.N, Cfg::RB);
  cudaError_t err = allow_dynamic_smem(dq_kernel, accumulator_bytes<Cfg>(ckb));
  if (err != cudaSuccess) return err;
  if (p.N > 0)
    HMMN_LAUNCH(dq_kernel, dim3(unsigned(p.B * nqt), unsigned(ceil_div(p.Ck, ckb))), Cfg::NT,
                size_t(accumulator_bytes<Cfg>(ckb)), stream, p, dout, lse, D, dq, nqt, ckb);

  const auto dkdv_kernel = kgr_dkdv_kernel<Cfg, T>;
  const int64_t ob = accumulator_chunk<Cfg>(imax(p.Ck, p.Cv), dynamic_smem_budget(dkdv_kernel, smem_optin));
  const int64_t nmt = ceil_div(p.M, Cfg::RB), ncv = ceil_div(p.Cv, ob), nck = ceil_div(p.Ck, ob);
  err = allow_dynamic_smem(dkdv_kernel, accumulator_bytes<Cfg>(ob));
  if (err != cudaSuccess) return err;
  if (p.M > 0)
    HMMN_LAUNCH(dkdv_kernel, dim3(unsigned(p.B * nmt), unsigned(ncv + nck)), Cfg::NT,
                size_t(accumulator_bytes<Cfg>(ob)), stream, p, dout, lse, D, dk, dv, nmt, ob, ncv);
  return cudaGetLastError();
}

}  // namespace hmmn
