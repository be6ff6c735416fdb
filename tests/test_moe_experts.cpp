// Tests of moe_experts (reference/ops/moe_experts.h) against a per-token fp64 loop of spec §4:
// y = routed_scale * sum_j w_j Expert_{e_j}(x) + Shared(x); unused experts, all tokens on one
// expert, one token, the routed scale applied to the routed part only, slot order, bad input.
// Run: build/<dir>/tests/test_moe_experts  (M3_TEST_SEED=<n> reproduces a failing draw)
#include "reference/ops/moe_experts.h"

#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using m3::Mat;
using m3::MatI;
using m3::ref::MlpWeights;
using m3::ref::SwigluParams;
using m3::test::poison;
using m3::test::randn;
using m3::test::rel_l2;

// fp64 vs fp64 naive: summation order only, over at most a few hundred terms (~1e-15).
// fp32 vs fp64 naive: fp32 roundoff 6e-8; two GEMMs of <= 32 terms, the activation and a sum of
// K_e + 1 outputs keep the error orders of magnitude below 1e-5.
template <class T>
constexpr double kTol = sizeof(T) == 8 ? 1e-12 : 1e-5;

template <class T>
MlpWeights<T> random_mlp(Eigen::Index H, Eigen::Index I, std::mt19937_64& g) {
  // Gate/up std about 3 for unit inputs: the clamps at +-7 are reached now and then.
  const double ws = 3.0 / std::sqrt(static_cast<double>(H));
  MlpWeights<T> w;
  w.gate = randn<T>(I, H, g, ws);                                       // [I, H]
  w.up = randn<T>(I, H, g, ws);                                         // [I, H]
  w.down = randn<T>(H, I, g, 1.0 / std::sqrt(static_cast<double>(I)));  // [H, I]
  return w;
}

// Plain-loop fp64 SwiGLU-OAI MLP of one token row; y [H] += scale * mlp(x_t).
template <class T>
void naive_mlp_add(const Mat<T>& x, Eigen::Index t, const MlpWeights<T>& w, const SwigluParams& p,
                   double scale, std::vector<double>& y) {
  const Eigen::Index H = x.cols(), I = w.gate.rows();
  std::vector<double> act(I);
  for (Eigen::Index i = 0; i < I; ++i) {
    double gs = 0, us = 0;
    for (Eigen::Index h = 0; h < H; ++h) {
      gs += static_cast<double>(x(t, h)) * static_cast<double>(w.gate(i, h));
      us += static_cast<double>(x(t, h)) * static_cast<double>(w.up(i, h));
    }
    const double gc = std::min(gs, p.limit), uc = std::max(-p.limit, std::min(us, p.limit));
    act[i] = (uc + p.beta) * gc / (1.0 + std::exp(-p.alpha * gc));
  }
  for (Eigen::Index h = 0; h < H; ++h) {
    double s = 0;
    for (Eigen::Index i = 0; i < I; ++i) s += act[i] * static_cast<double>(w.down(h, i));
    y[h] += scale * s;
  }
}

template <class T>
Mat<double> naive_moe(const Mat<T>& x, const MatI& ex, const Mat<T>& wts,
                      const std::vector<MlpWeights<T>>& ew, const MlpWeights<T>* shared,
                      double routed_scale, const SwigluParams& p) {
  Mat<double> y(x.rows(), x.cols());  // [T, H]
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    std::vector<double> routed(x.cols(), 0.0), total(x.cols(), 0.0);
    for (Eigen::Index j = 0; j < ex.cols(); ++j)
      naive_mlp_add(x, t, ew[ex(t, j)], p, static_cast<double>(wts(t, j)), routed);
    if (shared) naive_mlp_add(x, t, *shared, p, 1.0, total);
    for (Eigen::Index h = 0; h < x.cols(); ++h) y(t, h) = routed_scale * routed[h] + total[h];
  }
  return y;
}

// K distinct random ids per token out of [0, E), skipping `avoid` (pass -1 to allow all).
MatI random_choice(Eigen::Index Tn, int E, int K, std::mt19937_64& g, int avoid = -1) {
  MatI ex(Tn, K);
  std::vector<int> ids;
  for (int e = 0; e < E; ++e)
    if (e != avoid) ids.push_back(e);
  for (Eigen::Index t = 0; t < Tn; ++t) {
    std::shuffle(ids.begin(), ids.end(), g);
    for (int j = 0; j < K; ++j) ex(t, j) = ids[j];
  }
  return ex;
}

