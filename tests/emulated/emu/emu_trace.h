// Memory-traffic tracing of the emulated build: every global load and store a kernel makes through the access
// helpers of cuda/global_access.cuh is recorded (address, width, source site, the thread's barrier epoch) and, at
// the end of each block, grouped into warp instructions: the lanes of a warp that executed the same site for the
// same time since the same warp- or block-wide barrier form one request, as on the GPU. Per launch the trace
// keeps requests, 32-byte sectors and lane bytes per access kind and width, and the footprint: the distinct bytes
// read and written, split into sectors that one sampled block touched (private) and those several touched (shared),
// and the distinct sectors of each block, summed over the blocks (what reaches L2 when a block's re-reads hit L1).
//
// Large grids can be sampled: with max_blocks > 0 a launch of more blocks runs only max_blocks of them, in up to
// 8 evenly spaced runs of consecutive blocks (results of that launch are then incomplete: tracing only). Counts
// are reported as sampled, with the scale nblocks / executed; benchmarks/kernel_cost scales them.
#pragma once

#include <atomic>
#include <cstdint>
#include <source_location>
#include <string>

namespace vera_emu::trace {

enum class Kind : uint8_t { kLoad = 0, kStore = 1, kAtomic = 2 };

// True between start() and stop(): the access helpers check it before recording anything.
inline std::atomic<bool> g_active{false};

void record(const void* addr, unsigned bytes, Kind kind, const std::source_location& site);

inline void access(const void* addr, unsigned bytes, Kind kind, const std::source_location& site) {
  if (g_active.load(std::memory_order_relaxed)) record(addr, bytes, kind, site);
}

// Host side (one trace at a time; launches are serialized by the runtime anyway).
void start(uint64_t max_blocks);  // max_blocks = 0: run and trace every block
std::string stop();               // the launches since start(), as a JSON array; ends the trace
uint64_t launches();              // launches recorded so far in the current trace
uint64_t sample_blocks();         // blocks a launch of the current trace runs at most (0: all)

// Hooks of the launch engine (emu_runtime.cpp).
namespace hooks {
void begin_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                  uint64_t shared_bytes, uint64_t nblocks, uint64_t executed, bool programmatic);
void bind_thread(unsigned tid);                     // at the start of an emulated thread's work in a launch
void on_barrier();                                  // the calling thread passed a warp- or block-wide barrier
void end_block(uint64_t block, unsigned nthreads);  // single-threaded: every thread of the block is waiting
void end_launch(bool ok);
}  // namespace hooks

}  // namespace vera_emu::trace
