// Test-only kernels with deliberate memory inefficiencies, so the tests can prove that the traced traffic of the
// kernel cost report (emu/emu_trace.h, benchmarks/kernel_report.py) catches them. Each reads a (rows, cols)
// row-major fp32 matrix `in` and writes `out`. Never part of the extension.
#pragma once

#include <cstdint>

#if defined(VERA_EMULATE_CUDA)
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace vera::testing {

// The baseline: out = in, thread e copies element e (consecutive lanes, consecutive addresses).
cudaError_t launch_planted_coalesced_copy(const float* in, float* out, int64_t rows, int64_t cols);
// out = in, but thread e reads element (e % rows, e / rows): lanes `cols` elements apart (uncoalesced reads).
cudaError_t launch_planted_strided_copy(const float* in, float* out, int64_t rows, int64_t cols);
// out[i] = sum_j in[i, j]^2 - (sum_j in[i, j])^2 / cols, a row's variance times cols, with one warp per row that
// reads its row twice (a sum pass, then a sum-of-squares pass): twice the ideal read bytes.
cudaError_t launch_planted_double_read(const float* in, float* out, int64_t rows, int64_t cols);

}  // namespace vera::testing
