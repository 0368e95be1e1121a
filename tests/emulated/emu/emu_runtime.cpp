// The launch engine of the emulated build (model in emu_runtime.h): one host thread per CUDA thread of a block,
// taken from a process-wide pool, meeting at checked barriers. No torch, no CUDA.
#include "emu/emu_runtime.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "emu/emu_trace.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define VERA_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define VERA_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define VERA_EMU_POISON(p, n) ((void)(p), (void)(n))
#define VERA_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace vera_emu {
namespace detail {
namespace {

struct Abort {};  // unwinds an emulated thread once its launch has failed
struct Failure {  // thrown by fail(): a finding of this thread
  std::string what;
};

// Why a thread arrived at a barrier: tag = kind << 32 | mask.
enum Kind : uint32_t { kSyncthreads = 1, kEnd = 2, kWarpOpBase = 16 };

uint64_t tag_of(uint32_t kind, unsigned mask) { return (uint64_t(kind) << 32) | mask; }

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

std::string describe_tag(uint64_t tag) {
  const uint32_t kind = uint32_t(tag >> 32);
  const std::string mask = " (mask " + hex(unsigned(tag)) + ")";
  switch (kind) {
    case kSyncthreads: return "__syncthreads";
    case kEnd: return "the end of the kernel";
    case kWarpOpBase + int(WarpOp::kShfl): return "__shfl_sync" + mask;
    case kWarpOpBase + int(WarpOp::kShflUp): return "__shfl_up_sync" + mask;
    case kWarpOpBase + int(WarpOp::kShflDown): return "__shfl_down_sync" + mask;
    case kWarpOpBase + int(WarpOp::kShflXor): return "__shfl_xor_sync" + mask;
    case kWarpOpBase + int(WarpOp::kVote): return "a warp vote (__ballot/__any/__all_sync)" + mask;
    case kWarpOpBase + int(WarpOp::kSyncwarp): return "__syncwarp" + mask;
  }
  return "?";
}

std::string coords(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

struct Launch;

// Reusable barrier of `count` participants. Each phase's arrivals must carry the same tag; otherwise the launch
// fails with a message naming both sides. Launch::abort wakes every waiter.
class Barrier {
 public:
  void init(int count, int first_tid, const char* scope) {
    count_ = count;
    first_tid_ = first_tid;
    scope_ = scope;
    tags_.assign(count, 0);
  }

  // `on_complete` runs on the last arriver, before anyone is released. With wait = false the caller arrives
  // without waiting for the others (the phase is still checked when its last participant arrives).
  template <typename F>
  void arrive(Launch& launch, int who, uint64_t tag, bool wait, F&& on_complete);
  void wake() {
    gen_.fetch_add(1, std::memory_order_acq_rel);
    gen_.notify_all();
  }

 private:
  int count_ = 0, first_tid_ = 0;
  const char* scope_ = "";
  std::vector<uint64_t> tags_;
  std::atomic<int> arrived_{0};
  std::atomic<uint32_t> gen_{0};
};

// The lane exchange of shuffles and votes is double-buffered: exchange k writes and reads slots[k % 2] around
// one barrier; the earliest a lane can write that buffer again is exchange k + 2, after passing the barrier of
// exchange k + 1, which every lane reaches only after its reads of exchange k. One barrier per shuffle, not two.
struct Warp {
  Barrier barrier;
  unsigned lanes = 0;  // mask of the lanes that exist
  uint64_t slots[2][32] = {};
};

struct Launch {
  dim3 grid, block;
  unsigned nthreads = 0;
  uint64_t nblocks = 0;
  uint64_t executed = 0;  // blocks run: nblocks, or a trace's sample of them
  size_t shared_bytes = 0;
  Thunk thunk = nullptr;
  const void* call = nullptr;
  BlockOrder order = BlockOrder::kForward;
  uint64_t perm_a = 1, perm_c = 0;  // shuffled order: block (a * i + c) mod nblocks, gcd(a, nblocks) = 1

  Barrier block_barrier;
  std::unique_ptr<Warp[]> warps;
  unsigned nwarps = 0;

  std::atomic<bool> aborted{false};
  std::atomic<uint64_t> progress{0};
  std::mutex mu;  // guards error, done
  std::condition_variable done_cv;
  std::string error;
  unsigned done = 0;

  uint3 block_index(uint64_t i) const {
    uint64_t b = i;
    if (order == BlockOrder::kReverse) b = nblocks - 1 - i;
    if (order == BlockOrder::kShuffle)
      b = uint64_t(static_cast<unsigned __int128>(perm_a) * i % nblocks + perm_c) % nblocks;
    const uint64_t gx = grid.x, gy = grid.y;
    return uint3{unsigned(b % gx), unsigned(b / gx % gy), unsigned(b / (gx * gy))};
  }

  void abort(const std::string& why) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (error.empty()) error = why;
    }
    aborted.store(true, std::memory_order_seq_cst);
    block_barrier.wake();
    for (unsigned w = 0; w < nwarps; ++w) warps[w].barrier.wake();
  }

