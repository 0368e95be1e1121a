// Work claiming for the short, bandwidth-bound loops of the CPU decode path (decode_cpu.cpp). Torch-free, so the
// sanitizer program (tests/emulated/run_sanitizers.sh) runs it under ThreadSanitizer.
#pragma once

#include <cstdint>

namespace vera::cpu {

// Runs body(c) exactly once for every c in [0, num_chunks), on unspecified threads and in unspecified order, and
// returns when all have run, their writes visible to the caller. The calling thread claims and runs chunks itself;
// up to max_helpers persistent helper threads claim chunks too while any are left. Unlike at::parallel_for, the
// caller never waits for a helper that has not started (on a busy machine it simply runs every chunk): it waits
// only for helpers that are already running a chunk. A call made while another is running (from inside a chunk, or
// from another thread) runs its chunks serially on its own thread. body must not throw.
void run_claimed_fn(int64_t num_chunks, int max_helpers, void (*body)(void* ctx, int64_t chunk), void* ctx);

template <class F>
void run_claimed(int64_t num_chunks, int max_helpers, const F& body) {
  run_claimed_fn(
      num_chunks, max_helpers, [](void* ctx, int64_t c) { (*static_cast<const F*>(ctx))(c); },
      const_cast<void*>(static_cast<const void*>(&body)));
}

}  // namespace vera::cpu
