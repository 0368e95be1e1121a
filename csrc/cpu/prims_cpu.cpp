// CPU loops for VeRA's scaling, gathers and reductions. Rows are split across threads with at::parallel_for;
// inner loops run over contiguous memory in the op-math type (fp32; fp64 for fp64 data) so the compiler
// vectorizes them. Every reduction sums in a
// fixed order that does not depend on the thread count, so results are deterministic.
#include "cpu/prims_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "common/checks.h"
#include "common/layout.h"

namespace vera::cpu {
namespace {

using at::Tensor;

constexpr int64_t kMinElementsPerTask = 16384;

int64_t grain_for(int64_t inner) { return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, inner)); }

// Adapter of row n: 0 without an index vector.
inline int64_t adapter_of(const int64_t* idx, int64_t n) { return idx ? idx[n] : 0; }

const int64_t* idx_ptr(const c10::optional<Tensor>& idx) {
  return idx.has_value() ? idx->data_ptr<int64_t>() : nullptr;
}

#define VERA_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

template <typename in_t, typename out_t>
void row_scale_loop(const in_t* in, int64_t ld_in, const at::opmath_type<in_t>* lam,
                    const at::opmath_type<in_t>* col_lam, out_t* out, int64_t rows, int64_t cols) {
  using acc_t = at::opmath_type<in_t>;
  at::parallel_for(0, rows, grain_for(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t s = lam[i];
      const in_t* src = in + i * ld_in;
      out_t* dst = out + i * cols;
      if (col_lam) {
        for (int64_t j = 0; j < cols; ++j) dst[j] = static_cast<out_t>(s * static_cast<acc_t>(src[j]) * col_lam[j]);
      } else {
        for (int64_t j = 0; j < cols; ++j) dst[j] = static_cast<out_t>(s * static_cast<acc_t>(src[j]));
      }
    }
  });
}

}  // namespace

Tensor Prims::row_scale(const Tensor& in_, const Tensor& lam_, at::ScalarType dtype,
                        const c10::optional<Tensor>& col_lam_) {
  const Tensor in = rows_contiguous(in_);
  const Tensor lam = lam_.contiguous();
  const Tensor col_lam = col_lam_.has_value() ? col_lam_->contiguous() : Tensor();
  const at::ScalarType acc = opmath_dtype(in.scalar_type());
  TORCH_INTERNAL_ASSERT(dtype == in.scalar_type() || dtype == acc, "row_scale: output dtype must be in's or opmath");
  Tensor out = at::empty(in.sizes(), in.options().dtype(dtype));
  VERA_DISPATCH_FLOAT(in.scalar_type(), "vera_row_scale", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* lp = lam.const_data_ptr<acc_t>();
    const acc_t* cp = col_lam.defined() ? col_lam.const_data_ptr<acc_t>() : nullptr;
    if (dtype == acc) {
      row_scale_loop(in.const_data_ptr<scalar_t>(), in.stride(0), lp, cp, out.data_ptr<acc_t>(), in.size(0),
                     in.size(1));
    } else {
      row_scale_loop(in.const_data_ptr<scalar_t>(), in.stride(0), lp, cp, out.data_ptr<scalar_t>(), in.size(0),
                     in.size(1));
    }
  });
  return out;
}

Tensor Prims::col_scale(const Tensor& in_, const Tensor& lam_, const c10::optional<Tensor>& idx) {
  const Tensor in = rows_contiguous(in_);
  const Tensor lam = lam_.contiguous();
  const int64_t rows = in.size(0), cols = in.size(1);
  Tensor out = at::empty({rows, cols}, in.options());
  const int64_t* ip = idx_ptr(idx);
  VERA_DISPATCH_FLOAT(in.scalar_type(), "vera_col_scale", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src0 = in.const_data_ptr<scalar_t>();
    const acc_t* lp = lam.const_data_ptr<acc_t>();
    scalar_t* dst0 = out.data_ptr<scalar_t>();
    const int64_t ld = in.stride(0);
    at::parallel_for(0, rows, grain_for(cols), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t a = adapter_of(ip, n);
        scalar_t* dst = dst0 + n * cols;
        if (a < 0) {
          std::fill(dst, dst + cols, scalar_t(0));
          continue;
        }
        const scalar_t* src = src0 + n * ld;
        const acc_t* l = lp + a * cols;
        for (int64_t j = 0; j < cols; ++j) dst[j] = static_cast<scalar_t>(static_cast<acc_t>(src[j]) * l[j]);
      }
    });
  });
  return out;
}

