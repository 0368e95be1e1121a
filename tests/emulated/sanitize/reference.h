// Plain C++ references for the VeRA kernels (the math of csrc/common/vera_impl.h's Prims contract, written as
// the simplest loops), and typed host buffers in the kernels' storage formats. Used by the sanitizer check
// program, which has no torch.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "cuda/params.h"
#include "emu/emu_half.h"

namespace vera::check {

using cuda::DType;

inline const char* dtype_name(DType t) { return t == DType::F32 ? "f32" : t == DType::F16 ? "f16" : "bf16"; }

// A 2-D matrix (rows x cols, row stride ld >= cols) stored as dtype, with float access.
struct Matrix {
  DType dtype;
  int64_t rows, cols, ld;
  std::vector<float> f32;      // storage when dtype is F32
  std::vector<uint16_t> bits;  // storage of F16 / BF16

  Matrix(DType t, int64_t r, int64_t c, int64_t stride) : dtype(t), rows(r), cols(c), ld(stride) {
    const size_t n = size_t(r == 0 ? 0 : (r - 1) * stride + c) + 1;  // +1: never a zero-sized buffer
    if (t == DType::F32)
      f32.assign(n, 0.f);
    else
      bits.assign(n, 0);
  }
  void* data() { return dtype == DType::F32 ? static_cast<void*>(f32.data()) : static_cast<void*>(bits.data()); }

  float get(int64_t i, int64_t j) const {
    const int64_t e = i * ld + j;
    if (dtype == DType::F32) return f32[e];
    return dtype == DType::F16 ? vera_emu::half_bits_to_float(bits[e]) : vera_emu::bf16_bits_to_float(bits[e]);
  }
  // Stores v rounded to the storage type (fp32 math, one rounding, like the kernels).
  void set(int64_t i, int64_t j, float v) {
    const int64_t e = i * ld + j;
    if (dtype == DType::F32)
      f32[e] = v;
    else
      bits[e] = dtype == DType::F16 ? vera_emu::float_to_half_bits(v) : vera_emu::float_to_bf16_bits(v);
  }
  void randomize(std::mt19937& rng) {
    std::uniform_real_distribution<float> u(-2.f, 2.f);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) set(i, j, u(rng));
  }
};

inline std::vector<float> random_floats(std::mt19937& rng, int64_t n) {
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  std::vector<float> v(size_t(n) + 1);  // +1: never a zero-sized buffer
  for (auto& x : v) x = u(rng);
  return v;
}

// Adapter per row in [-1, k) (-1: no adapter), or an empty vector for "no index" (every row adapter 0).
inline std::vector<int64_t> random_idx(std::mt19937& rng, int64_t rows, int64_t k) {
  std::uniform_int_distribution<int64_t> u(-1, k - 1);
  std::vector<int64_t> v(size_t(rows) + 1);
  for (auto& x : v) x = u(rng);
  return v;
}

inline int64_t adapter(const std::vector<int64_t>* idx, int64_t n) { return idx ? (*idx)[n] : 0; }

// col_lam empty: no column scaling.
inline void row_scale_ref(const Matrix& in, const std::vector<float>& lam, const std::vector<float>& col_lam,
                          Matrix& out) {
  for (int64_t i = 0; i < in.rows; ++i)
    for (int64_t j = 0; j < in.cols; ++j) {
      float v = lam[i] * in.get(i, j);
      if (!col_lam.empty()) v *= col_lam[j];
      out.set(i, j, v);
    }
}

inline void col_scale_ref(const Matrix& in, const std::vector<float>& lam, const std::vector<int64_t>* idx,
                          Matrix& out) {
  for (int64_t n = 0; n < in.rows; ++n) {
    const int64_t a = adapter(idx, n);
    for (int64_t j = 0; j < in.cols; ++j) out.set(n, j, a < 0 ? 0.f : in.get(n, j) * lam[a * in.cols + j]);
  }
}

inline void scale_add_ref(const Matrix& base, const Matrix& z, const std::vector<float>& lam,
                          const std::vector<int64_t>* idx, Matrix& out) {
  for (int64_t n = 0; n < base.rows; ++n) {
    const int64_t a = adapter(idx, n);
    for (int64_t j = 0; j < base.cols; ++j)
      out.set(n, j, a < 0 ? base.get(n, j) : base.get(n, j) + lam[a * base.cols + j] * z.get(n, j));
  }
}

// Reductions in double: (sum, sum of |terms|) per output, for an error bound.
struct Sum {
  double value = 0, magnitude = 0;
};

inline std::vector<Sum> col_dot_reduce_ref(const Matrix& p, const Matrix& q, const std::vector<int64_t>* idx,
                                           int64_t k) {
  std::vector<Sum> out(size_t(k * p.cols));
  for (int64_t n = 0; n < p.rows; ++n) {
    const int64_t a = adapter(idx, n);
    if (a < 0) continue;
    for (int64_t j = 0; j < p.cols; ++j) {
      const double t = double(p.get(n, j)) * q.get(n, j);
      out[a * p.cols + j].value += t;
      out[a * p.cols + j].magnitude += std::fabs(t);
    }
  }
  return out;
}

// Both lambda gradients from q (out_f, r): {grad_ld (r), grad_lb (out_f)}.
inline std::pair<std::vector<Sum>, std::vector<Sum>> lambda_grads_ref(const Matrix& q, const Matrix& B,
                                                                      const std::vector<float>& ld,
                                                                      const std::vector<float>& lb) {
  std::vector<Sum> gld(size_t(q.cols)), glb(size_t(q.rows));
  for (int64_t o = 0; o < q.rows; ++o)
    for (int64_t k = 0; k < q.cols; ++k) {
      const double t = double(B.get(o, k)) * q.get(o, k);
      gld[k].value += lb[o] * t;
      gld[k].magnitude += std::fabs(lb[o] * t);
      glb[o].value += ld[k] * t;
      glb[o].magnitude += std::fabs(ld[k] * t);
    }
  return {gld, glb};
}

// fp32 sums of n terms: well within 1e-5 of the magnitude for the sizes checked here.
inline bool close(float got, const Sum& want) {
  return std::fabs(double(got) - want.value) <= 1e-5 * want.magnitude + 1e-30;
}

}  // namespace vera::check
