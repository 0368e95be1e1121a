// Device functions for the emulated build: atomics (relaxed, like the GPU's), memory fences, read-only loads and
// the float/bit intrinsics kernels commonly use. The fast-math intrinsics (__expf, ...) are computed exactly
// here, so results can differ from the GPU's approximations in the last bits.
#pragma once

#include <math.h>  // unqualified isfinite/sqrtf/... as in device code

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace vera_emu::detail {

template <typename T>
std::atomic_ref<T> atomic_at(T* address) {
  return std::atomic_ref<T>(*address);
}

// Read-modify-write through a CAS loop, for the operations atomic_ref lacks (min, max, inc, dec).
template <typename T, typename F>
T atomic_update(T* address, F&& f) {
  std::atomic_ref<T> a(*address);
  T old = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(old, f(old), std::memory_order_relaxed)) {
  }
  return old;
}

}  // namespace vera_emu::detail

#define VERA_EMU_ATOMIC_RMW(NAME, METHOD, T)                                            \
  inline T NAME(T* address, T val) {                                                    \
    return vera_emu::detail::atomic_at(address).METHOD(val, std::memory_order_relaxed); \
  }

VERA_EMU_ATOMIC_RMW(atomicAdd, fetch_add, int)
VERA_EMU_ATOMIC_RMW(atomicAdd, fetch_add, unsigned int)
VERA_EMU_ATOMIC_RMW(atomicAdd, fetch_add, unsigned long long)
VERA_EMU_ATOMIC_RMW(atomicAdd, fetch_add, float)
VERA_EMU_ATOMIC_RMW(atomicAdd, fetch_add, double)
VERA_EMU_ATOMIC_RMW(atomicSub, fetch_sub, int)
VERA_EMU_ATOMIC_RMW(atomicSub, fetch_sub, unsigned int)
VERA_EMU_ATOMIC_RMW(atomicExch, exchange, int)
VERA_EMU_ATOMIC_RMW(atomicExch, exchange, unsigned int)
VERA_EMU_ATOMIC_RMW(atomicExch, exchange, unsigned long long)
VERA_EMU_ATOMIC_RMW(atomicExch, exchange, float)
VERA_EMU_ATOMIC_RMW(atomicAnd, fetch_and, int)
VERA_EMU_ATOMIC_RMW(atomicAnd, fetch_and, unsigned int)
VERA_EMU_ATOMIC_RMW(atomicAnd, fetch_and, unsigned long long)
VERA_EMU_ATOMIC_RMW(atomicOr, fetch_or, int)
VERA_EMU_ATOMIC_RMW(atomicOr, fetch_or, unsigned int)
VERA_EMU_ATOMIC_RMW(atomicOr, fetch_or, unsigned long long)
VERA_EMU_ATOMIC_RMW(atomicXor, fetch_xor, int)
VERA_EMU_ATOMIC_RMW(atomicXor, fetch_xor, unsigned int)
VERA_EMU_ATOMIC_RMW(atomicXor, fetch_xor, unsigned long long)
#undef VERA_EMU_ATOMIC_RMW

#define VERA_EMU_ATOMIC_MINMAX(T)                                                                    \
  inline T atomicMin(T* address, T val) {                                                            \
    return vera_emu::detail::atomic_update(address, [val](T old) { return val < old ? val : old; }); \
  }                                                                                                  \
  inline T atomicMax(T* address, T val) {                                                            \
    return vera_emu::detail::atomic_update(address, [val](T old) { return val > old ? val : old; }); \
  }
VERA_EMU_ATOMIC_MINMAX(int)
VERA_EMU_ATOMIC_MINMAX(unsigned int)
VERA_EMU_ATOMIC_MINMAX(long long)
VERA_EMU_ATOMIC_MINMAX(unsigned long long)
#undef VERA_EMU_ATOMIC_MINMAX

// ((old >= val) ? 0 : (old + 1)) and (((old == 0) || (old > val)) ? val : (old - 1)), as CUDA defines them.
inline unsigned int atomicInc(unsigned int* address, unsigned int val) {
  return vera_emu::detail::atomic_update(address, [val](unsigned int old) { return old >= val ? 0u : old + 1; });
}
inline unsigned int atomicDec(unsigned int* address, unsigned int val) {
  return vera_emu::detail::atomic_update(address,
                                         [val](unsigned int old) { return (old == 0 || old > val) ? val : old - 1; });
}

template <typename T>
T atomicCAS(T* address, T compare, T val) {
  static_assert(std::is_integral_v<T> && (sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8), "atomicCAS on integers");
  vera_emu::detail::atomic_at(address).compare_exchange_strong(compare, val, std::memory_order_relaxed);
  return compare;  // the old value either way
}

// Fences order this thread's accesses (ThreadSanitizer does not model standalone fences: fence-based publication
// patterns are reported as races there; prefer acquire/release atomics in kernels that publish data).
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __ldg(const T* p) {
  return *p;
}

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0

inline int __float_as_int(float x) {
  int i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline unsigned int __float_as_uint(float x) {
  unsigned int i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline float __int_as_float(int i) {
  float x;
  std::memcpy(&x, &i, 4);
  return x;
}
inline float __uint_as_float(unsigned int i) {
  float x;
  std::memcpy(&x, &i, 4);
  return x;
}
inline long long __double_as_longlong(double x) {
  long long i;
  std::memcpy(&i, &x, 8);
  return i;
}
inline double __longlong_as_double(long long i) {
  double x;
  std::memcpy(&x, &i, 8);
  return x;
}

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  unsigned int r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

// CUDA's unqualified min/max overloads of device code.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
