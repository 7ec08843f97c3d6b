// Hot loops of local_track / global_track, compiled once per ISA by isa.h (see simd.h).

// local_track on one frame, for the memory-pixel vectors [v_begin, v_end) (V = lanes<T>()
// consecutive flat positions each; the last vector is shifted back to end at HW, recomputing
// a few pixels with identical results).
//
// mk: (C, mstride) memory key planes (mstride >= max(HW, V), tail zero-padded);
// qp: (C, qstride) query key planes, flat query index q stored at qp[qoff + q], with zeros
//     around so that every offset p + dy*W + dx read here is inside the plane.
// For each lane and offset (dy, dx) the score is accumulated over channels; 8 dx offsets
// share one load of the memory vector. Offsets are visited in increasing flat index order and
// only a strictly larger score replaces the best, so ties keep the smaller index.
template <typename T>
void local_track_vectors(const T* mk, int64_t mstride, const T* qp, int64_t qstride, int64_t qoff, int64_t* out,
                         int64_t C, int64_t H, int64_t W, int64_t rady, int64_t radx, int64_t rad, int64_t v_begin,
                         int64_t v_end) {
  using V = typename Vec<T>::type;
  using M = typename Vec<T>::mask;
  using I = typename Vec<T>::index;
  constexpr int L = lanes<T>();
  constexpr int G = 8;  // dx offsets per channel sweep
  const int64_t HW = H * W;
  for (int64_t v = v_begin; v < v_end; ++v) {
    const int64_t p0 = std::max<int64_t>(0, std::min(v * L, HW - L));
    M py, px, pflat, live;
    for (int l = 0; l < L; ++l) {
      const int64_t p = p0 + l;
      pflat[l] = static_cast<I>(p);
      py[l] = static_cast<I>(p / W);
      px[l] = static_cast<I>(p % W);
      live[l] = p < HW ? -1 : 0;
    }
    V best;
    M bidx;
    for (int l = 0; l < L; ++l) {
      best[l] = -std::numeric_limits<T>::infinity();
      // The smallest-index candidate of the window, as reference.py: only kept if every score is NaN.
      bidx[l] = static_cast<I>(std::max<int64_t>(0, py[l] - rad) * W + std::max<int64_t>(0, px[l] - rad));
    }
    const int64_t ymin = p0 / W, ymax = std::min(p0 + L - 1, HW - 1) / W;
    for (int64_t dy = -rady; dy <= rady; ++dy) {
      if (ymax + dy < 0 || ymin + dy >= H) continue;  // no lane has this query row
      const M yok = (py + static_cast<I>(dy) >= 0) & (py + static_cast<I>(dy) < static_cast<I>(H)) & live;
      for (int64_t dx0 = -radx; dx0 <= radx; dx0 += G) {
        V acc[G];
        for (int j = 0; j < G; ++j) acc[j] = V{};
        const T* mrow = mk + p0;
        const T* qrow = qp + qoff + p0 + dy * W + dx0;
        for (int64_t c = 0; c < C; ++c) {
          const V m = vload<V>(mrow + c * mstride);
          const T* q = qrow + c * qstride;
          for (int j = 0; j < G; ++j) acc[j] += m * vload<V>(q + j);
        }
        const int jn = static_cast<int>(std::min<int64_t>(G, radx - dx0 + 1));
        for (int j = 0; j < jn; ++j) {
          const I dx = static_cast<I>(dx0 + j);
          const M ok = yok & (px + dx >= 0) & (px + dx < static_cast<I>(W));
          const M better = ok & (acc[j] > best);
          best = better ? acc[j] : best;
          bidx = better ? pflat + static_cast<I>(dy * W + dx) : bidx;
        }
      }
    }
    for (int l = 0; l < L && p0 + l < HW; ++l) out[p0 + l] = bidx[l];
  }
}

