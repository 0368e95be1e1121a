// CPU loops for the element-wise and reduction steps of VeRA (contract in common/vera_impl.h).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/checks.h"

namespace vera::cpu {

// The most memory a CPU merge allocates besides weight (docs/DESIGN.md §2.3).
constexpr int64_t kMergeWorkspaceBytes = int64_t(16) << 20;

struct Prims {
  // Up to this many rows, forward runs the fused decode path (decode_cpu.cpp). Measured at I = O = 1024, r = 256,
  // fp32, 2 threads, weights out of cache (12 layers sharing one projection): the fused pass beats the GEMM path
  // up to N = 4 (0.53 against 0.67 ms a layer) and loses from N = 8 (0.83 against 0.69; at N = 16 1.15 against
  // 0.80): MKL's GEMM reuses each weight row over more rows than the pass's four.
  static constexpr int64_t kDecodeMaxRows = 4;
  // decode_forward relies on check_adapter_idx (a host loop here: no synchronization to save).
  static constexpr bool kDecodeChecksIdx = false;
  // (y, u) for x (N <= kDecodeMaxRows, I): y = (weight ? x W^T + bias : base) + lambda_b * ((u * lambda_d) B^T).
  static std::tuple<at::Tensor, at::Tensor> decode_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                           const c10::optional<at::Tensor>& bias,
                                                           const c10::optional<at::Tensor>& base, const AdapterArgs& a);
  // a @ b in op math: ATen's CPU GEMM has no wider output, so the operands are widened first.
  static at::Tensor mm_opmath(const at::Tensor& a, const at::Tensor& b) {
    const at::ScalarType acc = opmath_dtype(a.scalar_type());
    return at::mm(a.to(acc), b.to(acc));
  }
  static at::Tensor row_scale(const at::Tensor& in, const at::Tensor& lam, at::ScalarType dtype,
                              const c10::optional<at::Tensor>& col_lam = c10::nullopt);
  static at::Tensor col_scale(const at::Tensor& in, const at::Tensor& lam, const c10::optional<at::Tensor>& idx);
  static void scale_add(at::Tensor& out, const at::Tensor& base, const at::Tensor& z, const at::Tensor& lam,
                        const c10::optional<at::Tensor>& idx);
  static at::Tensor col_dot_reduce(const at::Tensor& p, const at::Tensor& q, const c10::optional<at::Tensor>& idx,
                                   int64_t num_adapters);
  static std::tuple<at::Tensor, at::Tensor> lambda_grads(const at::Tensor& q, const at::Tensor& B,
                                                         const at::Tensor& lambda_d, const at::Tensor& lambda_b);
  // weight (+)= alpha * delta_W tile by tile (contract in common/vera_impl.h), in at most kMergeWorkspaceBytes.
  static void merge_apply(at::Tensor& weight, const AdapterArgs& a, double alpha, bool transposed, bool check_first);
  // max |t| of each tensor as a double (+inf when one holds a NaN or an inf).
  static std::vector<double> max_abs(const std::vector<at::Tensor>& tensors);
  static void check_adapter_idx(const at::Tensor& idx, int64_t num_adapters);
};

}  // namespace vera::cpu
