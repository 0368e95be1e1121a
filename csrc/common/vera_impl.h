// The VeRA operators (docs/DESIGN.md §2), written once for every backend. Dense products go through ATen GEMMs
// (on the tensors' device and current stream, beta=1 accumulation where it saves a pass); the scaling, gathers
// and reductions around them are the backend's own loops or kernels, supplied as `Prims`:
//
//   row_scale(in (R, C), lam (R), dtype, col_lam? (C))
//                                              -> out (R, C) = lam[i] * in[i, j] (* col_lam[j]); dtype = in's or opmath
//   col_scale(in (N, C), lam (K, C), idx?)     -> out (N, C) = in[n, j] * lam[a(n), j]   (0 where a(n) < 0)
//   scale_add(out, base, z opmath, lam (K, C), idx?)   out[n, j] = base[n, j] + lam[a(n), j] * z[n, j]
//   col_dot_reduce(p, q opmath (N, C), idx?, K) -> (K, C) opmath, sum over rows n with a(n) = k of p * q
//   mm_opmath(a, b)                            -> a @ b with the result in op math: a low-precision GEMM's fp32
//                                                 accumulator kept instead of rounded
//   lambda_grads(q opmath (O, r), B, lambda_d, lambda_b)
//                                              -> (grad_lambda_d (r), grad_lambda_b (O)) of one adapter, from
//                                                 q = grad_out^T u read once
//   merge_apply(W, adapter, alpha, transposed, check_first)  W (+)= alpha * delta_W, one rounding, computed tile by
//                                                       tile (no O x I temporary); check_first: refuse, W unchanged,
//                                                       if any merged value would not be finite
//   max_abs(tensors)                                    -> max |t| of each (<= 5) tensor, read back as doubles
//                                                       (+inf where one holds a NaN or an inf)
//   check_adapter_idx(idx, K)                           every entry in [-1, K), refused with an error otherwise (the
//                                                       CUDA backend checks on the device while a CUDA graph is
//                                                       captured: a host read would synchronize)
//   kDecodeChecksIdx                                    true when decode_forward's kernels check idx themselves, on
//                                                       the device (then check_adapter_idx is not called before it)
//   decode_forward(x, weight?, bias?, base?, adapter)   -> (y, u): the whole small-N forward in one fused pass, for
//                                                       0 < N <= kDecodeMaxRows (the backend's own threshold)
//
// scale_add copies base where a(n) < 0. Lambdas and sums are in the op-math dtype (opmath_dtype: fp32, fp64 for fp64
// data). Without idx every row uses adapter 0 (lam viewed as (1, C)). All loops are deterministic.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common/checks.h"

