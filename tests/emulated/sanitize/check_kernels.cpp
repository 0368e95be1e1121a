// Runs every VeRA kernel launcher of csrc/cuda on random inputs (edge sizes, row strides, all dtypes) and
// compares with reference.h. Sizes stay small: this runs under ThreadSanitizer. Prints one line per failure.
#include <array>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "checks.h"
#include "cuda/launchers.h"
#include "reference.h"

namespace vera::check {
namespace {

using namespace vera::cuda;

constexpr DType kDtypes[] = {DType::F32, DType::F16, DType::BF16};

struct Shape {
  int64_t rows, cols, ld;
};
// Empty, single element, odd with a row stride, several blocks with a ragged tail.
constexpr Shape kShapes[] = {{0, 5, 5}, {1, 1, 1}, {5, 33, 40}, {37, 100, 130}};

struct Checker {
  std::mt19937 rng;
  int failures = 0;

  explicit Checker(unsigned seed) : rng(seed) {}

  bool launched(cudaError_t err, const std::string& what) {
    if (err == cudaSuccess) return true;
    ++failures;
    std::printf("FAIL %s: launch error %s: %s\n", what.c_str(), cudaGetErrorString(err),
                vera_emu::last_launch_error().c_str());
    return false;
  }

  void expect_equal(const Matrix& got, const Matrix& want, const std::string& what) {
    for (int64_t i = 0; i < want.rows; ++i)
      for (int64_t j = 0; j < want.cols; ++j)
        if (got.get(i, j) != want.get(i, j)) {
          ++failures;
          std::printf("FAIL %s: [%lld, %lld] = %.9g, expected %.9g\n", what.c_str(), (long long)i, (long long)j,
                      got.get(i, j), want.get(i, j));
          return;
        }
  }

  void expect_close(const std::vector<float>& got, const std::vector<Sum>& want, const std::string& what) {
    for (size_t e = 0; e < want.size(); ++e)
      if (!close(got[e], want[e])) {
        ++failures;
        std::printf("FAIL %s: [%zu] = %.9g, expected %.9g\n", what.c_str(), e, got[e], want[e].value);
        return;
      }
  }

  static std::string name(const char* kernel, DType t, const Shape& s, const char* extra = "") {
    return std::string(kernel) + " " + dtype_name(t) + " " + std::to_string(s.rows) + "x" + std::to_string(s.cols) +
           " ld " + std::to_string(s.ld) + extra;
  }

  void row_scale(DType t, const Shape& s, DType out_t, bool with_col_lam) {
    Matrix in(t, s.rows, s.cols, s.ld), out(out_t, s.rows, s.cols, s.cols), want(out_t, s.rows, s.cols, s.cols);
    in.randomize(rng);
    const std::vector<float> lam = random_floats(rng, s.rows);
    const std::vector<float> col_lam = with_col_lam ? random_floats(rng, s.cols) : std::vector<float>();
    const std::string what = name(
        "row_scale", t, s,
        with_col_lam ? (out_t == DType::F32 ? " col_lam -> f32" : " col_lam") : (out_t == DType::F32 ? " -> f32" : ""));
    if (!launched(launch_row_scale({in.data(), s.ld, lam.data(), with_col_lam ? col_lam.data() : nullptr, out.data(),
                                    s.rows, s.cols, t, out_t},
                                   nullptr),
                  what))
      return;
    row_scale_ref(in, lam, col_lam, want);
    expect_equal(out, want, what);
  }

  void col_scale(DType t, const Shape& s, bool with_idx) {
    const int64_t k = with_idx ? 3 : 1;
    Matrix in(t, s.rows, s.cols, s.ld), out(t, s.rows, s.cols, s.cols), want(t, s.rows, s.cols, s.cols);
    in.randomize(rng);
    const std::vector<float> lam = random_floats(rng, k * s.cols);
    const std::vector<int64_t> idx = random_idx(rng, s.rows, k);
    const std::vector<int64_t>* ip = with_idx ? &idx : nullptr;
    const std::string what = name("col_scale", t, s, with_idx ? " idx" : "");
    if (!launched(launch_col_scale(
                      {in.data(), s.ld, lam.data(), ip ? idx.data() : nullptr, out.data(), s.rows, s.cols, t}, nullptr),
                  what))
      return;
    col_scale_ref(in, lam, ip, want);
    expect_equal(out, want, what);
  }

