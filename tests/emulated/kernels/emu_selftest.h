// Self-tests of the CUDA emulation (emulated build only): each runs kernels of emu_selftest_kernels.h on host
// memory and checks the results against CUDA's documented semantics.
#pragma once

#include <string>
#include <vector>

namespace vera::testing {

std::vector<std::string> emu_selftest_names();
// "" when the self-test passes, else what went wrong.
std::string run_emu_selftest(const std::string& name);

}  // namespace vera::testing