namespace vera {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

// Small N (decode, serving): each backend's decode_forward computes the whole layer in one fused pass, reading each
// weight row once for all rows of x instead of paying a GEMM call per product.
template <class P>
bool use_decode(const Tensor& x) {
  return x.size(0) > 0 && x.size(0) <= P::kDecodeMaxRows;
}

// The kernels read adapter_idx with unit stride: a strided index vector is made contiguous once, up front.
inline OptTensor contiguous_idx(const OptTensor& idx) { return idx.has_value() ? OptTensor(idx->contiguous()) : idx; }

// lambda as (num_adapters, C): a single adapter's vector becomes one row.
inline Tensor as_rows(const Tensor& lam) { return lam.dim() == 1 ? lam.unsqueeze(0) : lam; }

// One adapter's whole (O, r) operand M = diag(lambda_b) B diag(lambda_d), in `dtype`: built once per call (O*r
// products), it turns the adapter into a single GEMM with u, y += u M^T and grad_u = grad_out M, with no (N, O) or
// (N, r) temporary and no per-row scaling pass (docs/DESIGN.md §2.1, §5: M is rounded once, like a weight).
template <class P>
Tensor folded_adapter(const AdapterArgs& a, at::ScalarType dtype) {
  return P::row_scale(a.B, a.lambda_b, dtype, a.lambda_d);
}

template <class P>
Tensor adapter_output(const Tensor& u, const AdapterArgs& a, const Tensor& base, bool base_is_ours) {
  // base + lambda_b * ((u * lambda_d) @ B^T); accumulates into base when we own it (a fresh base-layer output).
  if (a.adapter_idx.has_value()) {
    // Rows use different adapters: h = u * lambda_d[a(n)] (rounded like u), z = h @ B^T kept in fp32, and lambda_b
    // applied to z before the one rounding of y.
    Tensor z = P::mm_opmath(P::col_scale(u, as_rows(a.lambda_d), a.adapter_idx), a.B.t());
    Tensor out = base_is_ours ? base : at::empty_like(base, at::MemoryFormat::Contiguous);
    P::scale_add(out, base, z, as_rows(a.lambda_b), a.adapter_idx);
    return out;
  }
  Tensor m = folded_adapter<P>(a, u.scalar_type());
  if (base_is_ours) return base.addmm_(u, m.t());
  return at::addmm(base, u, m.t());
}

// x W^T + bias + the adapter term, for the fused linear ops. One adapter: the K = r product u M^T (+ bias) is formed
// first and the base GEMM (K = in_features, compute-bound) accumulates onto it with beta = 1, so reading the (N, O)
// addend costs nothing next to that GEMM's arithmetic; the other order would add an (N, O) read and write to the
// memory-bound K = r GEMM.
template <class P>
Tensor linear_plus_adapter(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& u,
                           const AdapterArgs& a) {
  if (a.adapter_idx.has_value()) return adapter_output<P>(u, a, at::linear(x, weight, bias), /*base_is_ours=*/true);
  const Tensor m_t = folded_adapter<P>(a, u.scalar_type()).t();
  Tensor y = bias.has_value() ? at::addmm(*bias, u, m_t) : at::mm(u, m_t);
  return y.addmm_(x, weight.t());
}

// delta_W (O, I) in the op-math dtype (fp32; fp64 for an fp64 projection).
template <class P>
Tensor delta_weight_opmath(const AdapterArgs& a) {
  const at::ScalarType acc = opmath_dtype(a.A.scalar_type());
  return at::mm(P::row_scale(a.B, a.lambda_b, acc), P::row_scale(a.A, a.lambda_d, acc));
}

// The fused linear op at training sizes, one adapter: with delta_W = diag(lambda_b) B diag(lambda_d) A, the layer is
// x @ (W + delta_W)^T and its input gradient grad_out @ (W + delta_W). Forming W + delta_W costs O*r*I + O*I, and
// saves the N*r*O GEMM for z in forward and the N*r*(O + I) of the two adapter GEMMs behind grad_x in backward, so it
// pays once N is large against I (forward) or against O*I/(O+I) (backward). Only where the data are in the op-math
// dtype: rounding W + delta_W to fp16/bf16 would be an error the unmerged computation does not make.
inline bool merged_weight_allowed(const AdapterArgs& a, const Tensor& data) {
  return !a.adapter_idx.has_value() && opmath_dtype(data.scalar_type()) == data.scalar_type();
}

inline bool use_merged_forward(int64_t rows, int64_t in_f, int64_t r, const AdapterArgs& a) {
  return merged_weight_allowed(a, a.A) && rows * r > in_f * (r + 1);
}

inline bool use_merged_backward(int64_t rows, int64_t in_f, int64_t out_f, int64_t r, const AdapterArgs& a) {
  return merged_weight_allowed(a, a.A) && rows * r * (in_f + out_f) > in_f * out_f * (r + 1);
}

// W + delta_W in W's dtype (equal to the op-math dtype where it is used).
template <class P>
Tensor merged_weight(const AdapterArgs& a, const Tensor& weight) {
  return delta_weight_opmath<P>(a).add_(weight);
}

// x (N, I), weight (O, I) and bias (O) of a fused nn.Linear.
inline void check_linear_args(const Tensor& x, const Tensor& weight, const OptTensor& bias) {
  check_activation(x, "x");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D (out_features, in_features), got shape ", weight.sizes());
  // (x is checked against weight, not the other way round: the caller's input is what is usually wrong)
  TORCH_CHECK(x.size(1) == weight.size(1), "x must have in_features=", weight.size(1),
              " as its last dimension (weight has shape ", weight.sizes(), "), got x of shape ", x.sizes());
  check_like(weight, "weight", {weight.size(0), x.size(1)}, x, "x");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1, "bias must be 1-D (out_features,), got shape ", bias->sizes());
    check_like(bias->unsqueeze(0), "bias", {1, weight.size(0)}, x, "x");
  }
}