  void scale_add(DType t, const Shape& s, bool with_idx, bool in_place) {
    const int64_t k = with_idx ? 3 : 1;
    Matrix base(t, s.rows, s.cols, s.ld), z(DType::F32, s.rows, s.cols, s.ld + 3), want(t, s.rows, s.cols, s.cols);
    base.randomize(rng);
    z.randomize(rng);
    const std::vector<float> lam = random_floats(rng, k * s.cols);
    const std::vector<int64_t> idx = random_idx(rng, s.rows, k);
    const std::vector<int64_t>* ip = with_idx ? &idx : nullptr;
    scale_add_ref(base, z, lam, ip, want);
    Matrix separate(t, s.rows, s.cols, s.cols);
    Matrix& out = in_place ? base : separate;  // in place: out aliases base, with base's row stride
    const std::string what =
        name("scale_add", t, s, in_place ? (with_idx ? " idx in-place" : " in-place") : (with_idx ? " idx" : ""));
    if (!launched(launch_scale_add({base.data(), s.ld, static_cast<const float*>(z.data()), z.ld, lam.data(),
                                    ip ? idx.data() : nullptr, out.data(), out.ld, s.rows, s.cols, t},
                                   nullptr),
                  what))
      return;
    expect_equal(out, want, what);
  }

  // Returns the number of row splits used.
  int col_dot_reduce(DType t, const Shape& s, int64_t k, bool with_idx) {
    Matrix p(t, s.rows, s.cols, s.ld), q(DType::F32, s.rows, s.cols, s.ld + 1);
    p.randomize(rng);
    q.randomize(rng);
    const std::vector<int64_t> idx = random_idx(rng, s.rows, k);
    const std::vector<int64_t>* ip = with_idx ? &idx : nullptr;
    // rows grouped by adapter, as kernel_prims.h groups them (a stable sort; -1 rows first, in no segment)
    std::vector<int64_t> order, bounds;
    for (int64_t a = -1; a < k; ++a) {
      if (a >= 0) bounds.push_back(int64_t(order.size()));
      for (int64_t n = 0; n < s.rows; ++n)
        if (idx[n] == a) order.push_back(n);
    }
    bounds.push_back(int64_t(order.size()));
    const int splits = col_dot_reduce_splits(s.rows, s.cols, k);
    std::vector<float> workspace(size_t(splits > 1 ? splits * k * s.cols : 0) + 1), out(size_t(k * s.cols) + 1, -1.f);
    const std::string extra = " k " + std::to_string(k) + " splits " + std::to_string(splits);
    const std::string what = name("col_dot_reduce", t, s, extra.c_str());
    if (!launched(launch_col_dot_reduce(
                      {p.data(), s.ld, static_cast<const float*>(q.data()), q.ld, ip ? order.data() : nullptr,
                       ip ? bounds.data() : nullptr, workspace.data(), out.data(), s.rows, s.cols, k, splits, t},
                      nullptr),
                  what))
      return splits;
    expect_close(out, col_dot_reduce_ref(p, q, ip, k), what);
    return splits;
  }

  // Shape: rows = out_f, cols = r, ld = B's row stride.
  void lambda_grads(DType t, const Shape& s) {
    Matrix q(DType::F32, s.rows, s.cols, s.cols), B(t, s.rows, s.cols, s.ld);
    q.randomize(rng);
    B.randomize(rng);
    const std::vector<float> ld = random_floats(rng, s.cols), lb = random_floats(rng, s.rows);
    int col_chunks = 0, row_chunks = 0;
    lambda_grads_chunks(s.rows, s.cols, &col_chunks, &row_chunks);
    std::vector<float> ws_b(size_t(col_chunks * s.rows) + 1), ws_d(size_t(row_chunks * s.cols) + 1);
    std::vector<float> grad_ld(size_t(s.cols) + 1, -1.f), grad_lb(size_t(s.rows) + 1, -1.f);
    const std::string what = name("lambda_grads", t, s);
    if (!launched(launch_lambda_grads(
                      {static_cast<const float*>(q.data()), B.data(), s.ld, ld.data(), lb.data(), ws_b.data(),
                       ws_d.data(), grad_ld.data(), grad_lb.data(), s.rows, s.cols, col_chunks, row_chunks, t},
                      nullptr),
                  what))
      return;
    const auto [want_ld, want_lb] = lambda_grads_ref(q, B, ld, lb);
    expect_close(grad_ld, want_ld, what + " grad_ld");
    expect_close(grad_lb, want_lb, what + " grad_lb");
  }

