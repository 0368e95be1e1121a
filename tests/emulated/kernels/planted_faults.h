// Test-only kernels with deliberate bugs, so the tests can prove that the emulated build's safety nets catch
// them: AddressSanitizer (out-of-bounds writes), ThreadSanitizer (a missing __syncthreads), the emulator's own
// barrier-divergence check, and the block-order test (an inter-block race). Never part of the extension.
#pragma once

#include <cstdint>

#if defined(VERA_EMULATE_CUDA)
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace vera::testing {

// Writes 1 to out[0..n] inclusive: one element past the end of an n-element buffer.
cudaError_t launch_planted_oob_write(float* out, int64_t n);
// Fills a 32x33 static __shared__ tile one row too far (row 32), then copies its first row to out (32 floats).
cudaError_t launch_planted_shared_oob(float* out);
// Per-block sum of in (n floats, 256 per block) through shared memory, without the __syncthreads between the
// writes and thread 0's reads: a shared-memory race. out has one float per block.
cudaError_t launch_planted_missing_sync(const float* in, float* out, int64_t n);
// Threads past n return before a __syncthreads that the others reach: barrier divergence. out has n floats.
cudaError_t launch_planted_divergent_barrier(float* out, int64_t n);
// Every block writes its index to *out: the result depends on which block runs last (an inter-block race).
cudaError_t launch_planted_block_order(int* out, unsigned blocks);

}  // namespace vera::testing