  void check_abort() const {
    if (aborted.load(std::memory_order_acquire)) throw Abort{};
  }

  void fresh_dynamic_shared() const {
    if (shared_bytes) std::memset(dynamic_shared_arena, 0xff, shared_bytes);
  }
};

struct ThreadCtx {
  Launch* launch;
  unsigned tid, warp, lane;
  unsigned exchanges = 0;  // shuffles and votes so far: picks the slot buffer (the same on every lane)
};

thread_local ThreadCtx* tls = nullptr;
thread_local std::string tls_last_error;

std::string where(uint3 block, uint3 thread) { return "block " + coords(block) + " thread " + coords(thread); }

uint3 thread_coords(const Launch& l, unsigned tid) {
  return uint3{tid % l.block.x, tid / l.block.x % l.block.y, tid / (l.block.x * l.block.y)};
}

template <typename F>
void Barrier::arrive(Launch& launch, int who, uint64_t tag, bool wait, F&& on_complete) {
  launch.check_abort();
  tags_[who] = tag;
  const uint32_t gen = gen_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
    arrived_.store(0, std::memory_order_relaxed);
    int odd = -1;
    for (int i = 1; i < count_ && odd < 0; ++i)
      if (tags_[i] != tags_[0]) odd = i;
    if (odd >= 0) {
      const uint3 b = blockIdx;
      launch.abort("barrier divergence in block " + coords(b) + ": thread " +
                   coords(thread_coords(launch, first_tid_)) + " reached " + describe_tag(tags_[0]) + " while thread " +
                   coords(thread_coords(launch, first_tid_ + odd)) + " reached " + describe_tag(tags_[odd]) +
                   " (every thread of the " + scope_ +
                   " must reach the same barriers; on the GPU this is undefined behaviour, often a hang)");
    } else {
      on_complete();
    }
    launch.progress.fetch_add(1, std::memory_order_relaxed);
    gen_.fetch_add(1, std::memory_order_acq_rel);
    gen_.notify_all();
  } else if (wait) {
    // Yield a while before sleeping: with hundreds of threads on a few cores the phase usually completes within
    // a round of yields, and a yielding thread needs no wake-up (about 25% faster than sleeping at once).
    for (int spins = 0;; ++spins) {
      launch.check_abort();
      if (gen_.load(std::memory_order_acquire) != gen) break;
      if (spins < 64) {
        std::this_thread::yield();
      } else {
        gen_.wait(gen, std::memory_order_acquire);
      }
    }
  }
  launch.check_abort();
}

ThreadCtx& ctx(const char* what) {
  if (tls == nullptr) {
    std::fprintf(stderr, "vera_emu: %s called outside an emulated kernel\n", what);
    std::abort();
  }
  return *tls;
}

void warp_barrier(ThreadCtx& c, uint32_t kind, unsigned mask, bool wait = true) {
  trace::hooks::on_barrier();
  c.launch->warps[c.warp].barrier.arrive(*c.launch, int(c.lane), tag_of(kind, mask), wait, [] {});
}

void check_full_mask(const ThreadCtx& c, unsigned mask, const char* what) {
  const unsigned lanes = c.launch->warps[c.warp].lanes;
  if ((mask & lanes) != lanes)
    fail(std::string(what) + " with mask " + hex(mask) +
         ": the emulation supports full-warp masks only (this warp's lanes are " + hex(lanes) +
         "); partial-warp code must be tested on the GPU");
}