  // weight (out_f, in_f), or (in_f, out_f) when transposed; A (r, in_f) and B (out_f, r) in the same dtype. Padded
  // row strides: aligned (multiples of 16 bytes: the 16-byte load paths) or odd (the element paths). The reference
  // is the kernel's arithmetic: delta[o, i] = fmaf chain over k = 0..r-1 of (lb[o] B[o, k]) (ld[k] A[k, i]), then
  // w + alpha * delta rounded once; bit-identical results are expected.
  void merge(DType t, int64_t out_f, int64_t in_f, int64_t r, bool transposed, float alpha, bool check_only,
             bool poison, bool aligned) {
    const int64_t wr = transposed ? in_f : out_f, wc = transposed ? out_f : in_f;
    const int64_t pad = aligned ? 8 : 3;
    auto padded = [&](int64_t cols) { return aligned ? (cols + pad + 7) / 8 * 8 : cols + pad; };
    Matrix w(t, wr, wc, padded(wc)), A(t, r, in_f, padded(in_f)), B(t, out_f, r, padded(r));
    w.randomize(rng);
    A.randomize(rng);
    B.randomize(rng);
    std::vector<float> ld = random_floats(rng, r), lb = random_floats(rng, out_f);
    if (poison && out_f > 0) lb[size_t(out_f / 2)] = INFINITY;
    const Matrix before = w;
    int flag = 0;
    const std::string what = std::string("merge ") + dtype_name(t) + " " + std::to_string(out_f) + "x" +
                             std::to_string(in_f) + " r " + std::to_string(r) + (transposed ? " fan_in_fan_out" : "") +
                             (check_only ? " check_only" : "") + (poison ? " inf" : "") +
                             (aligned ? " aligned" : " odd strides");
    const MergeParams p{w.data(),
                        transposed ? 1 : w.ld,
                        transposed ? w.ld : 1,
                        A.data(),
                        A.ld,
                        1,
                        B.data(),
                        B.ld,
                        1,
                        ld.data(),
                        lb.data(),
                        out_f,
                        in_f,
                        r,
                        alpha,
                        &flag,
                        t,
                        t};
    if (!launched(launch_merge(p, check_only, nullptr), what)) return;
    Matrix want = before;
    bool finite = true;
    for (int64_t o = 0; o < out_f; ++o)
      for (int64_t i = 0; i < in_f; ++i) {
        float d = 0.f;
        for (int64_t k = 0; k < r; ++k) d = std::fmaf(lb[size_t(o)] * B.get(o, k), ld[size_t(k)] * A.get(k, i), d);
        const int64_t row = transposed ? i : o, col = transposed ? o : i;
        Matrix one(t, 1, 1, 1);
        const float scaled = alpha * d;
        one.set(0, 0, before.get(row, col) + scaled);
        finite &= std::isfinite(one.get(0, 0));
        if (!check_only) want.set(row, col, one.get(0, 0));
      }
    expect_equal(w, want, what);
    const int want_flag = check_only && !finite ? 1 : 0;
    if (flag != want_flag) {
      ++failures;
      std::printf("FAIL %s: non-finite flag %d, expected %d\n", what.c_str(), flag, want_flag);
    }
  }

