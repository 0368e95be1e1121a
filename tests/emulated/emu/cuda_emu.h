// CUDA semantics for host C++ (g++ -std=c++20 -DVERA_EMULATE_CUDA): the built-ins, types and qualifiers our
// kernels use, plus vera::launch_kernel with the signature of the nvcc one in cuda/kernel_prelude.h, so the very
// same kernel source runs on the CPU in tests (tests/emulated). The execution model is described in
// emu_runtime.h. Not modelled: tensor-core instructions, inline PTX, code under __CUDA_ARCH__, partial-warp
// masks, divergence timing, the GPU's weak memory ordering beyond what ThreadSanitizer reports.
//
// `extern __shared__ T name[];` cannot be expressed with a macro (the storage class precedes it); the emulated
// build's source generator (tests/emulated/emu_sources.py) rewrites such declarations to
// VERA_EMU_EXTERN_SHARED(name, T), which points into the dynamic shared memory arena.
#pragma once

#if !defined(VERA_EMULATE_CUDA) || defined(__CUDACC__)
#error "emu/cuda_emu.h is for the emulated build only (g++ with -DVERA_EMULATE_CUDA)"
#endif

#include <cstddef>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emu/emu_device.h"
#include "emu/emu_half.h"
#include "emu/emu_runtime.h"
#include "emu/emu_trace.h"
#include "emu/emu_types.h"
#include "emu/emu_warp.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __constant__
#define __align__(n) __attribute__((aligned(n)))
// One copy per process, shared by the threads of the (single) running block. Not reset between blocks, unlike
// the GPU's: a kernel that reads static shared memory it never wrote sees the previous block's values.
#define __shared__ static
#define VERA_EMU_EXTERN_SHARED(name, ...) __VA_ARGS__* const name = ::vera_emu::dynamic_shared<__VA_ARGS__>()

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated; see vera_emu::last_launch_error())";
  }
  return "unknown error";
}

// Every emulated launch is synchronous and reports its error through its return value.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// Dynamic shared memory above 48 KiB needs this opt-in, as on the GPU.
template <typename... KernelArgs>
cudaError_t cudaFuncSetAttribute(void (*kernel)(KernelArgs...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorNotSupported;
  return vera_emu::detail::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}

namespace vera {

namespace emu_detail {

template <typename F>
struct KernelSignature;
template <typename... KernelArgs>
struct KernelSignature<void (*)(KernelArgs...)> {
  using Tuple = std::tuple<std::decay_t<KernelArgs>...>;  // CUDA's parameter space: by-value copies
};

// The kernel's qualified name with its template arguments, from gcc's spelling of this function's signature
// ("... [with auto Kernel = vera::cuda::{anonymous}::decode_y_kernel<float>]").
template <auto Kernel>
const char* kernel_name() {
  static const std::string name = ::vera_emu::detail::template_argument_named(__PRETTY_FUNCTION__, "Kernel");
  return name.c_str();
}

}  // namespace emu_detail

// Runs `Kernel` over the grid on host threads and returns the launch error. An empty grid launches nothing.
// The arguments are converted to the kernel's parameter types once (CUDA's parameter space); every thread gets
// its own by-value copies.
template <auto Kernel, bool programmatic = false, typename... Args>
inline cudaError_t launch_kernel(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t /*stream*/, Args&&... args) {
  using Call = typename emu_detail::KernelSignature<decltype(Kernel)>::Tuple;
  static_assert(std::tuple_size_v<Call> == sizeof...(Args), "launch_kernel: argument count differs from the kernel's");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  const Call call(std::forward<Args>(args)...);
  const vera_emu::detail::Thunk thunk = [](const void* c) { std::apply(Kernel, *static_cast<const Call*>(c)); };
  return vera_emu::detail::run_grid(grid, block, shared_bytes, reinterpret_cast<const void*>(Kernel),
                                    emu_detail::kernel_name<Kernel>(), thunk, &call, programmatic);
}

// A programmatic dependent launch (PDL) is a launch like any other here: launches run one after another, so the
// kernel before it has finished when it starts. The trace marks it ("programmatic"), for the cost model's launch
// overhead.
template <auto Kernel, typename... Args>
inline cudaError_t launch_kernel_dependent(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                                           Args&&... args) {
  return launch_kernel<Kernel, /*programmatic=*/true>(grid, block, shared_bytes, stream, std::forward<Args>(args)...);
}

// The emulated "GPU" is an H200: persistent grids are sized as on it.
inline int sm_count() { return 132; }

// No-ops: the kernel before has finished (see launch_kernel_dependent).
inline void grid_dependency_wait() {}
inline void allow_dependent_launch() {}

// A failed device-side check fails the launch with `what` (the GPU's device-side assert; the op then reports the
// launch error), and the calling thread does not go past it.
#define VERA_DEVICE_REQUIRE(ok, what)          \
  do {                                         \
    if (!(ok)) ::vera_emu::detail::fail(what); \
  } while (0)

}  // namespace vera