// Block-wide barriers (the end of the block, __syncthreads) first arrive at the warp's barrier without waiting:
// lanes split between a warp primitive and a block barrier then fail the launch instead of hanging, for the
// price of one wait per thread (every thread blocks once per block-wide barrier: that is what costs).
void end_of_block(ThreadCtx& c) {
  Launch& l = *c.launch;
  warp_barrier(c, kEnd, l.warps[c.warp].lanes, /*wait=*/false);
  const uint3 b = blockIdx;
  const uint64_t block = b.x + uint64_t(l.grid.x) * (b.y + uint64_t(l.grid.y) * b.z);
  l.block_barrier.arrive(l, int(c.tid), tag_of(kEnd, 0), /*wait=*/true, [&l, block] {
    trace::hooks::end_block(block, l.nthreads);
    l.fresh_dynamic_shared();
  });
}

void thread_main(Launch& l, unsigned tid) {
  ThreadCtx c{&l, tid, tid / 32, tid % 32};
  tls = &c;
  threadIdx = thread_coords(l, tid);
  blockDim = l.block;
  gridDim = l.grid;
  trace::hooks::bind_thread(tid);
  try {
    for (uint64_t j = 0; j < l.executed; ++j) {
      blockIdx = l.block_index(sampled_block(j, l.nblocks, l.executed));
      l.thunk(l.call);
      end_of_block(c);
    }
  } catch (const Abort&) {
  } catch (const Failure& f) {
    l.abort(f.what);
  } catch (const std::exception& e) {
    l.abort(where(blockIdx, threadIdx) + ": exception: " + e.what());
  } catch (...) {
    l.abort(where(blockIdx, threadIdx) + ": unknown exception");
  }
  tls = nullptr;
  std::lock_guard<std::mutex> lock(l.mu);
  if (++l.done == l.nthreads) l.done_cv.notify_all();
}

// The CUDA threads' host threads, kept for the whole process (creating 256 threads per launch cost ~18 ms,
// far more under ThreadSanitizer). Worker t runs thread t of every launch; it is woken through its own
// counter, so a launch wakes only the threads it uses. Never destroyed: idle workers block until exit.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool;
    return *pool;
  }

  // Starts thread_main(l, t) for t < l.nthreads on the workers (creating missing ones). The caller waits for
  // them through l.done. Returns how many it could start.
  unsigned start(Launch& l) {
    try {
      while (workers_.size() < l.nthreads) {
        auto w = std::make_unique<Worker>();
        w->tid = unsigned(workers_.size());
        std::thread(&Worker::loop, w.get()).detach();
        workers_.push_back(std::move(w));
      }
    } catch (const std::exception&) {
      return 0;
    }
    for (unsigned t = 0; t < l.nthreads; ++t) {
      Worker& w = *workers_[t];
      w.launch = &l;
      w.go.fetch_add(1, std::memory_order_release);
      w.go.notify_one();
    }
    return l.nthreads;
  }

 private:
  struct Worker {
    std::atomic<uint32_t> go{0};
    Launch* launch = nullptr;
    unsigned tid = 0;

    void loop() {
      uint32_t seen = 0;
      for (;;) {
        go.wait(seen, std::memory_order_acquire);
        seen = go.load(std::memory_order_acquire);
        thread_main(*launch, tid);  // its last step signals the launcher; `launch` is dead after that
      }
    }
  };
  std::vector<std::unique_ptr<Worker>> workers_;  // guarded by g_launch_mu
};

// Process-wide settings and state.
std::mutex g_launch_mu;  // one launch at a time: static __shared__ and the arena are process-wide
std::atomic<int> g_order{int(BlockOrder::kForward)};
std::atomic<uint64_t> g_seed{0};
std::mutex g_attr_mu;
std::map<const void*, int> g_max_dynamic_shared;

double watchdog_seconds() {
  const char* env = std::getenv("VERA_EMU_WATCHDOG_S");
  return env ? std::atof(env) : 300.0;
}

size_t dynamic_shared_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_attr_mu);
  const auto it = g_max_dynamic_shared.find(kernel);
  return it == g_max_dynamic_shared.end() ? kDefaultDynamicShared : size_t(it->second);
}