  // max |value| of a few tensors of dtype t (sizes from one element to several blocks, one starting off 16-byte
  // alignment, an inf planted when `poison`), against the exact maximum.
  void max_abs(DType t, bool poison) {
    const std::array<int64_t, 3> sizes{1, 5000, 333};
    std::vector<Matrix> ms;
    for (const int64_t n : sizes) ms.emplace_back(t, 1, n + 1, n + 1);  // one spare element: data() + 1 is unaligned
    MaxAbsParams p{};
    std::vector<double> want;
    for (size_t i = 0; i < ms.size(); ++i) {
      ms[i].randomize(rng);
      const int64_t first = i == 2 ? 1 : 0;
      if (poison && i == 1) ms[i].set(0, 4097, INFINITY);
      double m = 0;
      for (int64_t j = first; j < first + sizes[i]; ++j) m = std::max(m, double(std::fabs(ms[i].get(0, j))));
      want.push_back(m);
      p.data[i] = static_cast<const char*>(ms[i].data()) + first * (t == DType::F32 ? 4 : 2);
      p.numel[i] = sizes[i];
      p.dtype[i] = t;
    }
    p.count = int(ms.size());
    p.blocks = max_abs_blocks(5000);
    std::vector<float> partial(size_t(p.count * p.blocks) + 1), maxima(size_t(p.count) + 1, -1.f);
    p.partial = partial.data();
    p.maxima = maxima.data();
    const std::string what = std::string("max_abs ") + dtype_name(t) + (poison ? " inf" : "");
    if (!launched(launch_max_abs(p, nullptr), what)) return;
    for (size_t i = 0; i < want.size(); ++i) {
      if (double(maxima[i]) != want[i]) {
        ++failures;
        std::printf("FAIL %s: tensor %zu max %.9g, expected %.9g\n", what.c_str(), i, maxima[i], want[i]);
      }
    }
  }

