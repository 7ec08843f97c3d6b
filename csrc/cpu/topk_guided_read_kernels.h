// Hot loops of topk_guided_read (SPEC 5) and its backward, compiled once per ISA by isa.h.
//
// A coarse cell has rr = r*r fine queries and m = k*r*r fine candidates. Keys and values are
// channel-last rows (kt[p * Ck + c], vt[p * Cv + c]); `fine` lists the cell's m candidate rows.
// Each candidate row is read once per cell and used for all rr queries of the cell.
#include "read_kernels.h"

// Forward softmax of `rows` rows of n raw scores <q, k>, in place: s -> P = softmax(scale * s),
// lse[row] = log-sum-exp of the row's logits.
template <typename T>
void softmax_rows(T* s, int64_t rows, int64_t n, T scale, T* lse) {
  for (int64_t i = 0; i < rows; ++i) {
    T* row = s + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= scale;
    T mx = row[0];
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const T e = fast_exp(row[j] - mx);
      row[j] = e;
      sum += e;
    }
    lse[i] = mx + std::log(sum);
    const T inv = T(1) / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  }
}

// Backward of one cell (first pass): recomputes P from lse, stores P and
// dS = P * (<v_j, dO_i> - D_i) as (rr, m) rows, and writes dq = scale * dS @ K (rr, Ck).
// d_out: (rr, Cv) output gradients of the cell's queries; delta: (rr) D_i.
template <typename T>
void topk_cell_backward(const T* q, const T* d_out, const T* lse, const T* delta, int64_t rr, const T* kt,
                        const T* vt, const int64_t* fine, int64_t m, int64_t Ck, int64_t Cv, T scale, T* p, T* ds,
                        T* dq) {
  for (int64_t j = 0; j < m; ++j) {
    const T* kp = kt + fine[j] * Ck;
    const T* vp = vt + fine[j] * Cv;
    for (int64_t i = 0; i < rr; ++i) {
      const T pr = fast_exp(dot(q + i * Ck, kp, Ck) * scale - lse[i]);
      p[i * m + j] = pr;
      ds[i * m + j] = pr * (dot(d_out + i * Cv, vp, Cv) - delta[i]);
    }
  }
  std::fill(dq, dq + rr * Ck, T(0));
  for (int64_t j = 0; j < m; ++j) {
    const T* kp = kt + fine[j] * Ck;
    for (int64_t i = 0; i < rr; ++i) axpy(dq + i * Ck, ds[i * m + j], kp, Ck);
  }
  for (int64_t i = 0; i < rr * Ck; ++i) dq[i] *= scale;
}

// Backward, second pass, for the rr fine rows of one coarse memory position (base, base + 1,
// ..., base + (r-1)*W + r-1): adds the contributions of every (cell, k-slot) pair that lists
// it, in the given order. p, ds: (Nc, rr, m) rows of pass one; qt, dot: (HW, Ck), (HW, Cv)
// channel-last queries and output gradients.
template <typename T>
void topk_memory_backward(const int64_t* entries, int64_t n_entries, const T* p, const T* ds, int64_t r, int64_t W,
                          int64_t Wc, int64_t m, const T* qt, const T* dot_, int64_t Ck, int64_t Cv, int64_t base,
                          T scale, T* dkt, T* dvt) {
  const int64_t rr = r * r;
  for (int64_t e = 0; e < n_entries; ++e) {
    const int64_t cell = entries[2 * e], kk = entries[2 * e + 1];
    const int64_t q00 = (cell / Wc) * r * W + (cell % Wc) * r;  // the cell's first fine query
    const T* pe = p + cell * rr * m + kk * rr;
    const T* dse = ds + cell * rr * m + kk * rr;
    for (int64_t i = 0; i < rr; ++i) {
      const int64_t qf = q00 + (i / r) * W + i % r;
      const T* qi = qt + qf * Ck;
      const T* gi = dot_ + qf * Cv;
      for (int64_t ab = 0; ab < rr; ++ab) {
        const int64_t row = base + (ab / r) * W + ab % r;
        axpy(dvt + row * Cv, pe[i * m + ab], gi, Cv);
        axpy(dkt + row * Ck, dse[i * m + ab], qi, Ck);
      }
    }
  }
  for (int64_t ab = 0; ab < rr; ++ab) {
    T* dk = dkt + (base + (ab / r) * W + ab % r) * Ck;
#pragma omp simd
    for (int64_t c = 0; c < Ck; ++c) dk[c] *= scale;
  }
}
