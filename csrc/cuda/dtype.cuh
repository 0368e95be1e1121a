// Element types of the kernels: fp32 math on float / __half / __nv_bfloat16 storage, and the runtime-to-template
// switch the launchers use instead of hand-written dtype ladders.
#pragma once

#include "cuda/global_access.cuh"
#include "cuda/kernel_prelude.h"
#include "cuda/params.h"

namespace vera::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls f(T{}) with T the storage type of `t`.
template <typename F>
inline cudaError_t dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::F32: return f(float{});
    case DType::F16: return f(__half{});
    case DType::BF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Grid-stride loops over 64-bit element counts: enough blocks to fill the GPU, capped so a launch stays cheap.
constexpr int kThreads = 256;
inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  const int64_t want = (n + threads - 1) / threads;
  return static_cast<unsigned int>(want < 4096 ? want : 4096);
}

}  // namespace vera::cuda
