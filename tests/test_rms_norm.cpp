// Tests of ref::rms_norm and ref::rms_norm_heads (reference/ops/rms_norm.h): Gemma (1 + w)
// RMSNorm against a plain fp64 loop, both dtypes, in-place calls, scale invariance, bad input.
#include "reference/ops/rms_norm.h"

#include "tests/test_util.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace {

using m3::Mat;
using m3::MatD;
using m3::Vec;
using m3::ref::rms_norm;
using m3::ref::rms_norm_heads;
using m3::test::poison;
using m3::test::rel_l2;

constexpr double kEps = 1e-6;  // M3's rms_norm_eps (spec §1.1)
// fp64 vs fp64: the op and the loop differ only in the order of one product per element.
constexpr double kTolF64 = 1e-12;
// fp32 vs fp64: the op works in fp64 and rounds each output once (6e-8); 1e-5 is the suite's
// fp32 bound, far above that.
constexpr double kTolF32 = 1e-5;

template <class T>
constexpr double tol() { return std::is_same_v<T, double> ? kTolF64 : kTolF32; }

// Each slice of d values of a row: y = x / sqrt(mean(x^2) + eps) * (1 + w).
MatD naive_norm(const MatD& x, const Eigen::VectorXd& w, int n_heads, double eps) {
  const Eigen::Index d = w.size();
  MatD y(x.rows(), x.cols());  // [R, n_heads*d]
  for (Eigen::Index r = 0; r < x.rows(); ++r)
    for (int h = 0; h < n_heads; ++h) {
      double ss = 0;
      for (Eigen::Index i = 0; i < d; ++i) ss += x(r, h * d + i) * x(r, h * d + i);
      const double rms = std::sqrt(ss / static_cast<double>(d) + eps);
      for (Eigen::Index i = 0; i < d; ++i) y(r, h * d + i) = x(r, h * d + i) / rms * (1.0 + w[i]);
    }
  return y;
}

// n_heads == 0 selects rms_norm (one slice = the whole row), otherwise rms_norm_heads.
template <class T>
void check_case(int R, int n_heads, int d, double x_scale, std::mt19937_64& g) {
  SCOPED_TRACE("R=" + std::to_string(R) + " heads=" + std::to_string(n_heads) +
               " d=" + std::to_string(d) + " x_scale=" + std::to_string(x_scale));
  const int heads = n_heads == 0 ? 1 : n_heads;
  const Mat<T> x = m3::test::randn<T>(R, heads * d, g, x_scale);  // [R, heads*d]
  const Vec<T> w = m3::test::randn_vec<T>(d, g, 0.5);             // [d]; Gemma stores w, uses 1+w
  Mat<T> y(R, heads * d);                                         // [R, heads*d]
  poison(y);
  if (n_heads == 0) rms_norm<T>(x, w, kEps, y);
  else rms_norm_heads<T>(x, n_heads, w, kEps, y);
  const MatD ref = naive_norm(x.template cast<double>(), w.template cast<double>(), heads, kEps);
  ASSERT_EQ(y.rows(), R);
  ASSERT_EQ(y.cols(), heads * d);
  EXPECT_GT(x.norm(), 0);
  EXPECT_GT(ref.norm(), 0);
  EXPECT_TRUE(y.allFinite());
  EXPECT_LE(rel_l2(y, ref), tol<T>());
}

template <class T>
void check_rows() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  for (int R : {1, 5, 33})
    for (int C : {1, 7, 128, 6144}) check_case<T>(R, 0, C, 1.0, g);
  // Mean square ~1e-6 = eps: a misplaced eps (outside the sqrt, or dropped) fails here.
  check_case<T>(4, 0, 64, 1e-3, g);
}
TEST(RmsNorm_f32, Rows) { check_rows<float>(); }
TEST(RmsNorm_f64, Rows) { check_rows<double>(); }

template <class T>
void check_heads() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  for (int heads : {1, 3, 64})
    for (int d : {1, 8, 17, 128}) check_case<T>(3, heads, d, 1.0, g);
  check_case<T>(2, 4, 32, 1e-3, g);
}
TEST(RmsNormHeads_f32, PerHead) { check_heads<float>(); }
TEST(RmsNormHeads_f64, PerHead) { check_heads<double>(); }

