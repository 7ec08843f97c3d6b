// The block-level building blocks of every attention-like kernel here (forward and backward of
// kernel_guided_read and topk_guided_read, global_track): a block owns a set of RB "rows"
// (positions fixed for the whole block) and streams "columns" in tiles of CB positions.
//
//   dot:        r[i][j]  = sum_c A(c, row[i]) * B(c, col[j])      (SIMT, register micro-tile)
//   accum:      epi(i, v,  sum_j s[i][j] * V(v, col[j]))          (for a range of channels v)
//   softmax:    online softmax of s[i][:] into probabilities, updating (m, l) and alpha per row
//
// Thread (ty, tx) of the TY x TX block owns rows ty + TY*a and columns tx + TX*b of a tile
// (a < RI, b < RJ or RV): a strided micro-tile, so shared-memory reads of one warp touch
// consecutive words (no bank conflicts) or broadcast. Every staged load is bounds-checked:
// padding rows/columns (id -1) and channels past C read as 0.
#pragma once

#include "common.cuh"

namespace hmmn {

// One batch item's (channels x positions) operand: element (c, id) at base[c * sc + id * sp].
// Channels-first data has sp == 1 (coalesced along positions), channels-last sc == 1.
// dot/accum take any operand type with at(c, id), C and sc (sc == 1: stage channel-fastest),
// so a read may pass a view that computes its channels (memory_read's l2 terms).
template <typename T> struct Mat {
  const T* base;
  int64_t sc, sp, C;
  __device__ __forceinline__ acc_of<T> at(int64_t c, int64_t id) const { return to_acc(base[c * sc + id * sp]); }
};

template <typename T>
__host__ __device__ inline Mat<T> channels_first(const T* base, int64_t C, int64_t P) { return {base, P, 1, C}; }
template <typename T>
__host__ __device__ inline Mat<T> channels_last(const T* base, int64_t C) { return {base, 1, C, C}; }

template <typename A, int RB_, int CB_, int TY_, int TX_, int CC_, int VC_>
struct Tile {
  using acc_t = A;
  static constexpr int RB = RB_, CB = CB_, TY = TY_, TX = TX_, CC = CC_, VC = VC_;
  static constexpr int NT = TY * TX, NW = NT / 32;
  static constexpr int RI = RB / TY, RJ = CB / TX, RV = VC / TX;
  static_assert(RB % TY == 0 && CB % TX == 0 && VC % TX == 0, "tile sizes must divide");
  static_assert(NT % 32 == 0, "whole warps");

  struct AB {
    A a[CC][RB + 1];  // +1: channels-last staging writes a column, padding avoids bank conflicts
    A b[CC][CB + 1];
  };
  union U {
    AB ab;             // channel chunk of the two operands of dot()
    A v[CB][VC + 1];   // channel chunk of the operand of accum()
  };
  struct Smem {
    U u;
    A s[RB][CB + 1];   // logits, then probabilities (or dS) of the current tile
    int64_t row[RB];   // position id of each row (-1: padding)
    int64_t col[CB];   // position id of each column of the current tile (-1: padding)
  };

  static __device__ __forceinline__ int ty() { return threadIdx.x / TX; }
  static __device__ __forceinline__ int tx() { return threadIdx.x % TX; }

  // dst[cc][k] = m(c0 + cc, ids[k]); consecutive threads read consecutive addresses.
  template <int N, typename Op>
  static __device__ __forceinline__ void stage(A (*dst)[N + 1], const Op& m, const int64_t* ids, int64_t c0) {
    for (int e = threadIdx.x; e < N * CC; e += NT) {
      int k, cc;
      if (m.sc == 1) { k = e / CC; cc = e % CC; } else { cc = e / N; k = e % N; }
      const int64_t c = c0 + cc, id = ids[k];
      dst[cc][k] = (id >= 0 && c < m.C) ? m.at(c, id) : A(0);
    }
  }

