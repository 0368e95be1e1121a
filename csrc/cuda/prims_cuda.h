// The CUDA Prims: the kernel steps of kernel_prims.h launched on the current stream of the tensors' device, under
// a device guard, with every launch checked.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/kernel_prims.h"

namespace vera::cuda {

struct CudaLaunch {
  using Guard = c10::cuda::CUDAGuard;
  static cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }
  static void check(cudaError_t err, const char* /*what*/) { C10_CUDA_CHECK(err); }
  static bool capturing() {
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  }
  static void clear_partials(at::Tensor&) {}  // every block writes its partial
};

using Prims = KernelPrims<CudaLaunch>;

}  // namespace vera::cuda
