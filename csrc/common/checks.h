// Argument validation shared by every backend: each failure names the argument, what it got (shape, dtype,
// device) and what was expected. Backends call these before touching data, so a refused call changes nothing.
#pragma once

#include <ATen/ATen.h>

namespace vera {

// The adapter's operands, validated together. `ref` is the activation (x, or grad_out in backward) whose
// device and dtype the projection slices must share.
struct AdapterArgs {
  const at::Tensor& A;                           // (r, I)
  const at::Tensor& B;                           // (O, r)
  const at::Tensor& lambda_d;                    // (r) or (num_adapters, r)
  const at::Tensor& lambda_b;                    // (O) or (num_adapters, O)
  const c10::optional<at::Tensor>& adapter_idx;  // (N) int64 or none
};

// The dtype the math runs in and the lambdas are kept in: fp32, or fp64 for fp64 data (gradcheck).
inline at::ScalarType opmath_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Checks A/B/lambda/adapter_idx against x (N, in_features) producing (N, out_features). The projection slices
// must have x's dtype (cast once and reuse: the layer caches that cast); the lambdas are in opmath_dtype(x).
void check_adapter(const AdapterArgs& a, const at::Tensor& x, const char* x_name, int64_t in_features,
                   int64_t out_features);

// x must be 2-D floating point (fp32/fp16/bf16, or fp64 on the CPU).
void check_activation(const at::Tensor& t, const char* name);

// t must be 2-D of the given shape, on ref's device, with ref's dtype.
void check_like(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& ref,
                const char* ref_name);

// Number of adapters the lambdas hold: 1 without adapter_idx, else lambda_d.size(0).
int64_t num_adapters(const AdapterArgs& a);

}  // namespace vera
