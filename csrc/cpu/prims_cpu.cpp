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

namespace {

// Tile sizes of a CPU merge: tp rows of weight by tq of its columns, r cut into chunks of kc. One worker's workspace,
// the scaled operand slices (tp x kc and kc x tq) and the product tile (tp x tq, plus its copy in weight's op-math
// dtype when that differs from the projection's), stays within `budget` whatever the sizes: tiles shrink to 64 x 64
// first, then r is chunked. They start at 256 x 512: at r = 256 fp32, 1.25 MiB, so the tile is still in cache when
// it is added into weight.
struct MergeTiles {
  int64_t tp, tq, kc;
};

int64_t tile_bytes(const MergeTiles& t, int64_t elem, int64_t widened_elem) {
  return (t.tp * t.kc + t.kc * t.tq + t.tp * t.tq) * elem + t.tp * t.tq * widened_elem;
}

// widened_elem: the element size of the tile's copy in weight's op-math dtype, 0 without one.
MergeTiles merge_tiles(int64_t rows, int64_t cols, int64_t r, int64_t elem, int64_t widened_elem, int64_t budget) {
  MergeTiles t{std::min<int64_t>(rows, 256), std::min<int64_t>(cols, 512), std::max<int64_t>(r, 1)};
  while (tile_bytes(t, elem, widened_elem) > budget) {
    if (t.tq > 64 && t.tq >= t.tp) {
      t.tq = (t.tq + 1) / 2;
    } else if (t.tp > 64) {
      t.tp = (t.tp + 1) / 2;
    } else {
      t.kc = (t.kc + 1) / 2;
    }
  }
  return t;
}

// At most this many workers hold a workspace at once: each gets kMergeWorkspaceBytes / workers (>= 256 KiB).
constexpr int64_t kMergeMaxWorkers = 64;

}  // namespace

