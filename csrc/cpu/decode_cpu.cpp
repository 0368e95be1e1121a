// The fused small-N forward on the CPU (decode, serving). At N <= 16 the layer is bandwidth-bound on W, A and B,
// and one library GEMV call per product (single-threaded in MKL at these sizes) plus the element-wise passes cost
// more than the data. Here every row of A, W and B is read once, for all rows of x, by both cores:
//   pass 1 (over r):  u[n, k] = A_k . x_n,   h[n, k] = u[n, k] * lambda_d[a(n), k]   (h kept in fp32)
//   pass 2 (over O):  y[n, o] = (W_o . x_n + bias_o  or  base[n, o]) + lambda_b[a(n), o] * (B_o . h_n)
// Each output is rounded once. The dot products are compiled for AVX-512, AVX2/FMA and the baseline; the loader
// picks the best one the CPU has.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "cpu/prims_cpu.h"

namespace vera::cpu {
namespace {

using at::Tensor;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VERA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VERA_CPU_CLONES
#endif

// out[v] = row . xs[v] for v < n_vec (xs rows ld_x apart), in acc_t with independent partial sums.
template <typename T, typename acc_t>
__attribute__((always_inline)) inline void dots_impl(const T* row, const acc_t* xs, int64_t ld_x, int64_t n_vec,
                                                     int64_t len, acc_t* out) {
  constexpr int kLanes = 64;  // several independent vector accumulators: FMA latency, not a single chain, bounds
  for (int64_t v = 0; v < n_vec; ++v) {
    const acc_t* x = xs + v * ld_x;
    acc_t part[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes)
      for (int l = 0; l < kLanes; ++l) part[l] += static_cast<acc_t>(row[j + l]) * x[j + l];
    acc_t s = 0;
    for (int l = 0; l < kLanes; ++l) s += part[l];
    for (; j < len; ++j) s += static_cast<acc_t>(row[j]) * x[j];
    out[v] = s;
  }
}

VERA_CPU_CLONES void dots(const float* row, const float* xs, int64_t ld_x, int64_t n, int64_t len, float* out) {
  dots_impl(row, xs, ld_x, n, len, out);
}
VERA_CPU_CLONES void dots(const c10::BFloat16* row, const float* xs, int64_t ld_x, int64_t n, int64_t len,
                          float* out) {
  dots_impl(row, xs, ld_x, n, len, out);
}
VERA_CPU_CLONES void dots(const c10::Half* row, const float* xs, int64_t ld_x, int64_t n, int64_t len, float* out) {
  dots_impl(row, xs, ld_x, n, len, out);
}
void dots(const double* row, const double* xs, int64_t ld_x, int64_t n, int64_t len, double* out) {
  dots_impl(row, xs, ld_x, n, len, out);
}

Tensor rows_contiguous(const Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

int64_t grain_rows(int64_t work_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
}

}  // namespace

std::tuple<Tensor, Tensor> Prims::decode_forward(const Tensor& x, const c10::optional<Tensor>& weight_,
                                                 const c10::optional<Tensor>& bias_,
                                                 const c10::optional<Tensor>& base_, const AdapterArgs& a) {
  const int64_t n = x.size(0), in_f = x.size(1), r = a.lambda_d.size(-1);
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

    at::parallel_for(0, r, grain_rows(in_f * n), [&](int64_t k0, int64_t k1) {
      acc_t dot[kDecodeMaxRows];
      for (int64_t k = k0; k < k1; ++k) {
        dots(A.const_data_ptr<scalar_t>() + k * A.stride(0), xp, in_f, n, in_f, dot);
        for (int64_t row = 0; row < n; ++row) {
          const scalar_t uk = static_cast<scalar_t>(dot[row]);
          const int64_t ad = idx ? idx[row] : 0;
          up[row * r + k] = uk;
          hp[row * r + k] = ad < 0 ? acc_t(0) : static_cast<acc_t>(uk) * ldp[ad * r + k];
        }
      }
    });

    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* wp = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* basep = base.defined() ? base.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, out_f, grain_rows((in_f + r) * n), [&](int64_t o0, int64_t o1) {
      acc_t plain[kDecodeMaxRows], adapter[kDecodeMaxRows];
      for (int64_t o = o0; o < o1; ++o) {
        if (wp) {
          dots(wp + o * weight.stride(0), xp, in_f, n, in_f, plain);
          const acc_t b = bp ? static_cast<acc_t>(bp[o]) : acc_t(0);
          for (int64_t row = 0; row < n; ++row) plain[row] += b;
        } else {
          for (int64_t row = 0; row < n; ++row) plain[row] = static_cast<acc_t>(basep[row * base.stride(0) + o]);
        }
        dots(B.const_data_ptr<scalar_t>() + o * B.stride(0), hp, r, n, r, adapter);
        for (int64_t row = 0; row < n; ++row) {
          const int64_t ad = idx ? idx[row] : 0;
          const acc_t add = ad < 0 ? acc_t(0) : lbp[ad * out_f + o] * adapter[row];
          yp[row * out_f + o] = static_cast<scalar_t>(plain[row] + add);
        }
      }
    });
  });
  return {y, u};
}

}  // namespace vera::cpu
