// torch.ops.vera_emu: the CUDA kernel launchers of csrc/cuda, emulated on host threads, callable from pytest on
// CPU tensors. The params structs are filled from tensors exactly as csrc/cuda/prims_cuda.cpp fills them. The
// CPU reference primitives (csrc/cpu/prims_cpu.cpp, compiled into this test library) are exposed next to them
// as cpu_*, so a test runs the very same primitive on both sides. Test-only; never part of vera_ext.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

// After the torch headers: cuda_emu.h defines the CUDA qualifiers as macros.
#include "cpu/prims_cpu.h"
#include "cuda/launchers.h"
#include "testing/emu_selftest.h"
#include "testing/planted_faults.h"

namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;
using vera::cuda::DType;

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "the kernels support float32, float16 and bfloat16, got ", t);
  }
}

// As prims_cuda.cpp: rows contiguous, any row stride.
Tensor rows_contiguous(const Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

const int64_t* idx_ptr(const OptTensor& idx) {
  return idx.has_value() ? idx->const_data_ptr<int64_t>() : nullptr;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "emulated ", what, " failed: ", cudaGetErrorString(err), ": ",
              vera_emu::last_launch_error());
}

Tensor row_scale(const Tensor& in_, const Tensor& lam_, at::ScalarType dtype) {
  const Tensor in = rows_contiguous(in_), lam = lam_.contiguous();
  Tensor out = at::empty(in.sizes(), in.options().dtype(dtype));
  const vera::cuda::RowScaleParams p{in.const_data_ptr(), in.stride(0), lam.const_data_ptr<float>(), out.data_ptr(),
                                     in.size(0), in.size(1), dtype_of(in.scalar_type()), dtype_of(dtype)};
  check_launch(vera::cuda::launch_row_scale(p, nullptr), "row_scale");
  return out;
}

Tensor col_scale(const Tensor& in_, const Tensor& lam_, const OptTensor& idx) {
  const Tensor in = rows_contiguous(in_), lam = lam_.contiguous();
  Tensor out = at::empty({in.size(0), in.size(1)}, in.options());
  const vera::cuda::ColScaleParams p{in.const_data_ptr(), in.stride(0), lam.const_data_ptr<float>(), idx_ptr(idx),
                                     out.data_ptr(), in.size(0), in.size(1), dtype_of(in.scalar_type())};
  check_launch(vera::cuda::launch_col_scale(p, nullptr), "col_scale");
  return out;
}

void scale_add(Tensor out, const Tensor& base_, const Tensor& z_, const Tensor& lam_, const OptTensor& idx) {
  TORCH_CHECK(out.stride(1) == 1 || out.size(1) <= 1, "scale_add: out must have contiguous rows");
  const Tensor base = rows_contiguous(base_), z = rows_contiguous(z_), lam = lam_.contiguous();
  const vera::cuda::ScaleAddParams p{base.const_data_ptr(), base.stride(0), z.const_data_ptr(), z.stride(0),
                                     lam.const_data_ptr<float>(), idx_ptr(idx), out.data_ptr(), out.stride(0),
                                     out.size(0), out.size(1), dtype_of(out.scalar_type())};
  check_launch(vera::cuda::launch_scale_add(p, nullptr), "scale_add");
}

// splits <= 0: the launcher's own choice (col_dot_reduce_splits), as prims_cuda.cpp uses; > 0 forces a count.
Tensor col_dot_reduce(const Tensor& p_, const Tensor& q_, const OptTensor& idx, int64_t num_adapters, int64_t splits) {
  const Tensor p = rows_contiguous(p_), q = rows_contiguous(q_);
  const int64_t rows = p.size(0), cols = p.size(1);
  const int s = splits > 0 ? int(splits) : vera::cuda::col_dot_reduce_splits(rows, cols, num_adapters);
  Tensor out = at::empty({num_adapters, cols}, p.options().dtype(at::kFloat));
  Tensor workspace = at::empty({s > 1 ? s * num_adapters * cols : 0}, out.options());
  const vera::cuda::ColDotReduceParams params{p.const_data_ptr(), p.stride(0), q.const_data_ptr(), q.stride(0),
                                              idx_ptr(idx), workspace.data_ptr<float>(), out.data_ptr<float>(),
                                              rows, cols, num_adapters, s, dtype_of(p.scalar_type())};
  check_launch(vera::cuda::launch_col_dot_reduce(params, nullptr), "col_dot_reduce");
  return out;
}

int64_t col_dot_reduce_splits(int64_t rows, int64_t cols, int64_t num_adapters) {
  return vera::cuda::col_dot_reduce_splits(rows, cols, num_adapters);
}