// A forward's adapter_idx check: on the host before any kernel, except on a decode path whose kernels check it on
// the device (P::kDecodeChecksIdx: a host read would synchronize a decode step).
template <class P>
void check_forward_idx(const AdapterArgs& a, bool decode) {
  if (a.adapter_idx.has_value() && !(decode && P::kDecodeChecksIdx)) {
    P::check_adapter_idx(*a.adapter_idx, num_adapters(a));
  }
}

template <class P>
std::tuple<Tensor, Tensor> vera_forward(const Tensor& x, const Tensor& base_out, const Tensor& A, const Tensor& B,
                                        const Tensor& lambda_d, const Tensor& lambda_b,
                                        const OptTensor& adapter_idx_arg) {
  const OptTensor adapter_idx = contiguous_idx(adapter_idx_arg);
  const AdapterArgs a{A, B, lambda_d, lambda_b, adapter_idx};
  check_activation(x, "x");
  TORCH_CHECK(base_out.dim() == 2, "base_out must be 2-D (rows, out_features), got shape ", base_out.sizes());
  check_like(base_out, "base_out", {x.size(0), base_out.size(1)}, x, "x");
  check_adapter(a, x, "x", x.size(1), base_out.size(1));
  const bool decode = use_decode<P>(x);
  check_forward_idx<P>(a, decode);
  if (decode) return P::decode_forward(x, c10::nullopt, c10::nullopt, base_out, a);

  Tensor u = at::mm(x, A.t());
  return {adapter_output<P>(u, a, base_out, /*base_is_ours=*/false), u};
}

template <class P>
std::tuple<Tensor, Tensor> vera_linear_forward(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                               const Tensor& A, const Tensor& B, const Tensor& lambda_d,
                                               const Tensor& lambda_b, const OptTensor& adapter_idx_arg) {
  const OptTensor adapter_idx = contiguous_idx(adapter_idx_arg);
  const AdapterArgs a{A, B, lambda_d, lambda_b, adapter_idx};
  check_linear_args(x, weight, bias);
  check_adapter(a, x, "x", x.size(1), weight.size(0));
  const bool decode = use_decode<P>(x);
  check_forward_idx<P>(a, decode);
  if (decode) return P::decode_forward(x, weight, bias, c10::nullopt, a);

  Tensor u = at::mm(x, A.t());
  if (use_merged_forward(x.size(0), weight.size(1), lambda_d.size(-1), a)) {
    return {at::linear(x, merged_weight<P>(a, weight), bias), u};
  }
  return {linear_plus_adapter<P>(x, weight, bias, u, a), u};
}

// The adapter's gradients up to u, given grad_out (N, O) and the saved u (N, r): gh = dL/du (N, r) and both lambda
// gradients, each formed only when asked for.
struct AdapterGrads {
  Tensor gh, grad_ld, grad_lb;
};

