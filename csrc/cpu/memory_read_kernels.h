// Element-wise passes of memory_read and its backward, compiled once per ISA by isa.h. The
// block products around them go to BLAS (at::mm) in memory_read.cpp.
//
// Every similarity is brought to one affine form of a block product G = Ka^T Qa:
//   s[p, q] = u[p] * (G[p, q] + kb[p] + qb[q])
// (memory_read.cpp builds Ka, Qa, u, kb, qb), so these loops never branch on the similarity.
#include "read_kernels.h"

// One query's scores against n memory positions, in place: g[i] -> s[i].
template <typename T>
void affine_row(T* g, int64_t n, const T* u, const T* kb, T qb) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) g[i] = u[i] * (g[i] + kb[i] + qb);
}

// One memory position against n queries, in place: g[j] -> P = exp(s[j] - lse[j]); returns the
// sum of the P (the position's usage over these queries).
template <typename T>
T affine_col_probs(T* g, int64_t n, T u, T kb, const T* qb, const T* lse) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T p = fast_exp(u * (g[j] + kb + qb[j]) - lse[j]);
    g[j] = p;
    sum += p;
  }
  return sum;
}

// Backward, one memory position against n queries. In: g = G, dp = <V[:, p], dO[:, q]>.
// Out: g = P, dp = dT = u * dS with dS = P * (dp - D). Adds sum_j dS * (G + kb + qb) to du
// (the gradient of u) and sum_j dT to dkb.
template <typename T>
void affine_col_grad(T* g, T* dp, int64_t n, T u, T kb, const T* qb, const T* lse, const T* delta, T& du, T& dkb) {
  T su = 0, sk = 0;
#pragma omp simd reduction(+ : su, sk)
  for (int64_t j = 0; j < n; ++j) {
    const T d = g[j] + kb + qb[j];
    const T p = fast_exp(u * d - lse[j]);
    const T ds = p * (dp[j] - delta[j]);
    g[j] = p;
    dp[j] = u * ds;
    su += ds * d;
    sk += u * ds;
  }
  du += su;
  dkb += sk;
}

// y[j] += sum of the rows x[i * n + j] of a (rows x n) block.
template <typename T>
void add_column_sums(T* y, const T* x, int64_t rows, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = x + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] += row[j];
  }
}

// A query's top-k list (tv sorted descending, finite) -> probs[j] = softmax(tv)[j]; returns lse.
template <typename T>
T topk_softmax(const T* tv, int64_t k, T* probs) {
  const T mx = tv[0];
  T sum = 0;
  for (int64_t j = 0; j < k; ++j) {
    probs[j] = fast_exp(tv[j] - mx);
    sum += probs[j];
  }
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < k; ++j) probs[j] *= inv;
  return mx + std::log(sum);
}

// The top-k read of one value channel: out[q] = sum_j probs[q * k + j] * row[idx[q * k + j]]
// for n queries (row: the channel's Nm values, in cache for all queries).
template <typename T>
void gather_channel(const T* row, const int64_t* idx, const T* probs, int64_t n, int64_t k, T* out) {
  for (int64_t q = 0; q < n; ++q) {
    const int64_t* i = idx + q * k;
    const T* p = probs + q * k;
    T s = 0;
    for (int64_t j = 0; j < k; ++j) s += p[j] * row[i[j]];
    out[q] = s;
  }
}

// Backward of the top-k read for one query q against its k selected positions idx (keys and
// values channel-last: kat[p * Ca + c], vt[p * Cv + c]). P is recomputed from lse. Writes per
// slot P, dT = u * dS and dS * (G + kb + qb) (what dV, dKa, du need), and adds q's share to
// dqa_q (Ca) and dqb.
template <typename T>
void topk_grad_query(const T* qa_q, const T* do_q, T qb, T lse, T delta, const int64_t* idx, int64_t k, const T* kat,
                     const T* vt, const T* u, const T* kb, int64_t Ca, int64_t Cv, T* p_out, T* t_out, T* w_out,
                     T* dqa_q, T& dqb) {
  for (int64_t j = 0; j < k; ++j) {
    const int64_t p = idx[j];
    const T d = dot(kat + p * Ca, qa_q, Ca) + kb[p] + qb;
    const T prob = fast_exp(u[p] * d - lse);
    const T ds = prob * (dot(vt + p * Cv, do_q, Cv) - delta);
    p_out[j] = prob;
    t_out[j] = u[p] * ds;
    w_out[j] = ds * d;
    axpy(dqa_q, t_out[j], kat + p * Ca, Ca);
    dqb += t_out[j];
  }
}
