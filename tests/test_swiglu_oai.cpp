// Tests of swiglu_oai and mlp_swiglu (reference/ops/swiglu_oai.h) against plain-loop fp64
// formulas of spec §2.4, with inputs that cross both clamps, and the shape checks.
// Run: build/<dir>/tests/test_swiglu_oai  (M3_TEST_SEED=<n> reproduces a failing draw)
#include "reference/ops/swiglu_oai.h"

#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>
#include <vector>

namespace {

using m3::Mat;
using m3::ref::SwigluParams;
using m3::test::poison;
using m3::test::randn;
using m3::test::rel_l2;

// fp64 instantiation vs fp64 naive: only summation order differs (sums of a few dozen terms),
// so the difference is a few hundred ulps of 1.1e-16 at most.
// fp32 instantiation vs fp64 naive: fp32 unit roundoff is 6e-8; GEMMs over a few dozen terms and
// one activation rounding stay far below 1e-5.
template <class T>
constexpr double kTol = sizeof(T) == 8 ? 1e-12 : 1e-5;

double naive_act(double gate, double up, const SwigluParams& p) {
  double g = gate < p.limit ? gate : p.limit;
  double u = up < -p.limit ? -p.limit : (up > p.limit ? p.limit : up);
  return (u + p.beta) * g / (1.0 + std::exp(-p.alpha * g));
}

template <class T>
bool all_finite(const Mat<T>& m) {
  for (Eigen::Index i = 0; i < m.size(); ++i)
    if (!std::isfinite(static_cast<double>(m.data()[i]))) return false;
  return true;
}

template <class T>
void check_activation(Eigen::Index R, Eigen::Index I, const SwigluParams& p) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  // std 6 puts about a quarter of the draws beyond +-7, so both clamps are exercised.
  Mat<T> gate = randn<T>(R, I, g, 6.0), up = randn<T>(R, I, g, 6.0);  // [R, I]
  Mat<double> ref(R, I);                                              // [R, I]
  for (Eigen::Index r = 0; r < R; ++r)
    for (Eigen::Index i = 0; i < I; ++i) ref(r, i) = naive_act(gate(r, i), up(r, i), p);
  Mat<T> act(R, I);  // [R, I]
  poison(act);
  m3::ref::swiglu_oai(gate, up, p, act);
  ASSERT_EQ(act.rows(), R);
  ASSERT_EQ(act.cols(), I);
  EXPECT_TRUE(all_finite(act));
  EXPECT_GT(gate.norm(), 0.0);
  EXPECT_GT(ref.norm(), 0.0);
  EXPECT_LE(rel_l2(act, ref), kTol<T>);

  // In place: act may alias gate or up and must give the same bits.
  Mat<T> g2 = gate, u2 = up;
  m3::ref::swiglu_oai(g2, up, p, g2);
  m3::ref::swiglu_oai(gate, u2, p, u2);
  EXPECT_EQ(g2, act);
  EXPECT_EQ(u2, act);
}

// Values around and beyond the clamps; each checked against the naive formula and against the
// clamp's defining property (the output past a clamp equals the output at the clamp).
template <class T>
void check_clamps() {
  const SwigluParams p;  // alpha 1.702, limit 7, beta 1 (spec §2.4)
  const std::vector<double> gates = {-1000, -100, -8, -7.5, -7, -6.9, -1, 0,
                                     0.5,   6.9,  7,  7.5,  8,  100,  1e6};
  const std::vector<double> ups = {-1e6, -8, -7.5, -7, -6.9, -1, 0, 1, 6.9, 7, 7.5, 8, 1e6};
  const auto R = static_cast<Eigen::Index>(gates.size()), I = static_cast<Eigen::Index>(ups.size());
  Mat<T> gate(R, I), up(R, I), act(R, I);  // [R, I]: every (gate, up) pair
  Mat<double> ref(R, I);                   // [R, I]
  for (Eigen::Index r = 0; r < R; ++r)
    for (Eigen::Index i = 0; i < I; ++i) {
      gate(r, i) = static_cast<T>(gates[r]);
      up(r, i) = static_cast<T>(ups[i]);
      ref(r, i) = naive_act(gates[r], ups[i], p);
    }
  poison(act);
  m3::ref::swiglu_oai(gate, up, p, act);
  EXPECT_TRUE(all_finite(act));
  EXPECT_GT(ref.norm(), 0.0);
  EXPECT_LE(rel_l2(act, ref), kTol<T>);

  auto one = [&](double gv, double uv) {
    Mat<T> a(1, 1), b(1, 1), o(1, 1);
    a(0, 0) = static_cast<T>(gv);
    b(0, 0) = static_cast<T>(uv);
    m3::ref::swiglu_oai(a, b, p, o);
    return static_cast<double>(o(0, 0));
  };
  // gate: clamped from above only.
  EXPECT_EQ(one(7.5, 2.0), one(7.0, 2.0));
  EXPECT_EQ(one(1e6, 2.0), one(7.0, 2.0));
  EXPECT_NE(one(-7.5, 2.0), one(-7.0, 2.0));
  EXPECT_LT(one(-8.0, 2.0), 0.0);  // g * sigmoid(1.702 g) < 0 for unclamped negative g
  // Very negative gate: sigmoid underflows to 0 and the product is 0, not NaN.
  EXPECT_EQ(one(-1000.0, 2.0), 0.0);
  // up: clamped to [-7, 7].
  EXPECT_EQ(one(3.0, 7.5), one(3.0, 7.0));
  EXPECT_EQ(one(3.0, 1e6), one(3.0, 7.0));
  EXPECT_EQ(one(3.0, -7.5), one(3.0, -7.0));
  EXPECT_EQ(one(3.0, -1e6), one(3.0, -7.0));
  EXPECT_NE(one(3.0, 6.9), one(3.0, 7.0));
  // beta = 1: u = -1 zeroes the output whatever the gate.
  EXPECT_EQ(one(3.0, -1.0), 0.0);
  // Exact value at the corner gate = up = 7: (7 + 1) * 7 * sigmoid(11.914).
  EXPECT_NEAR(one(7.0, 7.0), 56.0 / (1.0 + std::exp(-11.914)), 56.0 * kTol<T>);
}