Tensor row_dot(const Tensor& p_, const Tensor& q_) {
  const Tensor p = rows_contiguous(p_), q = rows_contiguous(q_);
  Tensor out = at::empty({p.size(0)}, p.options().dtype(at::kFloat));
  const vera::cuda::RowDotParams params{p.const_data_ptr(), p.stride(0), q.const_data_ptr(), q.stride(0),
                                        out.data_ptr<float>(), p.size(0), p.size(1), dtype_of(p.scalar_type())};
  check_launch(vera::cuda::launch_row_dot(params, nullptr), "row_dot");
  return out;
}

// One launch_merge pass over weight (as prims_cuda.cpp's merge_apply, minus the two-pass safe logic); returns
// the non-finite flag, which only check_only raises.
int64_t merge(Tensor weight, const Tensor& delta_, double alpha, bool transposed, bool check_only) {
  const Tensor delta = delta_.contiguous();
  Tensor flag = at::zeros({1}, weight.options().dtype(at::kInt));
  const vera::cuda::MergeParams p{weight.data_ptr(), transposed ? weight.stride(1) : weight.stride(0),
                                  transposed ? weight.stride(0) : weight.stride(1), delta.const_data_ptr<float>(),
                                  delta.size(0), delta.size(1), static_cast<float>(alpha), flag.data_ptr<int>(),
                                  dtype_of(weight.scalar_type())};
  check_launch(vera::cuda::launch_merge(p, check_only, nullptr), "merge");
  return flag.item<int>();
}

// The fused small-N forward, DecodeParams filled as prims_cuda.cpp's decode_forward fills them. Returns (y, u).
std::tuple<Tensor, Tensor> decode(const Tensor& x_, const OptTensor& weight_, const OptTensor& bias_,
                                  const OptTensor& base_, const Tensor& A_, const Tensor& B_, const Tensor& lambda_d,
                                  const Tensor& lambda_b, const OptTensor& idx) {
  const Tensor x = x_.contiguous(), A = rows_contiguous(A_), B = rows_contiguous(B_);
  const Tensor ld = lambda_d.contiguous(), lb = lambda_b.contiguous();
  const Tensor weight = weight_.has_value() ? rows_contiguous(*weight_) : Tensor();
  const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
  const Tensor base = base_.has_value() ? rows_contiguous(*base_) : Tensor();
  const int64_t n = x.size(0), in_f = x.size(1), r = ld.size(-1), out_f = B.size(0);
  Tensor u = at::empty({n, r}, x.options());
  Tensor h = at::empty({n, r}, x.options().dtype(at::kFloat));
  Tensor y = at::empty({n, out_f}, x.options());
  const vera::cuda::DecodeParams p{x.const_data_ptr(), x.stride(0),
                                   weight.defined() ? weight.const_data_ptr() : nullptr,
                                   weight.defined() ? weight.stride(0) : 0,
                                   bias.defined() ? bias.const_data_ptr() : nullptr,
                                   base.defined() ? base.const_data_ptr() : nullptr,
                                   base.defined() ? base.stride(0) : 0,
                                   A.const_data_ptr(), A.stride(0), B.const_data_ptr(), B.stride(0),
                                   ld.const_data_ptr<float>(), lb.const_data_ptr<float>(), idx_ptr(idx),
                                   u.data_ptr(), h.data_ptr<float>(), y.data_ptr(),
                                   n, in_f, out_f, r, dtype_of(x.scalar_type())};
  check_launch(vera::cuda::launch_decode(p, nullptr), "decode");
  return {y, u};
}

void set_block_order(const std::string& order, int64_t seed) {
  using vera_emu::BlockOrder;
  TORCH_CHECK(order == "forward" || order == "reverse" || order == "shuffle",
              "block order must be forward, reverse or shuffle, got ", order);
  vera_emu::set_block_order(order == "forward" ? BlockOrder::kForward
                            : order == "reverse" ? BlockOrder::kReverse
                                                 : BlockOrder::kShuffle,
                            static_cast<uint64_t>(seed));
}

// The emulation's 16-bit conversions, element-wise, as raw bits in int32 (for exhaustive comparison with torch).
Tensor float_to_bits(const Tensor& f_, const std::string& format) {
  const Tensor f = f_.contiguous().to(at::kFloat);
  Tensor out = at::empty(f.sizes(), f.options().dtype(at::kInt));
  const float* src = f.const_data_ptr<float>();
  int* dst = out.data_ptr<int>();
  const bool half = format == "half";
  for (int64_t i = 0; i < f.numel(); ++i)
    dst[i] = half ? vera_emu::float_to_half_bits(src[i]) : vera_emu::float_to_bf16_bits(src[i]);
  return out;
}