// Waits for every thread. If no barrier completes for the watchdog period the launch is aborted, and if the
// threads then do not finish (an endless loop outside our primitives) the process ends with a message: a hang
// in CI is worse than a crash.
void wait_for_threads(Launch& l) {
  const double limit = watchdog_seconds();
  std::unique_lock<std::mutex> lock(l.mu);
  uint64_t seen = l.progress.load();
  auto last_change = std::chrono::steady_clock::now();
  while (l.done < l.nthreads) {
    l.done_cv.wait_for(lock, std::chrono::milliseconds(200));
    const uint64_t now_progress = l.progress.load();
    const auto now = std::chrono::steady_clock::now();
    if (now_progress != seen) {
      seen = now_progress;
      last_change = now;
    } else if (limit > 0 && std::chrono::duration<double>(now - last_change).count() > limit) {
      lock.unlock();
      l.abort("no barrier completed for " + std::to_string(limit) +
              " s: the kernel is deadlocked or loops endlessly (VERA_EMU_WATCHDOG_S sets the limit)");
      lock.lock();
      if (!l.done_cv.wait_for(lock, std::chrono::seconds(10), [&] { return l.done == l.nthreads; })) {
        std::fprintf(stderr, "vera_emu: %s; threads still running, ending the process\n", l.error.c_str());
        std::abort();
      }
    }
  }
}

}  // namespace

cudaError_t run_grid(dim3 grid, dim3 block, size_t shared_bytes, const void* kernel, const char* name, Thunk thunk,
                     const void* call, bool programmatic) {
  tls_last_error.clear();
  auto refuse = [](cudaError_t e, const std::string& why) {
    tls_last_error = why;
    return e;
  };
  if (tls != nullptr) return refuse(cudaErrorNotSupported, "kernel launched from inside a kernel");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      nthreads > 1024)
    return refuse(cudaErrorInvalidConfiguration, "block " + coords(block) + " is not a valid CUDA block shape");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return refuse(cudaErrorInvalidConfiguration, "grid " + coords(grid) + " exceeds CUDA's grid limits");
  const size_t shared_limit = dynamic_shared_limit(kernel);
  if (shared_bytes > shared_limit)
    return refuse(cudaErrorInvalidValue, std::to_string(shared_bytes) + " bytes of dynamic shared memory exceed the " +
                                             "kernel's limit of " + std::to_string(shared_limit) +
                                             " (above 48 KiB needs cudaFuncSetAttribute, at most 227 KiB)");

  std::lock_guard<std::mutex> launch_lock(g_launch_mu);
  Launch l;
  l.grid = grid;
  l.block = block;
  l.nthreads = unsigned(nthreads);
  l.nblocks = uint64_t(grid.x) * grid.y * grid.z;
  const uint64_t sample = trace::sample_blocks();
  l.executed = sample > 0 && sample < l.nblocks ? sample : l.nblocks;
  l.shared_bytes = shared_bytes;
  l.thunk = thunk;
  l.call = call;
  l.order = BlockOrder(g_order.load());
  if (l.order == BlockOrder::kShuffle && l.nblocks > 1) {
    std::mt19937_64 rng(g_seed.load() ^ l.nblocks);
    auto gcd = [](uint64_t a, uint64_t b) {
      while (b) {
        const uint64_t t = a % b;
        a = b;
        b = t;
      }
      return a;
    };
    do l.perm_a = 1 + rng() % (l.nblocks - 1);
    while (gcd(l.perm_a, l.nblocks) != 1);
    l.perm_c = rng() % l.nblocks;
  }
  l.block_barrier.init(int(nthreads), 0, "block");
  l.nwarps = unsigned((nthreads + 31) / 32);
  l.warps.reset(new Warp[l.nwarps]);
  for (unsigned w = 0; w < l.nwarps; ++w) {
    const unsigned n = unsigned(std::min<uint64_t>(32, nthreads - 32 * w));
    l.warps[w].lanes = n == 32 ? 0xffffffffu : (1u << n) - 1;
    l.warps[w].barrier.init(int(n), int(32 * w), "warp");
  }
  VERA_EMU_POISON(dynamic_shared_arena + shared_bytes, kMaxDynamicShared - shared_bytes);
  l.fresh_dynamic_shared();

  trace::hooks::begin_launch(name, grid.x, grid.y, grid.z, block.x, block.y, block.z, shared_bytes, l.nblocks,
                             l.executed, programmatic);
  if (Pool::get().start(l) != nthreads) {
    VERA_EMU_UNPOISON(dynamic_shared_arena, kMaxDynamicShared);
    trace::hooks::end_launch(false);
    return refuse(cudaErrorLaunchFailure, "could not start the block's threads");
  }
  wait_for_threads(l);
  VERA_EMU_UNPOISON(dynamic_shared_arena, kMaxDynamicShared);
  trace::hooks::end_launch(!l.aborted.load());
  if (!l.aborted.load()) return cudaSuccess;
  return refuse(cudaErrorLaunchFailure, l.error);
}

