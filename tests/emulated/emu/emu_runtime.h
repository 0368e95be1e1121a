// The execution model of the emulated build (implemented in emu_runtime.cpp):
//
// * A launch runs its blocks one at a time, in a configurable order (forward, reverse or a shuffled
//   permutation: a result that depends on block order is an inter-block race on the GPU). Blocks must run one at
//   a time because static __shared__ arrays are function-local statics, one copy for the whole process.
// * Each block's threads are real std::threads (one per CUDA thread; a process-wide pool, so thread t of every
//   block of every launch is the same host thread), so ThreadSanitizer sees every shared-memory and
//   global-memory access of every CUDA thread.
// * __syncthreads is a barrier of the block; warp primitives are barriers of the warp around a per-warp slot
//   exchange. Every barrier checks that all its participants arrived for the same reason: a thread that returns
//   while others wait at __syncthreads, or lanes that call different warp primitives, fail the launch with a
//   message instead of hanging (on the GPU that is undefined behaviour, often a hang).
// * Warp primitives are emulated for full warps: the mask must name every lane that exists in the warp.
// * Dynamic shared memory (`extern __shared__`) is one arena, filled with 0xff bytes (NaN, -1) before each
//   block, so reads of never-written shared memory show up in results; under ASan the bytes past the launch's
//   shared_bytes are poisoned.
// * Atomics are relaxed (as on the GPU); a launch returns after all its threads finished (streams ignored).
// * While a trace is recorded (emu_trace.h), every global access through cuda/global_access.cuh is recorded, and
//   a trace may run only a sample of a large grid's blocks.
// * A launch in which no barrier completes for VERA_EMU_WATCHDOG_S seconds (default 300) is aborted as hung;
//   if its threads still do not finish (an endless loop), the process ends with a message.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "emu/emu_types.h"

// CUDA's built-in variables, one copy per emulated thread.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace vera_emu {

enum class BlockOrder : int { kForward = 0, kReverse = 1, kShuffle = 2 };

// Process-wide settings for later launches (tests flip them to expose block-order dependence).
void set_block_order(BlockOrder order, uint64_t seed = 0);
// Why the last failed launch of this host thread failed (empty after a successful one).
std::string last_launch_error();

constexpr size_t kMaxDynamicShared = 227 * 1024;     // H100/H200 per-block opt-in limit
constexpr size_t kDefaultDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute
alignas(256) inline unsigned char dynamic_shared_arena[kMaxDynamicShared];

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(dynamic_shared_arena);
}

namespace detail {

using Thunk = void (*)(const void* call);
// Runs thunk(call) once per thread of every block (of the sampled blocks while a trace samples, emu_trace.h).
// `kernel` identifies the kernel for cudaFuncSetAttribute; `name` is its qualified name, for traces; `programmatic`:
// launched as a programmatic dependent (PDL), recorded in the trace.
cudaError_t run_grid(dim3 grid, dim3 block, size_t shared_bytes, const void* kernel, const char* name, Thunk thunk,
                     const void* call, bool programmatic);
// The value of template argument `param` in a gcc __PRETTY_FUNCTION__ ("... [with auto Kernel = ns::k<float>; ...]").
std::string template_argument_named(const char* pretty_function, const char* param);
// Which block the j-th executed block is when only `executed` of `nblocks` run: up to 8 evenly spaced runs of
// consecutive blocks (j itself when all run).
uint64_t sampled_block(uint64_t j, uint64_t nblocks, uint64_t executed);
cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);

enum class WarpOp : int { kShfl = 1, kShflUp, kShflDown, kShflXor, kVote, kSyncwarp };

void syncthreads();
void syncwarp(unsigned mask);
// All lanes publish `bits`; each lane gets the bits of lane `src_lane` (validated: an existing lane in mask).
uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t bits, int src_lane);
// Ballot of `pred` over the lanes of the warp.
unsigned warp_ballot(unsigned mask, bool pred);
unsigned lane_id();
// Mask of the lanes that exist in the calling thread's warp (all 32 unless blockDim is not a multiple of 32).
unsigned warp_lanes_mask();
[[noreturn]] void fail(const std::string& what);  // ends the launch with an error naming the calling thread

}  // namespace detail
}  // namespace vera_emu

inline void __syncthreads() { vera_emu::detail::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { vera_emu::detail::syncwarp(mask); }