template <class T>
void check_mlp(Eigen::Index R, Eigen::Index H, Eigen::Index I, const SwigluParams& p) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  Mat<T> x = randn<T>(R, H, g);  // [R, H]
  // Weight std 5/sqrt(H) gives gate and up a std of about 5: clamps are hit often.
  const double ws = 5.0 / std::sqrt(static_cast<double>(H));
  Mat<T> wg = randn<T>(I, H, g, ws), wu = randn<T>(I, H, g, ws);           // [I, H]
  Mat<T> wd = randn<T>(H, I, g, 1.0 / std::sqrt(static_cast<double>(I)));  // [H, I]

  Mat<double> act(R, I);  // [R, I]
  int gate_clamped = 0, up_clamped = 0;
  for (Eigen::Index r = 0; r < R; ++r)
    for (Eigen::Index i = 0; i < I; ++i) {
      double gs = 0, us = 0;
      for (Eigen::Index h = 0; h < H; ++h) {
        gs += static_cast<double>(x(r, h)) * static_cast<double>(wg(i, h));
        us += static_cast<double>(x(r, h)) * static_cast<double>(wu(i, h));
      }
      gate_clamped += gs > p.limit;
      up_clamped += std::abs(us) > p.limit;
      act(r, i) = naive_act(gs, us, p);
    }
  Mat<double> ref(R, H);  // [R, H]
  for (Eigen::Index r = 0; r < R; ++r)
    for (Eigen::Index h = 0; h < H; ++h) {
      double s = 0;
      for (Eigen::Index i = 0; i < I; ++i) s += act(r, i) * static_cast<double>(wd(h, i));
      ref(r, h) = s;
    }

  Mat<T> y(R, H);  // [R, H]
  poison(y);
  m3::ref::mlp_swiglu(x, wg, wu, wd, p, y);
  ASSERT_EQ(y.rows(), R);
  ASSERT_EQ(y.cols(), H);
  EXPECT_TRUE(all_finite(y));
  EXPECT_GT(x.norm(), 0.0);
  EXPECT_GT(ref.norm(), 0.0);
  EXPECT_LE(rel_l2(y, ref), kTol<T>);
  // Only a property of the larger draws: with R*I >= 50 values of std 5 some pass the clamps.
  if (R * I >= 50) {
    EXPECT_GT(gate_clamped, 0);
    EXPECT_GT(up_clamped, 0);
  }
}

TEST(SwigluOai_f32, Activation_Random) { check_activation<float>(37, 19, SwigluParams{}); }
TEST(SwigluOai_f64, Activation_Random) { check_activation<double>(37, 19, SwigluParams{}); }
TEST(SwigluOai_f64, Activation_OneRow_OddI) { check_activation<double>(1, 3, SwigluParams{}); }
TEST(SwigluOai_f32, Activation_Clamps) { check_clamps<float>(); }
TEST(SwigluOai_f64, Activation_Clamps) { check_clamps<double>(); }
// Non-default parameters must all be honoured (alpha, limit, beta).
TEST(SwigluOai_f64, Activation_CustomParams) {
  check_activation<double>(11, 13, SwigluParams{1.0, 3.0, 0.5});
}

TEST(MlpSwiglu_f32, OneRow_OddI) { check_mlp<float>(1, 16, 9, SwigluParams{}); }
TEST(MlpSwiglu_f64, OneRow_OddI) { check_mlp<double>(1, 16, 9, SwigluParams{}); }
TEST(MlpSwiglu_f32, OddAll) { check_mlp<float>(33, 23, 17, SwigluParams{}); }
TEST(MlpSwiglu_f64, OddAll) { check_mlp<double>(33, 23, 17, SwigluParams{}); }
TEST(MlpSwiglu_f32, Wide) { check_mlp<float>(64, 32, 96, SwigluParams{}); }
TEST(MlpSwiglu_f64, Wide) { check_mlp<double>(64, 32, 96, SwigluParams{}); }
TEST(MlpSwiglu_f64, CustomParams) { check_mlp<double>(20, 12, 7, SwigluParams{1.0, 3.0, 0.5}); }

