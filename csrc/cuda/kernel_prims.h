// VeRA's element-wise and reduction steps (contract in common/vera_impl.h) over the kernels of csrc/cuda: tensors
// become params structs, launched through a launch policy. The real build uses CudaLaunch (prims_cuda.h: device
// guard, current stream, C10_CUDA_CHECK); the emulated test library uses the same code with an emulated launch, so
// the params filling is tested on the CPU too.
//
// A launch policy L provides: L::Guard (constructed from the tensors' device), L::stream(), L::check(err, what),
// L::capturing() (true while a CUDA graph is being captured) and L::clear_partials(t) (zeroes a partials workspace
// where a launch may skip blocks: the emulated trace's sampling).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/layout.h"
#include "cuda/launchers.h"

namespace vera::cuda {

namespace detail {

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "vera_ext CUDA kernels support float32, float16 and bfloat16, got ", t);
  }
}

inline const int64_t* idx_ptr(const c10::optional<at::Tensor>& idx) {
  return idx.has_value() ? idx->const_data_ptr<int64_t>() : nullptr;
}

}  // namespace detail

template <class L>
struct KernelPrims {
  using Tensor = at::Tensor;
  using OptTensor = c10::optional<Tensor>;

  // Up to this many rows, forward runs the fused decode kernels (decode_kernels.cu).
  static constexpr int64_t kDecodeMaxRows = vera::cuda::kDecodeMaxRows;
  // The decode kernels check adapter_idx themselves, on the device (DecodeParams::idx): no host read on that path.
  static constexpr bool kDecodeChecksIdx = true;

  // a @ b in fp32 from fp16/bf16 operands: cuBLAS writes its fp32 accumulator (ATen's mm.dtype), so nothing is
  // rounded to the data dtype and the operands are not widened first.
  static Tensor mm_opmath(const Tensor& a, const Tensor& b) {
    if (a.scalar_type() == at::kFloat) return at::mm(a, b);
    return at::mm(a, b, at::kFloat);
  }

  static Tensor row_scale(const Tensor& in_, const Tensor& lam_, at::ScalarType dtype,
                          const OptTensor& col_lam_ = c10::nullopt) {
    const typename L::Guard guard(in_.device());
    const Tensor in = rows_contiguous(in_), lam = lam_.contiguous();
    const Tensor col_lam = col_lam_.has_value() ? col_lam_->contiguous() : Tensor();
    Tensor out = at::empty(in.sizes(), in.options().dtype(dtype));
    const RowScaleParams p{in.const_data_ptr(),
                           in.stride(0),
                           lam.const_data_ptr<float>(),
                           col_lam.defined() ? col_lam.const_data_ptr<float>() : nullptr,
                           out.data_ptr(),
                           in.size(0),
                           in.size(1),
                           detail::dtype_of(in.scalar_type()),
                           detail::dtype_of(dtype)};
    L::check(launch_row_scale(p, L::stream()), "row_scale");
    return out;
  }

  static Tensor col_scale(const Tensor& in_, const Tensor& lam_, const OptTensor& idx) {
    const typename L::Guard guard(in_.device());
    const Tensor in = rows_contiguous(in_), lam = lam_.contiguous();
    Tensor out = at::empty({in.size(0), in.size(1)}, in.options());
    const ColScaleParams p{
        in.const_data_ptr(), in.stride(0), lam.const_data_ptr<float>(),       detail::idx_ptr(idx), out.data_ptr(),
        in.size(0),          in.size(1),   detail::dtype_of(in.scalar_type())};
    L::check(launch_col_scale(p, L::stream()), "col_scale");
    return out;
  }

