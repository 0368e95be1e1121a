// The fused small-N forward on the CPU (decode, serving). At N <= 16 the layer is bandwidth-bound on W, A and B,
// and one library GEMV call per product (single-threaded in MKL at these sizes) plus the element-wise passes cost
// more than the data. Here every row of A, W and B is read once, for all rows of x, split by rows over the calling
// thread and whichever helper threads are free (run_claimed: unlike a parallel_for, it never waits for a descheduled
// worker, which on a busy machine cost milliseconds per call):
//   pass 1 (over r):  u[n, k] = A_k . x_n,   h[n, k] = u[n, k] * lambda_d[a(n), k]   (each rounded to x's dtype,
//                     as the GEMM path rounds u and M or h: a row's precision does not depend on N; docs/DESIGN.md §5)
//   pass 2 (over O):  y[n, o] = (W_o . x_n + bias_o  or  base[n, o]) + lambda_b[a(n), o] * (B_o . h_n)
// Each output is rounded once. The dot products are compiled for AVX-512, AVX2/FMA and the baseline; the loader
// picks the best one the CPU has.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common/layout.h"
#include "cpu/claim_pool.h"
#include "cpu/prims_cpu.h"

namespace vera::cpu {
namespace {

using at::Tensor;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VERA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VERA_CPU_CLONES
#endif

// Eight floats or four doubles: GCC's vector extensions compile one to an AVX register (in the AVX2 and AVX-512
// clones; 256-bit ops stream as fast as 512-bit ones here) or to two SSE registers (baseline). Explicit vectors,
// because the compiler's own vectorization of these loops read rows at half the speed (measured, one thread, 5 MiB
// of fp32 rows: 41-45 GB/s autovectorized with 64 accumulator lanes per row, 85 GB/s as below; a plain sum 85-97).
template <typename acc_t>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};

// v = kLanes consecutive values of p, converted to acc_t (an out-parameter: returning a vector by value would make
// the baseline clone warn about the AVX calling convention, though the function is always inlined).
template <typename T, typename V>
__attribute__((always_inline)) inline void load_as(const T* p, V& v) {
  using acc_t = std::remove_reference_t<decltype(v[0])>;
  if constexpr (std::is_same_v<T, acc_t>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bf16 is the upper half of an fp32: widen the bits and shift.
    typedef uint16_t Bits16 __attribute__((vector_size(16)));
    typedef uint32_t Bits32 __attribute__((vector_size(32)));
    Bits16 bits;
    std::memcpy(&bits, p, sizeof bits);
    const Bits32 wide = __builtin_convertvector(bits, Bits32) << 16;
    std::memcpy(&v, &wide, sizeof v);
  } else {
    acc_t lanes[Simd<acc_t>::kLanes];
    for (int l = 0; l < Simd<acc_t>::kLanes; ++l) lanes[l] = static_cast<acc_t>(p[l]);
    std::memcpy(&v, lanes, sizeof v);
  }
}

// out[k * out_stride] = row_k . x for the kR rows at rows + k * row_stride, over len entries, in acc_t. Each x load
// serves kR rows, whose independent accumulators hide the add latency. A row's result depends only on its own data
// (lanes summed in a fixed order, then the tail), never on kR or on which rows it was grouped with.
template <int kR, typename T, typename acc_t>
__attribute__((always_inline)) inline void dot_rows(const T* rows, int64_t row_stride, const acc_t* x, int64_t len,
                                                    acc_t* out, int64_t out_stride) {
  using V = typename Simd<acc_t>::V;
  constexpr int kLanes = Simd<acc_t>::kLanes;
  V acc[kR] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    V xv, rv;
    std::memcpy(&xv, x + j, sizeof xv);
    for (int k = 0; k < kR; ++k) {
      load_as(rows + k * row_stride + j, rv);
      acc[k] += rv * xv;
    }
  }
  for (int k = 0; k < kR; ++k) {
    acc_t s = 0;
    for (int l = 0; l < kLanes; ++l) s += acc[k][l];
    for (int64_t t = j; t < len; ++t) s += static_cast<acc_t>(rows[k * row_stride + t]) * x[t];
    out[k * out_stride] = s;
  }
}

// out[i * n_vec + v] = rows_i . xs_v for i < n_rows (rows row_stride apart) and v < n_vec (xs ld_x apart), in
// acc_t. Rows go four at a time (measured: 85 GB/s against 69 for one row with four accumulators); for several
// vectors the four rows are read again from L1 for each.
template <typename T, typename acc_t>
__attribute__((always_inline)) inline void dots_impl(const T* rows, int64_t row_stride, int64_t n_rows, const acc_t* xs,
                                                     int64_t ld_x, int64_t n_vec, int64_t len, acc_t* out) {
  constexpr int kRows = 4;
  int64_t i = 0;
  for (; i + kRows <= n_rows; i += kRows)
    for (int64_t v = 0; v < n_vec; ++v)
      dot_rows<kRows>(rows + i * row_stride, row_stride, xs + v * ld_x, len, out + i * n_vec + v, n_vec);
  for (; i < n_rows; ++i)
    for (int64_t v = 0; v < n_vec; ++v)
      dot_rows<1>(rows + i * row_stride, row_stride, xs + v * ld_x, len, out + i * n_vec + v, n_vec);
}

#define VERA_DOTS(T, ACC)                                                                                  \
  void dots(const T* rows, int64_t row_stride, int64_t n_rows, const ACC* xs, int64_t ld_x, int64_t n_vec, \
            int64_t len, ACC* out) {                                                                       \
    dots_impl(rows, row_stride, n_rows, xs, ld_x, n_vec, len, out);                                        \
  }
