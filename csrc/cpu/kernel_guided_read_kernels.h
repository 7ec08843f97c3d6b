// Element-wise passes of kernel_guided_read (SPEC 1) and its backward, compiled once per ISA
// by isa.h. The matrix products around them go to BLAS (at::mm) in kernel_guided_read.cpp.
//
// Gaussian term of memory position p for query q = (qy, qx), as reference.py computes it:
//   logit = scale * <k_p, q> + -(((qy - cy_p)^2 + (qx - cx_p)^2) * g_p)
// with g_p = 1 / (2 sigma^2), and cy_p = cx_p = g_p = 0 where p has no centre.
#include "read_kernels.h"

// One query's scores against n memory positions, in place: s[i] -> logit[i].
// cy, cx, g: per memory position, or g == nullptr for a plain read.
template <typename T>
void logit_row(T* s, int64_t n, T scale, T qy, T qx, const T* cy, const T* cx, const T* g) {
  if (g == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) s[i] = s[i] * scale;
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T dy = qy - cy[i], dx = qx - cx[i];
    s[i] = s[i] * scale + -((dy * dy + dx * dx) * g[i]);
  }
}

// One memory position's scores against n queries, in place (the backward's layout).
template <typename T>
void logit_col(T* s, int64_t n, T scale, const T* qy, const T* qx, T cy, T cx, T g) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T dy = qy[j] - cy, dx = qx[j] - cx;
    s[j] = s[j] * scale + -((dy * dy + dx * dx) * g);
  }
}

// Backward, one memory position against n queries: s holds its logits, dp the products
// <v_p, dO_q>. Leaves P = exp(logit - lse) in s and dS = P * (dp - D) in dp.
template <typename T>
void grad_scores_col(T* s, T* dp, int64_t n, const T* lse, const T* delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T p = fast_exp(s[j] - lse[j]);
    s[j] = p;
    dp[j] = p * (dp[j] - delta[j]);
  }
}