Tensor bits_to_float(const Tensor& b_, const std::string& format) {
  const Tensor b = b_.contiguous().to(at::kInt);
  Tensor out = at::empty(b.sizes(), b.options().dtype(at::kFloat));
  const int* src = b.const_data_ptr<int>();
  float* dst = out.data_ptr<float>();
  const bool half = format == "half";
  for (int64_t i = 0; i < b.numel(); ++i) {
    const auto bits = static_cast<uint16_t>(src[i]);
    dst[i] = half ? vera_emu::half_bits_to_float(bits) : vera_emu::bf16_bits_to_float(bits);
  }
  return out;
}

std::string selftest_names() {
  std::string names;
  for (const std::string& n : vera::testing::emu_selftest_names()) names += (names.empty() ? "" : ",") + n;
  return names;
}

std::string selftest(const std::string& name) { return vera::testing::run_emu_selftest(name); }

// The planted inter-block race: which block's write survived.
int64_t planted_block_order(int64_t blocks) {
  int out = -1;
  check_launch(vera::testing::launch_planted_block_order(&out, static_cast<unsigned>(blocks)), "planted_block_order");
  return out;
}

using CpuPrims = vera::cpu::Prims;

void cpu_scale_add(Tensor out, const Tensor& base, const Tensor& z, const Tensor& lam, const OptTensor& idx) {
  CpuPrims::scale_add(out, base, z, lam, idx);
}

std::tuple<Tensor, Tensor> cpu_decode(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                      const OptTensor& base, const Tensor& A, const Tensor& B, const Tensor& lambda_d,
                                      const Tensor& lambda_b, const OptTensor& idx) {
  return CpuPrims::decode_forward(x, weight, bias, base, vera::AdapterArgs{A, B, lambda_d, lambda_b, idx});
}

void cpu_merge_apply(Tensor weight, const Tensor& delta, double alpha, bool transposed, bool safe) {
  CpuPrims::merge_apply(weight, delta, alpha, transposed, safe);
}

}  // namespace

TORCH_LIBRARY(vera_emu, m) {
  m.def("row_scale(Tensor input, Tensor lam, ScalarType dtype) -> Tensor", &row_scale);
  m.def("col_scale(Tensor input, Tensor lam, Tensor? idx) -> Tensor", &col_scale);
  m.def("scale_add(Tensor(a!) out, Tensor base, Tensor z, Tensor lam, Tensor? idx) -> ()", &scale_add);
  m.def("col_dot_reduce(Tensor p, Tensor q, Tensor? idx, int num_adapters, int splits=0) -> Tensor", &col_dot_reduce);
  m.def("col_dot_reduce_splits(int rows, int cols, int num_adapters) -> int", &col_dot_reduce_splits);
  m.def("row_dot(Tensor p, Tensor q) -> Tensor", &row_dot);
  m.def("merge(Tensor(a!) weight, Tensor delta, float alpha, bool transposed, bool check_only) -> int", &merge);
  m.def("decode(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, Tensor A, Tensor B, Tensor lambda_d, "
        "Tensor lambda_b, Tensor? idx) -> (Tensor, Tensor)", &decode);

  m.def("cpu_row_scale(Tensor input, Tensor lam, ScalarType dtype) -> Tensor", &CpuPrims::row_scale);
  m.def("cpu_col_scale(Tensor input, Tensor lam, Tensor? idx) -> Tensor", &CpuPrims::col_scale);
  m.def("cpu_scale_add(Tensor(a!) out, Tensor base, Tensor z, Tensor lam, Tensor? idx) -> ()", &cpu_scale_add);
  m.def("cpu_col_dot_reduce(Tensor p, Tensor q, Tensor? idx, int num_adapters) -> Tensor", &CpuPrims::col_dot_reduce);
  m.def("cpu_row_dot(Tensor p, Tensor q) -> Tensor", &CpuPrims::row_dot);
  m.def("cpu_merge_apply(Tensor(a!) weight, Tensor delta, float alpha, bool transposed, bool safe) -> ()",
        &cpu_merge_apply);
  m.def("cpu_decode(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, Tensor A, Tensor B, Tensor lambda_d, "
        "Tensor lambda_b, Tensor? idx) -> (Tensor, Tensor)", &cpu_decode);
  m.def("cpu_decode_max_rows() -> int", [] { return CpuPrims::kDecodeMaxRows; });
  m.def("decode_max_rows() -> int", [] { return int64_t(vera::cuda::kDecodeMaxRows); });

  m.def("set_block_order(str order, int seed=0) -> ()", &set_block_order);
  m.def("float_to_bits(Tensor f, str format) -> Tensor", &float_to_bits);
  m.def("bits_to_float(Tensor bits, str format) -> Tensor", &bits_to_float);
  m.def("selftest_names() -> str", &selftest_names);
  m.def("selftest(str name) -> str", &selftest);
  m.def("planted_block_order(int blocks) -> int", &planted_block_order);
}