void Prims::scale_add(Tensor& out, const Tensor& base_, const Tensor& z_, const Tensor& lam_,
                      const c10::optional<Tensor>& idx) {
  const Tensor base = rows_contiguous(base_), z = rows_contiguous(z_), lam = lam_.contiguous();
  TORCH_INTERNAL_ASSERT(out.stride(1) == 1 || out.size(1) <= 1);
  TORCH_INTERNAL_ASSERT(z.scalar_type() == opmath_dtype(out.scalar_type()), "scale_add: z must be in op math");
  const int64_t rows = out.size(0), cols = out.size(1);
  const int64_t* ip = idx_ptr(idx);
  VERA_DISPATCH_FLOAT(out.scalar_type(), "vera_scale_add", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bp = base.const_data_ptr<scalar_t>();
    const acc_t* zp = z.const_data_ptr<acc_t>();
    const acc_t* lp = lam.const_data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t ldb = base.stride(0), ldz = z.stride(0), ldo = out.stride(0);
    at::parallel_for(0, rows, grain_for(cols), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t a = adapter_of(ip, n);
        const scalar_t* b = bp + n * ldb;
        scalar_t* o = op + n * ldo;
        if (a < 0) {
          if (o != b) std::copy(b, b + cols, o);
          continue;
        }
        const acc_t* zr = zp + n * ldz;
        const acc_t* l = lp + a * cols;
        for (int64_t j = 0; j < cols; ++j) o[j] = static_cast<scalar_t>(static_cast<acc_t>(b[j]) + l[j] * zr[j]);
      }
    });
  });
}

