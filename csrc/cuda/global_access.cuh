// The access helpers: every global-memory load and store of the kernels goes through these, so that the emulated
// build can trace them (tests/emulated/emu/emu_trace.h: requests, sectors, bytes, footprint), which
// benchmarks/kernel_report.py turns into the kernel cost report. Under nvcc they are the plain accesses they wrap:
// `load(p)` is `*p` (an LDG of sizeof(T) bytes: 16 for uint4), `store(p, v)` is `*p = v`. Shared memory is
// accessed directly.
#pragma once

#include "cuda/kernel_prelude.h"

#if defined(VERA_EMULATE_CUDA)
#include <source_location>
// The caller's source position identifies the instruction: the lanes of a warp at the same site form one request.
#define VERA_ACCESS_SITE , const std::source_location& site = std::source_location::current()
#define VERA_TRACE_ACCESS(ptr, bytes, kind) ::vera_emu::trace::access(ptr, bytes, ::vera_emu::trace::Kind::kind, site)
#else
#define VERA_ACCESS_SITE
#define VERA_TRACE_ACCESS(ptr, bytes, kind) ((void)0)
#endif

namespace vera::cuda {

template <typename T>
__device__ __forceinline__ T load(const T* p VERA_ACCESS_SITE) {
  VERA_TRACE_ACCESS(p, sizeof(T), kLoad);
  return *p;
}

template <typename T>
__device__ __forceinline__ void store(T* p, const T& value VERA_ACCESS_SITE) {
  VERA_TRACE_ACCESS(p, sizeof(T), kStore);
  *p = value;
}

__device__ __forceinline__ int atomic_or(int* p, int value VERA_ACCESS_SITE) {
  VERA_TRACE_ACCESS(p, sizeof(int), kAtomic);
  return atomicOr(p, value);
}

}  // namespace vera::cuda

#undef VERA_ACCESS_SITE
#undef VERA_TRACE_ACCESS
