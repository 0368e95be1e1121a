// The trace of emulated global-memory accesses (model in emu_trace.h). No torch, no CUDA.
#include "emu/emu_trace.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace vera_emu::trace {
namespace {

constexpr unsigned kMaxThreads = 1024;
constexpr uint64_t kSector = 32;

struct Record {
  uint64_t addr;
  const char* file;  // the site: file, line, column of the helper's caller
  uint32_t line, column;
  uint32_t epoch;  // barriers the thread had passed
  uint16_t bytes;
  Kind kind;
};

// One emulated thread's records for the current block. Thread t of every block is the same host thread (the
// runtime's pool), so buffers are indexed by tid and owned here for the whole process.
struct ThreadBuffer {
  std::vector<Record> records;
  uint32_t epoch = 0;
};
std::array<std::unique_ptr<ThreadBuffer>, kMaxThreads> g_buffers;
thread_local ThreadBuffer* tls_buffer = nullptr;

struct KindCounts {
  uint64_t requests = 0, sectors = 0, lane_bytes = 0;
  std::map<unsigned, uint64_t> requests_by_width;  // the widest lane access of the request, in bytes
};

struct Sector {
  uint32_t read_mask = 0, write_mask = 0;
  uint64_t read_block = ~uint64_t(0), write_block = ~uint64_t(0);
  bool read_shared = false, write_shared = false;
};

struct LaunchTrace {
  std::string kernel;
  std::array<uint64_t, 2> block_sectors{};  // loads, stores + atomics: distinct sectors per block, summed
  std::array<unsigned, 3> grid{}, block{};
  uint64_t shared_bytes = 0, nblocks = 0, executed = 0;
  bool programmatic = false;  // launched as a programmatic dependent (PDL) of the launch before
  std::array<KindCounts, 3> kinds;
  std::unordered_map<uint64_t, Sector> sectors;
  bool ok = true;
};

std::mutex g_mu;  // guards the host-side state below (launches are serialized by the runtime)
uint64_t g_max_blocks = 0;
std::vector<std::string> g_done;  // finished launches, as JSON objects
std::unique_ptr<LaunchTrace> g_current;

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kLoad: return "load";
    case Kind::kStore: return "store";
    case Kind::kAtomic: return "atomic";
  }
  return "?";
}

// A record's request key within its warp: the same site, the same barrier epoch, the same occurrence.
using RequestKey = std::tuple<uint8_t, const char*, uint32_t, uint32_t, uint32_t, uint32_t>;

void add_footprint(LaunchTrace& t, const Record& r, uint64_t block) {
  for (uint64_t a = r.addr; a < r.addr + r.bytes;) {
    const uint64_t s = a / kSector, end = std::min<uint64_t>(r.addr + r.bytes, (s + 1) * kSector);
    const uint32_t bits = uint32_t(((uint64_t(1) << (end - a)) - 1) << (a - s * kSector));
    Sector& sec = t.sectors[s];
    const bool write = r.kind != Kind::kLoad;
    uint32_t& mask = write ? sec.write_mask : sec.read_mask;
    uint64_t& first = write ? sec.write_block : sec.read_block;
    bool& shared = write ? sec.write_shared : sec.read_shared;
    mask |= bits;
    if (first == ~uint64_t(0)) {
      first = block;
    } else if (first != block) {
      shared = true;
    }
    a = end;
  }
}

// Groups one warp's records into requests and adds them to the launch; collects the sectors it touched (loads,
// stores) into block_sectors.
void add_warp(LaunchTrace& t, uint64_t block, unsigned first_tid, unsigned lanes,
              std::array<std::vector<uint64_t>, 2>& block_sectors) {
  std::vector<std::pair<RequestKey, const Record*>> entries;
  for (unsigned lane = 0; lane < lanes; ++lane) {
    if (!g_buffers[first_tid + lane]) continue;
    const ThreadBuffer& buf = *g_buffers[first_tid + lane];
    std::map<std::tuple<uint8_t, const char*, uint32_t, uint32_t, uint32_t>, uint32_t> seen;
    for (const Record& r : buf.records) {
      const uint32_t occurrence = seen[{uint8_t(r.kind), r.file, r.line, r.column, r.epoch}]++;
      entries.push_back({RequestKey{uint8_t(r.kind), r.file, r.line, r.column, r.epoch, occurrence}, &r});
    }
  }
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<uint64_t> sectors;
  for (size_t i = 0; i < entries.size();) {
    size_t j = i;
    sectors.clear();
    unsigned widest = 0;
    uint64_t bytes = 0;
    for (; j < entries.size() && entries[j].first == entries[i].first; ++j) {
      const Record& r = *entries[j].second;
      for (uint64_t s = r.addr / kSector; s <= (r.addr + r.bytes - 1) / kSector; ++s) {
        sectors.push_back(s);
        block_sectors[r.kind == Kind::kLoad ? 0 : 1].push_back(s);
      }
      widest = std::max<unsigned>(widest, r.bytes);
      bytes += r.bytes;
      add_footprint(t, r, block);
    }
    std::sort(sectors.begin(), sectors.end());
    KindCounts& k = t.kinds[std::get<0>(entries[i].first)];
    k.requests += 1;
    k.sectors += uint64_t(std::unique(sectors.begin(), sectors.end()) - sectors.begin());
    k.lane_bytes += bytes;
    k.requests_by_width[widest] += 1;
    i = j;
  }
}

