// Merge/unmerge without a delta tensor: W (+)= alpha * delta_W with delta_W = diag(lambda_b) B diag(lambda_d) A,
// computed a 128x128 output tile per block (an fp32 SIMT GEMM with K = r) and added into W in the same kernel,
// accumulated in fp32 and rounded once. Contract in params.h (MergeParams); design in docs/DESIGN.md §2.3.
//
// Operands are scaled while they are staged into shared memory: Ls[k][o] = lambda_b[o] * B[o, k0 + k] and
// Rs[k][i] = lambda_d[k0 + k] * A[k0 + k, i], the same fp32 products the row_scale kernel forms for B_hat and
// A_hat, so no scaled copy of A or B exists anywhere: the only memory a merge takes besides W is the 4-byte flag.
// Each thread owns an 8x8 micro-tile of consecutive (o, i) and sums its products over k = 0, 1, ..., r - 1 in that
// order with fmaf (fused, rounded once per step: the same bits under nvcc and in the emulated build).
//
// The epilogue reads and writes W along its contiguous dimension: i for (out, in), o for the transposed (in, out)
// layout of fan_in_fan_out; the threads' roles swap with the layout so that a warp's lanes cover consecutive
// 8-element runs of that dimension (16-byte loads and stores where aligned, element by element otherwise). A safe
// merge first runs the kernel in check-only mode, which writes nothing and raises the flag on a non-finite result.
#include <cstring>

#include "cuda/dtype.cuh"
#include "cuda/launchers.h"

