// Test-only kernels that exercise the CUDA features our production kernels do not use yet (dynamic shared
// memory, every warp shuffle and vote, atomics, vector loads, 3-D indexing, partial warps) plus misuses the
// emulator must refuse. emu_selftest.cpp runs them and checks the results. Valid CUDA: they compile with nvcc.
#pragma once

#include <cstdint>

#if defined(VERA_EMULATE_CUDA)
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace vera::testing {

constexpr int kWarpOpsPerThread = 9;
// Two warps (64 threads); out: kWarpOpsPerThread ints per thread, see the kernel.
cudaError_t launch_warp_ops(const int* in, int* out, int width);
// out[i] = in[j], j = i mirrored within its block (0 where j >= n), through dynamic shared memory (float and
// unsigned views of the same bytes); *fresh_mismatch counts threads that found
// their shared word not freshly poisoned (0xffffffff) before writing it (an emulator property, not CUDA's).
cudaError_t launch_dynamic_shared(const float* in, float* out, unsigned* fresh_mismatch, int64_t n, int threads,
                                  size_t shared_bytes);
// Asks for 64 KiB of dynamic shared memory, after cudaFuncSetAttribute when opt_in.
cudaError_t launch_big_dynamic_shared(float* out, bool opt_in);

struct AtomicsResult {
  float fsum;
  int isum, imax, imin, cas_count;
  unsigned bits, wrapped;
  unsigned long long usum;
  double dsum;
};
cudaError_t launch_atomics(const int* in, int n, AtomicsResult* result);

// out[i] = in4[i].x + 2 y + 3 z + 4 w (through __ldg); copy4[i] = src4[i] (int4).
cudaError_t launch_vector_loads(const float4* in4, float* out, const int4* src4, int4* copy4, int n);

// Block (4, 3, 2) (24 threads: one partial warp), grid (3, 2, 2). Per thread, at its global linear id:
// coords = tx | ty << 4 | tz << 8 | bx << 12 | by << 16 | bz << 20, ballot = __ballot_sync(~0u, 1).
cudaError_t launch_indexing_3d(unsigned* coords, unsigned* ballot);

// Misuses, each of which the emulator must turn into a launch error.
cudaError_t launch_partial_mask(int* out);     // __shfl_sync with a half-warp mask in a full warp
cudaError_t launch_missing_lane(int* out);     // a shuffle that reads a lane the (partial) warp lacks
cudaError_t launch_warp_divergence(int* out);  // half the lanes shuffle, the others __syncwarp
cudaError_t launch_bad_block(int* out, unsigned x, unsigned y, unsigned z);

}  // namespace vera::testing
