// gaussian_softmax (docs/ops.md section 2) and its backward: softmax over dim 1 (memory, length M = T*H*W)
// of affinity (B, M, N) plus the log-Gaussian bias, for every query column n. Torch-free.
//
// A block owns 32 consecutive columns (one per lane: coalesced rows) and 8 row groups; pass 1
// keeps an online (max, sum) per thread and merges the 8 groups in shared memory, pass 2
// writes exp(x + bias - max) / sum. Input read twice, output written once, nothing else stored.
#pragma once

#include "common.cuh"

namespace hmmn {

constexpr int kGsmCols = 32;
constexpr int kGsmRows = 8;

template <typename T> struct GsmParams {
  const T* x;               // (B, M, N) affinity, or grad_output in the backward
  const T* y;               // backward only: output (B, M, N)
  const int64_t* centers;   // (B, M)
  const acc_of<T>* sigma;   // (B, T)
  T* out;                   // (B, M, N)
  int64_t B, Tm, H, W, N, M;  // Tm: memory frames
};

template <typename T>
__global__ void __launch_bounds__(kGsmCols * kGsmRows, 1) gsm_fwd_kernel(GsmParams<T> p) {
  using A = acc_of<T>;
  HMMN_SHARED(A, sm_m, [kGsmRows][kGsmCols]);
  HMMN_SHARED(A, sm_l, [kGsmRows][kGsmCols]);
  const int64_t tiles = ceil_div(p.N, kGsmCols);
  const int64_t b = blockIdx.x / tiles, n = (blockIdx.x % tiles) * kGsmCols + threadIdx.x;
  const bool ok = n < p.N;
  const int qy = ok ? int(n / p.W) : 0, qx = ok ? int(n % p.W) : 0;
  const T* x = p.x + b * p.M * p.N + n;

  A m = neg_inf<A>(), l = A(0);
  if (ok) {
    for (int64_t pos = threadIdx.y; pos < p.M; pos += kGsmRows) {
      int cy, cx;
      A g;
      load_center(p.centers, p.sigma, b, pos, p.M, p.N, p.W, p.Tm, cy, cx, g);
      const A v = saturate(to_acc(x[pos * p.N]) + gauss_bias(qy, qx, cy, cx, g));
      if (v > m) {
        l = l * acc_exp(m - v) + A(1);  // m == -inf: exp gives 0
        m = v;
      } else if (v != neg_inf<A>()) {
        l += acc_exp(v - m);
      }
    }
  }
  sm_m[threadIdx.y][threadIdx.x] = m;
  sm_l[threadIdx.y][threadIdx.x] = l;
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int gr = 1; gr < kGsmRows; ++gr) {
      const A m2 = sm_m[gr][threadIdx.x], l2 = sm_l[gr][threadIdx.x];
      const A mm = m2 > m ? m2 : m;
      if (mm == neg_inf<A>()) continue;
      l = (m == neg_inf<A>() ? A(0) : l * acc_exp(m - mm)) + (m2 == neg_inf<A>() ? A(0) : l2 * acc_exp(m2 - mm));
      m = mm;
    }
    sm_m[0][threadIdx.x] = m;
    sm_l[0][threadIdx.x] = l;
  }
  __syncthreads();
  if (!ok) return;
  m = sm_m[0][threadIdx.x];
  l = sm_l[0][threadIdx.x];
  const A inv = l > A(0) ? A(1) / l : A(0);  // all -inf (only from sigma underflow): zeros, not NaN
  T* y = p.out + b * p.M * p.N + n;
  for (int64_t pos = threadIdx.y; pos < p.M; pos += kGsmRows) {
    int cy, cx;
    A g;
    load_center(p.centers, p.sigma, b, pos, p.M, p.N, p.W, p.Tm, cy, cx, g);
    const A v = saturate(to_acc(x[pos * p.N]) + gauss_bias(qy, qx, cy, cx, g));
    store(y + pos * p.N, inv == A(0) ? A(0) : acc_exp(v - m) * inv);
  }
}

// grad_affinity = y * (gy - sum_p gy * y), p.x = grad_output, p.y = output.
template <typename T>
__global__ void __launch_bounds__(kGsmCols * kGsmRows, 1) gsm_bwd_kernel(GsmParams<T> p) {
  using A = acc_of<T>;
  HMMN_SHARED(A, sm, [kGsmRows][kGsmCols]);
  const int64_t tiles = ceil_div(p.N, kGsmCols);
  const int64_t b = blockIdx.x / tiles, n = (blockIdx.x % tiles) * kGsmCols + threadIdx.x;
  const bool ok = n < p.N;
  const int64_t base = b * p.M * p.N + n;
  A s = A(0);
  if (ok)
    for (int64_t pos = threadIdx.y; pos < p.M; pos += kGsmRows)
      s += to_acc(p.x[base + pos * p.N]) * to_acc(p.y[base + pos * p.N]);
  sm[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (!ok) return;
  s = A(0);
  for (int gr = 0; gr < kGsmRows; ++gr) s += sm[gr][threadIdx.x];  // same order in every thread
  for (int64_t pos = threadIdx.y; pos < p.M; pos += kGsmRows) {
    const int64_t o = base + pos * p.N;
    store(p.out + o, to_acc(p.y[o]) * (to_acc(p.x[o]) - s));
  }
}

template <typename T>
cudaError_t gaussian_softmax_forward(const GsmParams<T>& p, cudaStream_t stream) {
  if (p.B * p.N == 0 || p.M == 0) return cudaSuccess;
  HMMN_LAUNCH(gsm_fwd_kernel<T>, unsigned(p.B * ceil_div(p.N, kGsmCols)), dim3(kGsmCols, kGsmRows), 0, stream, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gaussian_softmax_backward(const GsmParams<T>& p, cudaStream_t stream) {
  if (p.B * p.N == 0 || p.M == 0) return cudaSuccess;
  HMMN_LAUNCH(gsm_bwd_kernel<T>, unsigned(p.B * ceil_div(p.N, kGsmCols)), dim3(kGsmCols, kGsmRows), 0, stream, p);
  return cudaGetLastError();
}

}  // namespace hmmn
