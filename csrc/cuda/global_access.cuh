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

// A 16-byte load of data read once and never again soon (a frozen weight streamed by the decode kernels): not kept
// in L1 and marked evict-first in L2, so that it does not push out what is reused across kernels (the shared VeRA
// projections A and B, read by every layer). Under nvcc: `ld.global.nc.L1::no_allocate.L2::cache_hint.v4` with an
// evict-first policy (LDG.E.NA.128.CONSTANT in SASS; the `.L2::evict_first` qualifier itself needs 32-byte loads,
// sm_100). p must be 16-byte aligned and the data must not change while the kernel runs (.nc). Traced as a load.
__device__ __forceinline__ uint4 load_stream(const uint4* p VERA_ACCESS_SITE) {
  VERA_TRACE_ACCESS(p, sizeof(uint4), kLoad);
#if defined(__CUDA_ARCH__)
  uint4 v;
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "l"(policy));
  return v;
#else
  return *p;
#endif
}

__device__ __forceinline__ int atomic_or(int* p, int value VERA_ACCESS_SITE) {
  VERA_TRACE_ACCESS(p, sizeof(int), kAtomic);
  return atomicOr(p, value);
}

}  // namespace vera::cuda

#undef VERA_ACCESS_SITE
#undef VERA_TRACE_ACCESS
