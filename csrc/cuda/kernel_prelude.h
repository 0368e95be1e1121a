// What every kernel file includes first: the CUDA built-ins, either real (nvcc) or emulated on host threads
// (VERA_EMULATE_CUDA, the test-only build that runs these same kernels on the CPU), plus the launch helpers through
// which every kernel is started (plain, or as a programmatic dependent of the kernel before it) and the device-side
// helpers that go with them.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cassert>  // the device-side __assert_fail of VERA_DEVICE_REQUIRE
#include <utility>

#if defined(NDEBUG)
// With NDEBUG (as torch's extension builds compile) the headers above leave __assert_fail undeclared; CUDA's device
// runtime still provides it, and VERA_DEVICE_REQUIRE checks whatever NDEBUG says.
extern "C" {
[[noreturn]] __host__ __device__ void __assert_fail(const char* assertion, const char* file, unsigned int line,
                                                    const char* function) noexcept;
}
#endif

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

// An attribute of the current device, asked once per device and attribute kind (0 when it cannot be asked).
template <cudaDeviceAttr kAttr>
inline int current_device_attribute() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};  // 0: not asked yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 0;
  int value = cached[device].load(std::memory_order_relaxed);
  if (value == 0 && cudaDeviceGetAttribute(&value, kAttr, device) == cudaSuccess && value > 0) {
    cached[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

// The SM count of the current device (persistent grids are sized from it); an H200's 132 if it cannot be asked.
inline int sm_count() {
  const int count = current_device_attribute<cudaDevAttrMultiProcessorCount>();
  return count > 0 ? count : 132;
}

// Whether the current device runs programmatic dependent launches (PDL: compute capability 9.0 and later).
inline bool device_has_pdl() { return current_device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 9; }

// Launches `Kernel` as a programmatic dependent of the kernel before it on `stream` (PDL): its blocks may start
// once every block of that kernel has called allow_dependent_launch() (or exited), so its launch and the work it
// does before grid_dependency_wait() overlap the kernel before it. Everything that kernel writes, and everything
// before it on the stream, must be read only after grid_dependency_wait(). A plain launch where PDL is missing
// (the wait is then a no-op: the stream already ordered the two).
template <auto Kernel, typename... Args>
inline cudaError_t launch_kernel_dependent(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                                           Args&&... args) {
  if (!device_has_pdl()) return launch_kernel<Kernel>(grid, block, shared_bytes, stream, std::forward<Args>(args)...);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, Kernel, std::forward<Args>(args)...);
}

// In a kernel launched with launch_kernel_dependent: waits until the kernel before it has finished and its writes
// are visible. No-op before sm_90 and in a plain launch.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// In the kernel before a launch_kernel_dependent one: lets the dependent grid's blocks start (they still wait for
// this grid's completion in grid_dependency_wait). No-op before sm_90.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A device-side refusal: when `ok` is false the kernel stops with a device-side assert (the stream's error, as
// torch's own index kernels report a bad index) naming `what`. The calling thread does not go past a failed check.
#define VERA_DEVICE_REQUIRE(ok, what)                             \
  do {                                                            \
    if (!(ok)) __assert_fail(what, __FILE__, __LINE__, __func__); \
  } while (0)
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