std::string json_counts(const KindCounts& k) {
  std::string widths;
  for (const auto& [w, n] : k.requests_by_width)
    widths += (widths.empty() ? "" : ", ") + ("\"" + std::to_string(w) + "\": " + std::to_string(n));
  return "{\"requests\": " + std::to_string(k.requests) + ", \"sectors\": " + std::to_string(k.sectors) +
         ", \"lane_bytes\": " + std::to_string(k.lane_bytes) + ", \"requests_by_width\": {" + widths + "}}";
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

std::string to_json(const LaunchTrace& t) {
  uint64_t read_private = 0, read_shared = 0, write_private = 0, write_shared = 0;
  for (const auto& [id, s] : t.sectors) {
    (s.read_shared ? read_shared : read_private) += uint64_t(__builtin_popcount(s.read_mask));
    (s.write_shared ? write_shared : write_private) += uint64_t(__builtin_popcount(s.write_mask));
  }
  auto dim = [](const std::array<unsigned, 3>& d) {
    return "[" + std::to_string(d[0]) + ", " + std::to_string(d[1]) + ", " + std::to_string(d[2]) + "]";
  };
  std::string kinds;
  for (int k = 0; k < 3; ++k)
    kinds += std::string(k ? ", " : "") + "\"" + kind_name(Kind(k)) + "\": " + json_counts(t.kinds[k]);
  return "{\"kernel\": \"" + json_escape(t.kernel) + "\", \"grid\": " + dim(t.grid) + ", \"block\": " + dim(t.block) +
         ", \"dynamic_shared_bytes\": " + std::to_string(t.shared_bytes) +
         ", \"blocks\": " + std::to_string(t.nblocks) + ", \"executed_blocks\": " + std::to_string(t.executed) +
         ", \"ok\": " + (t.ok ? "true" : "false") + ", \"programmatic\": " + (t.programmatic ? "true" : "false") +
         ", " + kinds + ", \"unique_read_bytes_private\": " + std::to_string(read_private) +
         ", \"unique_read_bytes_shared\": " + std::to_string(read_shared) +
         ", \"unique_write_bytes_private\": " + std::to_string(write_private) +
         ", \"unique_write_bytes_shared\": " + std::to_string(write_shared) +
         ", \"block_unique_sectors\": {\"load\": " + std::to_string(t.block_sectors[0]) +
         ", \"store\": " + std::to_string(t.block_sectors[1]) + "}}";
}

}  // namespace

void record(const void* addr, unsigned bytes, Kind kind, const std::source_location& site) {
  ThreadBuffer* buf = tls_buffer;
  if (buf == nullptr || bytes == 0) return;  // not inside an emulated kernel of a traced launch
  buf->records.push_back(Record{reinterpret_cast<uint64_t>(addr), site.file_name(), site.line(), site.column(),
                                buf->epoch, uint16_t(bytes), kind});
}

void start(uint64_t max_blocks) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_max_blocks = max_blocks;
  g_done.clear();
  g_current.reset();
  g_active.store(true);
}

std::string stop() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_active.store(false);
  std::string out = "[";
  for (size_t i = 0; i < g_done.size(); ++i) out += (i ? ",\n " : "") + g_done[i];
  g_done.clear();
  return out + "]";
}

uint64_t launches() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_done.size();
}

uint64_t sample_blocks() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_active.load() ? g_max_blocks : 0;
}

namespace hooks {

void begin_launch(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                  uint64_t shared_bytes, uint64_t nblocks, uint64_t executed, bool programmatic) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_active.load()) return;
  auto t = std::make_unique<LaunchTrace>();
  t->kernel = kernel;
  t->grid = {gx, gy, gz};
  t->block = {bx, by, bz};
  t->shared_bytes = shared_bytes;
  t->nblocks = nblocks;
  t->executed = executed;
  t->programmatic = programmatic;
  g_current = std::move(t);
  for (auto& b : g_buffers)
    if (b) b->records.clear();
}

void bind_thread(unsigned tid) {
  if (!g_active.load(std::memory_order_relaxed) || tid >= kMaxThreads) {
    tls_buffer = nullptr;
    return;
  }
  if (!g_buffers[tid]) g_buffers[tid] = std::make_unique<ThreadBuffer>();  // only thread tid creates slot tid
  tls_buffer = g_buffers[tid].get();
}

void on_barrier() {
  if (tls_buffer) ++tls_buffer->epoch;
}

void end_block(uint64_t block, unsigned nthreads) {
  LaunchTrace* t = g_current.get();
  if (t == nullptr) return;
  std::array<std::vector<uint64_t>, 2> sectors;
  for (unsigned w = 0; w * 32 < nthreads; ++w) add_warp(*t, block, w * 32, std::min(32u, nthreads - w * 32), sectors);
  for (int k = 0; k < 2; ++k) {
    std::sort(sectors[k].begin(), sectors[k].end());
    t->block_sectors[k] += uint64_t(std::unique(sectors[k].begin(), sectors[k].end()) - sectors[k].begin());
  }
  for (unsigned tid = 0; tid < nthreads; ++tid)
    if (g_buffers[tid]) g_buffers[tid]->records.clear();
}

void end_launch(bool ok) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_current) return;
  g_current->ok = ok;
  g_done.push_back(to_json(*g_current));
  g_current.reset();
}

}  // namespace hooks
}  // namespace vera_emu::trace