template <class P>
AdapterGrads adapter_grads(const Tensor& grad_out, const Tensor& u, const AdapterArgs& a, bool need_gh, bool need_ld,
                           bool need_lb) {
  const OptTensor& idx = a.adapter_idx;
  const Tensor ld = as_rows(a.lambda_d), lb = as_rows(a.lambda_b);
  const at::ScalarType dtype = grad_out.scalar_type();
  AdapterGrads g;
  if (idx.has_value()) {
    // Rows use different adapters. gv = (lambda_b[a(n)] * grad_out) @ B is dL/dh (N, r) and z = h @ B^T, both kept
    // in fp32 for the per-adapter column sums of the lambda gradients.
    Tensor gv;
    if (need_gh || need_ld) gv = P::mm_opmath(P::col_scale(grad_out, lb, idx), a.B);
    if (need_gh) g.gh = P::col_scale(gv, ld, idx).to(dtype);
    if (need_ld) g.grad_ld = P::col_dot_reduce(u, gv, idx, ld.size(0));
    if (need_lb)
      g.grad_lb = P::col_dot_reduce(grad_out, P::mm_opmath(P::col_scale(u, ld, idx), a.B.t()), idx, lb.size(0));
    return g;
  }
  // One adapter: both lambda gradients come from the (O, r) GEMM q = grad_out^T u over the N rows, kept in fp32,
  //   dlambda_b[o] = sum_k lambda_d[k] B[o, k] q[o, k],   dlambda_d[k] = sum_o lambda_b[o] B[o, k] q[o, k],
  // in one pass over q; dL/du = grad_out M with the folded M. No (N, O) or (N, r) temporary either way.
  if (need_ld || need_lb) {
    std::tie(g.grad_ld, g.grad_lb) = P::lambda_grads(P::mm_opmath(grad_out.t(), u), a.B, a.lambda_d, a.lambda_b);
    if (!need_ld) g.grad_ld = Tensor();  // both come from one pass; only the requested ones are returned
    if (!need_lb) g.grad_lb = Tensor();
  }
  if (need_gh) g.gh = at::mm(grad_out, folded_adapter<P>(a, dtype));
  return g;
}

// Checks of the backward ops: grad_out (N, O), u (N, r), the adapter, and the weight grad_x is taken through.
template <class P>
void check_backward_args(const Tensor& grad_out, const Tensor& u, const AdapterArgs& a, const OptTensor& weight) {
  check_activation(grad_out, "grad_out");
  const int64_t rows = grad_out.size(0), r = a.lambda_d.size(-1);
  TORCH_CHECK(u.dim() == 2, "u must be 2-D (rows, r), got shape ", u.sizes());
  check_like(u, "u", {rows, u.size(1)}, grad_out, "grad_out");
  check_adapter(a, grad_out, "grad_out", a.A.dim() == 2 ? a.A.size(1) : -1, grad_out.size(1));
  TORCH_CHECK(u.size(1) == r, "u must have shape (rows, r=", r, "), got shape ", u.sizes());
  if (weight.has_value()) check_like(*weight, "weight", {grad_out.size(1), a.A.size(1)}, grad_out, "grad_out");
  if (a.adapter_idx.has_value()) P::check_adapter_idx(*a.adapter_idx, num_adapters(a));
}

inline Tensor or_empty(const Tensor& t, const Tensor& like) { return t.defined() ? t : at::empty({0}, like.options()); }

template <class P>
std::tuple<Tensor, Tensor, Tensor> vera_backward(const Tensor& grad_out, const Tensor& u, const Tensor& A,
                                                 const Tensor& B, const Tensor& lambda_d, const Tensor& lambda_b,
                                                 const OptTensor& adapter_idx_arg, const OptTensor& weight,
                                                 std::array<bool, 3> output_mask) {
  const OptTensor adapter_idx = contiguous_idx(adapter_idx_arg);
  const AdapterArgs a{A, B, lambda_d, lambda_b, adapter_idx};
  check_backward_args<P>(grad_out, u, a, weight);
  const int64_t rows = grad_out.size(0), r = lambda_d.size(-1);
  // grad_x through W + delta_W (one GEMM) instead of grad_out @ W + gh @ A, where that pays (merged_weight_allowed).
  const bool merged_grad_x =
      output_mask[0] && weight.has_value() && use_merged_backward(rows, A.size(1), grad_out.size(1), r, a);
  const bool need_gh = output_mask[0] && !merged_grad_x;
  AdapterGrads g = adapter_grads<P>(grad_out, u, a, need_gh, output_mask[1], output_mask[2]);
  Tensor grad_x;
  if (merged_grad_x) {
    grad_x = at::mm(grad_out, merged_weight<P>(a, *weight));
  } else if (output_mask[0]) {
    // beta = 1 on the compute-bound GEMM (K = out_features), not on the K = r one (see linear_plus_adapter)
    grad_x = weight.has_value() ? at::mm(g.gh, A).addmm_(grad_out, *weight) : at::mm(g.gh, A);
  }
  return {or_empty(grad_x, grad_out), or_empty(g.grad_ld, grad_out), or_empty(g.grad_lb, grad_out)};
}

