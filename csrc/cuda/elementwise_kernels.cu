// Element-wise VeRA steps: the folded adapter matrix diag(lambda_b) B diag(lambda_d) (row_scale with both lambdas),
// h = u * lambda_d[a(n)] (col_scale) and the gather-scale-add epilogue y = base + lambda_b[a(n)] * z with z the fp32
// output of the GEMM (scale_add). Grid-stride loops, 64-bit indices.
#include "cuda/dtype.cuh"
#include "cuda/launchers.h"

namespace vera::cuda {
namespace {

template <typename Tin, typename Tout>
__global__ void row_scale_kernel(const RowScaleParams p) {
  const Tin* in = static_cast<const Tin*>(p.in);
  Tout* out = static_cast<Tout*>(p.out);
  const int64_t total = p.rows * p.cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / p.cols, j = e - i * p.cols;
    float v = load(p.lam + i) * to_float(load(in + i * p.in_row_stride + j));
    if (p.col_lam) v *= load(p.col_lam + j);
    store(out + e, from_float<Tout>(v));
  }
}

template <typename T>
__global__ void col_scale_kernel(const ColScaleParams p) {
  const T* in = static_cast<const T*>(p.in);
  T* out = static_cast<T*>(p.out);
  const int64_t total = p.rows * p.cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e / p.cols, j = e - n * p.cols;
    const int64_t a = p.idx ? load(p.idx + n) : 0;
    store(out + e, a < 0 ? from_float<T>(0.f)
                         : from_float<T>(to_float(load(in + n * p.in_row_stride + j)) * load(p.lam + a * p.cols + j)));
  }
}

template <typename T>
__global__ void scale_add_kernel(const ScaleAddParams p) {
  const T* base = static_cast<const T*>(p.base);
  T* out = static_cast<T*>(p.out);
  const int64_t total = p.rows * p.cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e / p.cols, j = e - n * p.cols;
    const int64_t a = p.idx ? load(p.idx + n) : 0;
    const T b = load(base + n * p.base_row_stride + j);
    const T value =
        a < 0 ? b : from_float<T>(to_float(b) + load(p.lam + a * p.cols + j) * load(p.z + n * p.z_row_stride + j));
    store(out + n * p.out_row_stride + j, value);
  }
}

}  // namespace

cudaError_t launch_row_scale(const RowScaleParams& p, cudaStream_t stream) {
  const dim3 grid(blocks_for(p.rows * p.cols)), block(kThreads);
  return dispatch_dtype(p.in_dtype, [&](auto in_tag) {
    using Tin = decltype(in_tag);
    if (p.out_dtype == DType::F32) return launch_kernel<row_scale_kernel<Tin, float>>(grid, block, 0, stream, p);
    return launch_kernel<row_scale_kernel<Tin, Tin>>(grid, block, 0, stream, p);
  });
}

cudaError_t launch_col_scale(const ColScaleParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch_kernel<col_scale_kernel<decltype(tag)>>(dim3(blocks_for(p.rows * p.cols)), dim3(kThreads), 0, stream,
                                                          p);
  });
}

cudaError_t launch_scale_add(const ScaleAddParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch_kernel<scale_add_kernel<decltype(tag)>>(dim3(blocks_for(p.rows * p.cols)), dim3(kThreads), 0, stream,
                                                          p);
  });
}

}  // namespace vera::cuda