// The same on rows of the frame, for W >= V: tiles of RT memory rows x V columns (the last
// vector of a row shifted back to end at W). The RT rows share every query load: query row
// y0 + s serves memory row y0 + i at dy = s - i. Two rows need 2 x 8 accumulators: only with
// the 32 registers of AVX-512. G: dx offsets per channel sweep (7 for HMMN's window 7).
template <typename T, int G>
void local_track_rows(const T* mk, int64_t mstride, const T* qp, int64_t qstride, int64_t qoff, int64_t* out,
                      int64_t C, int64_t H, int64_t W, int64_t rady, int64_t radx, int64_t rad, int64_t t_begin,
                      int64_t t_end) {
  using V = typename Vec<T>::type;
  using M = typename Vec<T>::mask;
  using I = typename Vec<T>::index;
  constexpr int L = lanes<T>();
  constexpr int RT = HMMN_VEC_BYTES >= 64 ? 2 : 1;
  const int64_t nx = (W + L - 1) / L;  // vectors per row
  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    const int64_t y0 = (tile / nx) * RT, x0 = std::min((tile % nx) * L, W - L);
    const int rows = static_cast<int>(std::min<int64_t>(RT, H - y0));
    M px;
    for (int l = 0; l < L; ++l) px[l] = static_cast<I>(x0 + l);
    V best[RT];
    M bidx[RT];
    for (int i = 0; i < RT; ++i) {
      for (int l = 0; l < L; ++l) {
        best[i][l] = -std::numeric_limits<T>::infinity();
        bidx[i][l] = static_cast<I>(std::max<int64_t>(0, y0 + i - rad) * W + std::max<int64_t>(0, x0 + l - rad));
      }
    }
    for (int64_t s = -rady; s <= rady + rows - 1; ++s) {
      const int64_t qy = y0 + s;
      if (qy < 0 || qy >= H) continue;
      bool use[RT];
      for (int i = 0; i < RT; ++i) use[i] = i < rows && s - i >= -rady && s - i <= rady;
      for (int64_t dx0 = -radx; dx0 <= radx; dx0 += G) {
        V acc[RT][G];
        for (int i = 0; i < RT; ++i)
          for (int j = 0; j < G; ++j) acc[i][j] = V{};
        const T* qrow = qp + qoff + qy * W + x0 + dx0;
        const T* mrow = mk + y0 * W + x0;
        for (int64_t c = 0; c < C; ++c) {
          const T* q = qrow + c * qstride;
          V m[RT];
          for (int i = 0; i < RT; ++i) m[i] = vload<V>(mrow + c * mstride + (i < rows ? i : 0) * W);
          for (int j = 0; j < G; ++j) {
            V qv = vload<V>(q + j);
#if HMMN_X86_MULTIVERSION
            // Keep the load in a register: folded into each FMA it would be loaded RT times.
            asm("" : "+v"(qv));
#endif
            for (int i = 0; i < RT; ++i) acc[i][j] += m[i] * qv;
          }
        }
        const int jn = static_cast<int>(std::min<int64_t>(G, radx - dx0 + 1));
        for (int i = 0; i < RT; ++i) {
          if (!use[i]) continue;
          for (int j = 0; j < jn; ++j) {
            const I dx = static_cast<I>(dx0 + j);
            const M better = (px + dx >= 0) & (px + dx < static_cast<I>(W)) & (acc[i][j] > best[i]);
            best[i] = better ? acc[i][j] : best[i];
            bidx[i] = better ? px + static_cast<I>(qy * W + dx) : bidx[i];
          }
        }
      }
    }
    for (int i = 0; i < rows; ++i)
      for (int l = 0; l < L; ++l) out[(y0 + i) * W + x0 + l] = bidx[i][l];
  }
}

// Tiles of local_track_rows for an H x W frame.
template <typename T>
int64_t local_track_row_tiles(int64_t H, int64_t W) {
  constexpr int RT = HMMN_VEC_BYTES >= 64 ? 2 : 1;
  return (H + RT - 1) / RT * ((W + lanes<T>() - 1) / lanes<T>());
}

// Running argmax of one row of scores s[0, n): updates (best, idx) only on a strictly larger
// value, so across chunks visited in order ties keep the earlier index. NaN is never larger
// (it ranks as -inf).
template <typename T>
void row_argmax(const T* s, int64_t n, int64_t offset, T& best, int64_t& idx) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = s[i] > m ? s[i] : m;
  if (!(m > best)) return;
  for (int64_t i = 0; i < n; ++i) {
    if (s[i] == m) {
      best = m;
      idx = offset + i;
      return;
    }
  }
}
