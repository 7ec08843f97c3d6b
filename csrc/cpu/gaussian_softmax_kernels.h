// Hot loops of gaussian_softmax (docs/ops.md section 2), compiled once per ISA by isa.h.
//
// A task owns a slab of n consecutive query columns [q0, q0 + n) of one batch item (wide
// enough that each row segment spans many cache lines: strided narrow slabs thrash the TLB).
// Sweep one walks the M memory rows in blocks of R: the block's logits (affinity + log-Gaussian
// bias) go to a small buffer, the running column max is raised once per block, the running sum
// rescaled once and the block's exp(logit - max) added. Sweep two recomputes each logit and
// writes exp(logit - max) / sum. The matrix is read twice and written once, the first read
// being the only one not served by the block buffer; no exp(m_old - m_new) per element.

constexpr int64_t kSoftmaxRows = 16;  // R

// Coordinates of the slab's queries, shared by every row.
template <typename T>
inline void query_coords(int64_t q0, int64_t n, int64_t W, T* qy, T* qx) {
  for (int64_t j = 0; j < n; ++j) {
    qy[j] = static_cast<T>((q0 + j) / W);
    qx[j] = static_cast<T>((q0 + j) % W);
  }
}

// logit[j] = saturate(a[j] + gauss_term((qy[j] - cy)^2 + (qx[j] - cx)^2, g)), as reference.py
// (g = 0 where a position has no centre; simd.h).
template <typename T>
inline void gaussian_row(const T* a, T* logit, const T* qy, const T* qx, T cy, T cx, T g, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T dy = qy[j] - cy, dx = qx[j] - cx;
    logit[j] = saturate(a[j] + gauss_term(dy * dy + dx * dx, g));
  }
}

// work: (5 + R) * n elements.
template <typename T>
void gaussian_softmax_slab(const T* a, T* out, const int64_t* centers, const T* gamma, int64_t M, int64_t HW,
                           int64_t W, int64_t q0, int64_t n, T* work) {
  constexpr int64_t R = kSoftmaxRows;
  T* qy = work;
  T* qx = qy + n;
  T* m = qx + n;
  T* l = m + n;
  T* mx = l + n;
  T* block = mx + n;  // R * n logits
  query_coords(q0, n, W, qy, qx);
  for (int64_t j = 0; j < n; ++j) {
    m[j] = -std::numeric_limits<T>::infinity();
    l[j] = 0;
  }
  // (cy, cx, g) of memory row p
  auto centre = [&](int64_t p, T& cy, T& cx, T& g) {
    const int64_t c = centers[p];
    g = c >= 0 ? gamma[p / HW] : T(0);
    cy = c >= 0 ? static_cast<T>(c / W) : T(0);
    cx = c >= 0 ? static_cast<T>(c % W) : T(0);
  };
  for (int64_t p0 = 0; p0 < M; p0 += R) {
    const int64_t rows = std::min(R, M - p0);
    for (int64_t r = 0; r < rows; ++r) {
      T cy, cx, g;
      centre(p0 + r, cy, cx, g);
      gaussian_row(a + (p0 + r) * HW + q0, block + r * n, qy, qx, cy, cx, g, n);
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) mx[j] = m[j];
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = block + r * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) mx[j] = row[j] > mx[j] ? row[j] : mx[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      // first block: m = -inf and l = 0, so the factor does not matter (but must not be NaN)
      l[j] *= fast_exp((m[j] == -std::numeric_limits<T>::infinity() ? mx[j] : m[j]) - mx[j]);
      m[j] = mx[j];
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = block + r * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) l[j] += fast_exp(row[j] - m[j]);
    }
  }
  for (int64_t j = 0; j < n; ++j) l[j] = T(1) / l[j];
  for (int64_t p = 0; p < M; ++p) {
    T cy, cx, g;
    centre(p, cy, cx, g);
    T* o = out + p * HW + q0;
    gaussian_row(a + p * HW + q0, block, qy, qx, cy, cx, g, n);  // via L1: one store to the output
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = fast_exp(block[j] - m[j]) * l[j];
  }
}

// Softmax backward over dim 1 for a column slab: grad = y * (g - sum_p g * y).
// work: n elements.
template <typename T>
void softmax_backward_slab(const T* g, const T* y, T* grad, int64_t M, int64_t HW, int64_t n, T* work) {
  T* dot = work;
  for (int64_t j = 0; j < n; ++j) dot[j] = 0;
  for (int64_t p = 0; p < M; ++p) {
    const T* gr = g + p * HW;
    const T* yr = y + p * HW;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dot[j] += gr[j] * yr[j];
  }
  for (int64_t p = 0; p < M; ++p) {
    const T* gr = g + p * HW;
    const T* yr = y + p * HW;
    T* o = grad + p * HW;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = yr[j] * (gr[j] - dot[j]);
  }
}