template <class T>
Mat<T> random_weights(Eigen::Index Tn, int K, std::mt19937_64& g) {
  std::uniform_real_distribution<double> u(0.05, 1.0);  // router weights are positive
  Mat<T> w(Tn, K);
  for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = static_cast<T>(u(g));
  return w;
}

template <class T>
bool all_finite(const Mat<T>& m) {
  for (Eigen::Index i = 0; i < m.size(); ++i)
    if (!std::isfinite(static_cast<double>(m.data()[i]))) return false;
  return true;
}

template <class T>
Mat<T> run(const Mat<T>& x, const MatI& ex, const Mat<T>& wts, const std::vector<MlpWeights<T>>& ew,
           const MlpWeights<T>& shared, double routed_scale) {
  Mat<T> y(x.rows(), x.cols());  // [T, H]
  poison(y);
  m3::ref::moe_experts(x, ex, wts, ew, shared, routed_scale, SwigluParams{}, y);
  return y;
}

template <class T>
void expect_close(const Mat<T>& y, const Mat<double>& ref) {
  ASSERT_EQ(y.rows(), ref.rows());
  ASSERT_EQ(y.cols(), ref.cols());
  EXPECT_TRUE(all_finite(y));
  EXPECT_GT(ref.norm(), 0.0);
  EXPECT_LE(rel_l2(y, ref), kTol<T>);
}

// Random routing vs the naive loop. `avoid` >= 0 leaves that expert unchosen and fills its
// weights with NaN: any use of it would show in the output.
template <class T>
void check_random(Eigen::Index Tn, Eigen::Index H, Eigen::Index I, int E, int K, bool with_shared,
                  double routed_scale, int avoid = -1) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  Mat<T> x = randn<T>(Tn, H, g);  // [T, H]
  std::vector<MlpWeights<T>> ew;
  for (int e = 0; e < E; ++e) ew.push_back(random_mlp<T>(H, I, g));
  if (avoid >= 0) {
    poison(ew[avoid].gate);
    poison(ew[avoid].up);
    poison(ew[avoid].down);
  }
  MlpWeights<T> shared = with_shared ? random_mlp<T>(H, I + 2, g) : MlpWeights<T>{};
  MatI ex = random_choice(Tn, E, K, g, avoid);  // [T, K_e]
  Mat<T> wts = random_weights<T>(Tn, K, g);     // [T, K_e]
  Mat<double> ref =
      naive_moe(x, ex, wts, ew, with_shared ? &shared : nullptr, routed_scale, SwigluParams{});
  EXPECT_GT(x.norm(), 0.0);
  expect_close(run(x, ex, wts, ew, shared, routed_scale), ref);
}

TEST(MoeExperts_f32, T37_E6_K3_Shared) { check_random<float>(37, 16, 9, 6, 3, true, 2.0); }
TEST(MoeExperts_f64, T37_E6_K3_Shared) { check_random<double>(37, 16, 9, 6, 3, true, 2.0); }
TEST(MoeExperts_f32, OneToken_E5_K2) { check_random<float>(1, 12, 7, 5, 2, true, 2.0); }
TEST(MoeExperts_f64, OneToken_E5_K2) { check_random<double>(1, 12, 7, 5, 2, true, 2.0); }
TEST(MoeExperts_f64, OddH_KEqualsE) { check_random<double>(20, 11, 5, 3, 3, true, 1.5); }
TEST(MoeExperts_f32, UnusedExpert) { check_random<float>(25, 16, 9, 5, 2, true, 2.0, /*avoid=*/3); }
TEST(MoeExperts_f64, UnusedExpert) {
  check_random<double>(25, 16, 9, 5, 2, true, 2.0, /*avoid=*/3);
}
TEST(MoeExperts_f64, RoutedOnly) { check_random<double>(17, 8, 6, 4, 2, false, 2.0); }

