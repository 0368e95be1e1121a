// torch.ops.vera_emu: the CUDA kernel launchers of csrc/cuda, emulated on host threads, callable from pytest on
// CPU tensors. The params structs are filled by the same code the CUDA build uses (csrc/cuda/kernel_prims.h). The
// CPU reference primitives (csrc/cpu/prims_cpu.cpp, compiled into this test library) are exposed next to them
// as cpu_*, so a test runs the very same primitive on both sides. Test-only; never part of vera_ext.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <tuple>
#include <vector>

// After the torch headers: cuda_emu.h defines the CUDA qualifiers as macros.
#include "common/vera_impl.h"
#include "cpu/prims_cpu.h"
#include "cuda/kernel_prims.h"
#include "emu/emu_trace.h"
#include "kernels/emu_selftest.h"
#include "kernels/planted_faults.h"
#include "kernels/planted_traffic.h"

namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "emulated ", what, " failed: ", cudaGetErrorString(err), ": ",
              vera_emu::last_launch_error());
}

// Whether the emulated launch policy reports a CUDA graph capture in progress (set_capturing): lets a test run the
// capture-time code paths of kernel_prims.h on the CPU.
bool emulated_capture = false;

// The emulated launch: no device, no stream; launch errors carry the emulator's message.
struct EmuLaunch {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static cudaStream_t stream() { return nullptr; }
  static void check(cudaError_t err, const char* what) { check_launch(err, what); }
  static bool capturing() { return emulated_capture; }
  // A traced launch may run only a sample of its blocks (emu_trace.h): the partials of the blocks it skips are zeroed
  // first (below the dispatcher: the trace records no ATen call), so that a decision the host takes from them (the
  // safe merge's bound) is made on the sampled values instead of uninitialized memory.
  static void clear_partials(Tensor& partial) {
    if (vera_emu::trace::sample_blocks() > 0) std::memset(partial.data_ptr(), 0, partial.nbytes());
  }
};

using EmuPrims = vera::cuda::KernelPrims<EmuLaunch>;

void scale_add(Tensor out, const Tensor& base, const Tensor& z, const Tensor& lam, const OptTensor& idx) {
  EmuPrims::scale_add(out, base, z, lam, idx);
}

Tensor col_dot_reduce(const Tensor& p, const Tensor& q, const OptTensor& idx, int64_t num_adapters, int64_t splits) {
  return EmuPrims::col_dot_reduce(p, q, idx, num_adapters, splits);
}

int64_t col_dot_reduce_splits(int64_t rows, int64_t cols, int64_t num_adapters) {
  return vera::cuda::col_dot_reduce_splits(rows, cols, num_adapters);
}

// One launch_merge pass over weight (delta_W = diag(lambda_b) B diag(lambda_d) A, computed in the kernel);
// returns the non-finite flag, which only check_only raises.
int64_t merge(Tensor weight, const Tensor& A, const Tensor& B, const Tensor& lambda_d, const Tensor& lambda_b,
              double alpha, bool transposed, bool check_only) {
  return EmuPrims::merge_pass(weight, vera::AdapterArgs{A, B, lambda_d, lambda_b, c10::nullopt}, alpha, transposed,
                              check_only);
}

std::vector<double> max_abs(const std::vector<Tensor>& tensors) { return EmuPrims::max_abs(tensors); }

std::tuple<Tensor, Tensor> decode(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                  const OptTensor& base, const Tensor& A, const Tensor& B, const Tensor& lambda_d,
                                  const Tensor& lambda_b, const OptTensor& idx) {
  return EmuPrims::decode_forward(x, weight, bias, base, vera::AdapterArgs{A, B, lambda_d, lambda_b, idx});
}