  static void scale_add(Tensor& out, const Tensor& base_, const Tensor& z_, const Tensor& lam_, const OptTensor& idx) {
    const typename L::Guard guard(out.device());
    TORCH_CHECK(out.stride(1) == 1 || out.size(1) <= 1, "scale_add: out must have contiguous rows");
    const Tensor base = rows_contiguous(base_), z = rows_contiguous(z_), lam = lam_.contiguous();
    TORCH_INTERNAL_ASSERT(z.scalar_type() == at::kFloat, "scale_add: z must be the fp32 output of the GEMM");
    const ScaleAddParams p{base.const_data_ptr(),
                           base.stride(0),
                           z.const_data_ptr<float>(),
                           z.stride(0),
                           lam.const_data_ptr<float>(),
                           detail::idx_ptr(idx),
                           out.data_ptr(),
                           out.stride(0),
                           out.size(0),
                           out.size(1),
                           detail::dtype_of(out.scalar_type())};
    L::check(launch_scale_add(p, L::stream()), "scale_add");
  }

  // splits <= 0: the launcher's own choice (col_dot_reduce_splits); tests force other counts.
  static Tensor col_dot_reduce(const Tensor& p_, const Tensor& q_, const OptTensor& idx, int64_t num_adapters,
                               int64_t splits = 0) {
    const typename L::Guard guard(p_.device());
    const Tensor p = rows_contiguous(p_), q = rows_contiguous(q_);
    TORCH_INTERNAL_ASSERT(q.scalar_type() == at::kFloat, "col_dot_reduce: q must be fp32");
    const int64_t rows = p.size(0), cols = p.size(1);
    TORCH_CHECK(num_adapters <= 65535, "vera_ext CUDA: at most 65535 adapters in one mixed batch, got ", num_adapters);
    // Rows grouped by adapter on the device (no host read): a stable sort keeps each adapter's rows ascending, and
    // bounds[k] = the first position holding adapter k or a later one. Rows without adapter (-1) sort first and
    // fall in no segment.
    Tensor order, bounds;
    if (idx.has_value()) {
      Tensor sorted;
      std::tie(sorted, order) = at::sort(*idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      bounds = at::searchsorted(sorted, at::arange(num_adapters + 1, idx->options()));
    }
    const int s = splits > 0 ? static_cast<int>(splits) : col_dot_reduce_splits(rows, cols, num_adapters);
    Tensor out = at::empty({num_adapters, cols}, p.options().dtype(at::kFloat));
    Tensor workspace = at::empty({s > 1 ? s * num_adapters * cols : 0}, out.options());
    const ColDotReduceParams params{p.const_data_ptr(),
                                    p.stride(0),
                                    q.const_data_ptr<float>(),
                                    q.stride(0),
                                    order.defined() ? order.const_data_ptr<int64_t>() : nullptr,
                                    bounds.defined() ? bounds.const_data_ptr<int64_t>() : nullptr,
                                    workspace.data_ptr<float>(),
                                    out.data_ptr<float>(),
                                    rows,
                                    cols,
                                    num_adapters,
                                    s,
                                    detail::dtype_of(p.scalar_type())};
    L::check(launch_col_dot_reduce(params, L::stream()), "col_dot_reduce");
    return out;
  }

  // (grad_lambda_d (r), grad_lambda_b (out_f)) of one adapter from q = grad_out^T u (out_f, r) in fp32.
  static std::tuple<Tensor, Tensor> lambda_grads(const Tensor& q_, const Tensor& B_, const Tensor& lambda_d_,
                                                 const Tensor& lambda_b_) {
    const typename L::Guard guard(q_.device());
    const Tensor q = q_.contiguous(), B = rows_contiguous(B_);
    const Tensor ld = lambda_d_.contiguous(), lb = lambda_b_.contiguous();
    TORCH_INTERNAL_ASSERT(q.scalar_type() == at::kFloat && q.sizes() == B.sizes());
    const int64_t out_f = q.size(0), r = q.size(1);
    int col_chunks = 0, row_chunks = 0;
    lambda_grads_chunks(out_f, r, &col_chunks, &row_chunks);
    const auto opts = q.options();
    Tensor ws_b = at::empty({col_chunks * out_f}, opts), ws_d = at::empty({row_chunks * r}, opts);
    Tensor grad_ld = at::empty({r}, opts), grad_lb = at::empty({out_f}, opts);
    const LambdaGradsParams p{q.const_data_ptr<float>(),
                              B.const_data_ptr(),
                              B.stride(0),
                              ld.const_data_ptr<float>(),
                              lb.const_data_ptr<float>(),
                              ws_b.data_ptr<float>(),
                              ws_d.data_ptr<float>(),
                              grad_ld.data_ptr<float>(),
                              grad_lb.data_ptr<float>(),
                              out_f,
                              r,
                              col_chunks,
                              row_chunks,
                              detail::dtype_of(B.scalar_type())};
    L::check(launch_lambda_grads(p, L::stream()), "lambda_grads");
    return {grad_ld, grad_lb};
  }

  // max |t| of each tensor as a double (+inf when one holds a NaN or an inf), read back to the host: two small
  // launches (the second overlaps the first, PDL) and one device-to-host read, whatever the number of tensors.
  static std::vector<double> max_abs(const std::vector<Tensor>& tensors) {
    TORCH_INTERNAL_ASSERT(!tensors.empty() && tensors.size() <= size_t(kMaxAbsTensors), "max_abs: 1 to ",
                          kMaxAbsTensors, " tensors");
    const typename L::Guard guard(tensors[0].device());
    std::vector<Tensor> dense;  // keeps copies alive (a tensor that is not dense is copied, a rare case)
    MaxAbsParams p{};
    int64_t max_numel = 0;
    for (const Tensor& t : tensors) {
      dense.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
      const int i = p.count++;
      p.data[i] = dense.back().const_data_ptr();
      p.numel[i] = t.numel();
      p.dtype[i] = detail::dtype_of(t.scalar_type());
      max_numel = std::max(max_numel, t.numel());
    }
    p.blocks = max_abs_blocks(max_numel);
    const at::TensorOptions fp32 = tensors[0].options().dtype(at::kFloat);
    Tensor partial = at::empty({p.count, p.blocks}, fp32), maxima = at::empty({p.count}, fp32);
    L::clear_partials(partial);  // (a no-op on the GPU: see EmuLaunch)
    p.partial = partial.data_ptr<float>();
    p.maxima = maxima.data_ptr<float>();
    L::check(launch_max_abs(p, L::stream()), "max_abs");
    const Tensor host = maxima.to(at::kCPU);
    std::vector<double> out;
    for (int i = 0; i < p.count; ++i) out.push_back(host[i].item<double>());  // the first read waits for the kernels
    return out;
  }

  // One pass of the merge kernel over weight (the product tiles are computed in the kernel: no delta tensor, no
  // scaled copies of A or B); returns the non-finite flag, raised only by check_only. A and B are read through
  // their strides; only the lambdas are made contiguous (O + r floats).
  static int merge_pass(Tensor& weight, const AdapterArgs& a, double alpha, bool transposed, bool check_only) {
    const typename L::Guard guard(weight.device());
    const Tensor ld = a.lambda_d.contiguous(), lb = a.lambda_b.contiguous();
    // the flag only for the check pass (the write pass never touches it): no extra launch in a plain merge
    Tensor flag = check_only ? at::zeros({1}, weight.options().dtype(at::kInt)) : Tensor();
    const MergeParams p{weight.data_ptr(),
                        transposed ? weight.stride(1) : weight.stride(0),
                        transposed ? weight.stride(0) : weight.stride(1),
                        a.A.const_data_ptr(),
                        a.A.stride(0),
                        a.A.stride(1),
                        a.B.const_data_ptr(),
                        a.B.stride(0),
                        a.B.stride(1),
                        ld.const_data_ptr<float>(),
                        lb.const_data_ptr<float>(),
                        a.B.size(0),
                        a.A.size(1),
                        a.A.size(0),
                        static_cast<float>(alpha),
                        check_only ? flag.data_ptr<int>() : nullptr,
                        detail::dtype_of(weight.scalar_type()),
                        detail::dtype_of(a.A.scalar_type())};
    L::check(launch_merge(p, check_only, L::stream()), "merge");
    return check_only ? flag.item<int>() : 0;  // the one flag read (a sync), after the whole check pass
  }

  static void merge_apply(Tensor& weight, const AdapterArgs& a, double alpha, bool transposed, bool check_first) {
    if (check_first) {
      TORCH_CHECK_VALUE(
          merge_pass(weight, a, alpha, transposed, /*check_only=*/true) == 0,
          "safe merge refused: the merged weight would hold non-finite values (the adapter seems to " "be broken); weight left unchanged");
    }
    merge_pass(weight, a, alpha, transposed, /*check_only=*/false);
  }

  static std::tuple<Tensor, Tensor> decode_forward(const Tensor& x_, const OptTensor& weight_, const OptTensor& bias_,
                                                   const OptTensor& base_, const AdapterArgs& a) {
    const typename L::Guard guard(x_.device());
    const Tensor x = x_.contiguous(), A = rows_contiguous(a.A), B = rows_contiguous(a.B);
    const Tensor ld = a.lambda_d.contiguous(), lb = a.lambda_b.contiguous();
    const Tensor weight = weight_.has_value() ? rows_contiguous(*weight_) : Tensor();
    const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
    const Tensor base = base_.has_value() ? rows_contiguous(*base_) : Tensor();
    const int64_t n = x.size(0), in_f = x.size(1), r = ld.size(-1), out_f = B.size(0);
    Tensor u = at::empty({n, r}, x.options());
    Tensor h = at::empty({n, r}, x.options().dtype(at::kFloat));
    Tensor y = at::empty({n, out_f}, x.options());
    const DecodeParams p{x.const_data_ptr(),
                         x.stride(0),
                         weight.defined() ? weight.const_data_ptr() : nullptr,
                         weight.defined() ? weight.stride(0) : 0,
                         bias.defined() ? bias.const_data_ptr() : nullptr,
                         base.defined() ? base.const_data_ptr() : nullptr,
                         base.defined() ? base.stride(0) : 0,
                         A.const_data_ptr(),
                         A.stride(0),
                         B.const_data_ptr(),
                         B.stride(0),
                         ld.const_data_ptr<float>(),
                         lb.const_data_ptr<float>(),
                         detail::idx_ptr(a.adapter_idx),
                         num_adapters(a),
                         u.data_ptr(),
                         h.data_ptr<float>(),
                         y.data_ptr(),
                         n,
                         in_f,
                         out_f,
                         r,
                         detail::dtype_of(x.scalar_type())};
    L::check(launch_decode(p, L::stream()), "decode");
    return {y, u};
  }

  static void check_adapter_idx(const Tensor& idx, int64_t num_adapters) {
    if (idx.numel() == 0) return;
    if (L::capturing()) {
      // Reading the range back would synchronize, which a CUDA graph capture forbids. The check runs on the device
      // instead: a failed device assert stops the stream before any kernel reads a lambda row out of bounds, and
      // the error surfaces at the next synchronization (of the capture or of each replay).
      at::_assert_async(
          at::logical_and(idx.ge(-1), idx.lt(num_adapters)).all(),
          "vera_ext: adapter_idx holds a value outside [-1, num_adapters) (checked on the device " "during CUDA graph capture)");
      return;
    }
    const auto [lo, hi] = at::aminmax(idx);  // one read-back: min and max come back together
    const Tensor range = at::stack({lo, hi}).cpu();
    const int64_t lo_v = range[0].item<int64_t>(), hi_v = range[1].item<int64_t>();
    TORCH_CHECK(lo_v >= -1 && hi_v < num_adapters, "adapter_idx holds values in [", lo_v, ", ", hi_v,
                "]: expected -1 (no adapter) or an adapter index in [0, ", num_adapters, ")");
  }
};

}  // namespace vera::cuda
