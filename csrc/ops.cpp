// Every vera_ext operator schema, in one place. Semantics and shapes are documented in vera_ext/ops.py;
// the math is docs/DESIGN.md §2. Backends register implementations in csrc/cpu and csrc/cuda.
//
// Shapes: x (N, I); A (r, I) and B (O, r) are slices of the shared projection taken by stride (A[:r, :I],
// B[:O, :r]); without adapter_idx lambda_d is (r) and lambda_b is (O); with adapter_idx (N, int64, -1 = no
// adapter) they are stacked per adapter: lambda_d (num_adapters, r), lambda_b (num_adapters, O).
#include <torch/library.h>

TORCH_LIBRARY(vera_ext, m) {
  // y = base_out + lambda_b * ((u * lambda_d) @ B^T), u = x @ A^T. Returns (y, u); u is saved for backward.
  m.def(
      "vera_forward(Tensor x, Tensor base_out, Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, " "Tensor? adapter_idx=None) -> (Tensor, Tensor)");
  // Same with the base layer fused in: base_out = x @ weight^T + bias.
  m.def(
      "vera_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor lambda_d, " "Tensor lambda_b, Tensor? adapter_idx=None) -> (Tensor, Tensor)");
  // Gradients of the adapter term given grad_out (N, O) and the saved u (N, r): (grad_x, grad_lambda_d,
  // grad_lambda_b). With weight, grad_x also holds the plain-Linear base term grad_out @ weight. Entries whose
  // output_mask is false come back as empty tensors.
  m.def(
      "vera_backward(Tensor grad_out, Tensor u, Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, " "Tensor? adapter_idx, Tensor? weight, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The training form (docs/DESIGN.md §2.7): u = x @ A^T computed once for every layer that reads x with this A.
  m.def("vera_project(Tensor x, Tensor A) -> Tensor");
  // y = base_out + lambda_b * ((u * lambda_d) @ B^T) from a given u (N, r); its gradient goes to u, not through A.
  m.def(
      "vera_apply(Tensor u, Tensor base_out, Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, " "Tensor? adapter_idx=None) -> Tensor");
  // The same with the base layer fused in. merged says which passes of a training step run through W + delta_W:
  // "none", "forward" (y = x @ (W + delta_W)^T + bias), "backward" (grad_x, formed there), "both" (formed in each),
  // or "kept": formed in the forward and returned as the second output for the backward (once per step). The second
  // output is empty otherwise.
  m.def(
      "vera_linear_apply(Tensor x, Tensor u, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor lambda_d, " "Tensor lambda_b, Tensor? adapter_idx=None, str merged=\"none\") -> (Tensor, Tensor)");
  // (grad_x, grad_u, grad_lambda_d, grad_lambda_b) of the apply ops: grad_x = grad_out @ weight, the base term;
  // the whole input gradient when weight is the W + delta_W a merged forward kept, or with add_delta, where it is
  // grad_out @ (weight + delta_W) with delta_W formed here (grad_u is then not asked for). grad_u = dL/du.
  // Entries whose output_mask is false come back empty.
  m.def(
      "vera_apply_backward(Tensor grad_out, Tensor u, Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, " "Tensor? adapter_idx, Tensor? weight, bool add_delta, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // delta_W = diag(lambda_b) B diag(lambda_d) A, (O, I), or (I, O) with fan_in_fan_out; computed in the op-math
  // dtype (fp32, fp64 for fp64), cast once.
  m.def(
      "vera_delta_weight(Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, bool fan_in_fan_out, " "ScalarType dtype) -> Tensor");
  // weight += alpha * delta_W in place (alpha = 1 merges, -1 unmerges), accumulated in fp32, rounded once.
  // With safe, every merged value is checked for finiteness first and weight is left untouched on failure.
  m.def(
      "vera_merge_(Tensor(a!) weight, Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, float alpha, " "bool fan_in_fan_out, bool safe) -> ()");
}