// Every token routed to the same expert (one GEMM over all rows), K_e = 1 and K_e = 2.
template <class T>
void check_all_one_expert() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const Eigen::Index Tn = 40, H = 16, I = 9;
  const int E = 4;
  Mat<T> x = randn<T>(Tn, H, g);
  std::vector<MlpWeights<T>> ew;
  for (int e = 0; e < E; ++e) ew.push_back(random_mlp<T>(H, I, g));
  MlpWeights<T> shared = random_mlp<T>(H, I, g);
  MatI ex = MatI::Constant(Tn, 1, 2);
  Mat<T> wts = random_weights<T>(Tn, 1, g);
  expect_close(run(x, ex, wts, ew, shared, 2.0),
               naive_moe(x, ex, wts, ew, &shared, 2.0, SwigluParams{}));
  MatI ex2(Tn, 2);
  ex2.col(0).setConstant(2);
  ex2.col(1).setConstant(0);
  Mat<T> wts2 = random_weights<T>(Tn, 2, g);
  expect_close(run(x, ex2, wts2, ew, shared, 2.0),
               naive_moe(x, ex2, wts2, ew, &shared, 2.0, SwigluParams{}));
}
TEST(MoeExperts_f32, AllTokensOneExpert) { check_all_one_expert<float>(); }
TEST(MoeExperts_f64, AllTokensOneExpert) { check_all_one_expert<double>(); }

// The routed scale touches the routed part only: with no routed slots (K_e = 0) the output is
// the shared expert whatever the scale; with no shared expert it scales exactly (x2 and x0.5 are
// exact in binary floating point).
template <class T>
void check_routed_scale() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const Eigen::Index Tn = 13, H = 16, I = 9;
  const int E = 4, K = 2;
  Mat<T> x = randn<T>(Tn, H, g);
  std::vector<MlpWeights<T>> ew;
  for (int e = 0; e < E; ++e) ew.push_back(random_mlp<T>(H, I, g));
  MlpWeights<T> shared = random_mlp<T>(H, I, g), none;

  MatI ex0(Tn, 0);
  Mat<T> w0(Tn, 0);
  Mat<T> shared_only = run(x, ex0, w0, ew, shared, 2.0);
  expect_close(shared_only, naive_moe(x, ex0, w0, ew, &shared, 2.0, SwigluParams{}));
  EXPECT_EQ(shared_only, run(x, ex0, w0, ew, shared, 1.0));
  EXPECT_EQ(shared_only, run(x, ex0, w0, ew, shared, 7.0));

  MatI ex = random_choice(Tn, E, K, g);
  Mat<T> wts = random_weights<T>(Tn, K, g);
  Mat<T> routed1 = run(x, ex, wts, ew, none, 1.0);
  expect_close(routed1, naive_moe(x, ex, wts, ew, static_cast<const MlpWeights<T>*>(nullptr), 1.0,
                                  SwigluParams{}));
  EXPECT_EQ(run(x, ex, wts, ew, none, 2.0), Mat<T>(T(2) * routed1));
  EXPECT_EQ(run(x, ex, wts, ew, none, 0.5), Mat<T>(T(0.5) * routed1));
  // Both: scale 2 on the routed part, 1 on the shared one.
  const Mat<T> both = run(x, ex, wts, ew, shared, 2.0);
  expect_close(both, naive_moe(x, ex, wts, ew, &shared, 2.0, SwigluParams{}));
  Mat<double> lin = (2.0 * routed1.template cast<double>() + shared_only.template cast<double>());
  EXPECT_LE(rel_l2(both, lin), kTol<T>);
}
TEST(MoeExperts_f32, RoutedScale_RoutedPartOnly) { check_routed_scale<float>(); }
TEST(MoeExperts_f64, RoutedScale_RoutedPartOnly) { check_routed_scale<double>(); }

// Permuting a token's (expert, weight) slots gives the same bits: contributions are summed in
// expert-id order, not slot order.
template <class T>
void check_slot_order() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const Eigen::Index Tn = 21, H = 12, I = 7;
  const int E = 7, K = 4;
  Mat<T> x = randn<T>(Tn, H, g);
  std::vector<MlpWeights<T>> ew;
  for (int e = 0; e < E; ++e) ew.push_back(random_mlp<T>(H, I, g));
  MlpWeights<T> shared = random_mlp<T>(H, I, g);
  MatI ex = random_choice(Tn, E, K, g);
  Mat<T> wts = random_weights<T>(Tn, K, g);
  const Mat<T> y = run(x, ex, wts, ew, shared, 2.0);
  MatI ex_p = ex;
  Mat<T> wts_p = wts;
  for (Eigen::Index t = 0; t < Tn; ++t) {
    std::vector<int> perm(K);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), g);
    if (t == 0) std::reverse(perm.begin(), perm.end());  // at least one row surely moved
    for (int j = 0; j < K; ++j) {
      ex_p(t, j) = ex(t, perm[j]);
      wts_p(t, j) = wts(t, perm[j]);
    }
  }
  ASSERT_NE(ex_p, ex);
  EXPECT_EQ(run(x, ex_p, wts_p, ew, shared, 2.0), y);
  expect_close(y, naive_moe(x, ex, wts, ew, &shared, 2.0, SwigluParams{}));
}
TEST(MoeExperts_f32, SlotOrderIrrelevant) { check_slot_order<float>(); }
TEST(MoeExperts_f64, SlotOrderIrrelevant) { check_slot_order<double>(); }