// ------------------------------------------------------------------------------------------------------------
// The training form (docs/DESIGN.md §2.7): u = x A^T is an input, computed once (vera_project) for every layer that
// reads the same x with the same A. Its gradient leaves the apply ops as grad_u, and autograd sums it over those
// layers before the one grad_u @ A of vera_project's backward.

template <class P>
Tensor vera_project(const Tensor& x, const Tensor& A) {
  check_activation(x, "x");
  TORCH_CHECK(A.dim() == 2 && A.size(1) == x.size(1), "A must have shape (r, in_features=", x.size(1),
              ") (slice the shared projection as vera_A[:r, :in_features]), got shape ", A.sizes());
  check_like(A, "A", A.sizes(), x, "x");
  return at::mm(x, A.t());
}

// u (N, r) as an apply op's input: 2-D, one row per row of ref, r columns, ref's dtype and device.
inline void check_u(const Tensor& u, const Tensor& ref, const char* ref_name, int64_t r) {
  TORCH_CHECK(u.dim() == 2, "u must be 2-D (rows, r), got shape ", u.sizes());
  check_like(u, "u", {ref.size(0), r}, ref, ref_name);
}

template <class P>
Tensor vera_apply(const Tensor& u, const Tensor& base_out, const Tensor& A, const Tensor& B, const Tensor& lambda_d,
                  const Tensor& lambda_b, const OptTensor& adapter_idx_arg) {
  const OptTensor adapter_idx = contiguous_idx(adapter_idx_arg);
  const AdapterArgs a{A, B, lambda_d, lambda_b, adapter_idx};
  check_activation(base_out, "base_out");
  check_adapter(a, base_out, "base_out", A.dim() == 2 ? A.size(1) : -1, base_out.size(1));
  check_u(u, base_out, "base_out", lambda_d.size(-1));
  if (adapter_idx.has_value()) P::check_adapter_idx(*adapter_idx, num_adapters(a));
  return adapter_output<P>(u, a, base_out, /*base_is_ours=*/false);
}

// merged (docs/DESIGN.md §2.7): the forward runs through W + delta_W for "forward", "both" and "kept", and "kept"
// returns it for the backward to reuse (delta_W formed once per step); the second output is empty otherwise. The
// backward's share ("backward", "both") is vera_apply_backward's add_delta. The caller chooses
// (vera_ext/ops.py: merged_weight_mode).
template <class P>
std::tuple<Tensor, Tensor> vera_linear_apply(const Tensor& x, const Tensor& u, const Tensor& weight,
                                             const OptTensor& bias, const Tensor& A, const Tensor& B,
                                             const Tensor& lambda_d, const Tensor& lambda_b,
                                             const OptTensor& adapter_idx_arg, c10::string_view merged) {
  const OptTensor adapter_idx = contiguous_idx(adapter_idx_arg);
  const AdapterArgs a{A, B, lambda_d, lambda_b, adapter_idx};
  const bool in_forward = merged == "forward" || merged == "both" || merged == "kept";
  TORCH_CHECK(in_forward || merged == "none" || merged == "backward",
              "merged must be \"none\", \"forward\", \"backward\", \"both\" or \"kept\", got \"", merged, "\"");
  check_linear_args(x, weight, bias);
  check_adapter(a, x, "x", x.size(1), weight.size(0));
  check_u(u, x, "x", lambda_d.size(-1));
  if (adapter_idx.has_value()) P::check_adapter_idx(*adapter_idx, num_adapters(a));
  if (merged != "none") {
    TORCH_CHECK(
        merged_weight_allowed(a, x), "merged=\"", merged,
        "\" needs one adapter (no adapter_idx) and float32 " "or float64 data (rounding W + delta_W to a lower precision would add error), got x of dtype ",
        x.scalar_type(), adapter_idx.has_value() ? " with adapter_idx" : "");
  }
  if (in_forward) {
    Tensor w_merged = merged_weight<P>(a, weight);
    Tensor y = at::linear(x, w_merged, bias);
    return {y, merged == "kept" ? w_merged : at::empty({0}, x.options())};
  }
  return {linear_plus_adapter<P>(x, weight, bias, u, a), at::empty({0}, x.options())};
}