VERA_CPU_CLONES VERA_DOTS(float, float) VERA_CPU_CLONES VERA_DOTS(c10::BFloat16, float) VERA_CPU_CLONES
    VERA_DOTS(c10::Half, float) VERA_DOTS(double, double)
#undef VERA_DOTS

        constexpr int64_t kMaxChunkRows = 64;
constexpr int64_t kChunkMacs = 32768;

// Rows per chunk of a pass whose rows cost macs_per_row multiply-adds each: about kChunkMacs (a few microseconds,
// so the claims cost little and the two threads finish close together), a multiple of 4 (the row groups of dots).
int64_t chunk_rows(int64_t macs_per_row) {
  const int64_t rows = kChunkMacs / std::max<int64_t>(1, macs_per_row);
  return std::clamp<int64_t>((rows + 3) / 4 * 4, 8, kMaxChunkRows);
}

// f(row0, row1) over [0, rows) in chunks. Every row is in exactly one chunk, so each output is computed by one
// thread in the serial order: the result does not depend on the thread count.
template <typename F>
void for_row_chunks(int64_t rows, int64_t macs_per_row, const F& f) {
  const int64_t chunk = chunk_rows(macs_per_row);
  // Helpers: the intra-op thread count beyond this thread; none inside a parallel region (no nested teams), and
  // none for less than two chunks' worth of work, which takes less time than waking a helper.
  const bool worth_helpers = rows * macs_per_row >= 2 * kChunkMacs && !at::in_parallel_region();
  const int helpers = worth_helpers ? at::get_num_threads() - 1 : 0;
  run_claimed((rows + chunk - 1) / chunk, helpers, [&](int64_t c) { f(c * chunk, std::min(rows, (c + 1) * chunk)); });
}

}  // namespace

std::tuple<Tensor, Tensor> Prims::decode_forward(const Tensor& x, const c10::optional<Tensor>& weight_,
                                                 const c10::optional<Tensor>& bias_, const c10::optional<Tensor>& base_,
                                                 const AdapterArgs& a) {
  const int64_t n = x.size(0), in_f = x.size(1), r = a.lambda_d.size(-1);
  TORCH_INTERNAL_ASSERT(n <= kDecodeMaxRows, "decode_forward: ", n, " rows, the chunk buffers hold ", kDecodeMaxRows);
  const int64_t out_f = a.B.size(0);
  const at::ScalarType acc_type = opmath_dtype(x.scalar_type());
  const Tensor xf = x.to(acc_type).contiguous();
  const Tensor A = rows_contiguous(a.A), B = rows_contiguous(a.B);
  const Tensor ld = a.lambda_d.contiguous(), lb = a.lambda_b.contiguous();
  const Tensor weight = weight_.has_value() ? rows_contiguous(*weight_) : Tensor();
  const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
  const Tensor base = base_.has_value() ? rows_contiguous(*base_) : Tensor();
  const int64_t* idx = a.adapter_idx.has_value() ? a.adapter_idx->const_data_ptr<int64_t>() : nullptr;

  Tensor u = at::empty({n, r}, x.options());
  Tensor y = at::empty({n, out_f}, x.options());
  Tensor hf = at::empty({n, r}, xf.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vera_decode_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* xp = xf.const_data_ptr<acc_t>();
    const acc_t* ldp = ld.const_data_ptr<acc_t>();
    const acc_t* lbp = lb.const_data_ptr<acc_t>();
    scalar_t* up = u.data_ptr<scalar_t>();
    acc_t* hp = hf.data_ptr<acc_t>();

    for_row_chunks(r, in_f * n, [&](int64_t k0, int64_t k1) {
      acc_t dot[kMaxChunkRows * Prims::kDecodeMaxRows];
      dots(A.const_data_ptr<scalar_t>() + k0 * A.stride(0), A.stride(0), k1 - k0, xp, in_f, n, in_f, dot);
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t row = 0; row < n; ++row) {
          const scalar_t uk = static_cast<scalar_t>(dot[(k - k0) * n + row]);
          const int64_t ad = idx ? idx[row] : 0;
          up[row * r + k] = uk;
          hp[row * r + k] =
              ad < 0 ? acc_t(0) : static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(uk) * ldp[ad * r + k]));
        }
      }
    });

    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* wp = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* basep = base.defined() ? base.const_data_ptr<scalar_t>() : nullptr;
    for_row_chunks(out_f, ((wp ? in_f : 0) + r) * n, [&](int64_t o0, int64_t o1) {
      acc_t plain[kMaxChunkRows * Prims::kDecodeMaxRows], adapter[kMaxChunkRows * Prims::kDecodeMaxRows];
      if (wp) dots(wp + o0 * weight.stride(0), weight.stride(0), o1 - o0, xp, in_f, n, in_f, plain);
      dots(B.const_data_ptr<scalar_t>() + o0 * B.stride(0), B.stride(0), o1 - o0, hp, r, n, r, adapter);
      for (int64_t o = o0; o < o1; ++o) {
        for (int64_t row = 0; row < n; ++row) {
          const int64_t i = (o - o0) * n + row;
          const acc_t before = wp ? plain[i] + (bp ? static_cast<acc_t>(bp[o]) : acc_t(0))
                                  : static_cast<acc_t>(basep[row * base.stride(0) + o]);
          const int64_t ad = idx ? idx[row] : 0;
          const acc_t add = ad < 0 ? acc_t(0) : lbp[ad * out_f + o] * adapter[i];
          yp[row * out_f + o] = static_cast<scalar_t>(before + add);
        }
      }
    });
  });
  return {y, u};
}

}  // namespace vera::cpu