namespace vera::cuda {
namespace {

constexpr int kTileO = 128, kTileI = 128;  // output tile of a block
constexpr int kChunk = 8;                  // k values staged in shared memory at a time
constexpr int kMicro = 8;                  // each thread: kMicro x kMicro outputs
constexpr int kLanesI = kTileI / kMicro, kLanesO = kTileO / kMicro;
constexpr int kMergeThreads = kLanesO * kLanesI;  // 256
static_assert(kMergeThreads == 256, "the staging below gives each thread at most one 16-byte load per operand");

// n consecutive T at p as floats: 16-byte loads when `vec` (p 16-byte aligned, all n in bounds), else element by
// element with the elements at or past `valid` read as 0.
template <typename T, int n>
__device__ __forceinline__ void load_run(const T* p, bool vec, int valid, float (&out)[n]) {
  static_assert((n * sizeof(T)) % 16 == 0, "whole 16-byte loads only");
  if (vec) {
    T vals[n];
    VERA_UNROLL
    for (int c = 0; c < int(n * sizeof(T) / 16); ++c) {
      const uint4 raw = load(reinterpret_cast<const uint4*>(p) + c);
      memcpy(reinterpret_cast<char*>(vals) + 16 * c, &raw, 16);
    }
    VERA_UNROLL
    for (int e = 0; e < n; ++e) out[e] = to_float(vals[e]);
  } else {
    VERA_UNROLL
    for (int e = 0; e < n; ++e) out[e] = e < valid ? to_float(load(p + e)) : 0.f;
  }
}

template <typename T, int n>
__device__ __forceinline__ void store_run(T* p, bool vec, int valid, const T (&vals)[n]) {
  if (vec) {
    VERA_UNROLL
    for (int c = 0; c < int(n * sizeof(T) / 16); ++c) {
      uint4 raw;
      memcpy(&raw, reinterpret_cast<const char*>(vals) + 16 * c, 16);
      store(reinterpret_cast<uint4*>(p) + c, raw);
    }
  } else {
    VERA_UNROLL
    for (int e = 0; e < n; ++e)
      if (e < valid) store(p + e, vals[e]);
  }
}

// TW: weight's storage type; TP: A's and B's. vec_a / vec_b: A's / B's rows are 16-byte aligned with unit column
// stride; vec_w: weight's runs along its contiguous dimension are (unit stride, 16-byte aligned rows).
template <typename TW, typename TP, bool kCheckOnly>
__global__ void __launch_bounds__(kMergeThreads)
    merge_kernel(const MergeParams p, const bool vec_a, const bool vec_b, const bool vec_w) {
  constexpr int kVecP = 16 / sizeof(TP);  // elements of A or B in one 16-byte load
  static_assert(kChunk % kVecP == 0 && kTileI % kVecP == 0, "a chunk row is whole 16-byte loads");
  __shared__ __align__(16) float ls[kChunk][kTileO];  // lambda_b * B, k-major
  __shared__ __align__(16) float rs[kChunk][kTileI];  // lambda_d * A
  const TP* B = static_cast<const TP*>(p.B);
  const TP* A = static_cast<const TP*>(p.A);
  const int64_t o0 = int64_t(blockIdx.y) * kTileO, i0 = int64_t(blockIdx.x) * kTileI;
  const int t = threadIdx.x;

  // Staging of B: row o of the tile, kVecP consecutive k from column piece bc (at most one piece per thread).
  constexpr int kPiecesB = kChunk / kVecP;
  const bool stages_b = t < kTileO * kPiecesB;
  const int b_row = t / kPiecesB, b_col = (t % kPiecesB) * kVecP;
  const int64_t b_o = o0 + b_row;
  const bool b_in = stages_b && b_o < p.out_f;
  const float b_scale = b_in ? load(p.lambda_b + b_o) : 0.f;
  const TP* b_ptr = B + (b_in ? b_o : 0) * p.b_stride_o;
  // Staging of A: row k of the chunk, kVecP consecutive i from piece ac.
  constexpr int kPiecesA = kTileI / kVecP;
  const bool stages_a = t < kChunk * kPiecesA;
  const int a_row = t / kPiecesA, a_col = (t % kPiecesA) * kVecP;
  const int64_t a_i = i0 + a_col;
  const int a_valid = static_cast<int>(a_i < p.in_f ? (p.in_f - a_i < kVecP ? p.in_f - a_i : kVecP) : 0);

  // This thread's micro-tile: o in [o0 + mo, +8), i in [i0 + mi, +8). The lane index runs along weight's
  // contiguous dimension (see the epilogue).
  const bool o_fastest = p.w_stride_o == 1 && p.w_stride_i != 1;
  const int mo = (o_fastest ? t % kLanesO : t / kLanesI) * kMicro;
  const int mi = (o_fastest ? t / kLanesO : t % kLanesI) * kMicro;

  float acc[kMicro][kMicro];
  VERA_UNROLL
  for (int m = 0; m < kMicro; ++m) VERA_UNROLL
  for (int n = 0; n < kMicro; ++n) acc[m][n] = 0.f;

  for (int64_t k0 = 0; k0 < p.r; k0 += kChunk) {
    if (stages_b) {
      float v[kVecP];
      const int64_t k = k0 + b_col;
      const int valid = b_in ? static_cast<int>(p.r - k < kVecP ? (p.r - k > 0 ? p.r - k : 0) : kVecP) : 0;
      if (vec_b && valid == kVecP) {
        load_run<TP, kVecP>(b_ptr + k, true, kVecP, v);
      } else {  // ragged end of r, rows past out_f, or no 16-byte loads: element by element (strided columns)
        VERA_UNROLL
        for (int e = 0; e < kVecP; ++e) v[e] = e < valid ? to_float(load(b_ptr + (k + e) * p.b_stride_k)) : 0.f;
      }
      VERA_UNROLL
      for (int e = 0; e < kVecP; ++e) ls[b_col + e][b_row] = b_scale * v[e];
    }
    if (stages_a) {
      float v[kVecP];
      const int64_t k = k0 + a_row;
      const bool k_in = k < p.r;
      const float scale = k_in ? load(p.lambda_d + k) : 0.f;
      const TP* a_ptr = A + (k_in ? k : 0) * p.a_stride_k;
      const int valid = k_in ? a_valid : 0;
      if (vec_a && valid == kVecP) {
        load_run<TP, kVecP>(a_ptr + a_i, true, kVecP, v);
      } else {
        VERA_UNROLL
        for (int e = 0; e < kVecP; ++e) v[e] = e < valid ? to_float(load(a_ptr + (a_i + e) * p.a_stride_i)) : 0.f;
      }
      VERA_UNROLL
      for (int e = 0; e < kVecP; ++e) rs[a_row][a_col + e] = scale * v[e];
    }
    __syncthreads();
    // Past the end of r the staged values are 0: fmaf(0, 0, acc) leaves acc as it is, so the sum over the real k
    // is unchanged.
    VERA_UNROLL
    for (int k = 0; k < kChunk; ++k) {
      float a[kMicro], b[kMicro];
      VERA_UNROLL
      for (int m = 0; m < kMicro; ++m) a[m] = ls[k][mo + m];
      VERA_UNROLL
      for (int n = 0; n < kMicro; ++n) b[n] = rs[k][mi + n];
      VERA_UNROLL
      for (int m = 0; m < kMicro; ++m) VERA_UNROLL
      for (int n = 0; n < kMicro; ++n) acc[m][n] = __fmaf_rn(a[m], b[n], acc[m][n]);
    }
    __syncthreads();
  }

  // Epilogue: eight runs of eight elements along weight's contiguous dimension (fast index f, slow index s).
  TW* w = static_cast<TW*>(p.weight);
  const int64_t fast0 = o_fastest ? o0 + mo : i0 + mi, slow0 = o_fastest ? i0 + mi : o0 + mo;
  const int64_t fast_n = o_fastest ? p.out_f : p.in_f, slow_n = o_fastest ? p.in_f : p.out_f;
  const int64_t fast_stride = o_fastest ? p.w_stride_o : p.w_stride_i;
  const int64_t slow_stride = o_fastest ? p.w_stride_i : p.w_stride_o;
  const int valid = static_cast<int>(fast0 < fast_n ? (fast_n - fast0 < kMicro ? fast_n - fast0 : kMicro) : 0);
  const bool vec = vec_w && valid == kMicro;
  bool finite = true;
  VERA_UNROLL
  for (int s = 0; s < kMicro; ++s) {
    if (slow0 + s >= slow_n || valid == 0) break;
    TW* dst = w + (slow0 + s) * slow_stride + fast0 * fast_stride;
    float before[kMicro];
    if (vec) {
      load_run<TW, kMicro>(dst, true, kMicro, before);
    } else {
      VERA_UNROLL
      for (int e = 0; e < kMicro; ++e) before[e] = e < valid ? to_float(load(dst + e * fast_stride)) : 0.f;
    }
    TW merged[kMicro];
    VERA_UNROLL
    for (int e = 0; e < kMicro; ++e) {
      const float d = o_fastest ? acc[e][s] : acc[s][e];
      // alpha * d and the sum rounded separately (no contraction into one fma): the CPU merge's arithmetic
      merged[e] = from_float<TW>(__fadd_rn(before[e], __fmul_rn(p.alpha, d)));
      if (kCheckOnly && e < valid) finite &= isfinite(to_float(merged[e]));
    }
    if (!kCheckOnly) {
      if (vec) {
        store_run<TW, kMicro>(dst, true, kMicro, merged);
      } else {
        VERA_UNROLL
        for (int e = 0; e < kMicro; ++e)
          if (e < valid) store(dst + e * fast_stride, merged[e]);
      }
    }
  }
  if (kCheckOnly && !finite) atomic_or(p.nonfinite, 1);
}

bool aligned16(const void* ptr, int64_t row_stride, int64_t unit_stride, size_t elem_size) {
  return unit_stride == 1 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (row_stride * int64_t(elem_size)) % 16 == 0;
}

template <typename TW, typename TP>
cudaError_t launch_typed(const MergeParams& p, bool check_only, cudaStream_t stream) {
  const int64_t tiles_i = (p.in_f + kTileI - 1) / kTileI, tiles_o = (p.out_f + kTileO - 1) / kTileO;
  if (tiles_o > 65535) return cudaErrorInvalidConfiguration;
  const bool o_fastest = p.w_stride_o == 1 && p.w_stride_i != 1;
  const bool vec_a = aligned16(p.A, p.a_stride_k, p.a_stride_i, sizeof(TP));
  const bool vec_b = aligned16(p.B, p.b_stride_o, p.b_stride_k, sizeof(TP));
  const bool vec_w = o_fastest ? aligned16(p.weight, p.w_stride_i, p.w_stride_o, sizeof(TW))
                               : aligned16(p.weight, p.w_stride_o, p.w_stride_i, sizeof(TW));
  const dim3 grid(static_cast<unsigned int>(tiles_i), static_cast<unsigned int>(tiles_o)), block(kMergeThreads);
  if (check_only) return launch_kernel<merge_kernel<TW, TP, true>>(grid, block, 0, stream, p, vec_a, vec_b, vec_w);
  return launch_kernel<merge_kernel<TW, TP, false>>(grid, block, 0, stream, p, vec_a, vec_b, vec_w);
}

}  // namespace

cudaError_t launch_merge(const MergeParams& p, bool check_only, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto w_tag) {
    return dispatch_dtype(p.proj_dtype, [&](auto p_tag) {
      return launch_typed<decltype(w_tag), decltype(p_tag)>(p, check_only, stream);
    });
  });
}

}  // namespace vera::cuda