TEST(MoeExperts_f32, BadInputsThrow) {
  auto g = m3::test::test_rng();
  const Eigen::Index Tn = 3, H = 8, I = 5;
  const int E = 4, K = 2;
  Mat<float> x = randn<float>(Tn, H, g), y;
  std::vector<MlpWeights<float>> ew;
  for (int e = 0; e < E; ++e) ew.push_back(random_mlp<float>(H, I, g));
  MlpWeights<float> shared = random_mlp<float>(H, I, g);
  MatI ex = random_choice(Tn, E, K, g);
  Mat<float> wts = random_weights<float>(Tn, K, g);
  const SwigluParams p;
  EXPECT_NO_THROW(m3::ref::moe_experts(x, ex, wts, ew, shared, 2.0, p, y));

  MatI ex_rows = MatI::Zero(Tn + 1, K);
  EXPECT_THROW(m3::ref::moe_experts(x, ex_rows, wts, ew, shared, 2.0, p, y), std::invalid_argument);
  Mat<float> wts_cols = Mat<float>::Ones(Tn, K + 1), wts_rows = Mat<float>::Ones(Tn - 1, K);
  EXPECT_THROW(m3::ref::moe_experts(x, ex, wts_cols, ew, shared, 2.0, p, y), std::invalid_argument);
  EXPECT_THROW(m3::ref::moe_experts(x, ex, wts_rows, ew, shared, 2.0, p, y), std::invalid_argument);

  // Ids out of [0, E): std::out_of_range naming the token and the slot.
  for (int bad : {-1, E, E + 100}) {
    MatI ex_bad = ex;
    ex_bad(1, 1) = bad;
    try {
      m3::ref::moe_experts(x, ex_bad, wts, ew, shared, 2.0, p, y);
      ADD_FAILURE() << "id " << bad << " accepted";
    } catch (const std::out_of_range& err) {
      const std::string msg = err.what();
      EXPECT_NE(msg.find("token 1"), std::string::npos) << msg;
      EXPECT_NE(msg.find("slot 1"), std::string::npos) << msg;
    }
  }

  // Expert weights inconsistent with x's H (also one no token uses), or among themselves.
  auto bad_expert = [&](int e, auto mutate) {
    std::vector<MlpWeights<float>> ew_bad = ew;
    mutate(ew_bad[e]);
    EXPECT_THROW(m3::ref::moe_experts(x, ex, wts, ew_bad, shared, 2.0, p, y), std::invalid_argument)
        << "expert " << e;
  };
  for (int e = 0; e < E; ++e) {
    bad_expert(e, [&](MlpWeights<float>& w) { w.gate = Mat<float>::Ones(I, H + 1); });
    bad_expert(e, [&](MlpWeights<float>& w) { w.up = Mat<float>::Ones(I + 1, H); });
    bad_expert(e, [&](MlpWeights<float>& w) { w.down = Mat<float>::Ones(I, H); });  // transposed
  }
  // Shared expert: wrong H, or only partly given (empty means "no shared expert" only if all are).
  MlpWeights<float> sh_bad = shared;
  sh_bad.down = Mat<float>::Ones(H + 1, I);
  EXPECT_THROW(m3::ref::moe_experts(x, ex, wts, ew, sh_bad, 2.0, p, y), std::invalid_argument);
  MlpWeights<float> sh_part;
  sh_part.gate = shared.gate;
  EXPECT_THROW(m3::ref::moe_experts(x, ex, wts, ew, sh_part, 2.0, p, y), std::invalid_argument);
  // x with a different H than the experts.
  Mat<float> x_bad = randn<float>(Tn, H + 2, g);
  EXPECT_THROW(m3::ref::moe_experts(x_bad, ex, wts, ew, shared, 2.0, p, y), std::invalid_argument);
}

}  // namespace
