// The helper threads behind run_claimed (claim_pool.h): one job at a time, taken with a try-lock.
//
// Protocol. The caller writes the job (body, size, the chunk counter reset to 0), sets open_, bumps epoch_ to wake
// the helpers, and claims chunks from next_ itself. When none is left it clears open_ and waits until in_flight_ is
// 0. A helper that sees a new epoch first counts itself in in_flight_ and only then reads open_. Each side writes
// one variable and then reads the other's, all seq_cst (Dekker), so in their single total order either
//   - the helper's count comes before the caller's read of in_flight_: the caller waits for it, or
//   - the caller's clear comes before the helper's read of open_: the helper sees false and touches nothing, or
//     sees true set by a *later* job, whose fields it then reads and whose caller (clearing later still) waits.
// So the caller waits only for helpers that joined in time, and no helper reads a job's fields after its caller
// has returned. A helper that wakes late just counts itself briefly and goes back to waiting.
#include "cpu/claim_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <system_error>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace vera::cpu {
namespace {

// The job's function and its context (a type-erased callable: no allocation, no torch).
struct Body {
  void (*fn)(void*, int64_t);
  void* ctx;
  void operator()(int64_t c) const { fn(ctx, c); }
};

// How long an idle helper spins before it blocks: long enough that a model's next layer call (after Python overhead
// and a small op in between) finds it awake, since waking a blocked thread took ~50 us here (measured: 50 us of
// spin lost half the gain when one N=1 F.linear ran between calls, 100 us did not); short enough that an idle
// process burns no noticeable CPU.
constexpr std::chrono::microseconds kSpin{100};

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

class Pool {
 public:
  bool try_lock() { return !busy_.exchange(true, std::memory_order_acquire); }
  void unlock() { busy_.store(false, std::memory_order_release); }

  // Holding the lock: runs the job with the caller and up to `helpers` helper threads.
  void run(int64_t num_chunks, Body body, int helpers) {
    helpers = start_helpers(helpers);
    // Plain writes: no helper reads these now (open_ is false and the previous caller waited for in_flight_ 0),
    // and a helper reads them only after seeing open_ true, so the store to open_ publishes them.
    body_ = &body;
    num_chunks_ = num_chunks;
    active_ = helpers;
    next_.store(0, std::memory_order_relaxed);
    open_.store(true, std::memory_order_seq_cst);
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    epoch_.notify_all();  // a syscall only when some helper has gone to sleep
    claim_all(body, num_chunks);
    open_.store(false, std::memory_order_seq_cst);
    // Acquire (via seq_cst) pairs with the helpers' release decrement: their chunks' writes are visible after this.
    for (int spin = 0; in_flight_.load(std::memory_order_seq_cst) != 0; ++spin) {
      if (spin < 4096)
        cpu_relax();
      else
        sched_yield();  // a helper preempted mid-chunk may need this core
    }
  }

 private:
  void claim_all(Body body, int64_t n) {
    // Relaxed: a claim needs only atomicity; the job's data is ordered by open_, the chunks' results by in_flight_.
    for (int64_t c; (c = next_.fetch_add(1, std::memory_order_relaxed)) < n;) body(c);
  }

  [[noreturn]] void helper_loop(int id, uint32_t seen) {
    for (;;) {
      seen = await_epoch(seen);
      in_flight_.fetch_add(1, std::memory_order_seq_cst);
      if (open_.load(std::memory_order_seq_cst) && id < active_) claim_all(*body_, num_chunks_);
      in_flight_.fetch_sub(1, std::memory_order_release);
    }
  }

  // Spins for kSpin, then blocks (futex) until epoch_ differs from `seen`. Acquire: a helper that sees the bump
  // also sees the open_ store made before it.
  uint32_t await_epoch(uint32_t seen) {
    const auto deadline = std::chrono::steady_clock::now() + kSpin;
    for (int i = 1;; ++i) {
      const uint32_t e = epoch_.load(std::memory_order_acquire);
      if (e != seen) return e;
      cpu_relax();
      if (i % 64 == 0 && std::chrono::steady_clock::now() > deadline) break;
    }
    epoch_.wait(seen, std::memory_order_acquire);
    return epoch_.load(std::memory_order_acquire);
  }

  // Holding the lock. A new helper starts from the epoch before this job's bump, so it joins this job.
  int start_helpers(int wanted) {
    while (num_helpers_ < wanted) {
      try {
        std::thread(&Pool::helper_loop, this, num_helpers_, epoch_.load(std::memory_order_relaxed)).detach();
      } catch (const std::system_error&) {
        break;  // no more threads to be had: use those there are
      }
      ++num_helpers_;
    }
    return std::min(wanted, num_helpers_);
  }

  std::atomic<bool> busy_{false};
  int num_helpers_ = 0;  // guarded by busy_
  const Body* body_ = nullptr;
  int64_t num_chunks_ = 0;
  int active_ = 0;  // helpers with a smaller id take part in the job
  std::atomic<bool> open_{false};
  std::atomic<int> in_flight_{0};
  std::atomic<uint32_t> epoch_{0};
  alignas(64) std::atomic<int64_t> next_{0};  // its own cache line: claimed on every chunk, by every thread
};

// Leaked on purpose: detached helpers use it until the process ends. A forked child has none of the parent's
// helpers (and may have inherited the lock mid-job), so it starts a fresh pool.
Pool* g_pool = nullptr;

Pool& pool() {
  static const bool init = [] {
    g_pool = new Pool;
    pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool; });
    return true;
  }();
  (void)init;
  return *g_pool;
}

}  // namespace

void run_claimed_fn(int64_t num_chunks, int max_helpers, void (*fn)(void*, int64_t), void* ctx) {
  const Body body{fn, ctx};
  const int helpers = static_cast<int>(std::min<int64_t>(max_helpers, num_chunks - 1));
  if (helpers > 0) {
    Pool& p = pool();
    if (p.try_lock()) {
      p.run(num_chunks, body, helpers);
      p.unlock();
      return;
    }
  }
  for (int64_t c = 0; c < num_chunks; ++c) body(c);
}

}  // namespace vera::cpu
