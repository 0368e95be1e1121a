// What every kernel file includes first: the CUDA built-ins, either real (nvcc) or emulated on host threads
// (VERA_EMULATE_CUDA, the test-only build that runs these same kernels on the CPU), plus the one launch helper
// through which every kernel is started.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <utility>

namespace vera {
// Launches `Kernel` on `stream` and returns the launch error. An empty grid launches nothing (CUDA rejects it).
// The kernel is a template argument so that the emulated build (tests/emulated/emu/cuda_emu.h) knows its name for
// the traces.
template <auto Kernel, typename... Args>
inline cudaError_t launch_kernel(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  Kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}
}  // namespace vera
#elif defined(VERA_EMULATE_CUDA)
#include "emu/cuda_emu.h"
#else
#error "csrc/cuda kernels compile with nvcc, or with g++ and -DVERA_EMULATE_CUDA for the emulated test build"
#endif

#include <cstdint>

// Loop unrolling hint for nvcc; g++ (the emulated build) has no such pragma and would warn.
#if defined(__CUDACC__)
#define VERA_UNROLL _Pragma("unroll")
#else
#define VERA_UNROLL
#endif