void Prims::merge_apply(Tensor& weight, const AdapterArgs& a_, double alpha, bool transposed, bool check_first) {
  // weight (P, Q): (out, in), or (in, out) when transposed. A tile of delta_W in weight's layout is
  //   (out, in): B_hat[p-rows] @ A_hat[:, q-cols]       (in, out): A_hat[:, p-rows]^T @ B_hat[q-rows]^T
  // with B_hat = diag(lambda_b) B and A_hat = diag(lambda_d) A in the projection's op-math dtype (the products
  // row_scale forms), formed slice by slice into the worker's workspace. The tiles are shared out among the threads
  // in one parallel region; each computes its tiles with a single-threaded MKL GEMM (MKL does not nest inside a
  // parallel region) and adds each into weight while it is in cache. One region instead of a multithreaded GEMM
  // per tile: fewer thread hand-offs, which matter on a busy machine.
  const int64_t rows = weight.size(0), cols = weight.size(1), r = a_.A.size(0);
  if (rows == 0 || cols == 0) return;
  // Detached: the workers' ATen calls must record no autograd history (grad mode is thread-local).
  const Tensor A = a_.A.detach(), B = a_.B.detach();
  const Tensor ld = a_.lambda_d.detach().unsqueeze(1), lb = a_.lambda_b.detach().unsqueeze(1);
  const at::ScalarType pacc = opmath_dtype(A.scalar_type()), wacc = opmath_dtype(weight.scalar_type());
  const bool convert = pacc != wacc;
  // Tile sizes for the most workers there can be, then as many workers as there are tiles to share (at most).
  const int64_t max_workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), kMergeMaxWorkers));
  const MergeTiles t = merge_tiles(rows, cols, r, c10::elementSize(pacc), convert ? c10::elementSize(wacc) : 0,
                                   kMergeWorkspaceBytes / max_workers);
  const int64_t tiles_p = (rows + t.tp - 1) / t.tp, tiles = tiles_p * ((cols + t.tq - 1) / t.tq);
  const int64_t workers = std::min(max_workers, tiles);
  // Every worker's workspace, allocated here at once (row slice, column slice, product tile; the widened tile).
  const int64_t per_worker = t.tp * t.kc + t.kc * t.tq + t.tp * t.tq;
  const at::TensorOptions popts = A.options().dtype(pacc);
  const Tensor workspace = at::empty({workers * per_worker}, popts);
  const Tensor widened = convert ? at::empty({workers * t.tp * t.tq}, popts.dtype(wacc)) : Tensor();

  // lam[k] * src[k, j] (op math) into the front of buf, as src's shape.
  auto scale_into = [](const Tensor& buf, const Tensor& src, const Tensor& lam) {
    Tensor out = buf.narrow(0, 0, src.numel()).view(src.sizes());
    at::mul_out(out, src, lam);
    return out;
  };

  const int64_t s0 = weight.stride(0), s1 = weight.stride(1);
  VERA_DISPATCH_FLOAT(weight.scalar_type(), "vera_merge_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* w = weight.data_ptr<scalar_t>();
    const acc_t al = static_cast<acc_t>(alpha);
    // body(p0, np, q0, nq, d) for every tile, d its product (np x nq, row-major) in weight's op-math dtype. Worker
    // w takes a contiguous range of tiles (column-block-major over weight's tile grid) and its own workspace slice.
    auto for_each_tile = [&](auto&& body) {
      at::parallel_for(0, workers, 1, [&](int64_t first, int64_t last) {
        for (int64_t worker = first; worker < last; ++worker) {
          const Tensor ws = workspace.narrow(0, worker * per_worker, per_worker);
          const Tensor row_buf = ws.narrow(0, 0, t.tp * t.kc), col_buf = ws.narrow(0, t.tp * t.kc, t.kc * t.tq);
          const Tensor prod_buf = ws.narrow(0, t.tp * t.kc + t.kc * t.tq, t.tp * t.tq);
          const Tensor conv_buf = convert ? widened.narrow(0, worker * t.tp * t.tq, t.tp * t.tq) : Tensor();
          const int64_t begin = tiles * worker / workers, end = tiles * (worker + 1) / workers;
          int64_t scaled_q0 = -1;  // the column block whose operand col_buf holds (r in one chunk)
          for (int64_t tile = begin; tile < end; ++tile) {
            // column-block-major: a worker's consecutive tiles share their column operand, scaled once
            const int64_t q0 = tile / tiles_p * t.tq, p0 = tile % tiles_p * t.tp;
            const int64_t np = std::min(t.tp, rows - p0), nq = std::min(t.tq, cols - q0);
            Tensor prod = prod_buf.narrow(0, 0, np * nq).view({np, nq});
            if (r == 0) prod.zero_();
            for (int64_t k0 = 0; k0 < r; k0 += t.kc) {
              const int64_t nk = std::min(t.kc, r - k0);
              // the operand along weight's rows as (np, nk), the one along its columns as (nk, nq); with
              // fan_in_fan_out A_hat^T and B_hat^T: A_hat and B_hat slices used through transposed views
              const Tensor rh =
                  transposed
                      ? scale_into(row_buf, A.slice(0, k0, k0 + nk).slice(1, p0, p0 + np), ld.slice(0, k0, k0 + nk)).t()
                      : scale_into(row_buf, B.slice(0, p0, p0 + np).slice(1, k0, k0 + nk), lb.slice(0, p0, p0 + np));
              if (nk < r || q0 != scaled_q0) {
                if (transposed) {
                  scale_into(col_buf, B.slice(0, q0, q0 + nq).slice(1, k0, k0 + nk), lb.slice(0, q0, q0 + nq));
                } else {
                  scale_into(col_buf, A.slice(0, k0, k0 + nk).slice(1, q0, q0 + nq), ld.slice(0, k0, k0 + nk));
                }
                scaled_q0 = nk < r ? -1 : q0;
              }
              const Tensor ch = transposed ? col_buf.narrow(0, 0, nq * nk).view({nq, nk}).t()
                                           : col_buf.narrow(0, 0, nk * nq).view({nk, nq});
              if (k0 == 0) {
                at::mm_out(prod, rh, ch);
              } else {
                prod.addmm_(rh, ch);  // only when r exceeds one chunk: the chunks' sums are added in order
              }
            }
            if (convert) prod = conv_buf.narrow(0, 0, np * nq).view({np, nq}).copy_(prod);
            body(p0, np, q0, nq, prod.const_data_ptr<acc_t>());
          }
        }
      });
    };
    if (check_first) {
      std::atomic<bool> finite{true};
      for_each_tile([&](int64_t p0, int64_t np, int64_t q0, int64_t nq, const acc_t* d) {
        bool ok = true;
        for (int64_t p = 0; p < np; ++p) {
          const scalar_t* wr = w + (p0 + p) * s0 + q0 * s1;
          const acc_t* dr = d + p * nq;
          for (int64_t q = 0; q < nq; ++q)
            ok &= std::isfinite(static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(wr[q * s1]) + al * dr[q])));
        }
        if (!ok) finite.store(false, std::memory_order_relaxed);
      });
      TORCH_CHECK_VALUE(
          finite.load(),
          "safe merge refused: the merged weight would hold non-finite values " "(the adapter seems to be broken); weight left unchanged");
    }
    for_each_tile([&](int64_t p0, int64_t np, int64_t q0, int64_t nq, const acc_t* d) {
      for (int64_t p = 0; p < np; ++p) {
        scalar_t* wr = w + (p0 + p) * s0 + q0 * s1;
        const acc_t* dr = d + p * nq;
        if (s1 == 1) {  // the common case, kept apart so that it vectorizes
          for (int64_t q = 0; q < nq; ++q) wr[q] = static_cast<scalar_t>(static_cast<acc_t>(wr[q]) + al * dr[q]);
        } else {
          for (int64_t q = 0; q < nq; ++q) {
            scalar_t& dst = wr[q * s1];
            dst = static_cast<scalar_t>(static_cast<acc_t>(dst) + al * dr[q]);
          }
        }
      }
    });
  });
}

std::vector<double> Prims::max_abs(const std::vector<Tensor>& tensors) {
  std::vector<double> out;
  for (const Tensor& t : tensors) {
    // The inf-norm is exact in t's dtype (a maximum of absolute values); NaN propagates into it.
    out.push_back(at::linalg_vector_norm(t, std::numeric_limits<double>::infinity()).item<double>());
  }
  return out;
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