// y may be x itself (x is no longer read when y is written).
TEST(MlpSwiglu_f64, OutputAliasesInput) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  Mat<double> x = randn<double>(5, 8, g), wg = randn<double>(3, 8, g), wu = randn<double>(3, 8, g);
  Mat<double> wd = randn<double>(8, 3, g), y;
  m3::ref::mlp_swiglu(x, wg, wu, wd, SwigluParams{}, y);
  m3::ref::mlp_swiglu(x, wg, wu, wd, SwigluParams{}, x);
  EXPECT_EQ(x, y);
}

TEST(SwigluOai_f32, BadShapesThrow) {
  Mat<float> a(4, 5), b(4, 6), c(3, 5), act;
  a.setOnes();
  b.setOnes();
  c.setOnes();
  EXPECT_THROW(m3::ref::swiglu_oai(a, b, SwigluParams{}, act), std::invalid_argument);
  EXPECT_THROW(m3::ref::swiglu_oai(a, c, SwigluParams{}, act), std::invalid_argument);
  EXPECT_THROW(m3::ref::swiglu_oai(a, a, SwigluParams{1.702, -1.0, 1.0}, act),
               std::invalid_argument);
}

TEST(MlpSwiglu_f32, BadShapesThrow) {
  const Eigen::Index R = 3, H = 8, I = 5;
  Mat<float> x = Mat<float>::Ones(R, H), wg = Mat<float>::Ones(I, H), wu = Mat<float>::Ones(I, H);
  Mat<float> wd = Mat<float>::Ones(H, I), y;
  EXPECT_NO_THROW(m3::ref::mlp_swiglu(x, wg, wu, wd, SwigluParams{}, y));
  Mat<float> x_bad = Mat<float>::Ones(R, H + 1);
  EXPECT_THROW(m3::ref::mlp_swiglu(x_bad, wg, wu, wd, SwigluParams{}, y), std::invalid_argument);
  Mat<float> wu_rows = Mat<float>::Ones(I + 1, H), wu_cols = Mat<float>::Ones(I, H - 1);
  EXPECT_THROW(m3::ref::mlp_swiglu(x, wg, wu_rows, wd, SwigluParams{}, y), std::invalid_argument);
  EXPECT_THROW(m3::ref::mlp_swiglu(x, wg, wu_cols, wd, SwigluParams{}, y), std::invalid_argument);
  Mat<float> wd_t = Mat<float>::Ones(I, H);  // transposed down projection
  EXPECT_THROW(m3::ref::mlp_swiglu(x, wg, wu, wd_t, SwigluParams{}, y), std::invalid_argument);
  Mat<float> wd_rows = Mat<float>::Ones(H + 1, I);
  EXPECT_THROW(m3::ref::mlp_swiglu(x, wg, wu, wd_rows, SwigluParams{}, y), std::invalid_argument);
}

}  // namespace

// Rounding::BF16 rounds gate, up, act and y to bf16 (the GPU's storage points) and nothing else:
// it equals the same steps written out with an explicit round after each, bit for bit, its output
// is bf16-exact, and it differs from the unrounded MLP (so the mode is not a no-op).
TEST(MlpSwiglu_f32, Bf16RoundingAtTheGpuStoragePoints) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const SwigluParams p{};
  Mat<float> x = randn<float>(19, 24, g, 2.0), wg = randn<float>(13, 24, g), wu = randn<float>(13, 24, g);  // [R, H], [I, H]
  Mat<float> wd = randn<float>(24, 13, g);  // [H, I]
  Mat<float> gate(19, 13), up(19, 13), act;  // [R, I]; the products written as mlp_swiglu writes them
  gate.noalias() = x * wg.transpose();
  up.noalias() = x * wu.transpose();
  m3::round_bf16_inplace(gate);
  m3::round_bf16_inplace(up);
  m3::ref::swiglu_oai(gate, up, p, act);
  m3::round_bf16_inplace(act);
  Mat<float> want(19, 24);  // [R, H]
  want.noalias() = act * wd.transpose();
  m3::round_bf16_inplace(want);

  Mat<float> y(19, 24), y_exact;  // [R, H]
  poison(y);
  m3::ref::mlp_swiglu(x, wg, wu, wd, p, y, m3::ref::Rounding::BF16);
  m3::ref::mlp_swiglu(x, wg, wu, wd, p, y_exact, m3::ref::Rounding::NONE);
  ASSERT_TRUE(all_finite(y));
  EXPECT_GT(want.norm(), 0.0);
  EXPECT_EQ(y, want);
  Mat<float> y_round = y;
  m3::round_bf16_inplace(y_round);
  EXPECT_EQ(y, y_round);
  EXPECT_NE(y, y_exact);
}
