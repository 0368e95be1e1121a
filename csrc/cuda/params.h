// Plain parameter structs for the VeRA kernels: raw pointers, sizes and strides (in elements, 64-bit), no
// torch types. KernelPrims (kernel_prims.h) fills them from tensors; the launchers (launchers.h) and kernels
// receive them by value.
#pragma once

#include <cstdint>

namespace vera::cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// out[i, j] = lam[i] * in[i, j] * col_lam[j] (col_lam nullable: 1); out (rows, cols) contiguous, in out_dtype
// (== in_dtype or F32). With both lambdas this folds diag(lambda_b) B diag(lambda_d) into one operand.
struct RowScaleParams {
  const void* in;
  int64_t in_row_stride;
  const float* lam;      // (rows)
  const float* col_lam;  // (cols) or null
  void* out;
  int64_t rows, cols;
  DType in_dtype, out_dtype;
};

// out[n, j] = in[n, j] * lam[a(n), j] (0 where a(n) < 0); a(n) = idx ? idx[n] : 0. out contiguous.
struct ColScaleParams {
  const void* in;
  int64_t in_row_stride;
  const float* lam;    // (num_adapters, cols) contiguous
  const int64_t* idx;  // nullable
  void* out;
  int64_t rows, cols;
  DType dtype;
};

// out[n, j] = base[n, j] + lam[a(n), j] * z[n, j]; out may alias base. z is fp32 (the GEMM's unrounded output).
struct ScaleAddParams {
  const void* base;
  int64_t base_row_stride;
  const float* z;
  int64_t z_row_stride;
  const float* lam;
  const int64_t* idx;  // nullable
  void* out;
  int64_t out_row_stride;
  int64_t rows, cols;
  DType dtype;
};

// out[k, j] = sum over rows n with a(n) = k of p[n, j] * q[n, j], fp32, in a fixed order; p in `dtype`, q fp32 (a
// GEMM's unrounded output). Rows come grouped by adapter: adapter k's rows are order[bounds[k]] ..
// order[bounds[k + 1] - 1], ascending (a stable sort of the indices), so a block reads only its adapter's rows
// (without an index: order null, bounds null, every row is adapter 0's). Each segment is cut into `splits`
// contiguous chunks whose partial sums (workspace, splits x num_adapters x cols) are added in order.
struct ColDotReduceParams {
  const void* p;
  int64_t p_row_stride;
  const float* q;
  int64_t q_row_stride;
  const int64_t* order;   // (rows) row numbers grouped by adapter, or null
  const int64_t* bounds;  // (num_adapters + 1) segment starts into order, or null
  float* workspace;       // splits * num_adapters * cols floats (unused when splits == 1)
  float* out;             // (num_adapters, cols)
  int64_t rows, cols, num_adapters;
  int splits;
  DType dtype;
};

// Both lambda gradients of one adapter from q = grad_out^T u (out_f, r), fp32, read once:
//   grad_lb[o] = sum_k lambda_d[k] B[o, k] q[o, k],   grad_ld[k] = sum_o lambda_b[o] B[o, k] q[o, k].
// Blocks take (column chunk x, row chunk y); their partial sums (ws_b: col_chunks x out_f, ws_d: row_chunks x r) are
// added in a fixed order by the finish kernel, so the result does not depend on scheduling.
struct LambdaGradsParams {
  const float* q;  // (out_f, r) contiguous
  const void* B;   // (out_f, r)
  int64_t b_row_stride;
  const float* lambda_d;  // (r)
  const float* lambda_b;  // (out_f)
  float* ws_b;            // col_chunks * out_f
  float* ws_d;            // row_chunks * r
  float* grad_ld;         // (r)
  float* grad_lb;         // (out_f)
  int64_t out_f, r;
  int col_chunks, row_chunks;
  DType dtype;
};

// weight[o * w_stride_o + i * w_stride_i] += alpha * delta[o, i], rounded once (weight is (out, in), or (in, out)
// with fan_in_fan_out: the strides say which), where delta = diag(lambda_b) B diag(lambda_d) A is never stored:
//   delta[o, i] = sum over k = 0, ..., r - 1 (in that order, fused multiply-adds in fp32) of
//                 (lambda_b[o] * B[o, k]) * (lambda_d[k] * A[k, i])     (each factor an fp32 product)
// A (r, in_f) and B (out_f, r) with any strides, in proj_dtype; lambdas fp32 contiguous. With check_only, nothing
// is written and *nonfinite is set to 1 if any merged value (rounded to weight's dtype) is not finite.
struct MergeParams {
  void* weight;
  int64_t w_stride_o, w_stride_i;
  const void* A;
  int64_t a_stride_k, a_stride_i;
  const void* B;
  int64_t b_stride_o, b_stride_k;
  const float* lambda_d;  // (r)
  const float* lambda_b;  // (out_f)
  int64_t out_f, in_f, r;
  float alpha;
  int* nonfinite;    // read only with check_only (may be null otherwise)
  DType dtype;       // weight's
  DType proj_dtype;  // A's and B's
};

// The largest |value| of each of up to kMaxAbsTensors tensors, in two launches (the safe merge's finiteness bound):
// block b of pass 1 writes partial[t * blocks + b] = max |data[t][i]| over its share of tensor t (+inf where a value
// is NaN or infinite), pass 2 (a programmatic dependent of pass 1) writes maxima[t], the maximum of tensor t's
// partials. Each tensor is numel[t] values of dtype[t] stored densely from data[t] (in any order: the maximum does
// not depend on it).
constexpr int kMaxAbsTensors = 5;
struct MaxAbsParams {
  const void* data[kMaxAbsTensors];
  int64_t numel[kMaxAbsTensors];
  DType dtype[kMaxAbsTensors];
  int count;       // tensors given, 1..kMaxAbsTensors
  float* partial;  // (count, blocks) fp32 workspace, contiguous
  int blocks;      // pass 1's grid (max_abs_blocks)
  float* maxima;   // (count) fp32
};

// Fused small-N forward (decode, serving), n <= kDecodeMaxRows:
//   pass 1, over the rows k of A: u[n, k] = A_k . x_n;  h[n, k] = u[n, k] * lambda_d[a(n), k]  (rounded to the
//                                    data dtype like u, held in an fp32 workspace)
//   pass 2, over the outputs o:     y[n, o] = (W_o . x_n + bias[o]  or  base[n, o]) + lambda_b[a(n), o] * (B_o . h_n)
// Every row of A, W and B is read once, for all n, with 16-byte loads where the rows are 16-byte aligned.
constexpr int kDecodeMaxRows = 32;
struct DecodeParams {
  const void* x;
  int64_t x_row_stride;
  const void* weight;  // (out_f, in_f) or null: then base is given
  int64_t w_row_stride;
  const void* bias;  // (out_f) or null
  const void* base;  // (n, out_f) or null
  int64_t base_row_stride;
  const void* A;  // (r, in_f)
  int64_t a_row_stride;
  const void* B;  // (out_f, r)
  int64_t b_row_stride;
  const float* lambda_d;  // (num_adapters, r)
  const float* lambda_b;  // (num_adapters, out_f)
  const int64_t* idx;     // nullable; each entry in [-1, num_adapters), checked by the kernels (a device-side assert)
  int64_t num_adapters;   // rows of lambda_d and lambda_b
  void* u;                // (n, r), contiguous
  float* h;               // (n, r) fp32 workspace, contiguous
  void* y;                // (n, out_f), contiguous
  int64_t n, in_f, out_f, r;
  DType dtype;
};

}  // namespace vera::cuda
