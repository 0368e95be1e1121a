// The checks behind emu_selftest.h. Expected values follow the CUDA programming guide: shuffle source lanes with
// `width` segments, votes over the warp's lanes, atomics' return-value semantics, thread/block linearization.
#include "kernels/emu_selftest.h"

#include <climits>
#include <functional>
#include <map>
#include <sstream>

#include "kernels/emu_selftest_kernels.h"
#include "kernels/planted_faults.h"

namespace vera::testing {
namespace {

std::string launch_error(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return "";
  return std::string(what) + ": " + cudaGetErrorString(err) + ": " + vera_emu::last_launch_error();
}

template <typename A, typename B>
std::string expect_eq(const A& got, const B& want, const std::string& what) {
  if (got == want) return "";
  std::ostringstream s;
  s << what << ": got " << got << ", expected " << want;
  return s.str();
}

std::string warp_ops(int width) {
  std::vector<int> in(64), out(64 * kWarpOpsPerThread, -1);
  for (int t = 0; t < 64; ++t) in[t] = (t * 7 + 3) % 50;
  if (auto e = launch_error(launch_warp_ops(in.data(), out.data(), width), "warp_ops"); !e.empty()) return e;

  const int w = width;
  auto seg = [w](int lane) { return lane & ~(w - 1); };
  auto up = [w](int lane, int d) { return (lane & (w - 1)) >= d ? lane - d : lane; };
  auto down = [w](int lane, int d) { return (lane & (w - 1)) + d < w ? lane + d : lane; };
  auto bfly = [w, seg](int lane, int m) {
    const int s = lane ^ m;
    return seg(s) > seg(lane) ? lane : s;
  };
  auto down32 = [](int lane, int d) { return lane + d < 32 ? lane + d : lane; };  // the reductions use width 32
  for (int warp = 0; warp < 2; ++warp) {
    const int* v = in.data() + 32 * warp;
    int tree[32], fly[32];
    for (int l = 0; l < 32; ++l) tree[l] = fly[l] = v[l];
    for (int offset = 16; offset > 0; offset /= 2) {
      int nt[32], nf[32];
      for (int l = 0; l < 32; ++l) {
        nt[l] = tree[l] + tree[down32(l, offset)];
        nf[l] = fly[l] + fly[l ^ offset];
      }
      std::copy(nt, nt + 32, tree);
      std::copy(nf, nf + 32, fly);
    }
    unsigned ballot = 0;
    bool any_big = false, all_nonneg = true, all_gt5 = true;
    for (int l = 0; l < 32; ++l) {
      ballot |= unsigned(v[l] % 3 == 0) << l;
      any_big |= v[l] > 1000;
      all_nonneg &= v[l] >= 0;
      all_gt5 &= v[l] > 5;
    }
    for (int l = 0; l < 32; ++l) {
      const int* o = out.data() + (32 * warp + l) * kWarpOpsPerThread;
      const std::string at =
          "width " + std::to_string(w) + " warp " + std::to_string(warp) + " lane " + std::to_string(l);
      const int want[kWarpOpsPerThread] = {v[seg(l) + (3 & (w - 1))],
                                           v[up(l, 2)],
                                           v[down(l, 5)],
                                           v[bfly(l, 9)],
                                           tree[l],
                                           fly[l],
                                           int(ballot),
                                           int(any_big) | int(all_nonneg) << 1 | int(all_gt5) << 2,
                                           v[bfly(l, 1)]};
      const char* names[kWarpOpsPerThread] = {"shfl(3)",     "shfl_up(2)",     "shfl_down(5)",
                                              "shfl_xor(9)", "shfl_down tree", "shfl_xor butterfly",
                                              "ballot",      "any/all",        "shfl_xor(double)"};
      for (int k = 0; k < kWarpOpsPerThread; ++k)
        if (auto e = expect_eq(o[k], want[k], at + " " + names[k]); !e.empty()) return e;
    }
    int sum = 0;  // the reductions in plain terms
    for (int l = 0; l < 32; ++l) sum += v[l];
    if (auto e = expect_eq(tree[0], sum, "warp sum"); !e.empty()) return e;
  }
  return "";
}

std::string dynamic_shared() {
  for (const int threads : {96, 256}) {
    const int64_t n = 1000;
    std::vector<float> in(n), out(n, -1.f);
    for (int64_t i = 0; i < n; ++i) in[i] = 0.5f * float(i);
    unsigned stale = 0;
    if (auto e = launch_error(launch_dynamic_shared(in.data(), out.data(), &stale, n, threads, threads * sizeof(float)),
                              "dynamic_shared");
        !e.empty())
      return e;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = i / threads, j = b * threads + (threads - 1 - i % threads);
      if (auto e = expect_eq(out[i], j < n ? in[j] : 0.f, "dynamic_shared out[" + std::to_string(i) + "]"); !e.empty())
        return e;
    }
    if (auto e = expect_eq(stale, 0u, "threads that saw shared memory not refilled with 0xff"); !e.empty()) return e;
  }
  float big[32] = {};
  const cudaError_t refused = launch_big_dynamic_shared(big, /*opt_in=*/false);
  if (refused != cudaErrorInvalidValue) return "64 KiB of dynamic shared memory without opt-in was not refused";
  if (auto e = launch_error(launch_big_dynamic_shared(big, /*opt_in=*/true), "big_dynamic_shared"); !e.empty())
    return e;
  for (float v : big)
    if (v != 1.f) return "big dynamic shared memory: wrong value";
  return "";
}

std::string atomics() {
  const int n = 1000;
  std::vector<int> in(n);
  AtomicsResult want{0.f, 0, INT_MIN, INT_MAX, 0, 0u, 0u, 0ull, 0.0};
  for (int i = 0; i < n; ++i) {
    const int v = (i * 37) % 101 - 20;
    in[i] = v;
    want.fsum += float(v);
    want.isum += v;
    want.imax = std::max(want.imax, v);
    want.imin = std::min(want.imin, v);
    want.bits |= 1u << (v & 31);
    want.wrapped = want.wrapped >= 9u ? 0u : want.wrapped + 1;
    want.usum += static_cast<unsigned long long>(v);
    want.dsum += 0.25 * v;
    want.cas_count += 1;
  }
  AtomicsResult got{0.f, 0, INT_MIN, INT_MAX, 0, 0u, 0u, 0ull, 0.0};
  if (auto e = launch_error(launch_atomics(in.data(), n, &got), "atomics"); !e.empty()) return e;
  for (const std::string& e :
       {expect_eq(got.fsum, want.fsum, "atomicAdd(float)"), expect_eq(got.isum, want.isum, "atomicAdd(int)"),
        expect_eq(got.imax, want.imax, "atomicMax"), expect_eq(got.imin, want.imin, "atomicMin"),
        expect_eq(got.bits, want.bits, "atomicOr"), expect_eq(got.wrapped, want.wrapped, "atomicInc"),
        expect_eq(got.usum, want.usum, "atomicAdd(unsigned long long)"),
        expect_eq(got.dsum, want.dsum, "atomicAdd(double)"),
        expect_eq(got.cas_count, want.cas_count, "atomicCAS loop")})
    if (!e.empty()) return e;
  return "";
}

std::string vector_loads() {
  const int n = 100;
  std::vector<float4> in4(n);
  std::vector<int4> src4(n), copy4(n);
  std::vector<float> out(n);
  for (int i = 0; i < n; ++i) {
    in4[i] = make_float4(float(i), 1.f, -2.f, 0.5f * float(i));
    src4[i] = make_int4(i, -i, 2 * i, 7);
  }
  if (auto e = launch_error(launch_vector_loads(in4.data(), out.data(), src4.data(), copy4.data(), n), "vector_loads");
      !e.empty())
    return e;
  for (int i = 0; i < n; ++i) {
    if (auto e = expect_eq(out[i], float(i) + 2.f - 6.f + 2.f * float(i), "float4 sum"); !e.empty()) return e;
    if (copy4[i].x != i || copy4[i].y != -i || copy4[i].z != 2 * i || copy4[i].w != 7) return "int4 copy differs";
  }
  return "";
}

std::string indexing_3d() {
  const unsigned total = 3 * 2 * 2 * 24;
  std::vector<unsigned> coords(total, ~0u), ballot(total, 0);
  if (auto e = launch_error(launch_indexing_3d(coords.data(), ballot.data()), "indexing_3d"); !e.empty()) return e;
  for (unsigned id = 0; id < total; ++id) {
    const unsigned tid = id % 24, bid = id / 24;
    const unsigned want =
        (tid % 4) | (tid / 4 % 3) << 4 | (tid / 12) << 8 | (bid % 3) << 12 | (bid / 3 % 2) << 16 | (bid / 6) << 20;
    if (auto e = expect_eq(coords[id], want, "coords of linear id " + std::to_string(id)); !e.empty()) return e;
    if (auto e = expect_eq(ballot[id], 0x00ffffffu, "ballot in a 24-thread warp"); !e.empty()) return e;
  }
  return "";
}

// Each misuse must fail the launch (cudaErrorLaunchFailure) with a message saying why.
std::string refused(cudaError_t err, cudaError_t want, const std::string& needle, const char* what) {
  if (err != want)
    return std::string(what) + ": expected \"" + cudaGetErrorString(want) + "\", got \"" + cudaGetErrorString(err) +
           "\"";
  const std::string msg = vera_emu::last_launch_error();
  if (msg.find(needle) == std::string::npos)
    return std::string(what) + ": the message \"" + msg + "\" does not mention \"" + needle + "\"";
  return "";
}

std::string misuse() {
  int out[64] = {};
  float fout[300] = {};
  for (const std::string& e : {
           refused(launch_partial_mask(out), cudaErrorLaunchFailure, "full-warp masks", "partial mask"),
           refused(launch_missing_lane(out), cudaErrorLaunchFailure, "does not exist", "missing lane"),
           refused(launch_warp_divergence(out), cudaErrorLaunchFailure, "barrier divergence", "warp divergence"),
           refused(launch_planted_divergent_barrier(fout, 300), cudaErrorLaunchFailure, "barrier divergence",
                   "early return before __syncthreads"),
           refused(launch_bad_block(out, 0, 1, 1), cudaErrorInvalidConfiguration, "block", "empty block"),
           refused(launch_bad_block(out, 1025, 1, 1), cudaErrorInvalidConfiguration, "block", "1025 threads"),
           refused(launch_bad_block(out, 32, 32, 2), cudaErrorInvalidConfiguration, "block", "2048 threads"),
           refused(launch_bad_block(out, 1, 1, 65), cudaErrorInvalidConfiguration, "block", "block.z = 65"),
       })
    if (!e.empty()) return e;
  return launch_error(launch_bad_block(out, 1024, 1, 1), "a 1024-thread block must launch");
}

const std::map<std::string, std::function<std::string()>>& selftests() {
  static const std::map<std::string, std::function<std::string()>> tests = {
      {"warp_ops_width32", [] { return warp_ops(32); }},
      {"warp_ops_width16", [] { return warp_ops(16); }},
      {"warp_ops_width8", [] { return warp_ops(8); }},
      {"dynamic_shared", dynamic_shared},
      {"atomics", atomics},
      {"vector_loads", vector_loads},
      {"indexing_3d", indexing_3d},
      {"misuse", misuse},
  };
  return tests;
}

}  // namespace

std::vector<std::string> emu_selftest_names() {
  std::vector<std::string> names;
  for (const auto& kv : selftests()) names.push_back(kv.first);
  return names;
}

std::string run_emu_selftest(const std::string& name) {
  const auto it = selftests().find(name);
  if (it == selftests().end()) return "no emulation self-test named " + name;
  return it->second();
}

}  // namespace vera::testing
