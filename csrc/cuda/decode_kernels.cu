// The fused small-N forward (decode, serving) in two launches, bandwidth-bound on W, A and B (contract in
// params.h, DecodeParams). A and B are shared by every layer and adapter, so across the layers of a model they stay
// in L2; per-row adapters only change which lambda entries are gathered, so a batch whose rows use different adapters
// (out of however many are registered) reads what one adapter reads.
//   pass 1: a block per row k of A (r is small: a block, not a warp, keeps the SMs busy)
//   pass 2: a warp per output row o of W and B
#include <cstring>

#include "cuda/dtype.cuh"
#include "cuda/launchers.h"

namespace vera::cuda {
namespace {

constexpr int kPass1Threads = 256;
constexpr int kPass2WarpsPerBlock = 8;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// kVec consecutive elements at p (16-byte aligned) as floats, with 16-byte loads.
template <typename T, int kVec>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[kVec]) {
  static_assert((kVec * sizeof(T)) % 16 == 0, "whole 16-byte loads only");
  T vals[kVec];
  VERA_UNROLL
  for (int c = 0; c < int(kVec * sizeof(T) / 16); ++c) {
    const uint4 raw = load(reinterpret_cast<const uint4*>(p) + c);
    memcpy(reinterpret_cast<char*>(vals) + 16 * c, &raw, 16);
  }
  VERA_UNROLL
  for (int e = 0; e < kVec; ++e) out[e] = to_float(vals[e]);
}

// acc[m] += row . xs[m] (m < n) over this thread's share of the columns: thread `t` of `threads` takes chunks of
// kVec = 16 / sizeof(T) columns, t, t + threads, ...; the tail past the last whole chunk, and everything when the
// rows are not 16-byte aligned, goes element by element. Rows are T; xs are T (x) or fp32 (h).
template <typename T, typename X>
__device__ __forceinline__ void thread_dots(const T* row, const X* xs, int64_t x_stride, int64_t len, int64_t n,
                                            bool aligned, int t, int threads, float (&acc)[kDecodeMaxRows]) {
  constexpr int kVec = 16 / sizeof(T);
  int64_t scalar_from = 0;
  if (aligned) {
    const int64_t chunks = len / kVec;
    for (int64_t c = t; c < chunks; c += threads) {
      float w[kVec];
      load_floats<T, kVec>(row + c * kVec, w);
      VERA_UNROLL
      for (int m = 0; m < kDecodeMaxRows; ++m) {
        if (m >= n) break;
        float xv[kVec];
        load_floats<X, kVec>(xs + m * x_stride + c * kVec, xv);
        VERA_UNROLL
        for (int e = 0; e < kVec; ++e) acc[m] += w[e] * xv[e];
      }
    }
    scalar_from = chunks * kVec;
  }
  for (int64_t j = scalar_from + t; j < len; j += threads) {
    const float w = to_float(load(row + j));
    VERA_UNROLL
    for (int m = 0; m < kDecodeMaxRows; ++m) {
      if (m >= n) break;
      acc[m] += w * to_float(load(xs + m * x_stride + j));
    }
  }
}

template <typename T>
__global__ void decode_u_kernel(const DecodeParams p, const bool aligned) {
  __shared__ float partial[kPass1Threads / 32][kDecodeMaxRows];
  const T* A = static_cast<const T*>(p.A);
  const T* x = static_cast<const T*>(p.x);
  T* u = static_cast<T*>(p.u);
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  for (int64_t k = blockIdx.x; k < p.r; k += gridDim.x) {
    float acc[kDecodeMaxRows];
    VERA_UNROLL
    for (int m = 0; m < kDecodeMaxRows; ++m) acc[m] = 0.f;
    thread_dots<T, T>(A + k * p.a_row_stride, x, p.x_row_stride, p.in_f, p.n, aligned, threadIdx.x, kPass1Threads, acc);
    VERA_UNROLL
    for (int m = 0; m < kDecodeMaxRows; ++m) {
      if (m >= p.n) break;
      const float s = warp_sum(acc[m]);
      if (lane == 0) partial[warp][m] = s;
    }
    __syncthreads();
    if (threadIdx.x < p.n) {  // thread m finishes row m, warps summed in a fixed order
      const int m = threadIdx.x;
      float s = 0.f;
      for (int w = 0; w < kPass1Threads / 32; ++w) s += partial[w][m];
      const T uk = from_float<T>(s);
      const int64_t a = p.idx ? load(p.idx + m) : 0;
      store(u + m * p.r + k, uk);
      store(p.h + m * p.r + k, a < 0 ? 0.f : to_float(uk) * load(p.lambda_d + a * p.r + k));
    }
    __syncthreads();  // partial is reused by the next row
  }
}

template <typename T>
__global__ void decode_y_kernel(const DecodeParams p, const bool aligned_w, const bool aligned_b) {
  const T* W = static_cast<const T*>(p.weight);
  const T* B = static_cast<const T*>(p.B);
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  const T* base = static_cast<const T*>(p.base);
  T* y = static_cast<T*>(p.y);
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kPass2WarpsPerBlock;
  for (int64_t o = int64_t(blockIdx.x) * kPass2WarpsPerBlock + threadIdx.x / 32; o < p.out_f; o += warps) {
    float plain[kDecodeMaxRows], adapter[kDecodeMaxRows];
    VERA_UNROLL
    for (int m = 0; m < kDecodeMaxRows; ++m) plain[m] = adapter[m] = 0.f;
    if (W) thread_dots<T, T>(W + o * p.w_row_stride, x, p.x_row_stride, p.in_f, p.n, aligned_w, lane, 32, plain);
    thread_dots<T, float>(B + o * p.b_row_stride, p.h, p.r, p.r, p.n, aligned_b, lane, 32, adapter);
    VERA_UNROLL
    for (int m = 0; m < kDecodeMaxRows; ++m) {
      if (m >= p.n) break;
      const float pw = warp_sum(plain[m]), ad = warp_sum(adapter[m]);
      if (lane == m) {
        const float before =
            W ? pw + (bias ? to_float(load(bias + o)) : 0.f) : to_float(load(base + m * p.base_row_stride + o));
        const int64_t a = p.idx ? load(p.idx + m) : 0;
        store(y + m * p.out_f + o, from_float<T>(a < 0 ? before : before + load(p.lambda_b + a * p.out_f + o) * ad));
      }
    }
  }
}

bool aligned16(const void* ptr, int64_t row_stride, size_t elem_size) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (row_stride * int64_t(elem_size)) % 16 == 0;
}

}  // namespace

cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.n > kDecodeMaxRows) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool aligned_a = aligned16(p.A, p.a_row_stride, sizeof(T)) && aligned16(p.x, p.x_row_stride, sizeof(T));
    const bool aligned_w =
        p.weight && aligned16(p.weight, p.w_row_stride, sizeof(T)) && aligned16(p.x, p.x_row_stride, sizeof(T));
    const bool aligned_b = aligned16(p.B, p.b_row_stride, sizeof(T)) && aligned16(p.h, p.r, sizeof(float));
    const int64_t pass1_blocks = p.r < 65535 ? p.r : 65535;
    cudaError_t err = launch_kernel<decode_u_kernel<T>>(dim3(static_cast<unsigned int>(pass1_blocks)),
                                                        dim3(kPass1Threads), 0, stream, p, aligned_a);
    if (err != cudaSuccess) return err;
    const int64_t want = (p.out_f + kPass2WarpsPerBlock - 1) / kPass2WarpsPerBlock;
    return launch_kernel<decode_y_kernel<T>>(dim3(static_cast<unsigned int>(want < 65535 ? want : 65535)),
                                             dim3(32 * kPass2WarpsPerBlock), 0, stream, p, aligned_w, aligned_b);
  });
}

}  // namespace vera::cuda
