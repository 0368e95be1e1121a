// Merge/unmerge: weight += alpha * delta (delta = B_hat A_hat in fp32, from a cuBLAS GEMM), accumulated in fp32 and
// rounded once. 32x32 tiles go through shared memory so that both delta and weight are read and written along
// their contiguous dimension, whether weight is (out, in) or, with fan_in_fan_out, (in, out). A safe merge first
// runs the same tiles in check-only mode, which writes nothing and raises a flag on a non-finite result.
#include "cuda/dtype.cuh"
#include "cuda/launchers.h"

namespace vera::cuda {
namespace {

constexpr int kTile = 32;
constexpr int kTileRows = 8;  // blockDim.y; each thread covers kTile / kTileRows rows of a tile

template <typename T, bool kCheckOnly>
__global__ void merge_kernel(const MergeParams p) {
  __shared__ float tile[kTile][kTile + 1];  // +1: no bank conflicts on the transposed read
  T* w = static_cast<T*>(p.weight);
  const int64_t o0 = int64_t(blockIdx.y) * kTile, i0 = int64_t(blockIdx.x) * kTile;
  // weight's contiguous dimension: i for (out, in), o for the transposed (in, out) layout.
  const bool o_fastest = p.w_stride_o == 1 && p.w_stride_i != 1;

  for (int r = threadIdx.y; r < kTile; r += kTileRows) {  // coalesced along i
    const int64_t o = o0 + r, i = i0 + threadIdx.x;
    tile[r][threadIdx.x] = (o < p.out_f && i < p.in_f) ? load(p.delta + o * p.in_f + i) : 0.f;
  }
  __syncthreads();

  bool finite = true;
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    // Along weight's contiguous dimension: (o, i) = (o0 + x, i0 + r) when o is fastest, else (o0 + r, i0 + x).
    const int oo = o_fastest ? threadIdx.x : r, ii = o_fastest ? r : threadIdx.x;
    const int64_t o = o0 + oo, i = i0 + ii;
    if (o >= p.out_f || i >= p.in_f) continue;
    T* dst = w + o * p.w_stride_o + i * p.w_stride_i;
    const T merged = from_float<T>(to_float(load(dst)) + p.alpha * tile[oo][ii]);
    if (kCheckOnly) {
      finite &= isfinite(to_float(merged));
    } else {
      store(dst, merged);
    }
  }
  if (kCheckOnly && !finite) atomic_or(p.nonfinite, 1);
}

}  // namespace

cudaError_t launch_merge(const MergeParams& p, bool check_only, cudaStream_t stream) {
  const int64_t tiles_i = (p.in_f + kTile - 1) / kTile, tiles_o = (p.out_f + kTile - 1) / kTile;
  if (tiles_o > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned int>(tiles_i), static_cast<unsigned int>(tiles_o)), block(kTile, kTileRows);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (check_only) return launch_kernel<merge_kernel<T, true>>(grid, block, 0, stream, p);
    return launch_kernel<merge_kernel<T, false>>(grid, block, 0, stream, p);
  });
}

}  // namespace vera::cuda
