// CUDA's plain host-visible types for the emulated build: error codes, streams, dim3/uint3 and the vector types
// (float4, int2, ...) with CUDA's sizes and alignments, so that reinterpret_casts to vector types behave (and
// misalign) as on the GPU; UBSan's alignment check then reports what would be a misaligned-address fault there.
#pragma once

#include <cstddef>
#include <cstdint>

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNotSupported = 801,
  cudaErrorLaunchFailure = 719,  // the emulation's own findings: barrier divergence, bad masks, deadlock, ...
};
using cudaError = cudaError_t;

struct CUstream_st;  // never defined: streams are accepted and ignored (every emulated launch is synchronous)
using cudaStream_t = CUstream_st*;

enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// One vector family: T1 (alignment of T), T2 (2 * sizeof(T)), T3 (alignment of T), T4 (4 * sizeof(T), at most 16).
#define VERA_EMU_VECTOR_FAMILY(T, NAME)                                              \
  struct NAME##1 { T x; };                                                           \
  struct alignas(2 * sizeof(T)) NAME##2 { T x, y; };                                 \
  struct NAME##3 { T x, y, z; };                                                     \
  struct alignas(4 * sizeof(T) < 16 ? 4 * sizeof(T) : 16) NAME##4 { T x, y, z, w; }; \
  inline NAME##1 make_##NAME##1(T x) { return NAME##1 {x}; }                         \
  inline NAME##2 make_##NAME##2(T x, T y) { return NAME##2 {x, y}; }                 \
  inline NAME##3 make_##NAME##3(T x, T y, T z) { return NAME##3 {x, y, z}; }         \
  inline NAME##4 make_##NAME##4(T x, T y, T z, T w) { return NAME##4 {x, y, z, w}; }

VERA_EMU_VECTOR_FAMILY(signed char, char)
VERA_EMU_VECTOR_FAMILY(unsigned char, uchar)
VERA_EMU_VECTOR_FAMILY(short, short)
VERA_EMU_VECTOR_FAMILY(unsigned short, ushort)
VERA_EMU_VECTOR_FAMILY(int, int)
VERA_EMU_VECTOR_FAMILY(unsigned int, uint)
VERA_EMU_VECTOR_FAMILY(long, long)
VERA_EMU_VECTOR_FAMILY(unsigned long, ulong)
VERA_EMU_VECTOR_FAMILY(long long, longlong)
VERA_EMU_VECTOR_FAMILY(unsigned long long, ulonglong)
VERA_EMU_VECTOR_FAMILY(float, float)
VERA_EMU_VECTOR_FAMILY(double, double)
#undef VERA_EMU_VECTOR_FAMILY

static_assert(sizeof(float4) == 16 && alignof(float4) == 16 && alignof(float2) == 8 && alignof(int4) == 16 &&
                  alignof(double2) == 16 && alignof(short2) == 4 && alignof(char4) == 4 && sizeof(float3) == 12,
              "vector types must have CUDA's sizes and alignments");

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
