// Element-wise pieces every read shares (kernel_guided_read, topk_guided_read, memory_read):
// the online softmax step, the streaming top-k with the tie rule, accumulator rescaling, and
// small vector helpers. Included by the *_kernels.h files inside each ISA namespace of isa.h
// (no include guard, no #include: everything it uses comes from common.h and simd.h).

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
inline void axpy(T* y, T a, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Online softmax step for one query: raises the running max m to cover s, replaces s by
// exp(s - m), adds their sum to the running sum l (first rescaled), and returns the factor
// exp(m_old - m_new) by which earlier partial outputs must be rescaled.
template <typename T>
T softmax_row_update(T* s, int64_t n, T& m, T& l) {
  T mx = m;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) mx = s[i] > mx ? s[i] : mx;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const T e = fast_exp(s[i] - mx);
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
// indices idx0 + i.
template <typename T>
void topk_offer(const T* s, int64_t n, int64_t idx0, T* tv, int64_t* ti, int64_t k) {
  T thr = tv[k - 1];
  for (int64_t i = 0; i < n; ++i) {
    const T v = s[i];
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