Tensor Prims::col_dot_reduce(const Tensor& p_, const Tensor& q_, const c10::optional<Tensor>& idx,
                             int64_t num_adapters) {
  const Tensor p = rows_contiguous(p_), q = rows_contiguous(q_);
  TORCH_INTERNAL_ASSERT(q.scalar_type() == opmath_dtype(p.scalar_type()), "col_dot_reduce: q must be in op math");
  const int64_t rows = p.size(0), cols = p.size(1);
  Tensor out = at::zeros({num_adapters, cols}, p.options().dtype(opmath_dtype(p.scalar_type())));
  const int64_t* ip = idx_ptr(idx);
  VERA_DISPATCH_FLOAT(p.scalar_type(), "vera_col_dot_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const acc_t* qp = q.const_data_ptr<acc_t>();
    acc_t* acc0 = out.data_ptr<acc_t>();
    const int64_t ldp = p.stride(0), ldq = q.stride(0);
    // Threads own column ranges and walk every row in order: each sum has one fixed order.
    at::parallel_for(0, cols, 16, [&](int64_t c0, int64_t c1) {
      for (int64_t n = 0; n < rows; ++n) {
        const int64_t a = adapter_of(ip, n);
        if (a < 0) continue;
        const scalar_t* pr = pp + n * ldp;
        const acc_t* qr = qp + n * ldq;
        acc_t* acc = acc0 + a * cols;
        for (int64_t j = c0; j < c1; ++j) acc[j] += static_cast<acc_t>(pr[j]) * qr[j];
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> Prims::lambda_grads(const Tensor& q_, const Tensor& B_, const Tensor& lambda_d_,
                                               const Tensor& lambda_b_) {
  const Tensor q = q_.contiguous(), B = rows_contiguous(B_), ld = lambda_d_.contiguous(), lb = lambda_b_.contiguous();
  TORCH_INTERNAL_ASSERT(q.scalar_type() == opmath_dtype(B.scalar_type()) && q.sizes() == B.sizes());
  const int64_t out_f = q.size(0), r = q.size(1);
  Tensor grad_ld = at::zeros({r}, q.options()), grad_lb = at::empty({out_f}, q.options());
  VERA_DISPATCH_FLOAT(B.scalar_type(), "vera_lambda_grads", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* qp = q.const_data_ptr<acc_t>();
    const scalar_t* bp = B.const_data_ptr<scalar_t>();
    const acc_t* ldp = ld.const_data_ptr<acc_t>();
    const acc_t* lbp = lb.const_data_ptr<acc_t>();
    acc_t* gld = grad_ld.data_ptr<acc_t>();
    acc_t* glb = grad_lb.data_ptr<acc_t>();
    const int64_t ldb = B.stride(0);
    // grad_lb: rows split across threads, each row summed in column order.
    at::parallel_for(0, out_f, grain_for(r), [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        acc_t s = 0;
        for (int64_t k = 0; k < r; ++k) s += ldp[k] * (static_cast<acc_t>(bp[o * ldb + k]) * qp[o * r + k]);
        glb[o] = s;
      }
    });
    // grad_ld: columns split across threads, each walking the rows in order (one fixed order per sum).
    at::parallel_for(0, r, 16, [&](int64_t k0, int64_t k1) {
      for (int64_t o = 0; o < out_f; ++o) {
        const acc_t l = lbp[o];
        for (int64_t k = k0; k < k1; ++k) gld[k] += l * (static_cast<acc_t>(bp[o * ldb + k]) * qp[o * r + k]);
      }
    });
  });
  return {grad_ld, grad_lb};
}

void Prims::merge_apply(Tensor& weight, const Tensor& delta_, double alpha, bool transposed, bool safe) {
  const int64_t out_f = delta_.size(0), in_f = delta_.size(1);
  // Logical element (o, i) of delta lives at weight[o * so + i * si] (weight is (I, O) when transposed).
  const int64_t so = transposed ? weight.stride(1) : weight.stride(0);
  const int64_t si = transposed ? weight.stride(0) : weight.stride(1);
  constexpr int64_t kTile = 64;  // square tiles keep both layouts cache friendly
  const int64_t row_tiles = (out_f + kTile - 1) / kTile;

  VERA_DISPATCH_FLOAT(weight.scalar_type(), "vera_merge_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor delta = delta_.to(opmath_dtype(weight.scalar_type())).contiguous();
    scalar_t* w = weight.data_ptr<scalar_t>();
    const acc_t* d = delta.const_data_ptr<acc_t>();
    const acc_t a = static_cast<acc_t>(alpha);
    auto for_each_tile = [&](auto&& body) {
      at::parallel_for(0, row_tiles, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t i0 = 0; i0 < in_f; i0 += kTile)
            body(t * kTile, std::min(out_f, (t + 1) * kTile), i0, std::min(in_f, i0 + kTile));
      });
    };
    if (safe) {
      std::atomic<bool> finite{true};
      for_each_tile([&](int64_t o0, int64_t o1, int64_t i0, int64_t i1) {
        bool ok = true;
        for (int64_t o = o0; o < o1; ++o)
          for (int64_t i = i0; i < i1; ++i)
            ok &= std::isfinite(static_cast<acc_t>(
                static_cast<scalar_t>(static_cast<acc_t>(w[o * so + i * si]) + a * d[o * in_f + i])));
        if (!ok) finite.store(false, std::memory_order_relaxed);
      });
      TORCH_CHECK_VALUE(
          finite.load(),
          "safe merge refused: the merged weight would hold non-finite values " "(the adapter seems to be broken); weight left unchanged");
    }
    for_each_tile([&](int64_t o0, int64_t o1, int64_t i0, int64_t i1) {
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t i = i0; i < i1; ++i) {
          scalar_t& dst = w[o * so + i * si];
          dst = static_cast<scalar_t>(static_cast<acc_t>(dst) + a * d[o * in_f + i]);
        }
    });
  });
}

void Prims::check_adapter_idx(const Tensor& idx_, int64_t num_adapters) {
  const Tensor idx = idx_.contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < idx.numel(); ++n) {
    TORCH_CHECK(ip[n] >= -1 && ip[n] < num_adapters, "adapter_idx[", n, "] = ", ip[n],
                " is out of range: expected -1 (no adapter) or an adapter index in [0, ", num_adapters, ")");
  }
}

}  // namespace vera::cpu
