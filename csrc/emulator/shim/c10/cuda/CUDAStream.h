// Emulated build: kernels run synchronously on the calling thread's launch; one null stream.
#pragma once

#include "emulator/emulator.h"

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace c10::cuda