  // r[a][b] = sum_c ma(c, row[ty + TY*a]) * mb(c, col[tx + TX*b]). ma.C == mb.C.
  // Starts with a barrier, so callers may have just written row/col ids.
  template <typename OpA, typename OpB>
  static __device__ __forceinline__ void dot(A (&r)[RI][RJ], const OpA& ma, const OpB& mb, Smem& sm) {
    const int y = ty(), x = tx();
#pragma unroll
    for (int a = 0; a < RI; ++a)
#pragma unroll
      for (int b = 0; b < RJ; ++b) r[a][b] = A(0);
    for (int64_t c0 = 0; c0 < ma.C; c0 += CC) {
      __syncthreads();
      stage<RB>(sm.u.ab.a, ma, sm.row, c0);
      stage<CB>(sm.u.ab.b, mb, sm.col, c0);
      __syncthreads();
#pragma unroll 4
      for (int cc = 0; cc < CC; ++cc) {
        A p[RI], q[RJ];
#pragma unroll
        for (int a = 0; a < RI; ++a) p[a] = sm.u.ab.a[cc][y + TY * a];
#pragma unroll
        for (int b = 0; b < RJ; ++b) q[b] = sm.u.ab.b[cc][x + TX * b];
#pragma unroll
        for (int a = 0; a < RI; ++a)
#pragma unroll
          for (int b = 0; b < RJ; ++b) r[a][b] += p[a] * q[b];
      }
    }
  }

  // For channels v in [v0, v1) (in chunks of VC): x = sum_j s[i][j] * m(v, col[j]), then
  // epi(i, v - v0, x) on the thread that owns (i, v); each (i, v) has exactly one owner, so epi
  // may read-modify-write a per-block accumulator without atomics.
  // Starts with a barrier, so s[][] written just before is visible.
  template <typename Op, typename Epi>
  static __device__ __forceinline__ void accum(const Op& m, int64_t v0, int64_t v1, Smem& sm, Epi&& epi) {
    const int y = ty(), x = tx();
    for (int64_t vc = v0; vc < v1; vc += VC) {
      __syncthreads();
      for (int e = threadIdx.x; e < CB * VC; e += NT) {
        int k, vv;
        if (m.sc == 1) { k = e / VC; vv = e % VC; } else { vv = e / CB; k = e % CB; }
        const int64_t v = vc + vv, id = sm.col[k];
        sm.u.v[k][vv] = (id >= 0 && v < v1) ? m.at(v, id) : A(0);
      }
      __syncthreads();
      A acc[RI][RV];
#pragma unroll
      for (int a = 0; a < RI; ++a)
#pragma unroll
        for (int b = 0; b < RV; ++b) acc[a][b] = A(0);
#pragma unroll 4
      for (int j = 0; j < CB; ++j) {
        A p[RI], q[RV];
#pragma unroll
        for (int a = 0; a < RI; ++a) p[a] = sm.s[y + TY * a][j];
#pragma unroll
        for (int b = 0; b < RV; ++b) q[b] = sm.u.v[j][x + TX * b];
#pragma unroll
        for (int a = 0; a < RI; ++a)
#pragma unroll
          for (int b = 0; b < RV; ++b) acc[a][b] += p[a] * q[b];
      }
#pragma unroll
      for (int a = 0; a < RI; ++a)
#pragma unroll
        for (int b = 0; b < RV; ++b) {
          const int64_t v = vc + x + TX * b;
          if (v < v1) epi(y + TY * a, v - v0, acc[a][b]);
        }
    }
  }