void set_block_order(const std::string& order, int64_t seed) {
  using vera_emu::BlockOrder;
  TORCH_CHECK(order == "forward" || order == "reverse" || order == "shuffle",
              "block order must be forward, reverse or shuffle, got ", order);
  vera_emu::set_block_order(order == "forward"   ? BlockOrder::kForward
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

// The planted wasteful kernels of testing/planted_traffic.h on a (rows, cols) fp32 matrix.
Tensor planted_traffic(const std::string& name, const Tensor& in_) {
  const Tensor in = in_.contiguous();
  TORCH_CHECK(in.dim() == 2 && in.scalar_type() == at::kFloat, "planted_traffic: in must be a 2-D float32 matrix");
  const int64_t rows = in.size(0), cols = in.size(1);
  const float* src = in.const_data_ptr<float>();
  if (name == "double_read") {
    Tensor out = at::empty({rows}, in.options());
    check_launch(vera::testing::launch_planted_double_read(src, out.data_ptr<float>(), rows, cols), "double_read");
    return out;
  }
  Tensor out = at::empty_like(in);
  TORCH_CHECK(name == "coalesced_copy" || name == "strided_copy",
              "planted_traffic: name must be coalesced_copy, strided_copy or double_read, got ", name);
  check_launch(name == "coalesced_copy"
                   ? vera::testing::launch_planted_coalesced_copy(src, out.data_ptr<float>(), rows, cols)
                   : vera::testing::launch_planted_strided_copy(src, out.data_ptr<float>(), rows, cols),
               name.c_str());
  return out;
}

// The vera_ext operators exactly as the CUDA build runs them (common/vera_impl.h over the kernel primitives),
// with the kernels emulated and the GEMMs on the CPU: what the kernel cost report traces.
std::tuple<Tensor, Tensor> op_vera_forward(const Tensor& x, const Tensor& base_out, const Tensor& A, const Tensor& B,
                                           const Tensor& lambda_d, const Tensor& lambda_b, const OptTensor& idx) {
  return vera::vera_forward<EmuPrims>(x, base_out, A, B, lambda_d, lambda_b, idx);
}

std::tuple<Tensor, Tensor> op_vera_linear_forward(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                  const Tensor& A, const Tensor& B, const Tensor& lambda_d,
                                                  const Tensor& lambda_b, const OptTensor& idx) {
  return vera::vera_linear_forward<EmuPrims>(x, weight, bias, A, B, lambda_d, lambda_b, idx);
}

std::tuple<Tensor, Tensor, Tensor> op_vera_backward(const Tensor& grad_out, const Tensor& u, const Tensor& A,
                                                    const Tensor& B, const Tensor& lambda_d, const Tensor& lambda_b,
                                                    const OptTensor& idx, const OptTensor& weight,
                                                    std::array<bool, 3> output_mask) {
  return vera::vera_backward<EmuPrims>(grad_out, u, A, B, lambda_d, lambda_b, idx, weight, output_mask);
}

Tensor op_vera_apply(const Tensor& u, const Tensor& base_out, const Tensor& A, const Tensor& B, const Tensor& lambda_d,
                     const Tensor& lambda_b, const OptTensor& idx) {
  return vera::vera_apply<EmuPrims>(u, base_out, A, B, lambda_d, lambda_b, idx);
}

std::tuple<Tensor, Tensor> op_vera_linear_apply(const Tensor& x, const Tensor& u, const Tensor& weight,
                                                const OptTensor& bias, const Tensor& A, const Tensor& B,
                                                const Tensor& lambda_d, const Tensor& lambda_b, const OptTensor& idx,
                                                c10::string_view merged) {
  return vera::vera_linear_apply<EmuPrims>(x, u, weight, bias, A, B, lambda_d, lambda_b, idx, merged);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> op_vera_apply_backward(const Tensor& grad_out, const Tensor& u,
                                                                  const Tensor& A, const Tensor& B,
                                                                  const Tensor& lambda_d, const Tensor& lambda_b,
                                                                  const OptTensor& idx, const OptTensor& weight,
                                                                  bool add_delta, std::array<bool, 4> output_mask) {
  return vera::vera_apply_backward<EmuPrims>(grad_out, u, A, B, lambda_d, lambda_b, idx, weight, add_delta,
                                             output_mask);
}

void op_vera_merge_(Tensor weight, const Tensor& A, const Tensor& B, const Tensor& lambda_d, const Tensor& lambda_b,
                    double alpha, bool fan_in_fan_out, bool safe) {
  vera::vera_merge_<EmuPrims>(weight, A, B, lambda_d, lambda_b, alpha, fan_in_fan_out, safe);
}

// The full fp32 delta (get_delta_weight): still row_scale twice and a GEMM (the merge no longer forms it).
Tensor op_vera_delta_weight(const Tensor& A, const Tensor& B, const Tensor& lambda_d, const Tensor& lambda_b,
                            bool fan_in_fan_out, at::ScalarType dtype) {
  return vera::vera_delta_weight<EmuPrims>(A, B, lambda_d, lambda_b, fan_in_fan_out, dtype);
}

void trace_start(int64_t max_blocks) {
  TORCH_CHECK(max_blocks >= 0, "trace_start: max_blocks must be >= 0 (0: every block), got ", max_blocks);
  vera_emu::trace::start(static_cast<uint64_t>(max_blocks));
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

// The CPU merge primitive; check_first: the exact check pass (every tile recomputed) before the write pass.
void cpu_merge_apply(Tensor weight, const Tensor& A, const Tensor& B, const Tensor& lambda_d, const Tensor& lambda_b,
                     double alpha, bool transposed, bool check_first) {
  CpuPrims::merge_apply(weight, vera::AdapterArgs{A, B, lambda_d, lambda_b, c10::nullopt}, alpha, transposed,
                        check_first);
}

}  // namespace

// ATen has mm.dtype (a low-precision GEMM with an fp32 result) only on CUDA; KernelPrims::mm_opmath calls it. The
// emulated build runs that code on CPU tensors, so this test library gives the op a CPU kernel: the same fp32
// accumulation of the same products, through widened operands.
Tensor mm_dtype_cpu(const Tensor& a, const Tensor& b, at::ScalarType out_dtype) {
  return at::mm(a.to(out_dtype), b.to(out_dtype));
}

TORCH_LIBRARY_IMPL(aten, CPU, m) { m.impl("mm.dtype", &mm_dtype_cpu); }

TORCH_LIBRARY(vera_emu, m) {
  m.def("row_scale(Tensor input, Tensor lam, ScalarType dtype, Tensor? col_lam=None) -> Tensor", &EmuPrims::row_scale);
  m.def("col_scale(Tensor input, Tensor lam, Tensor? idx) -> Tensor", &EmuPrims::col_scale);
  m.def("scale_add(Tensor(a!) out, Tensor base, Tensor z, Tensor lam, Tensor? idx) -> ()", &scale_add);
  m.def("col_dot_reduce(Tensor p, Tensor q, Tensor? idx, int num_adapters, int splits=0) -> Tensor", &col_dot_reduce);
  m.def("col_dot_reduce_splits(int rows, int cols, int num_adapters) -> int", &col_dot_reduce_splits);
  m.def("lambda_grads(Tensor q, Tensor B, Tensor lambda_d, Tensor lambda_b) -> (Tensor, Tensor)",
        &EmuPrims::lambda_grads);
  m.def(
      "merge(Tensor(a!) weight, Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, float alpha, bool transposed, " "bool check_only) -> int",
      &merge);
  m.def(
      "decode(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, Tensor A, Tensor B, Tensor lambda_d, " "Tensor lambda_b, Tensor? idx) -> (Tensor, Tensor)",
      &decode);

  m.def("cpu_row_scale(Tensor input, Tensor lam, ScalarType dtype, Tensor? col_lam=None) -> Tensor",
        &CpuPrims::row_scale);
  m.def("cpu_col_scale(Tensor input, Tensor lam, Tensor? idx) -> Tensor", &CpuPrims::col_scale);
  m.def("cpu_scale_add(Tensor(a!) out, Tensor base, Tensor z, Tensor lam, Tensor? idx) -> ()", &cpu_scale_add);
  m.def("cpu_col_dot_reduce(Tensor p, Tensor q, Tensor? idx, int num_adapters) -> Tensor", &CpuPrims::col_dot_reduce);
  m.def("cpu_lambda_grads(Tensor q, Tensor B, Tensor lambda_d, Tensor lambda_b) -> (Tensor, Tensor)",
        &CpuPrims::lambda_grads);
  m.def(
      "cpu_merge_apply(Tensor(a!) weight, Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, float alpha, " "bool transposed, bool check_first) -> ()",
      &cpu_merge_apply);
  m.def(
      "cpu_decode(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, Tensor A, Tensor B, Tensor lambda_d, " "Tensor lambda_b, Tensor? idx) -> (Tensor, Tensor)",
      &cpu_decode);
  m.def("max_abs(Tensor[] tensors) -> float[]", &max_abs);
  m.def("cpu_max_abs(Tensor[] tensors) -> float[]", &CpuPrims::max_abs);
  m.def("cpu_decode_max_rows() -> int", [] { return CpuPrims::kDecodeMaxRows; });
  m.def("decode_max_rows() -> int", [] { return int64_t(vera::cuda::kDecodeMaxRows); });

  m.def(
      "op_vera_forward(Tensor x, Tensor base_out, Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, " "Tensor? adapter_idx=None) -> (Tensor, Tensor)",
      &op_vera_forward);
  m.def(
      "op_vera_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor lambda_d, " "Tensor lambda_b, Tensor? adapter_idx=None) -> (Tensor, Tensor)",
      &op_vera_linear_forward);
  m.def(
      "op_vera_backward(Tensor grad_out, Tensor u, Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, " "Tensor? adapter_idx, Tensor? weight, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
      &op_vera_backward);
  m.def(
      "op_vera_apply(Tensor u, Tensor base_out, Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, " "Tensor? adapter_idx=None) -> Tensor",
      &op_vera_apply);
  m.def(
      "op_vera_linear_apply(Tensor x, Tensor u, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor lambda_d, " "Tensor lambda_b, Tensor? adapter_idx=None, str merged=\"none\") -> (Tensor, Tensor)",
      &op_vera_linear_apply);
  m.def(
      "op_vera_apply_backward(Tensor grad_out, Tensor u, Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, " "Tensor? adapter_idx, Tensor? weight, bool add_delta, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
      &op_vera_apply_backward);
  m.def(
      "op_vera_merge_(Tensor(a!) weight, Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, float alpha, " "bool fan_in_fan_out, bool safe) -> ()",
      &op_vera_merge_);
  m.def(
      "op_vera_delta_weight(Tensor A, Tensor B, Tensor lambda_d, Tensor lambda_b, bool fan_in_fan_out, " "ScalarType dtype) -> Tensor",
      &op_vera_delta_weight);

  // Memory-traffic traces (emu/emu_trace.h): start, the number of launches recorded so far, stop (JSON).
  m.def("trace_start(int max_blocks=0) -> ()", &trace_start);
  m.def("trace_launches() -> int", [] { return int64_t(vera_emu::trace::launches()); });
  m.def("trace_stop() -> str", [] { return vera_emu::trace::stop(); });
  m.def("planted_traffic(str name, Tensor input) -> Tensor", &planted_traffic);

  m.def("set_block_order(str order, int seed=0) -> ()", &set_block_order);
  m.def("set_capturing(bool capturing) -> ()", [](bool capturing) { emulated_capture = capturing; });
  m.def("float_to_bits(Tensor f, str format) -> Tensor", &float_to_bits);
  m.def("bits_to_float(Tensor bits, str format) -> Tensor", &bits_to_float);
  m.def("selftest_names() -> str", &selftest_names);
  m.def("selftest(str name) -> str", &selftest);
  m.def("planted_block_order(int blocks) -> int", &planted_block_order);
}
