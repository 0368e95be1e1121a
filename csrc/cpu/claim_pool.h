// Work claiming for the short, bandwidth-bound loops of the CPU decode path (decode_cpu.cpp).
#pragma once

#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace vera::cpu {

// Runs body(c) exactly once for every c in [0, num_chunks), on unspecified threads and in unspecified order, and
// returns when all have run. The calling thread claims and runs chunks itself; up to at::get_num_threads() - 1
// persistent helper threads claim chunks too while any are left. Unlike at::parallel_for, the caller never waits
// for a helper that has not started (on a busy machine it simply runs every chunk): it waits only for helpers that
// are already running a chunk. A call made while another is running (from inside a chunk, or from another thread)
// runs its chunks serially on its own thread. body must not throw.
void run_claimed(int64_t num_chunks, c10::function_ref<void(int64_t)> body);

}  // namespace vera::cpu
