// Per-ISA helpers for the *_kernels.h files; included by isa.h inside each ISA namespace
// (no include guard, no #include: everything it uses is included by common.h).
// HMMN_VEC_BYTES is the native vector width of the ISA being compiled.

// GCC vector extensions at the native width: portable code that compiles to SSE, AVX2 or
// AVX-512 depending on the target in force.
template <typename T> struct Vec;
template <> struct Vec<float> {
  typedef float type __attribute__((vector_size(HMMN_VEC_BYTES)));
  typedef int32_t mask __attribute__((vector_size(HMMN_VEC_BYTES)));  // what a comparison returns
  typedef int32_t index;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(HMMN_VEC_BYTES)));
  typedef int64_t mask __attribute__((vector_size(HMMN_VEC_BYTES)));
  typedef int64_t index;
};
template <typename T> constexpr int lanes() { return HMMN_VEC_BYTES / sizeof(T); }

// Unaligned load / store of a whole vector.
template <typename V, typename T> inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T> inline void vstore(T* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }

// exp(x) for float, ~1 ulp (Cephes expf), branch-free so that loops calling it vectorise.
// Below -87.33 (where expf leaves the normal range) it returns 0.
inline float fast_exp(float x_in) {
  float x = x_in < -87.33f ? -87.33f : x_in;
  x = x > 88.37f ? 88.37f : x;
  const float t = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: round to nearest int
  const float n = t - 12582912.0f;
  int32_t ni;
  std::memcpy(&ni, &t, 4);
  ni -= 0x4B400000;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x_in < -87.33f ? 0.0f : p * scale;
}
// double keeps libm's exp (the double path is for accuracy, not speed).
inline double fast_exp(double x) { return std::exp(x); }

// The numeric rules of docs/reliability.md, shared by every kernel:
// a logit clamped to +-1e36 (float) / +-1e300 (double), NaN kept, so that an overflow (huge
// scale, a sigma whose 1 / (2 sigma^2) is inf) saturates instead of making inf - inf = NaN in a
// softmax, and a log-sum-exp of saturated logits stays finite (reference.py's LOGIT_BOUND);
template <typename T> inline T saturate(T x) {
  constexpr T big = sizeof(T) == 4 ? T(1e36f) : T(1e300);
  return x > big ? big : (x < -big ? -big : x);
}
// the Gaussian term -d2 * g, exactly 0 at d2 == 0 even where g overflowed to inf (no 0 * inf);
template <typename T> inline T gauss_term(T d2, T g) { return d2 == T(0) ? T(0) : -(d2 * g); }
// a score as top-k and argmax rank it: NaN counts as -inf (ranks last, ties to the smaller index).
template <typename T> inline T rank_value(T x) { return x != x ? -std::numeric_limits<T>::infinity() : x; }