// (grad_x, grad_u, grad_lambda_d, grad_lambda_b) of the apply ops. grad_x = grad_out @ weight, the base term, or the
// whole input gradient through W + delta_W: weight is the one a merged forward kept, or add_delta forms it here.
template <class P>
std::tuple<Tensor, Tensor, Tensor, Tensor> vera_apply_backward(const Tensor& grad_out, const Tensor& u, const Tensor& A,
                                                               const Tensor& B, const Tensor& lambda_d,
                                                               const Tensor& lambda_b, const OptTensor& adapter_idx_arg,
                                                               const OptTensor& weight, bool add_delta,
                                                               std::array<bool, 4> output_mask) {
  const OptTensor adapter_idx = contiguous_idx(adapter_idx_arg);
  const AdapterArgs a{A, B, lambda_d, lambda_b, adapter_idx};
  check_backward_args<P>(grad_out, u, a, weight);
  TORCH_CHECK(!output_mask[0] || weight.has_value(), "output_mask[0] (grad_x) needs weight");
  if (add_delta) {
    TORCH_CHECK(
        weight.has_value() && !output_mask[1],
        "add_delta takes the whole input gradient through weight + delta_W: it needs weight and leaves " "grad_u (output_mask[1]) out");
    TORCH_CHECK(merged_weight_allowed(a, grad_out),
                "add_delta needs one adapter (no adapter_idx) and float32 or " "float64 data, got grad_out of dtype ",
                grad_out.scalar_type());
  }
  Tensor grad_x;
  if (output_mask[0]) grad_x = at::mm(grad_out, add_delta ? merged_weight<P>(a, *weight) : *weight);
  AdapterGrads g = adapter_grads<P>(grad_out, u, a, output_mask[1], output_mask[2], output_mask[3]);
  return {or_empty(grad_x, grad_out), or_empty(g.gh, grad_out), or_empty(g.grad_ld, grad_out),
          or_empty(g.grad_lb, grad_out)};
}

inline void check_merge_args(const AdapterArgs& a) {
  TORCH_CHECK(a.A.dim() == 2, "A must be 2-D (r, in_features), got shape ", a.A.sizes());
  TORCH_CHECK(
      a.A.scalar_type() != at::kDouble || a.A.device().is_cpu(),
      "A may be float64 only on the CPU (the CUDA kernels are float32, float16 and bfloat16), got A of dtype " "float64 on ",
      a.A.device());
  TORCH_CHECK(a.B.dim() == 2, "B must be 2-D (out_features, r), got shape ", a.B.sizes());
  // B and the lambdas are checked against a stand-in activation of A's device and dtype.
  Tensor probe = at::empty({0, a.A.size(1)}, a.A.options());
  check_adapter(a, probe, "A", a.A.size(1), a.B.size(0));
}