  // The fused small-N forward. u is checked against the float64 dot rounded to the dtype (one flip allowed), y
  // against float64 from the kernel's own u (so a flip in u is not counted twice).
  void decode(DType t, int64_t n, int64_t in_f, int64_t out_f, int64_t r, bool with_weight, bool with_idx,
              bool strided) {
    const int64_t k = with_idx ? 3 : 1, pad = strided ? 8 : 0;
    Matrix x(t, n, in_f, in_f), a(t, r, in_f, in_f + pad), b(t, out_f, r, r + pad), w(t, out_f, in_f, in_f),
        bias(t, 1, out_f, out_f), base(t, n, out_f, out_f + pad), u(t, n, r, r), y(t, n, out_f, out_f);
    for (Matrix* m : {&x, &a, &b, &w, &bias, &base}) m->randomize(rng);
    const std::vector<float> ld = random_floats(rng, k * r), lb = random_floats(rng, k * out_f);
    const std::vector<int64_t> idx = random_idx(rng, n, k);
    std::vector<float> h(size_t(n * r) + 1);
    const std::string what = "decode " + std::string(dtype_name(t)) + " n " + std::to_string(n) + " in " +
                             std::to_string(in_f) + " out " + std::to_string(out_f) + " r " + std::to_string(r) +
                             (with_weight ? " weight+bias" : " base") + (with_idx ? " idx" : "") +
                             (strided ? " strided" : "");
    const DecodeParams p{x.data(),
                         in_f,
                         with_weight ? w.data() : nullptr,
                         in_f,
                         with_weight ? bias.data() : nullptr,
                         with_weight ? nullptr : base.data(),
                         base.ld,
                         a.data(),
                         a.ld,
                         b.data(),
                         b.ld,
                         ld.data(),
                         lb.data(),
                         with_idx ? idx.data() : nullptr,
                         k,
                         u.data(),
                         h.data(),
                         y.data(),
                         n,
                         in_f,
                         out_f,
                         r,
                         t};
    if (!launched(launch_decode(p, nullptr), what)) return;
    const double eps = t == DType::F32 ? 0x1p-23 : t == DType::F16 ? 0x1p-10 : 0x1p-7;
    auto bad = [&](const char* name, int64_t i, int64_t j, double got, double want, double mag) {
      if (std::fabs(got - want) <= eps * std::fabs(want) + 1e-5 * mag + 0x1p-24) return false;
      ++failures;
      std::printf("FAIL %s: %s[%lld, %lld] = %.9g, expected %.9g\n", what.c_str(), name, (long long)i, (long long)j,
                  got, want);
      return true;
    };
    for (int64_t m = 0; m < n; ++m) {
      const int64_t ad = with_idx ? idx[m] : 0;
      for (int64_t kk = 0; kk < r; ++kk) {
        double dot = 0, mag = 0;
        for (int64_t j = 0; j < in_f; ++j) {
          dot += double(x.get(m, j)) * a.get(kk, j);
          mag += std::fabs(double(x.get(m, j)) * a.get(kk, j));
        }
        if (bad("u", m, kk, u.get(m, kk), dot, mag)) return;
      }
      for (int64_t o = 0; o < out_f; ++o) {
        double before = with_weight ? bias.get(0, o) : base.get(m, o), mag = std::fabs(before);
        for (int64_t j = 0; with_weight && j < in_f; ++j) {
          before += double(w.get(o, j)) * x.get(m, j);
          mag += std::fabs(double(w.get(o, j)) * x.get(m, j));
        }
        double adapter = 0;
        Matrix h(t, 1, 1, 1);  // h = u * lambda_d rounded to the data dtype, as the kernel (and the GEMM paths) do
        for (int64_t kk = 0; ad >= 0 && kk < r; ++kk) {
          h.set(0, 0, u.get(m, kk) * ld[ad * r + kk]);
          const double term = double(b.get(o, kk)) * h.get(0, 0) * lb[ad * out_f + o];
          adapter += term;
          mag += std::fabs(term);
        }
        if (bad("y", m, o, y.get(m, o), before + adapter, mag)) return;
      }
    }
  }
};

}  // namespace

int check_kernels(unsigned seed) {
  Checker c(seed);
  for (const DType t : kDtypes) {
    for (const Shape& s : kShapes) {
      for (bool col_lam : {false, true}) {
        c.row_scale(t, s, t, col_lam);
        if (t != DType::F32) c.row_scale(t, s, DType::F32, col_lam);
      }
      for (const bool idx : {false, true}) {
        c.col_scale(t, s, idx);
        c.scale_add(t, s, idx, /*in_place=*/false);
        c.scale_add(t, s, idx, /*in_place=*/true);
      }
      c.lambda_grads(t, s);
    }
    c.lambda_grads(t, {70, 300, 301});  // more than one column chunk and several row chunks
    int max_splits = 1;
    for (const Shape& s : kShapes) max_splits = std::max(max_splits, c.col_dot_reduce(t, s, 1, false));
    max_splits = std::max(max_splits, c.col_dot_reduce(t, {300, 40, 47}, 3, true));
    max_splits = std::max(max_splits, c.col_dot_reduce(t, {513, 33, 33}, 2, true));
    if (max_splits < 2) {
      ++c.failures;
      std::printf("FAIL col_dot_reduce: no case used more than one row split\n");
    }
    for (const bool transposed : {false, true}) {
      // empty, one element, ragged tiles in both directions (two blocks each way), r within and past a k chunk
      for (const auto& [o, i, r] : {std::array<int64_t, 3>{0, 3, 2}, {1, 1, 1}, {33, 65, 9}, {140, 131, 17}}) {
        c.merge(t, o, i, r, transposed, 1.f, false, false, true);
        c.merge(t, o, i, r, transposed, -0.5f, false, false, false);
      }
      c.merge(t, 33, 65, 5, transposed, 1.f, true, false, true);
      c.merge(t, 33, 65, 5, transposed, 1.f, true, true, false);
    }
  }
  for (const DType t : kDtypes) {
    c.max_abs(t, false);
    c.max_abs(t, true);
    c.decode(t, 1, 7, 5, 3, true, false, false);     // odd sizes: element-wise loads
    c.decode(t, 3, 64, 40, 16, true, false, false);  // 16-byte loads in every dtype
    c.decode(t, 5, 131, 37, 24, true, true, true);   // mixed adapters, strided projection slices
    c.decode(t, 17, 64, 33, 8, false, true, false);  // base given instead of a weight
    c.decode(t, 32, 40, 24, 12, true, true, false);  // the most rows
    // 16-byte paths of every row bucket (1, 4, 16, 32), ragged out_f and r, aligned strided slices (pad 8)
    c.decode(t, 1, 64, 41, 16, true, true, true);
    c.decode(t, 4, 1032, 9, 9, true, true, false);  // r = 9: pass 2 element-wise, pass 1 16-byte
    c.decode(t, 16, 136, 37, 24, true, true, true);
    c.decode(t, 20, 72, 13, 8, false, false, true);
  }
  std::printf("kernels: %d failure(s)\n", c.failures);
  return c.failures;
}

}  // namespace vera::check