  // Online softmax over the tile's columns, one warp per row: s[i][:] becomes
  // exp(s - m_new), m[i] = m_new, l[i] = l[i] * alpha + rowsum, alpha[i] = exp(m_old - m_new).
  // A row whose logits are all -inf so far (padding) keeps alpha = 1 and gets zeros, never NaN.
  // Callers barrier before (s complete) and after (m, l, alpha, s read by other threads).
  static __device__ __forceinline__ void online_softmax(Smem& sm, A* m, A* l, A* alpha) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int i = warp; i < RB; i += NW) {
      A mx = neg_inf<A>();
      for (int j = lane; j < CB; j += 32) mx = sm.s[i][j] > mx ? sm.s[i][j] : mx;
      mx = warp_max(mx);
      const A m_old = m[i];
      const A m_new = mx > m_old ? mx : m_old;
      A sum = A(0), al = A(1);
      if (m_new == neg_inf<A>()) {
        for (int j = lane; j < CB; j += 32) sm.s[i][j] = A(0);
      } else {
        al = acc_exp(m_old - m_new);  // m_old == -inf gives 0
        for (int j = lane; j < CB; j += 32) {
          const A e = acc_exp(sm.s[i][j] - m_new);
          sm.s[i][j] = e;
          sum += e;
        }
      }
      sum = warp_sum(sum);
      __syncwarp();  // every lane has read m[i] before lane 0 overwrites it
      if (lane == 0) {
        m[i] = m_new;
        l[i] = l[i] * al + sum;
        alpha[i] = al;
      }
    }
  }
};

// Tile shapes per accumulator type. Square: query x memory tiles of kernel_guided_read and
// global_track. Narrow: few rows (the r*r fine queries of a coarse cell, or the r*r fine memory
// pixels of one coarse index) against many columns. Tall: many rows against few columns.
template <typename A> struct Tiles;
template <> struct Tiles<float> {
  using Square = Tile<float, 64, 64, 16, 16, 16, 64>;
  using Narrow = Tile<float, 16, 64, 16, 16, 16, 64>;
  using Tall = Tile<float, 64, 16, 16, 16, 16, 64>;
};
template <> struct Tiles<double> {  // float64 is for gradcheck: small tiles keep smem < 48 KiB
  using Square = Tile<double, 32, 32, 16, 16, 16, 32>;
  using Narrow = Tile<double, 16, 32, 16, 16, 16, 32>;
  using Tall = Tile<double, 32, 16, 16, 16, 16, 32>;
};

// Largest channel chunk (a multiple of VC; at least VC; no more than C rounded up to VC) whose
// per-block accumulator of RB rows x (chunk + 1) values fits in `budget` bytes.
template <typename Cfg>
inline int64_t accumulator_chunk(int64_t C, int64_t budget) {
  const int64_t row_values = budget / (Cfg::RB * int64_t(sizeof(typename Cfg::acc_t)));
  const int64_t n = imax((row_values - 1) / Cfg::VC, 1);
  return imin(n, imax(ceil_div(C, Cfg::VC), 1)) * Cfg::VC;
}

// Dynamic shared memory of an RB x (chunk + 1) accumulator (+1: rows on different banks).
template <typename Cfg>
inline int64_t accumulator_bytes(int64_t chunk) {
  return Cfg::RB * (chunk + 1) * int64_t(sizeof(typename Cfg::acc_t));
}

// Dynamic shared memory a kernel may use: what the device allows per block (optin) minus the
// kernel's static shared memory, capped at 64 KiB so two blocks still fit on one SM.
template <typename K>
inline int64_t dynamic_smem_budget(K kernel, int64_t smem_optin) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) return 0;
  const int64_t budget = imin(int64_t(64) << 10, smem_optin - int64_t(attr.sharedSizeBytes));
#if !defined(__CUDACC__)
  return hmmn_emu::cap_dynamic_smem_budget(budget);  // test hook: small sizes take several chunks
#else
  return budget;
#endif
}

// Opts a kernel into `dyn` bytes of dynamic shared memory (above the 48 KiB default).
template <typename K>
inline cudaError_t allow_dynamic_smem(K kernel, int64_t dyn) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dyn));
}

}  // namespace hmmn
