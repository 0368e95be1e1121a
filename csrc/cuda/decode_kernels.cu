// The fused small-N forward (decode, serving) in two launches (contract in params.h, DecodeParams). At N <= 16 the
// layer moves 32 MiB of W for a few MFLOPs: it is bandwidth-bound, and a GPU only reaches its HBM rate with many
// bytes in flight per SM. So each warp keeps several output rows' 16-byte loads in flight at once (kRows rows x
// kUnroll chunks per lane, all issued before the first is used, then the x chunks they meet, a group of rows at a
// time, also before the first is used), the persistent grid is sized from the SM count, and
// W is streamed with an evict-first hint (load_stream) so that A and B, shared by every layer and every adapter,
// stay in L2. Per-row adapters only change which lambda entries are gathered (the rows' own, never a scan over the
// adapter table), so a batch whose rows use 16 different adapters reads what one adapter reads.
//   pass 1 (decode_u_kernel): a block per group of kURows rows of A; its threads split the columns, the warps'
//          partial sums meet in shared memory in a fixed order. u = A x (rounded to T), h = u * lambda_d (rounded to T
//          and held as fp32: the GEMM paths round the same intermediates, so a row's precision does not depend on N).
//   pass 2 (decode_y_kernel): a warp per group of kYRows rows of W and B; its lanes split the columns; lane m
//          finishes row m of y. Launched as a programmatic dependent of pass 1 (PDL): its blocks start while pass 1
//          runs and stream W (which does not depend on pass 1) before they wait for h, so the pair costs one launch
//          and the W stream overlaps pass 1.
// Both kernels are instantiated per row bucket NB (n <= NB, NB in {1, 4, 16, 32}: decode_bucket): the accumulators
// are NB wide, rows n..NB of x are read as row n - 1 (an L1 hit) and never stored. CUDA cores only: at N = 16 the
// FMAs take about as long as the W stream on the cost report (docs/DESIGN.md 3.2). Rows that are not 16-byte aligned
// take the element-wise instantiation (kAligned = false), a separate kernel so that its loop does not blur the fast
// one's.
#include <cstring>

#include "cuda/dtype.cuh"
#include "cuda/launchers.h"

// The loops over column chunks are not unrolled further by the compiler: each step already has its loads batched
// (kRows x kSteps), and unrolling again only adds registers (and spills, at NB = 32).
#if defined(__CUDACC__)
#define DECODE_NO_UNROLL _Pragma("unroll 1")
#else
#define DECODE_NO_UNROLL
#endif

