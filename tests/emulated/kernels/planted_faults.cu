// The deliberately broken kernels of planted_faults.h. Each bug is marked BUG.
#include "cuda/kernel_prelude.h"
#include "kernels/planted_faults.h"

namespace vera::testing {
namespace {

constexpr int kThreads = 256;

__global__ void planted_oob_write_kernel(float* out, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i <= n; i += stride) out[i] = 1.f;  // BUG: <=
}

// `rows` is a parameter so that the compiler cannot see the overflow (and drop the bad iteration).
__global__ void planted_shared_oob_kernel(float* out, int rows) {
  __shared__ float tile[32][33];
  for (int r = 0; r < rows; ++r) tile[r][threadIdx.x] = float(r);
  __syncthreads();
  out[threadIdx.x] = tile[0][threadIdx.x];
}

__global__ void planted_missing_sync_kernel(const float* in, float* out, int64_t n) {
  __shared__ float vals[kThreads];
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  vals[threadIdx.x] = i < n ? in[i] : 0.f;
  // BUG: __syncthreads() missing here; thread 0 reads the other threads' writes unordered.
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int k = 0; k < kThreads; ++k) s += vals[k];
    out[blockIdx.x] = s;
  }
}

__global__ void planted_divergent_barrier_kernel(float* out, int64_t n) {
  __shared__ float vals[kThreads];
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;  // BUG: the remaining threads wait at the __syncthreads below for these
  vals[threadIdx.x] = float(i);
  __syncthreads();
  out[i] = vals[threadIdx.x];
}

__global__ void planted_block_order_kernel(int* out) {
  if (threadIdx.x == 0) *out = int(blockIdx.x);  // BUG: every block writes the same location
}

unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t launch_planted_oob_write(float* out, int64_t n) {
  return launch_kernel<planted_oob_write_kernel>(dim3(blocks(n + 1)), dim3(kThreads), 0, nullptr, out, n);
}

cudaError_t launch_planted_shared_oob(float* out) {
  const int rows = 33;  // BUG: the tile has 32 rows
  return launch_kernel<planted_shared_oob_kernel>(dim3(1), dim3(32), 0, nullptr, out, rows);
}

cudaError_t launch_planted_missing_sync(const float* in, float* out, int64_t n) {
  return launch_kernel<planted_missing_sync_kernel>(dim3(blocks(n)), dim3(kThreads), 0, nullptr, in, out, n);
}

cudaError_t launch_planted_divergent_barrier(float* out, int64_t n) {
  return launch_kernel<planted_divergent_barrier_kernel>(dim3(blocks(n)), dim3(kThreads), 0, nullptr, out, n);
}

cudaError_t launch_planted_block_order(int* out, unsigned nblocks) {
  return launch_kernel<planted_block_order_kernel>(dim3(nblocks), dim3(32), 0, nullptr, out);
}

}  // namespace vera::testing
