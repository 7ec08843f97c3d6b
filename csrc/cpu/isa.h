// Compiles the kernel header named by HMMN_KERNELS once per ISA level. No include guard on
// purpose: each op's .cpp includes it once, after every other header (so that no library
// code is compiled with the wider target and shared with the baseline build).
//
//   #define HMMN_KERNELS "local_track_kernels.h"
//   #include "isa.h"
//   ... HMMN_PICK(local_track_vectors<float>) ...
//
// x86-64 with GCC: isa_base (SSE2), isa_avx2 (AVX2 + FMA), isa_avx512 (F/VL/BW/DQ);
// elsewhere only isa_base. HMMN_VEC_BYTES is the native vector width of each.
#ifndef HMMN_KERNELS
#error "define HMMN_KERNELS before including isa.h"
#endif

namespace hmmn_ops::cpu {

#if HMMN_X86_MULTIVERSION
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define HMMN_VEC_BYTES 32
namespace isa_avx2 {
#include "simd.h"
#include HMMN_KERNELS
}  // namespace isa_avx2
#undef HMMN_VEC_BYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define HMMN_VEC_BYTES 64
namespace isa_avx512 {
#include "simd.h"
#include HMMN_KERNELS
}  // namespace isa_avx512
#undef HMMN_VEC_BYTES
#pragma GCC pop_options
#endif

#define HMMN_VEC_BYTES 16
namespace isa_base {
#include "simd.h"
#include HMMN_KERNELS
}  // namespace isa_base
#undef HMMN_VEC_BYTES

}  // namespace hmmn_ops::cpu
