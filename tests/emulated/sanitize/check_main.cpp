// The sanitizer check program: the emulated kernels (and csrc/cpu/claim_pool.cpp) with no torch and no python, built by
// run_sanitizers.sh once with -fsanitize=address,undefined and once with -fsanitize=thread.
//
//   emu_check clean        every VeRA kernel vs reference.h (traced), every emulation self-test, the CPU decode path's
//                          work claiming from several threads; exit 0 when all pass
//                          (a sanitizer report makes the exit status non-zero by itself)
//   emu_check oob          the planted out-of-bounds global write   (AddressSanitizer must report it)
//   emu_check shared-oob   the planted static __shared__ overflow    (AddressSanitizer should report it)
//   emu_check race         the planted missing __syncthreads         (ThreadSanitizer must report it)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "checks.h"
#include "emu/emu_trace.h"
#include "kernels/emu_selftest.h"
#include "kernels/planted_faults.h"

namespace {

int clean(unsigned seed) {
  // Traced (every block runs, so results are complete): the trace's bookkeeping runs under the sanitizers too.
  vera_emu::trace::start(0);
  int failures = vera::check::check_kernels(seed);
  const std::string trace = vera_emu::trace::stop();
  const bool traced = trace.find("\"kernel\": \"vera::cuda::") != std::string::npos;
  std::printf("trace of the kernel checks: %zu bytes of JSON%s\n", trace.size(), traced ? "" : " (EMPTY: FAIL)");
  failures += traced ? 0 : 1;
  failures += vera::check::check_claim_pool(seed);
  for (const std::string& name : vera::testing::emu_selftest_names()) {
    const std::string error = vera::testing::run_emu_selftest(name);
    std::printf("selftest %s: %s\n", name.c_str(), error.empty() ? "ok" : error.c_str());
    failures += error.empty() ? 0 : 1;
  }
  std::printf("%s\n", failures ? "FAILED" : "all clean checks passed");
  return failures ? 1 : 0;
}

// A planted fault that the sanitizer let through ends here.
int not_caught(const char* what, cudaError_t err) {
  std::printf("planted %s ran to completion (%s) without a sanitizer report\n", what, cudaGetErrorString(err));
  return 3;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "clean";
  const unsigned seed = argc > 2 ? unsigned(std::strtoul(argv[2], nullptr, 10)) : 1234u;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (mode == "clean") return clean(seed);
  if (mode == "oob") {
    const int64_t n = 1000;
    std::unique_ptr<float[]> out(new float[n]);
    return not_caught("out-of-bounds write", vera::testing::launch_planted_oob_write(out.get(), n));
  }
  if (mode == "shared-oob") {
    float out[32];
    return not_caught("shared-memory overflow", vera::testing::launch_planted_shared_oob(out));
  }
  if (mode == "race") {
    const int64_t n = 512;
    std::vector<float> in(n, 1.f), out(2, 0.f);
    return not_caught("missing __syncthreads", vera::testing::launch_planted_missing_sync(in.data(), out.data(), n));
  }
  std::fprintf(stderr, "usage: %s [clean [SEED] | oob | shared-oob | race]\n", argv[0]);
  return 2;
}
