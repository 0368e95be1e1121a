#include "cuda/prims_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launchers.h"

namespace vera::cuda {
namespace {

using at::Tensor;

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "vera_ext CUDA kernels support float32, float16 and bfloat16, got ", t);
  }
}

// Rows contiguous, any row stride: projection slices (A[:r, :I], B[:O, :r]) are read in place.
Tensor rows_contiguous(const Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

const int64_t* idx_ptr(const c10::optional<Tensor>& idx) {
  return idx.has_value() ? idx->const_data_ptr<int64_t>() : nullptr;
}

cudaStream_t stream() {
  return at::cuda::getCurrentCUDAStream().stream();
}

}  // namespace

Tensor Prims::row_scale(const Tensor& in_, const Tensor& lam_, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(in_.device());
  const Tensor in = rows_contiguous(in_), lam = lam_.contiguous();
  Tensor out = at::empty(in.sizes(), in.options().dtype(dtype));
  const RowScaleParams p{in.const_data_ptr(), in.stride(0), lam.const_data_ptr<float>(), out.data_ptr(),
                         in.size(0),          in.size(1),   dtype_of(in.scalar_type()),  dtype_of(dtype)};
  C10_CUDA_CHECK(launch_row_scale(p, stream()));
  return out;
}

Tensor Prims::col_scale(const Tensor& in_, const Tensor& lam_, const c10::optional<Tensor>& idx) {
  const c10::cuda::CUDAGuard guard(in_.device());
  const Tensor in = rows_contiguous(in_), lam = lam_.contiguous();
  Tensor out = at::empty({in.size(0), in.size(1)}, in.options());
  const ColScaleParams p{in.const_data_ptr(), in.stride(0), lam.const_data_ptr<float>(), idx_ptr(idx),
                         out.data_ptr(),      in.size(0),   in.size(1),                  dtype_of(in.scalar_type())};
  C10_CUDA_CHECK(launch_col_scale(p, stream()));
  return out;
}

void Prims::scale_add(Tensor& out, const Tensor& base_, const Tensor& z_, const Tensor& lam_,
                      const c10::optional<Tensor>& idx) {
  const c10::cuda::CUDAGuard guard(out.device());
  TORCH_INTERNAL_ASSERT(out.stride(1) == 1 || out.size(1) <= 1);
  const Tensor base = rows_contiguous(base_), z = rows_contiguous(z_), lam = lam_.contiguous();
  const ScaleAddParams p{base.const_data_ptr(), base.stride(0), z.const_data_ptr(), z.stride(0),
                         lam.const_data_ptr<float>(), idx_ptr(idx), out.data_ptr(), out.stride(0),
                         out.size(0), out.size(1), dtype_of(out.scalar_type())};
  C10_CUDA_CHECK(launch_scale_add(p, stream()));
}

Tensor Prims::col_dot_reduce(const Tensor& p_, const Tensor& q_, const c10::optional<Tensor>& idx,
                             int64_t num_adapters) {
  const c10::cuda::CUDAGuard guard(p_.device());
  const Tensor p = rows_contiguous(p_), q = rows_contiguous(q_);
  const int64_t rows = p.size(0), cols = p.size(1);
  TORCH_CHECK(num_adapters <= 65535, "vera_ext CUDA: at most 65535 adapters in one mixed batch, got ", num_adapters);
  Tensor out = at::empty({num_adapters, cols}, p.options().dtype(at::kFloat));
  const int splits = col_dot_reduce_splits(rows, cols, num_adapters);
  Tensor workspace = at::empty({splits > 1 ? splits * num_adapters * cols : 0}, out.options());
  const ColDotReduceParams params{p.const_data_ptr(), p.stride(0), q.const_data_ptr(), q.stride(0), idx_ptr(idx),
                                  workspace.data_ptr<float>(), out.data_ptr<float>(), rows, cols, num_adapters,
                                  splits, dtype_of(p.scalar_type())};
  C10_CUDA_CHECK(launch_col_dot_reduce(params, stream()));
  return out;
}

Tensor Prims::row_dot(const Tensor& p_, const Tensor& q_) {
  const c10::cuda::CUDAGuard guard(p_.device());
  const Tensor p = rows_contiguous(p_), q = rows_contiguous(q_);
  TORCH_INTERNAL_ASSERT(p.scalar_type() == q.scalar_type() && p.sizes() == q.sizes());
  Tensor out = at::empty({p.size(0)}, p.options().dtype(at::kFloat));
  const RowDotParams params{p.const_data_ptr(), p.stride(0), q.const_data_ptr(), q.stride(0), out.data_ptr<float>(),
                            p.size(0), p.size(1), dtype_of(p.scalar_type())};
  C10_CUDA_CHECK(launch_row_dot(params, stream()));
  return out;
}

void Prims::merge_apply(Tensor& weight, const Tensor& delta_, double alpha, bool transposed, bool safe) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const Tensor delta = delta_.contiguous();
  Tensor flag = at::zeros({1}, weight.options().dtype(at::kInt));
  MergeParams p{weight.data_ptr(), transposed ? weight.stride(1) : weight.stride(0),
                transposed ? weight.stride(0) : weight.stride(1), delta.const_data_ptr<float>(), delta.size(0),
                delta.size(1), static_cast<float>(alpha), flag.data_ptr<int>(), dtype_of(weight.scalar_type())};
  if (safe) {
    C10_CUDA_CHECK(launch_merge(p, /*check_only=*/true, stream()));
    TORCH_CHECK_VALUE(flag.item<int>() == 0, "safe merge refused: the merged weight would hold non-finite values "
                                             "(the adapter seems to be broken); weight left unchanged");
  }
  C10_CUDA_CHECK(launch_merge(p, /*check_only=*/false, stream()));
}

std::tuple<Tensor, Tensor> Prims::decode_forward(const Tensor& x_, const c10::optional<Tensor>& weight_,
                                                 const c10::optional<Tensor>& bias_, const c10::optional<Tensor>& base_,
                                                 const AdapterArgs& a) {
  static_assert(kDecodeMaxRows == vera::cuda::kDecodeMaxRows, "one decode row limit");
  const c10::cuda::CUDAGuard guard(x_.device());
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
                       idx_ptr(a.adapter_idx),
                       u.data_ptr(),
                       h.data_ptr<float>(),
                       y.data_ptr(),
                       n,
                       in_f,
                       out_f,
                       r,
                       dtype_of(x.scalar_type())};
  C10_CUDA_CHECK(launch_decode(p, stream()));
  return {y, u};
}

void Prims::check_adapter_idx(const Tensor& idx, int64_t num_adapters) {
  // Reading the range back synchronizes (once: min and max come back together); under CUDA-graph capture that is
  // impossible, and the caller, which built the indices, is trusted.
  if (idx.numel() == 0 || c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
  const auto [lo, hi] = at::aminmax(idx);
  const Tensor range = at::stack({lo, hi}).cpu();
  const int64_t lo_v = range[0].item<int64_t>(), hi_v = range[1].item<int64_t>();
  TORCH_CHECK(lo_v >= -1 && hi_v < num_adapters, "adapter_idx holds values in [", lo_v, ", ", hi_v,
              "]: expected -1 (no adapter) or an adapter index in [0, ", num_adapters, ")");
}

}  // namespace vera::cuda
