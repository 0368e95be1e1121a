// Deterministic reductions of VeRA's backward: the mixed-batch column reduction sum_n p[n, j] q[n, j] per adapter
// (over rows grouped by adapter, so each row is read once whatever the number of adapters),
// both lambda gradients of one adapter from q = grad_out^T u, and the max-abs of several tensors in one launch (the
// safe merge's finiteness bound). No float atomics: every sum is taken in one fixed order, so results are identical
// run to run.
#include <cmath>
#include <cstring>

#include "cuda/dtype.cuh"
#include "cuda/launchers.h"

namespace vera::cuda {
namespace {

constexpr int kTileCols = 32;  // threadIdx.x: one column each
constexpr int kRowLanes = 8;   // threadIdx.y: rows n = lane, lane + 8, ...

// Block (column tile, adapter k, chunk s): partial sum over chunk s of adapter k's segment of rows.
template <typename T>
__global__ void col_dot_partial_kernel(const ColDotReduceParams p) {
  __shared__ float part[kRowLanes][kTileCols];
  const T* pp = static_cast<const T*>(p.p);
  const int64_t j = int64_t(blockIdx.x) * kTileCols + threadIdx.x;
  const int64_t k = blockIdx.y;
  __shared__ int64_t segment[2];               // adapter k's rows: order[segment[0]] .. order[segment[1] - 1]
  if (threadIdx.x == 0 && threadIdx.y == 0) {  // one load for the block (most blocks of a big table are empty)
    segment[0] = p.bounds ? load(p.bounds + k) : 0;
    segment[1] = p.bounds ? load(p.bounds + k + 1) : p.rows;
  }
  __syncthreads();
  const int64_t seg_begin = segment[0], seg_end = segment[1];
  const int64_t chunk = (seg_end - seg_begin + p.splits - 1) / p.splits;
  const int64_t begin = seg_begin + int64_t(blockIdx.z) * chunk;
  const int64_t end = begin + chunk < seg_end ? begin + chunk : seg_end;

  float acc = 0.f;
  if (j < p.cols) {
    for (int64_t i = begin + threadIdx.y; i < end; i += kRowLanes) {
      const int64_t n = p.order ? load(p.order + i) : i;
      acc += to_float(load(pp + n * p.p_row_stride + j)) * load(p.q + n * p.q_row_stride + j);
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

constexpr int kLgWarps = 16;                  // warps per block of the lambda-gradient kernel
constexpr int kLgRowsPerWarp = 2;             // rows o each warp takes: a block covers kLgWarps * kLgRowsPerWarp rows
constexpr int kLgColsPerLane = 8;             // columns k each lane keeps a partial sum for
constexpr int kLgCols = 32 * kLgColsPerLane;  // columns of a block's chunk

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Block (column chunk x, row chunk y): for its rows o and columns k, t = B[o, k] q[o, k];
//   ws_b[x, o] = sum over the chunk's k of lambda_d[k] t      (a warp per row, butterfly sum)
//   ws_d[y, k] = sum over the chunk's o of lambda_b[o] t      (per lane, then the warps in order)
// Lane l owns columns k0 + l + 32 j: the loads of a warp are coalesced along the row. A lane issues all its loads
// (kLgRowsPerWarp x kLgColsPerLane of B and of q, unconditional) before the first sum, so they are in flight
// together: the kernel is bound by the bytes, not by one load's latency after another (the report: 2 KiB in flight
// per warp, against 290 bytes when each load sat behind its own bounds check).
template <typename T>
__global__ void __launch_bounds__(kLgWarps * 32) lambda_grads_partial_kernel(const LambdaGradsParams p) {
  __shared__ float col_part[kLgWarps][kLgCols];
  const T* B = static_cast<const T*>(p.B);
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int64_t k0 = int64_t(blockIdx.x) * kLgCols + lane;
  const int64_t o0 = int64_t(blockIdx.y) * (kLgWarps * kLgRowsPerWarp) + warp * kLgRowsPerWarp;
  // Out-of-range entries are clamped to row 0 / column 0 (always valid) and their products zeroed afterwards, so
  // every load is unconditional and the compiler can issue them all before the first use.
  T bv[kLgRowsPerWarp][kLgColsPerLane];
  float qv[kLgRowsPerWarp][kLgColsPerLane], ld[kLgColsPerLane], lb[kLgRowsPerWarp];
  VERA_UNROLL
  for (int j = 0; j < kLgColsPerLane; ++j) ld[j] = load(p.lambda_d + (k0 + 32 * j < p.r ? k0 + 32 * j : 0));
  VERA_UNROLL
  for (int i = 0; i < kLgRowsPerWarp; ++i) {
    const int64_t o = o0 + i < p.out_f ? o0 + i : 0;
    lb[i] = load(p.lambda_b + o);
    VERA_UNROLL
    for (int j = 0; j < kLgColsPerLane; ++j) {
      const int64_t k = k0 + 32 * j < p.r ? k0 + 32 * j : 0;
      bv[i][j] = load(B + o * p.b_row_stride + k);
      qv[i][j] = load(p.q + o * p.r + k);
    }
  }
  float t[kLgRowsPerWarp][kLgColsPerLane];
  VERA_UNROLL
  for (int i = 0; i < kLgRowsPerWarp; ++i) {
    VERA_UNROLL
    for (int j = 0; j < kLgColsPerLane; ++j) {
      const bool in = o0 + i < p.out_f && k0 + 32 * j < p.r;
      t[i][j] = in ? to_float(bv[i][j]) * qv[i][j] : 0.f;
    }
  }
  float acc[kLgColsPerLane];
  VERA_UNROLL
  for (int j = 0; j < kLgColsPerLane; ++j) acc[j] = 0.f;
  VERA_UNROLL
  for (int i = 0; i < kLgRowsPerWarp; ++i) {
    float row = 0.f;
    VERA_UNROLL
    for (int j = 0; j < kLgColsPerLane; ++j) {
      row += ld[j] * t[i][j];
      acc[j] += lb[i] * t[i][j];
    }
    row = warp_sum(row);
    if (lane == 0 && o0 + i < p.out_f) store(p.ws_b + int64_t(blockIdx.x) * p.out_f + o0 + i, row);
  }
  VERA_UNROLL
  for (int j = 0; j < kLgColsPerLane; ++j) col_part[warp][lane + 32 * j] = acc[j];
  __syncthreads();
  for (int c = threadIdx.x; c < kLgCols; c += blockDim.x) {
    const int64_t k = int64_t(blockIdx.x) * kLgCols + c;
    if (k >= p.r) continue;
    float s = 0.f;
    for (int w = 0; w < kLgWarps; ++w) s += col_part[w][c];
    store(p.ws_d + int64_t(blockIdx.y) * p.r + k, s);
  }
}

// grad_lb[o] = sum over x of ws_b[x, o], grad_ld[k] = sum over y of ws_d[y, k], chunks in ascending order (four
// loads issued at a time, added in order).
__device__ __forceinline__ float sum_chunks(const float* first, int64_t stride, int count) {
  float s = 0.f;
  int c = 0;
  for (; c + 4 <= count; c += 4) {
    float v[4];
    VERA_UNROLL
    for (int u = 0; u < 4; ++u) v[u] = load(first + (c + u) * stride);
    VERA_UNROLL
    for (int u = 0; u < 4; ++u) s += v[u];
  }
  for (; c < count; ++c) s += load(first + c * stride);
  return s;
}

__global__ void lambda_grads_finish_kernel(const LambdaGradsParams p) {
  const int64_t total = p.out_f + p.r;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    if (e < p.out_f) {
      store(p.grad_lb + e, sum_chunks(p.ws_b + e, p.out_f, p.col_chunks));
    } else {
      const int64_t k = e - p.out_f;
      store(p.grad_ld + k, sum_chunks(p.ws_d + k, p.r, p.row_chunks));
    }
  }
}

constexpr int kMaxAbsUnroll = 4;       // 16-byte loads in flight per thread
constexpr int kMaxAbsBlocksPerSm = 4;  // blocks of kThreads per SM: 32 warps, each with kMaxAbsUnroll loads out

// m with |v| folded in; a NaN makes it +inf (fmaxf would drop a NaN), so "not finite" survives the maximum.
__device__ __forceinline__ float fold_abs(float m, float v) { return v != v ? INFINITY : fmaxf(m, fabsf(v)); }

// This thread's share of max |data[i]|, i < numel: 16-byte chunks t, t + threads, ... (kMaxAbsUnroll loaded before
// any is used) where data is 16-byte aligned, then the tail (or everything) element by element.
template <typename T>
__device__ __forceinline__ float thread_max_abs(const T* data, int64_t numel) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t threads = int64_t(gridDim.x) * blockDim.x;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t chunks = reinterpret_cast<uintptr_t>(data) % 16 == 0 ? numel / kVec : 0;
  const uint4* vec = reinterpret_cast<const uint4*>(data);
  float m = 0.f;
  for (int64_t c0 = t; c0 < chunks; c0 += threads * kMaxAbsUnroll) {
    uint4 raw[kMaxAbsUnroll];
    VERA_UNROLL
    for (int j = 0; j < kMaxAbsUnroll; ++j) {
      const int64_t c = c0 + j * threads;
      raw[j] = c < chunks ? load(vec + c) : make_uint4(0, 0, 0, 0);  // zeros leave the maximum as it is
    }
    VERA_UNROLL
    for (int j = 0; j < kMaxAbsUnroll; ++j) {
      T vals[kVec];
      memcpy(vals, &raw[j], 16);
      VERA_UNROLL
      for (int e = 0; e < kVec; ++e) m = fold_abs(m, to_float(vals[e]));
    }
  }
  for (int64_t i = chunks * kVec + t; i < numel; i += threads) m = fold_abs(m, to_float(load(data + i)));
  return m;
}

// Block reduce of a maximum (non-negative values, NaN already folded to +inf); thread 0 gets it. warp_max is the
// block's shared scratch (kThreads / 32 floats), free again when this returns.
__device__ __forceinline__ float block_max(float m, float (&warp_max)[kThreads / 32]) {
  for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) m = fmaxf(m, warp_max[w]);
  }
  __syncthreads();
  return m;
}

// Pass 1: block b's maximum of each tensor into partial[t * blocks + b].
__global__ void __launch_bounds__(kThreads) max_abs_partial_kernel(const MaxAbsParams p) {
  __shared__ float warp_max[kThreads / 32];
  allow_dependent_launch();  // the finish kernel may start; it waits for these partials before reading them
  VERA_UNROLL  // unrolled: p.data[t] etc. indexed with constants stay in the parameter bank (no stack copy)
  for (int t = 0; t < kMaxAbsTensors; ++t) {
    if (t >= p.count) break;
    float m = 0.f;
    switch (p.dtype[t]) {
      case DType::F32: m = thread_max_abs(static_cast<const float*>(p.data[t]), p.numel[t]); break;
      case DType::F16: m = thread_max_abs(static_cast<const __half*>(p.data[t]), p.numel[t]); break;
      case DType::BF16: m = thread_max_abs(static_cast<const __nv_bfloat16*>(p.data[t]), p.numel[t]); break;
    }
    m = block_max(m, warp_max);
    if (threadIdx.x == 0) store(p.partial + int64_t(t) * p.blocks + blockIdx.x, m);
  }
}

// Pass 2, a programmatic dependent of pass 1 (its launch overlaps pass 1): block t reduces tensor t's partials into
// maxima[t].
__global__ void __launch_bounds__(kThreads) max_abs_finish_kernel(const MaxAbsParams p) {
  __shared__ float warp_max[kThreads / 32];
  grid_dependency_wait();
  const float* partial = p.partial + int64_t(blockIdx.x) * p.blocks;
  float m = 0.f;
  for (int b = threadIdx.x; b < p.blocks; b += kThreads) m = fmaxf(m, load(partial + b));
  m = block_max(m, warp_max);
  if (threadIdx.x == 0) store(p.maxima + blockIdx.x, m);
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

void lambda_grads_chunks(int64_t out_f, int64_t r, int* col_chunks, int* row_chunks) {
  *col_chunks = static_cast<int>((r + kLgCols - 1) / kLgCols);
  *row_chunks = static_cast<int>((out_f + kLgWarps * kLgRowsPerWarp - 1) / (kLgWarps * kLgRowsPerWarp));
}

cudaError_t launch_lambda_grads(const LambdaGradsParams& p, cudaStream_t stream) {
  if (p.row_chunks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned int>(p.col_chunks), static_cast<unsigned int>(p.row_chunks));
  cudaError_t err = dispatch_dtype(p.dtype, [&](auto tag) {
    return launch_kernel<lambda_grads_partial_kernel<decltype(tag)>>(grid, dim3(kLgWarps * 32), 0, stream, p);
  });
  if (err != cudaSuccess) return err;
  return launch_kernel<lambda_grads_finish_kernel>(dim3(blocks_for(p.out_f + p.r)), dim3(kThreads), 0, stream, p);
}

int max_abs_blocks(int64_t max_numel) {
  // Enough 16-byte loads for the largest tensor to keep every SM busy, no more blocks than it has chunks for.
  const int64_t want =
      (max_numel + int64_t(kThreads) * 8 * kMaxAbsUnroll - 1) / (int64_t(kThreads) * 8 * kMaxAbsUnroll);
  const int64_t cap = int64_t(sm_count()) * kMaxAbsBlocksPerSm;
  return static_cast<int>(want < 1 ? 1 : want < cap ? want : cap);
}

cudaError_t launch_max_abs(const MaxAbsParams& p, cudaStream_t stream) {
  if (p.count < 1 || p.count > kMaxAbsTensors || p.blocks < 1) return cudaErrorInvalidValue;
  const cudaError_t err = launch_kernel<max_abs_partial_kernel>(dim3(p.blocks), dim3(kThreads), 0, stream, p);
  if (err != cudaSuccess) return err;
  return launch_kernel_dependent<max_abs_finish_kernel>(dim3(p.count), dim3(kThreads), 0, stream, p);
}

}  // namespace vera::cuda
