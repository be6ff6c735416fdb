// Tests of ref::lm_head (reference/ops/lm_head.h): final Gemma RMSNorm then the untied projection,
// against a plain fp64 loop, both dtypes, awkward sizes, bad shapes.
#include "reference/ops/lm_head.h"

#include "tests/test_util.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace {

using m3::Mat;
using m3::MatD;
using m3::Vec;
using m3::ref::lm_head;
using m3::test::poison;
using m3::test::rel_l2;

constexpr double kEps = 1e-6;  // M3's rms_norm_eps (spec §1.1)
// fp64 vs fp64: the GEMM's blocked summation order against a loop, <= 65 terms per logit.
constexpr double kTolF64 = 1e-12;
// fp32 vs fp64: normed h is rounded to fp32 (6e-8), then dots of <= 65 terms: 1e-5 is ample.
constexpr double kTolF32 = 1e-5;

// logits[t, v] = sum_c (h[t, c] / rms(h[t]) * (1 + norm_w[c])) * w[v, c]
MatD naive_lm_head(const MatD& h, const Eigen::VectorXd& norm_w, const MatD& w) {
  MatD logits(h.rows(), w.rows());  // [T, V]
  for (Eigen::Index t = 0; t < h.rows(); ++t) {
    double ss = 0;
    for (Eigen::Index c = 0; c < h.cols(); ++c) ss += h(t, c) * h(t, c);
    const double rms = std::sqrt(ss / static_cast<double>(h.cols()) + kEps);
    for (Eigen::Index v = 0; v < w.rows(); ++v) {
      double s = 0;
      for (Eigen::Index c = 0; c < h.cols(); ++c) s += h(t, c) / rms * (1.0 + norm_w[c]) * w(v, c);
      logits(t, v) = s;
    }
  }
  return logits;
}

template <class T>
void check_sizes(double tol) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  struct Size { int tokens, H, V; };
  for (Size s : {Size{1, 1, 1}, Size{1, 16, 7}, Size{5, 65, 300}, Size{17, 32, 129}}) {
    SCOPED_TRACE("T=" + std::to_string(s.tokens) + " H=" + std::to_string(s.H) +
                 " V=" + std::to_string(s.V));
    // h is drawn at scale 3, not 1, so that a missing normalization cannot pass.
    const Mat<T> h = m3::test::randn<T>(s.tokens, s.H, g, 3.0);  // [T, H]
    const Vec<T> norm_w = m3::test::randn_vec<T>(s.H, g, 0.5);   // [H]
    const Mat<T> w = m3::test::randn<T>(s.V, s.H, g);            // [V, H]
    Mat<T> logits(s.tokens, s.V);                                // [T, V]
    poison(logits);
    lm_head<T>(h, norm_w, kEps, w, logits);
    const MatD ref = naive_lm_head(h.template cast<double>(), norm_w.template cast<double>(),
                                   w.template cast<double>());
    ASSERT_EQ(logits.rows(), s.tokens);
    ASSERT_EQ(logits.cols(), s.V);
    EXPECT_GT(h.norm(), 0);
    EXPECT_GT(ref.norm(), 0);
    EXPECT_TRUE(logits.allFinite());
    EXPECT_LE(rel_l2(logits, ref), tol);
  }
}
TEST(LmHead_f32, AwkwardSizes) { check_sizes<float>(kTolF32); }
TEST(LmHead_f64, AwkwardSizes) { check_sizes<double>(kTolF64); }

TEST(LmHead_f32, BadShape_Throws) {
  const Mat<float> h = Mat<float>::Ones(2, 8), w = Mat<float>::Ones(5, 8);
  const Vec<float> norm_w = Vec<float>::Zero(8);
  Mat<float> logits;
  EXPECT_NO_THROW(lm_head<float>(h, norm_w, kEps, w, logits));
  EXPECT_THROW(lm_head<float>(h, Vec<float>::Zero(7), kEps, w, logits), std::invalid_argument);
  EXPECT_THROW(lm_head<float>(h, norm_w, kEps, Mat<float>::Ones(5, 9), logits),
               std::invalid_argument);
  EXPECT_THROW(lm_head<float>(h, norm_w, -1.0, w, logits), std::invalid_argument);
}

}  // namespace
