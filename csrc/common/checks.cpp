#include "common/checks.h"

#include <sstream>

namespace vera {
namespace {

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device();
  return s.str();
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
              "), got ", describe(t));
}

void check_lambda(const at::Tensor& lam, const char* name, int64_t width, const char* width_name,
                  const c10::optional<at::Tensor>& idx, const at::Tensor& x, const char* x_name) {
  check_same_device(lam, name, x, x_name);
  const at::ScalarType want = opmath_dtype(x.scalar_type());
  TORCH_CHECK(lam.scalar_type() == want, name, " must be ", want,
              " (VeRA keeps its scaling vectors in fp32; fp64 " "only with fp64 data), got ", describe(lam));
  if (idx.has_value()) {
    TORCH_CHECK(lam.dim() == 2 && lam.size(1) == width, name, " must have shape (num_adapters, ", width_name, "=",
                width, ") when adapter_idx is given, got ", describe(lam));
  } else {
    TORCH_CHECK(lam.dim() == 1 && lam.size(0) == width, name, " must have shape (", width_name, "=", width,
                ",) without adapter_idx, got ", describe(lam));
  }
}

}  // namespace

void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D (rows, features), got ", describe(t));
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              " must be float32, float16 or bfloat16 (or float64 on the " "CPU), got ", describe(t));
  TORCH_CHECK(t.scalar_type() != at::kDouble || t.device().is_cpu(), name,
              " may be float64 only on the CPU (the " "CUDA kernels are float32, float16 and bfloat16), got ",
              describe(t));
}

void check_like(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& ref,
                const char* ref_name) {
  check_same_device(t, name, ref, ref_name);
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", describe(t));
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (", ref.scalar_type(),
              "), got ", describe(t));
}

int64_t num_adapters(const AdapterArgs& a) { return a.adapter_idx.has_value() ? a.lambda_d.size(0) : 1; }

void check_adapter(const AdapterArgs& a, const at::Tensor& x, const char* x_name, int64_t in_features,
                   int64_t out_features) {
  TORCH_CHECK(a.lambda_d.dim() >= 1 && a.lambda_d.size(-1) >= 1,
              "lambda_d must hold r >= 1 entries (shape (r,) or (num_adapters, r)), got ", describe(a.lambda_d));
  const int64_t r = a.lambda_d.size(-1);

  TORCH_CHECK(a.A.dim() == 2 && a.A.size(0) == r && a.A.size(1) == in_features, "A must have shape (r=", r,
              ", in_features=", in_features, ") (slice the shared projection as vera_A[:r, :in_features]), got ",
              describe(a.A));
  TORCH_CHECK(a.B.dim() == 2 && a.B.size(0) == out_features && a.B.size(1) == r,
              "B must have shape (out_features=", out_features, ", r=", r,
              ") (slice the shared projection as vera_B[:out_features, :r]), got ", describe(a.B));
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{a.A, "A"}, {a.B, "B"}}) {
    check_same_device(t, name, x, x_name);
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have the dtype of ", x_name, " (", x.scalar_type(),
                "); cast the projection once and reuse it (VeraLinear caches it), got ", describe(t));
  }

  if (a.adapter_idx.has_value()) {
    const at::Tensor& idx = *a.adapter_idx;
    check_same_device(idx, "adapter_idx", x, x_name);
    TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.size(0) == x.size(0),
                "adapter_idx must be an int64 vector with one entry per row of ", x_name, " (", x.size(0), "), got ",
                describe(idx));
    TORCH_CHECK(
        a.lambda_d.dim() == 2 && a.lambda_b.dim() == 2 && a.lambda_d.size(0) == a.lambda_b.size(0),
        "with adapter_idx, lambda_d (num_adapters, r) and lambda_b (num_adapters, out_features) must stack " "the same adapters, got lambda_d ",
        describe(a.lambda_d), " and lambda_b ", describe(a.lambda_b));
  }
  check_lambda(a.lambda_d, "lambda_d", r, "r", a.adapter_idx, x, x_name);
  check_lambda(a.lambda_b, "lambda_b", out_features, "out_features", a.adapter_idx, x, x_name);
}

}  // namespace vera