std::string template_argument_named(const char* pretty_function, const char* param) {
  const std::string text(pretty_function), key = std::string(param) + " = ";
  const size_t from = text.find(key);
  if (from == std::string::npos) return text;
  size_t end = from + key.size();
  for (int depth = 0; end < text.size(); ++end) {  // up to the first top-level ';' or ']'
    const char ch = text[end];
    if (ch == '<' || ch == '(') ++depth;
    if (ch == '>' || ch == ')') --depth;
    if (depth == 0 && (ch == ';' || ch == ']')) break;
  }
  return text.substr(from + key.size(), end - from - key.size());
}

uint64_t sampled_block(uint64_t j, uint64_t nblocks, uint64_t executed) {
  if (executed >= nblocks) return j;
  const uint64_t runs = std::min<uint64_t>(8, executed);
  const uint64_t run = j * runs / executed;                     // runs of nearly equal length
  const uint64_t first_j = (run * executed + runs - 1) / runs;  // the first j of this run
  return run * nblocks / runs + (j - first_j);
}

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || size_t(bytes) > kMaxDynamicShared) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(g_attr_mu);
  g_max_dynamic_shared[kernel] = bytes;
  return cudaSuccess;
}

void fail(const std::string& what) {
  if (tls == nullptr) {
    std::fprintf(stderr, "vera_emu: %s (outside an emulated kernel)\n", what.c_str());
    std::abort();
  }
  throw Failure{where(blockIdx, threadIdx) + ": " + what};
}

void syncthreads() {
  ThreadCtx& c = ctx("__syncthreads");
  Launch& l = *c.launch;
  warp_barrier(c, kSyncthreads, l.warps[c.warp].lanes, /*wait=*/false);  // see end_of_block (counts the epoch)
  l.block_barrier.arrive(l, int(c.tid), tag_of(kSyncthreads, 0), /*wait=*/true, [] {});
}

void syncwarp(unsigned mask) {
  ThreadCtx& c = ctx("__syncwarp");
  check_full_mask(c, mask, "__syncwarp");
  warp_barrier(c, kWarpOpBase + uint32_t(WarpOp::kSyncwarp), mask);
}

uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t bits, int src_lane) {
  ThreadCtx& c = ctx("a warp shuffle");
  Warp& w = c.launch->warps[c.warp];
  check_full_mask(c, mask, "a warp shuffle");
  if (src_lane < 0 || src_lane > 31 || !((w.lanes >> src_lane) & 1u))
    fail("a warp shuffle reads lane " + std::to_string(src_lane) + ", which does not exist in this warp (lanes " +
         hex(w.lanes) + "); the GPU returns an undefined value");
  uint64_t* slots = w.slots[c.exchanges++ % 2];
  slots[c.lane] = bits;
  warp_barrier(c, kWarpOpBase + uint32_t(op), mask);
  return slots[src_lane];
}

unsigned warp_ballot(unsigned mask, bool pred) {
  ThreadCtx& c = ctx("a warp vote");
  Warp& w = c.launch->warps[c.warp];
  check_full_mask(c, mask, "a warp vote");
  uint64_t* slots = w.slots[c.exchanges++ % 2];
  slots[c.lane] = pred ? 1 : 0;
  warp_barrier(c, kWarpOpBase + uint32_t(WarpOp::kVote), mask);
  unsigned ballot = 0;
  for (unsigned lane = 0; lane < 32; ++lane)
    if (((w.lanes >> lane) & 1u) && slots[lane]) ballot |= 1u << lane;
  return ballot;
}

unsigned lane_id() { return ctx("a warp primitive").lane; }

unsigned warp_lanes_mask() {
  ThreadCtx& c = ctx("a warp primitive");
  return c.launch->warps[c.warp].lanes;
}

}  // namespace detail

void set_block_order(BlockOrder order, uint64_t seed) {
  detail::g_order.store(int(order));
  detail::g_seed.store(seed);
}

std::string last_launch_error() { return detail::tls_last_error; }

}  // namespace vera_emu
