// Deterministic reductions of VeRA's backward: the lambda_d (and mixed-batch lambda_b) column reduction
// sum_n p[n, j] q[n, j] per adapter, and the lambda_b row dot sum_j p[i, j] q[i, j]. No float atomics: every
// sum is taken in one fixed order, so results are identical run to run.
#include "cuda/dtype.cuh"
#include "cuda/launchers.h"

namespace vera::cuda {
namespace {

constexpr int kTileCols = 32;  // threadIdx.x: one column each
constexpr int kRowLanes = 8;   // threadIdx.y: rows n = lane, lane + 8, ...

// Block (column tile, adapter k, row chunk s): partial sum over its chunk's rows of adapter k.
template <typename T>
__global__ void col_dot_partial_kernel(const ColDotReduceParams p) {
  __shared__ float part[kRowLanes][kTileCols];
  const T* pp = static_cast<const T*>(p.p);
  const T* qp = static_cast<const T*>(p.q);
  const int64_t j = int64_t(blockIdx.x) * kTileCols + threadIdx.x;
  const int64_t k = blockIdx.y;
  const int64_t chunk = (p.rows + p.splits - 1) / p.splits;
  const int64_t n_begin = int64_t(blockIdx.z) * chunk;
  const int64_t n_end = n_begin + chunk < p.rows ? n_begin + chunk : p.rows;

  float acc = 0.f;
  if (j < p.cols) {
    for (int64_t n = n_begin + threadIdx.y; n < n_end; n += kRowLanes) {
      if ((p.idx ? load(p.idx + n) : 0) != k) continue;
      acc += to_float(load(pp + n * p.p_row_stride + j)) * to_float(load(qp + n * p.q_row_stride + j));
    }
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  for (int half = kRowLanes / 2; half > 0; half /= 2) {  // tree over the row lanes, fixed order
    if (threadIdx.y < half) part[threadIdx.y][threadIdx.x] += part[threadIdx.y + half][threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.y == 0 && j < p.cols) {
    float* dst = p.splits == 1 ? p.out : p.workspace + int64_t(blockIdx.z) * p.num_adapters * p.cols;
    store(dst + k * p.cols + j, part[0][threadIdx.x]);
  }
}

// out[k, j] = sum over s of workspace[s, k, j], s ascending.
__global__ void col_dot_finish_kernel(const ColDotReduceParams p) {
  const int64_t total = p.num_adapters * p.cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int split = 0; split < p.splits; ++split) s += load(p.workspace + split * total + e);
    store(p.out + e, s);
  }
}

// One warp per row; lanes stride over the columns, then a butterfly sum (same order every run).
template <typename T>
__global__ void row_dot_kernel(const RowDotParams p) {
  const T* pp = static_cast<const T*>(p.p);
  const T* qp = static_cast<const T*>(p.q);
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_grid = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t i = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; i < p.rows; i += warps_per_grid) {
    float acc = 0.f;
    for (int64_t j = lane; j < p.cols; j += 32)
      acc += to_float(load(pp + i * p.p_row_stride + j)) * to_float(load(qp + i * p.q_row_stride + j));
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) store(p.out + i, acc);
  }
}

}  // namespace

int col_dot_reduce_splits(int64_t rows, int64_t cols, int64_t num_adapters) {
  // Aim for ~1024 blocks in all, with at least 256 rows per chunk.
  const int64_t tiles = (cols + kTileCols - 1) / kTileCols * (num_adapters > 0 ? num_adapters : 1);
  int64_t splits = 1024 / (tiles > 0 ? tiles : 1);
  const int64_t by_rows = (rows + 255) / 256;
  if (splits > by_rows) splits = by_rows;
  if (splits > 64) splits = 64;
  return static_cast<int>(splits < 1 ? 1 : splits);
}

cudaError_t launch_col_dot_reduce(const ColDotReduceParams& p, cudaStream_t stream) {
  if (p.num_adapters > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned int>((p.cols + kTileCols - 1) / kTileCols),
                  static_cast<unsigned int>(p.num_adapters), static_cast<unsigned int>(p.splits));
  cudaError_t err = dispatch_dtype(p.dtype, [&](auto tag) {
    return launch_kernel<col_dot_partial_kernel<decltype(tag)>>(grid, dim3(kTileCols, kRowLanes), 0, stream, p);
  });
  if (err != cudaSuccess || p.splits == 1) return err;
  return launch_kernel<col_dot_finish_kernel>(dim3(blocks_for(p.num_adapters * p.cols)), dim3(kThreads), 0, stream, p);
}

cudaError_t launch_row_dot(const RowDotParams& p, cudaStream_t stream) {
  const int rows_per_block = kThreads / 32;
  const int64_t want = (p.rows + rows_per_block - 1) / rows_per_block;
  const dim3 grid(static_cast<unsigned int>(want < 4096 ? want : 4096));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch_kernel<row_dot_kernel<decltype(tag)>>(grid, dim3(kThreads), 0, stream, p);
  });
}

}  // namespace vera::cuda
