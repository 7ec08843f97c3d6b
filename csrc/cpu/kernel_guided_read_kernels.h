// Element-wise passes of kernel_guided_read (SPEC 1) and its backward, compiled once per ISA
// by isa.h. The matrix products around them go to BLAS (at::mm) in kernel_guided_read.cpp.
//
// Gaussian term of memory position p for query q = (qy, qx), as reference.py computes it:
//   logit = saturate(scale * <k_p, q> + gauss_term((qy - cy_p)^2 + (qx - cx_p)^2, g_p))
// with g_p = 1 / (2 sigma^2), and cy_p = cx_p = g_p = 0 where p has no centre (simd.h).

// One query's scores against n memory positions, in place: s[i] -> logit[i].
// cy, cx, g: per memory position, or g == nullptr for a plain read.
template <typename T>
void logit_row(T* s, int64_t n, T scale, T qy, T qx, const T* cy, const T* cx, const T* g) {
  if (g == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) s[i] = saturate(s[i] * scale);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T dy = qy - cy[i], dx = qx - cx[i];
    s[i] = saturate(s[i] * scale + gauss_term(dy * dy + dx * dx, g[i]));
  }
}

// One memory position's scores against n queries, in place (the backward's layout).
template <typename T>
void logit_col(T* s, int64_t n, T scale, const T* qy, const T* qx, T cy, T cx, T g) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T dy = qy[j] - cy, dx = qx[j] - cx;
    s[j] = saturate(s[j] * scale + gauss_term(dy * dy + dx * dx, g));
  }
}

// Online softmax step for one query: raises the running max m to cover s, replaces s by
// exp(s - m), adds their sum to the running sum l (first rescaled), and returns the factor
// exp(m_old - m_new) by which earlier partial outputs must be rescaled.
template <typename T>
T softmax_row_update(T* s, int64_t n, T& m, T& l) {
  T mx = m;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) mx = s[i] > mx ? s[i] : mx;
  // Every score -inf so far (only from -inf inputs: finite logits saturate): no weight yet,
  // and no exp(-inf - -inf) = NaN.
  const T base = mx == -std::numeric_limits<T>::infinity() ? T(0) : mx;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const T e = fast_exp(s[i] - base);
    s[i] = e;
    sum += e;
  }
  const T alpha = m == -std::numeric_limits<T>::infinity() ? T(0) : fast_exp(m - mx);
  l = l * alpha + sum;
  m = mx;
  return alpha;
}

// Streaming top-k of one query: (tv, ti) hold its k best (logit, index) pairs so far, sorted by
// descending logit then ascending index, padded with (-inf, INT64_MAX). Offers s[0, n) with
// indices idx0 + i; a NaN logit ranks as -inf (rank_value).
template <typename T>
void topk_offer(const T* s, int64_t n, int64_t idx0, T* tv, int64_t* ti, int64_t k) {
  T thr = tv[k - 1];
  for (int64_t i = 0; i < n; ++i) {
    const T v = rank_value(s[i]);
    if (v < thr) continue;
    const int64_t idx = idx0 + i;
    int64_t pos = k - 1;
    if (!(v > tv[pos] || idx < ti[pos])) continue;  // equal to the last kept one, larger index
    while (pos > 0 && (v > tv[pos - 1] || (v == tv[pos - 1] && idx < ti[pos - 1]))) {
      tv[pos] = tv[pos - 1];
      ti[pos] = ti[pos - 1];
      --pos;
    }
    tv[pos] = v;
    ti[pos] = idx;
    thr = tv[k - 1];
  }
}

// o[r * n + j] *= alpha[j] for an (rows x n) block.
template <typename T>
void scale_columns(T* o, int64_t rows, int64_t n, const T* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = o + r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= alpha[j];
  }
}

// out[r * ld + j] = o[r * n + j] / l[j].
template <typename T>
void write_normalised(const T* o, int64_t rows, int64_t n, const T* l, T* out, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = o + r * n;
    T* dst = out + r * ld;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = row[j] / l[j];
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