namespace vera::cuda {
namespace {

constexpr int kUThreads = 256;      // pass 1: threads per block
constexpr int kYWarpsPerBlock = 4;  // pass 2: warps per block
// 16-byte chunks per lane along B's short rows per step: 1 (r = 256 bf16 is one chunk per lane; a second would be
// a predicated-off load).
constexpr int kUnrollB = 1;

// Rows of W and B per warp in pass 2 (kYRows) and of A per block in pass 1 (kURows), and 16-byte chunks per lane
// per row and step along W and A (kUnroll), per row bucket: kRows * kUnroll loads of W or A in flight per lane
// (pass 2: 8 below NB = 16, 4 from there, where NB x chunks come with each step; pass 1: 4, and 2 at NB = 32) and x
// reused kRows times, within registers: kRows * NB fp32 accumulators (at most 64), so that nothing spills under
// __launch_bounds__. Every pass-1 block reads all of x from L2, so at NB = 16 (x 16 rows wide) a block takes 4 rows
// of A: half the blocks, half that L2 traffic (at NB = 32, 128 accumulators would spill).
template <int NB>
struct Shape {
  static constexpr int kUnroll = NB >= 16 ? 1 : 2;
  static constexpr int kYRows = NB <= 16 ? 4 : 2;
  static constexpr int kURows = NB == 16 ? 4 : 2;
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The 16 bytes at p as 16 / sizeof(T) floats.
template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float* out) {
  constexpr int kVec = 16 / sizeof(T);
  T vals[kVec];
  memcpy(vals, &raw, 16);
  VERA_UNROLL
  for (int e = 0; e < kVec; ++e) out[e] = to_float(vals[e]);
}

// acc[i][m] += M_i . x_m over this thread's share of the columns, for the kRows rows M_i = M + min(first + i, last) *
// m_stride (rows past the last read it again, an L1 hit; the caller drops their sums) and the NB rows
// x_m = xs + min(m, n - 1) * x_stride.
//
// Aligned (rows and xs 16-byte aligned): thread t of `threads` takes the 16-byte chunks t, t + threads, ...,
// kSteps of them per step for each row, loaded back to back (W with load_stream when kStream) before any is used;
// chunks past the end are predicated off (zeros, no load). The tail past the last whole chunk (fewer than
// 16 / sizeof(T) columns) is one element-wise step. Not aligned: element by element.
template <typename T, typename X, int NB, int kRows, int kSteps, bool kAligned, bool kStream>
__device__ __forceinline__ void dot_rows(const T* M, int64_t m_stride, int64_t first, int64_t last, const X* xs,
                                         int64_t x_stride, int64_t len, int n, int t, int threads,
                                         float (&acc)[kRows][NB]) {
  const T* rows[kRows];
  VERA_UNROLL
  for (int i = 0; i < kRows; ++i) rows[i] = M + (first + i < last ? first + i : last) * m_stride;
  // Row m of x, computed where it is used: an array of NB pointers would hold 2 * NB registers for the whole loop.
  auto x_row = [&](int m) { return xs + int64_t(m < n ? m : n - 1) * x_stride; };
  int64_t scalar_from = 0;
  if constexpr (kAligned) {
    constexpr int kVec = 16 / sizeof(T);
    const int64_t chunks = len / kVec;
    DECODE_NO_UNROLL
    for (int64_t c0 = t; c0 < chunks; c0 += int64_t(threads) * kSteps) {
      uint4 w[kRows][kSteps];
      bool valid[kSteps];
      VERA_UNROLL
      for (int j = 0; j < kSteps; ++j) valid[j] = c0 + int64_t(j) * threads < chunks;
      VERA_UNROLL
      for (int i = 0; i < kRows; ++i) {
        VERA_UNROLL
        for (int j = 0; j < kSteps; ++j) {
          const uint4* src = reinterpret_cast<const uint4*>(rows[i] + (c0 + int64_t(j) * threads) * kVec);
          if constexpr (kStream) {
            w[i][j] = valid[j] ? load_stream(src) : make_uint4(0, 0, 0, 0);
          } else {
            w[i][j] = valid[j] ? load(src) : make_uint4(0, 0, 0, 0);
          }
        }
      }
      VERA_UNROLL
      for (int j = 0; j < kSteps; ++j) {
        // The x chunks of this column chunk are loaded kGroup rows at a time, all of a group before any is used
        // (x is small and L1-resident; loads interleaved with the FMAs would each make the warp wait). kGroup
        // bounds the registers they take: 16 (NB >= 16: 4) x 16 bytes.
        constexpr int kXLoads = kVec * int(sizeof(X)) / 16;
        constexpr int kGroupLoads = NB >= 16 ? 8 : 16;  // NB >= 16 holds 64 accumulators already
        constexpr int kGroup = NB < kGroupLoads / kXLoads ? NB : kGroupLoads / kXLoads;
        float wf[kRows][kVec];
        VERA_UNROLL
        for (int i = 0; i < kRows; ++i) unpack<T>(w[i][j], wf[i]);
        VERA_UNROLL
        for (int g = 0; g < NB; g += kGroup) {
          uint4 xr[kGroup][kXLoads];
          VERA_UNROLL
          for (int m = 0; m < kGroup; ++m) {
            VERA_UNROLL
            for (int c = 0; c < kXLoads; ++c) {
              const uint4* src = reinterpret_cast<const uint4*>(x_row(g + m) + (c0 + int64_t(j) * threads) * kVec) + c;
              xr[m][c] = valid[j] ? load(src) : make_uint4(0, 0, 0, 0);
            }
          }
          VERA_UNROLL
          for (int m = 0; m < kGroup; ++m) {
            float xv[kVec];
            VERA_UNROLL
            for (int c = 0; c < kXLoads; ++c) unpack<X>(xr[m][c], xv + c * (16 / int(sizeof(X))));
            VERA_UNROLL
            for (int i = 0; i < kRows; ++i) {
              VERA_UNROLL
              for (int e = 0; e < kVec; ++e) acc[i][g + m] += wf[i][e] * xv[e];
            }
          }
        }
      }
    }
    scalar_from = chunks * kVec;
    // At most kVec - 1 columns are left and threads >= 32 > kVec - 1: one step, no loop.
    const int64_t j = scalar_from + t;
    if (j < len) {
      VERA_UNROLL
      for (int i = 0; i < kRows; ++i) {
        const float w = to_float(load(rows[i] + j));
        VERA_UNROLL
        for (int m = 0; m < NB; ++m) acc[i][m] += w * to_float(load(x_row(m) + j));
      }
    }
  } else {
    DECODE_NO_UNROLL
    for (int64_t j = t; j < len; j += threads) {
      float w[kRows];
      VERA_UNROLL
      for (int i = 0; i < kRows; ++i) w[i] = to_float(load(rows[i] + j));
      VERA_UNROLL
      for (int m = 0; m < NB; ++m) {
        const float xv = to_float(load(x_row(m) + j));
        VERA_UNROLL
        for (int i = 0; i < kRows; ++i) acc[i][m] += w[i] * xv;
      }
    }
  }
}

template <int kRows, int NB>
__device__ __forceinline__ void zero(float (&acc)[kRows][NB]) {
  VERA_UNROLL
  for (int i = 0; i < kRows; ++i) {
    VERA_UNROLL
    for (int m = 0; m < NB; ++m) acc[i][m] = 0.f;
  }
}

// The adapter of row m: idx[m], or 0 without an index (-1: no adapter). Pass 1 reads it only in a thread that passed
// check_adapter_of(p, m); pass 2 only after grid_dependency_wait(), i.e. after pass 1 completed, which it cannot
// with a bad index (a device-side assert ends the work on the stream). Pass 2 has no check of its own: the
// failure path's call made its NB = 32 loop spill.
__device__ __forceinline__ int64_t adapter_of(const DecodeParams& p, int m) { return p.idx ? load(p.idx + m) : 0; }

// An index outside [-1, num_adapters) stops the kernel (a device-side assert) before the thread that would gather
// row m's lambdas reads any: the op checks nothing on the host for these kernels, as a host read of the index range
// would synchronize the stream (and cost a decode step more than its kernels). Called at the start of pass 1, where
// few registers are live.
__device__ __forceinline__ void check_adapter_of(const DecodeParams& p, int m) {
  if (!p.idx || m >= p.n) return;
  const int64_t a = load(p.idx + m);
  VERA_DEVICE_REQUIRE(
      a >= -1 && a < p.num_adapters,
      "vera_ext: adapter_idx holds a value outside [-1, num_adapters) (checked on the device by the " "decode kernels)");
}

template <typename T, int NB, bool kAligned>
__global__ void __launch_bounds__(kUThreads, 1) decode_u_kernel(const DecodeParams p) {
  constexpr int kRows = Shape<NB>::kURows;
  constexpr int kWarps = kUThreads / 32;
  __shared__ float partial[kWarps][kRows][NB];
  const T* A = static_cast<const T*>(p.A);
  const T* x = static_cast<const T*>(p.x);
  T* u = static_cast<T*>(p.u);
  const int n = static_cast<int>(p.n);
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int64_t last = p.r - 1;
  allow_dependent_launch();  // pass 2 may start streaming W now; it waits for h before it reads it
  if (threadIdx.x < kRows * NB) check_adapter_of(p, threadIdx.x % NB);  // the row this thread finishes below
  for (int64_t k0 = int64_t(blockIdx.x) * kRows; k0 < p.r; k0 += int64_t(gridDim.x) * kRows) {
    float acc[kRows][NB];
    zero(acc);
    dot_rows<T, T, NB, kRows, Shape<NB>::kUnroll, kAligned, false>(A, p.a_row_stride, k0, last, x, p.x_row_stride,
                                                                   p.in_f, n, threadIdx.x, kUThreads, acc);
    VERA_UNROLL
    for (int i = 0; i < kRows; ++i) {
      VERA_UNROLL
      for (int m = 0; m < NB; ++m) {
        const float s = warp_sum(acc[i][m]);
        if (lane == 0) partial[warp][i][m] = s;
      }
    }
    __syncthreads();
    // Thread (i, m) finishes row k0 + i for x row m, the warps' partial sums added in a fixed order.
    if (threadIdx.x < kRows * NB) {
      const int i = threadIdx.x / NB, m = threadIdx.x % NB;
      const int64_t k = k0 + i;
      if (m < n && k <= last) {
        float s = 0.f;
        for (int w = 0; w < kWarps; ++w) s += partial[w][i][m];
        const T uk = from_float<T>(s);
        const int64_t a = adapter_of(p, m);
        store(u + m * p.r + k, uk);
        store(p.h + m * p.r + k, a < 0 ? 0.f : to_float(from_float<T>(to_float(uk) * load(p.lambda_d + a * p.r + k))));
      }
    }
    __syncthreads();  // partial is reused by the next group
  }
}

// Reduces acc over the warp; lane m (< NB) gets row i's sum for x row m in mine[i].
template <int kRows, int NB>
__device__ __forceinline__ void warp_sums_to_lanes(float (&acc)[kRows][NB], int lane, float (&mine)[kRows]) {
  VERA_UNROLL
  for (int i = 0; i < kRows; ++i) {
    mine[i] = 0.f;
    VERA_UNROLL
    for (int m = 0; m < NB; ++m) {
      const float s = warp_sum(acc[i][m]);
      if (lane == m) mine[i] = s;
    }
  }
}

// __launch_bounds__: no minimum of blocks per SM for the 16-byte paths (0: the compiler's choice, spill-free there);
// 2 for the element-wise path, whose NB = 32 instantiation spilled without it.
template <typename T, int NB, bool kAligned>
__global__ void __launch_bounds__(32 * kYWarpsPerBlock, kAligned ? 0 : 2) decode_y_kernel(const DecodeParams p) {
  constexpr int kRows = Shape<NB>::kYRows;
  __shared__ float parked[kYWarpsPerBlock][kRows][32];
  const T* W = static_cast<const T*>(p.weight);
  const T* B = static_cast<const T*>(p.B);
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  const T* base = static_cast<const T*>(p.base);
  T* y = static_cast<T*>(p.y);
  const int n = static_cast<int>(p.n);
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int64_t last = p.out_f - 1;
  const int64_t warps = int64_t(gridDim.x) * kYWarpsPerBlock;
  for (int64_t o0 = (int64_t(blockIdx.x) * kYWarpsPerBlock + threadIdx.x / 32) * kRows; o0 <= last;
       o0 += warps * kRows) {
    float acc[kRows][NB];
    float mine[kRows];
    if (W) {
      zero(acc);
      dot_rows<T, T, NB, kRows, Shape<NB>::kUnroll, kAligned, kAligned>(W, p.w_row_stride, o0, last, x, p.x_row_stride,
                                                                        p.in_f, n, lane, 32, acc);
      warp_sums_to_lanes(acc, lane, mine);
      // Parked in shared memory (each thread its own slots: no barrier) while B's loop runs: kept in registers
      // across it, they were spilled at NB >= 16.
      VERA_UNROLL
      for (int i = 0; i < kRows; ++i) parked[warp][i][lane] = mine[i];
    }
    zero(acc);
    grid_dependency_wait();  // h comes from pass 1 (and base, x from before it); W's products did not need them
    dot_rows<T, float, NB, kRows, kUnrollB, kAligned, false>(B, p.b_row_stride, o0, last, p.h, p.r, p.r, n, lane, 32,
                                                             acc);
    warp_sums_to_lanes(acc, lane, mine);
    if (lane < n) {
      const int m = lane;
      const int64_t a = adapter_of(p, m);
      VERA_UNROLL
      for (int i = 0; i < kRows; ++i) {
        const int64_t o = o0 + i;
        if (o > last) break;
        const float before = W ? parked[warp][i][lane] + (bias ? to_float(load(bias + o)) : 0.f)
                               : to_float(load(base + m * p.base_row_stride + o));
        store(y + m * p.out_f + o,
              from_float<T>(a < 0 ? before : before + load(p.lambda_b + a * p.out_f + o) * mine[i]));
      }
    }
  }
}

bool aligned16(const void* ptr, int64_t row_stride, size_t elem_size) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (row_stride * int64_t(elem_size)) % 16 == 0;
}

unsigned int grid_for(int64_t items_per_block_round, int64_t work_items, int resident_per_sm) {
  const int64_t want = (work_items + items_per_block_round - 1) / items_per_block_round;
  const int64_t cap = int64_t(sm_count()) * resident_per_sm;
  return static_cast<unsigned int>(want < cap ? want : cap);
}

// Blocks in flight per SM: pass 1 has little work (r rows), pass 2 keeps a few 4-warp blocks per SM.
constexpr int kUBlocksPerSm = 2, kYBlocksPerSm = 4;

template <typename T, int NB, bool kAligned>
cudaError_t launch_u(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(grid_for(Shape<NB>::kURows, p.r, kUBlocksPerSm));
  return launch_kernel<decode_u_kernel<T, NB, kAligned>>(grid, dim3(kUThreads), 0, stream, p);
}

template <typename T, int NB, bool kAligned>
cudaError_t launch_y(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(grid_for(int64_t(Shape<NB>::kYRows) * kYWarpsPerBlock, p.out_f, kYBlocksPerSm));
  return launch_kernel_dependent<decode_y_kernel<T, NB, kAligned>>(grid, dim3(32 * kYWarpsPerBlock), 0, stream, p);
}

template <typename T, int NB>
cudaError_t launch_bucket(const DecodeParams& p, cudaStream_t stream) {
  // The element-wise path (rows not 16-byte aligned: a rare fallback) has two buckets, 4 and 32, not four: half
  // the instantiations, for at most 4x the FMAs of a tighter bucket on a path bound by its load latency anyway.
  constexpr int kSlowNB = NB <= 4 ? 4 : kDecodeMaxRows;
  const bool x_aligned = aligned16(p.x, p.x_row_stride, sizeof(T));
  const bool aligned_a = x_aligned && aligned16(p.A, p.a_row_stride, sizeof(T));
  const bool aligned_b = aligned16(p.B, p.b_row_stride, sizeof(T)) && aligned16(p.h, p.r, sizeof(float));
  // Pass 2 takes its fast path when every row it streams (W's, if given, and B's) is aligned.
  const bool aligned_y = aligned_b && (!p.weight || (x_aligned && aligned16(p.weight, p.w_row_stride, sizeof(T))));
  const cudaError_t err = aligned_a ? launch_u<T, NB, true>(p, stream) : launch_u<T, kSlowNB, false>(p, stream);
  if (err != cudaSuccess) return err;
  return aligned_y ? launch_y<T, NB, true>(p, stream) : launch_y<T, kSlowNB, false>(p, stream);
}

// The row bucket of n rows: the NB the 16-byte kernels are instantiated for (with kSlowNB in launch_bucket, the one
// place the row thresholds live).
int decode_bucket(int64_t n) { return n <= 1 ? 1 : n <= 4 ? 4 : n <= 16 ? 16 : kDecodeMaxRows; }

}  // namespace

cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.n < 0 || p.n > kDecodeMaxRows) return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;  // nothing to compute (the kernels read row n - 1 of x)
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    switch (decode_bucket(p.n)) {
      case 1: return launch_bucket<T, 1>(p, stream);
      case 4: return launch_bucket<T, 4>(p, stream);
      case 16: return launch_bucket<T, 16>(p, stream);
      default: return launch_bucket<T, kDecodeMaxRows>(p, stream);
    }
  });
}

}  // namespace vera::cuda