template <class P>
Tensor vera_delta_weight(const Tensor& A, const Tensor& B, const Tensor& lambda_d, const Tensor& lambda_b,
                         bool fan_in_fan_out, at::ScalarType dtype) {
  const AdapterArgs a{A, B, lambda_d, lambda_b, c10::nullopt};
  check_merge_args(a);
  TORCH_CHECK(at::isFloatingType(dtype), "dtype must be a floating point type, got ", dtype);
  Tensor delta = delta_weight_opmath<P>(a);
  if (fan_in_fan_out) delta = delta.t();
  return delta.to(dtype, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
}

// True when every merged value is sure to be finite, from five max-abs reductions (no O x I work): with
// T = r max|lambda_b| max|B| max|lambda_d| max|A|, every fp32 (or fp64) partial sum of delta_W[o, i] is at most
// T (1 + u)^(r + 2) <= 1.07 T (u = 2^-24, r < 2^20), so |w + alpha d| before the final rounding is below
// (max|W| + 1.07 |alpha| T)(1 + u)^3, and a value that far below the largest finite value of weight's dtype rounds to
// a finite one. A NaN or inf anywhere makes the maxima non-finite and the answer false; so does a bound too close to
// the limit, where the exact check (each value recomputed, tile by tile) decides instead. The five maxima (exact:
// a maximum of absolute values) come from P::max_abs: on CUDA two small launches and one device-to-host read.
template <class P>
bool merge_provably_finite(const Tensor& weight, const AdapterArgs& a, double alpha) {
  const int64_t r = a.A.size(0);
  if (r >= (int64_t(1) << 20)) return false;
  const std::vector<Tensor> operands{weight, a.A, a.B, a.lambda_d, a.lambda_b};
  for (const Tensor& t : operands) {
    if (t.numel() == 0) return false;  // nothing to bound: the exact check (cheap then)
  }
  const std::vector<double> m = P::max_abs(operands);
  const double w_max = m[0], a_max = m[1], b_max = m[2];
  const double bound = double(r) * b_max * m[4] * m[3] * a_max;
  const double limit = weight.scalar_type() == at::kHalf       ? 65504.0
                       : weight.scalar_type() == at::kBFloat16 ? 3.3895313892515355e38
                       : weight.scalar_type() == at::kFloat    ? 3.4028234663852886e38
                                                               : 1.7976931348623157e308;
  const double merged = (w_max + 1.07 * std::abs(alpha) * bound) * 1.001;
  return std::isfinite(merged) && merged < limit && bound * 1.07 < 3.4e38;  // no fp32 overflow inside the sums
}

template <class P>
void vera_merge_(Tensor& weight, const Tensor& A, const Tensor& B, const Tensor& lambda_d, const Tensor& lambda_b,
                 double alpha, bool fan_in_fan_out, bool safe) {
  const AdapterArgs a{A, B, lambda_d, lambda_b, c10::nullopt};
  check_merge_args(a);
  // The merge is not differentiable; the ATen calls below (reductions, the CPU tiles' products) must not record
  // autograd history for lambdas that require grad (out= variants refuse them).
  const at::NoGradGuard no_grad;
  const int64_t out_f = B.size(0), in_f = A.size(1);
  TORCH_CHECK(weight.device() == A.device(), "weight must be on the device of A (", A.device(), "), got ",
              weight.device());
  const at::ScalarType wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kHalf || wt == at::kBFloat16 || wt == at::kDouble,
              "weight must be float32, float16, bfloat16 or float64, got ", wt);
  TORCH_CHECK(
      wt != at::kDouble || weight.device().is_cpu(),
      "weight may be float64 only on the CPU (the CUDA merge kernel is float32, float16 and bfloat16), got " "weight of dtype float64 on ",
      weight.device());
  const std::array<int64_t, 2> expected =
      fan_in_fan_out ? std::array<int64_t, 2>{in_f, out_f} : std::array<int64_t, 2>{out_f, in_f};
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == expected[0] && weight.size(1) == expected[1],
              "weight must have shape (", expected[0], ", ", expected[1], ") ",
              fan_in_fan_out ? "(in_features, out_features) with fan_in_fan_out" : "(out_features, in_features)",
              ", got ", weight.sizes());
  // delta_W is never formed whole: merge_apply computes it tile by tile (docs/DESIGN.md §2.3). A safe merge whose
  // finiteness the bound proves skips the check pass (a second computation of every tile).
  const bool check_first = safe && !merge_provably_finite<P>(weight, a, alpha);
  P::merge_apply(weight, a, alpha, fan_in_fan_out, check_first);
}

}  // namespace vera
