// Emulated build (csrc/emulator): stands in for torch's c10/cuda header so the CUDA glue
// (csrc/cuda/*.cu) compiles unchanged for CPU tensors. C10_CUDA_CHECK raises the emulator's
// error (a failed launch, a divergent barrier...) as a RuntimeError with its detail.
#pragma once

#include <c10/util/Exception.h>

#include "emulator/emulator.h"

#define C10_CUDA_CHECK(EXPR)                                                                                 \
  do {                                                                                                       \
    const cudaError_t hmmn_emu_err = (EXPR);                                                                 \
    TORCH_CHECK(hmmn_emu_err == cudaSuccess, "CUDA emulator: ", cudaGetErrorString(hmmn_emu_err), ": ",       \
                ::hmmn_emu::error_detail());                                                                 \
  } while (0)
