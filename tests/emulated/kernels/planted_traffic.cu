// The deliberately wasteful kernels of planted_traffic.h. Each waste is marked WASTE.
#include "cuda/global_access.cuh"
#include "kernels/planted_traffic.h"

namespace vera::testing {
namespace {

using vera::cuda::load;
using vera::cuda::store;

constexpr int kThreads = 256;

unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

__global__ void planted_coalesced_copy_kernel(const float* in, float* out, int64_t rows, int64_t cols) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e < rows * cols) store(out + e, load(in + e));
}

__global__ void planted_strided_copy_kernel(const float* in, float* out, int64_t rows, int64_t cols) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= rows * cols) return;
  const int64_t i = e % rows, j = e / rows;            // WASTE: consecutive lanes walk down a column
  store(out + i * cols + j, load(in + i * cols + j));  // (the writes are strided too)
}

__global__ void planted_double_read_kernel(const float* in, float* out, int64_t rows, int64_t cols) {
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together
  float sum = 0.f, squares = 0.f;
  for (int64_t j = lane; j < cols; j += 32) sum += load(in + row * cols + j);
  for (int64_t j = lane; j < cols; j += 32) {  // WASTE: the row is read again
    const float v = load(in + row * cols + j);
    squares += v * v;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    squares += __shfl_xor_sync(0xffffffffu, squares, offset);
  }
  if (lane == 0) store(out + row, squares - sum * sum / float(cols));
}

}  // namespace

cudaError_t launch_planted_coalesced_copy(const float* in, float* out, int64_t rows, int64_t cols) {
  return launch_kernel<planted_coalesced_copy_kernel>(dim3(blocks(rows * cols)), dim3(kThreads), 0, nullptr, in, out,
                                                      rows, cols);
}

cudaError_t launch_planted_strided_copy(const float* in, float* out, int64_t rows, int64_t cols) {
  return launch_kernel<planted_strided_copy_kernel>(dim3(blocks(rows * cols)), dim3(kThreads), 0, nullptr, in, out,
                                                    rows, cols);
}

cudaError_t launch_planted_double_read(const float* in, float* out, int64_t rows, int64_t cols) {
  return launch_kernel<planted_double_read_kernel>(dim3(blocks(rows * 32)), dim3(kThreads), 0, nullptr, in, out, rows,
                                                   cols);
}

}  // namespace vera::testing