// y may be x: the in-place result equals the out-of-place one bit for bit.
template <class T>
void check_in_place() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const Mat<T> x0 = m3::test::randn<T>(6, 3 * 17, g);  // [R, 3*17]
  const Vec<T> w_row = m3::test::randn_vec<T>(3 * 17, g);
  const Vec<T> w_head = m3::test::randn_vec<T>(17, g);
  Mat<T> separate, x = x0;
  rms_norm<T>(x0, w_row, kEps, separate);
  rms_norm<T>(x, w_row, kEps, x);
  EXPECT_EQ(x, separate);
  x = x0;
  rms_norm_heads<T>(x0, 3, w_head, kEps, separate);
  rms_norm_heads<T>(x, 3, w_head, kEps, x);
  EXPECT_EQ(x, separate);
}
TEST(RmsNorm_f32, InPlace) { check_in_place<float>(); }
TEST(RmsNorm_f64, InPlace) { check_in_place<double>(); }

// y(c x) = y(x) apart from eps: y(c x) / y(x) = sqrt((ms + eps) / (ms + eps / c^2)) for a row of
// mean square ms, so the relative change is at most |1 - 1/c^2| eps / (2 ms) (first order). The
// bound is computed from the smallest row mean square; 1.01 covers the second-order term, and the
// rounding allowance is the dtype's tolerance.
template <class T>
void check_scale_invariance() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const int R = 8, C = 96;
  const Mat<T> x = m3::test::randn<T>(R, C, g);  // [R, C]
  const Vec<T> w = m3::test::randn_vec<T>(C, g, 0.5);
  double min_ms = INFINITY;
  for (int r = 0; r < R; ++r)
    min_ms = std::min(min_ms, x.row(r).template cast<double>().squaredNorm() / C);
  Mat<T> y, y_scaled;
  rms_norm<T>(x, w, kEps, y);
  EXPECT_GT(y.norm(), 0);
  for (double c : {1000.0, 0.37, 4.0}) {
    SCOPED_TRACE("c=" + std::to_string(c));
    const Mat<T> xc = (x.template cast<double>() * c).template cast<T>();
    rms_norm<T>(xc, w, kEps, y_scaled);
    const double bound = 1.01 * std::abs(1.0 - 1.0 / (c * c)) * kEps / (2.0 * min_ms) + tol<T>();
    EXPECT_LE(rel_l2(y_scaled, y), bound);
  }
}
TEST(RmsNorm_f32, ScaleInvariant) { check_scale_invariance<float>(); }
TEST(RmsNorm_f64, ScaleInvariant) { check_scale_invariance<double>(); }

TEST(RmsNorm_f32, BadInput_Throws) {
  const Mat<float> x = Mat<float>::Ones(2, 12);
  const Vec<float> w12 = Vec<float>::Ones(12), w4 = Vec<float>::Ones(4), w5 = Vec<float>::Ones(5);
  Mat<float> y;
  EXPECT_NO_THROW(rms_norm<float>(x, w12, kEps, y));
  EXPECT_THROW(rms_norm<float>(x, w4, kEps, y), std::invalid_argument);
  EXPECT_THROW(rms_norm<float>(x, w12, -1.0, y), std::invalid_argument);
  EXPECT_THROW(rms_norm<float>(x, w12, NAN, y), std::invalid_argument);
  EXPECT_NO_THROW(rms_norm_heads<float>(x, 3, w4, kEps, y));
  EXPECT_THROW(rms_norm_heads<float>(x, 3, w5, kEps, y), std::invalid_argument);
  EXPECT_THROW(rms_norm_heads<float>(x, 4, w4, kEps, y), std::invalid_argument);
  EXPECT_THROW(rms_norm_heads<float>(x, 0, w4, kEps, y), std::invalid_argument);
  EXPECT_THROW(rms_norm_heads<float>(x, 3, Vec<float>(), kEps, y), std::invalid_argument);
  EXPECT_THROW(rms_norm_heads<float>(x, 3, w4, -1e-6, y), std::invalid_argument);
}

}  // namespace
