// local_track (docs/ops.md section 3) and global_track (docs/ops.md section 4): argmax of <memory_key, query_key> over a
// clipped window / over all queries, ties to the smaller flat query index. Torch-free.
// Layouts (contiguous): mk (B, C, M) channels-first (M = T*N; T = 1 for local_track),
// qk (B, C, N); out (B, M) int64.
#pragma once

#include "tile.cuh"

namespace hmmn {

// One thread per memory pixel; the window is scanned in increasing flat index, so a strict
// `>` keeps the smallest index among equal scores.
template <typename T>
__global__ void local_track_kernel(const T* __restrict__ mk, const T* __restrict__ qk, int64_t* __restrict__ out,
                                   int64_t B, int64_t C, int64_t H, int64_t W, int64_t radius) {
  using A = acc_of<T>;
  const int64_t N = H * W;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < B * N; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / N, pix = e % N, y = pix / W, x = pix % W;
    const T* m = mk + b * C * N + pix;
    const T* q = qk + b * C * N;
    A best = A(0);
    int64_t arg = -1;
    for (int64_t qy = imax(y - radius, 0); qy <= imin(y + radius, H - 1); ++qy)
      for (int64_t qx = imax(x - radius, 0); qx <= imin(x + radius, W - 1); ++qx) {
        const int64_t n = qy * W + qx;
        A d = A(0);
        for (int64_t c = 0; c < C; ++c) d += to_acc(m[c * N]) * to_acc(q[c * N + n]);
        if (d != d) d = neg_inf<A>();  // NaN ranks as -inf (docs/reliability.md)
        if (arg < 0 || d > best) {
          best = d;
          arg = n;
        }
      }
    out[e] = arg;
  }
}

template <typename T>
cudaError_t local_track(const T* mk, const T* qk, int64_t* out, int64_t B, int64_t C, int64_t H, int64_t W,
                        int64_t window, cudaStream_t stream) {
  if (B * H * W == 0) return cudaSuccess;
  const int threads = 128;
  const int64_t blocks = imin(ceil_div(B * H * W, threads), int64_t(1) << 20);
  HMMN_LAUNCH(local_track_kernel<T>, unsigned(blocks), threads, 0, stream, mk, qk, out, B, C, H, W, window / 2);
  return cudaGetLastError();
}

// Rows = 64 memory positions, columns = query tiles; scores from the shared SIMT tile, each
// thread keeps the best of the columns it owns (visited in increasing index), then the TX
// threads of a row merge with the tie rule.
template <typename A>
__device__ __forceinline__ bool argmax_better(A v, int64_t i, A bv, int64_t bi) {
  return bi < 0 || (i >= 0 && (v > bv || (v == bv && i < bi)));
}

template <typename Cfg, typename T>
__global__ void __launch_bounds__(Cfg::NT, 1)
    global_track_kernel(const T* __restrict__ mk, const T* __restrict__ qk, int64_t* __restrict__ out, int64_t C,
                        int64_t N, int64_t M, int64_t nmt) {
  using A = acc_of<T>;
  static_assert(Cfg::TX <= 32 && (Cfg::TX & (Cfg::TX - 1)) == 0 && 32 % Cfg::TX == 0, "row threads share a warp");
  HMMN_SHARED(typename Cfg::Smem, sm, );
  const int64_t b = blockIdx.x / nmt, p0 = (blockIdx.x % nmt) * Cfg::RB;
  const auto K = channels_first(mk + b * C * M, C, M);
  const auto Q = channels_first(qk + b * C * N, C, N);
  for (int i = threadIdx.x; i < Cfg::RB; i += Cfg::NT) sm.row[i] = p0 + i < M ? p0 + i : -1;
  A best[Cfg::RI];
  int64_t arg[Cfg::RI];
#pragma unroll
  for (int a = 0; a < Cfg::RI; ++a) {
    best[a] = A(0);
    arg[a] = -1;
  }
  for (int64_t t0 = 0; t0 < N; t0 += Cfg::CB) {
    __syncthreads();  // the previous tile is done with the column ids
    for (int j = threadIdx.x; j < Cfg::CB; j += Cfg::NT) sm.col[j] = t0 + j < N ? t0 + j : -1;
    A r[Cfg::RI][Cfg::RJ];
    Cfg::dot(r, K, Q, sm);
#pragma unroll
    for (int a = 0; a < Cfg::RI; ++a)
#pragma unroll
      for (int b2 = 0; b2 < Cfg::RJ; ++b2) {
        const int64_t q = sm.col[Cfg::tx() + Cfg::TX * b2];
        const A s = r[a][b2] != r[a][b2] ? neg_inf<A>() : r[a][b2];  // NaN ranks as -inf
        if (q >= 0 && (arg[a] < 0 || s > best[a])) {
          best[a] = s;
          arg[a] = q;
        }
      }
  }
#pragma unroll
  for (int a = 0; a < Cfg::RI; ++a) {
    A v = best[a];
    int64_t i = arg[a];
    for (int o = Cfg::TX / 2; o > 0; o >>= 1) {  // lanes of one row are TX consecutive lanes
      const A v2 = __shfl_xor_sync(0xffffffffu, v, o);
      const int64_t i2 = __shfl_xor_sync(0xffffffffu, i, o);
      if (argmax_better(v2, i2, v, i)) {
        v = v2;
        i = i2;
      }
    }
    const int64_t pos = sm.row[Cfg::ty() + Cfg::TY * a];
    if (Cfg::tx() == 0 && pos >= 0) out[b * M + pos] = i;
  }
}

template <typename T>
cudaError_t global_track(const T* mk, const T* qk, int64_t* out, int64_t B, int64_t C, int64_t N, int64_t M,
                         cudaStream_t stream) {
  using Cfg = typename Tiles<acc_of<T>>::Square;
  if (B * M == 0) return cudaSuccess;
  const int64_t nmt = ceil_div(M, Cfg::RB);
  const auto kernel = global_track_kernel<Cfg, T>;
  HMMN_LAUNCH(kernel, unsigned(B * nmt), Cfg::NT, 0, stream, mk, qk, out, C, N, M, nmt);
  return cudaGetLastError();
}

}  // namespace hmmn
