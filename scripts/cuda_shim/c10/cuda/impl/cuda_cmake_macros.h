// Stand-in for the header a CUDA build of torch generates (absent from the CPU wheel), used
// only by scripts/check_cuda_compile.sh. A CUDA torch builds c10_cuda as a shared library.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
