// run_claimed (csrc/cpu/claim_pool.cpp) under the sanitizers: several threads start jobs at once, of random sizes,
// with chunks of random length, so helpers join early, late (after the job closed) or not at all. Every chunk must
// run exactly once and its plain (non-atomic) writes must be visible to the caller when run_claimed returns:
// ThreadSanitizer reports any write the caller reads without a happens-before edge from the chunk that made it.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "checks.h"
#include "cpu/claim_pool.h"

namespace vera::check {
namespace {

// A chunk of variable length that the optimizer keeps.
void busy_wait(unsigned iterations) {
  std::atomic<unsigned> sink{0};
  for (unsigned i = 0; i < iterations; ++i) sink.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

int check_claim_pool(unsigned seed) {
  constexpr int kThreads = 4, kJobsPerThread = 300;
  std::vector<int> failures(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([t, seed, &failures] {
      std::mt19937 rng(seed + 7919u * unsigned(t));
      for (int job = 0; job < kJobsPerThread; ++job) {
        const int64_t chunks = 1 + int64_t(rng() % 48);
        const int helpers = int(rng() % 4);
        const unsigned spin = rng() % 2000;
        std::vector<int> runs(chunks, 0), values(chunks, -1);
        cpu::run_claimed(chunks, helpers, [&](int64_t c) {
          busy_wait(spin);
          if (c % 7 == 3) std::this_thread::yield();
          ++runs[c];  // plain writes: a chunk run twice, or read early, is a data race
          values[c] = int(c) * 3 + job;
        });
        for (int64_t c = 0; c < chunks; ++c) {
          if (runs[c] != 1 || values[c] != int(c) * 3 + job) {
            std::printf("claim_pool: thread %d job %d chunk %lld ran %d times, value %d\n", t, job,
                        static_cast<long long>(c), runs[c], values[c]);
            ++failures[t];
            break;
          }
        }
        // Now and then let the helpers go to sleep, so the next job has to wake them.
        if (job % 50 == 49) std::this_thread::sleep_for(std::chrono::microseconds(300));
      }
    });
  }
  for (std::thread& th : threads) th.join();
  int total = 0;
  for (int f : failures) total += f;
  std::printf("claim_pool: %d threads x %d jobs: %s\n", kThreads, kJobsPerThread, total ? "FAILED" : "ok");
  return total;
}

}  // namespace vera::check
