// Tests of ref::rope_neox and ref::qk_norm_rope (reference/ops/qk_norm_rope.h): the partial NeoX
// rotation against the spec's formula in plain fp64 loops, HF's inverse-frequency form, positions
// up to 2^20, and two properties of a rotation: it keeps each head's rotary norm, and q.k after
// rotation depends only on the position difference.
#include "reference/ops/qk_norm_rope.h"

#include "tests/test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using m3::Mat;
using m3::MatD;
using m3::Vec;
using m3::ref::qk_norm_rope;
using m3::ref::rope_neox;
using m3::test::poison;
using m3::test::rel_l2;
using Pos = std::vector<std::int64_t>;

constexpr double kTheta = 5e6;  // M3's RoPE base (spec §1.1)
constexpr double kEps = 1e-6;   // M3's rms_norm_eps
// fp64 vs fp64 with the same angle formula: the rotation differs at most in rounding order.
constexpr double kTolF64 = 1e-12;
// fp32 vs fp64: the op rotates in fp64 and rounds each output once (6e-8). An op with fp32 angles
// would be off by up to ~0.06 rad at p = 2^20, i.e. rel-L2 ~1e-2, so 1e-5 separates the two.
constexpr double kTolF32 = 1e-5;
// The rotation alone (rope_neox) in fp32: each output is the fp64 rotation rounded once, so its
// error is at most 2^-24 = 6e-8 of the output (measured: worst 3.9e-8 over 3000 draws of every
// geometry below). kTolF32 left the check's own non-vacuity proof to chance: at {1, 17, 6} only one
// pair of 17 channels has a frequency whose fp32 angle is off (the others are exact or tiny), and
// fp32 angles then moved the draw by rel-L2 7.3e-6 .. 1.4e-5 in its lowest 1e-3 (20000 draws,
// median 4.2e-5), under 1e-5 once in ~20000 draws (M3_TEST_SEED=4701244433690842817: 9.09e-6).
// 1e-6 stays 16x over the op's largest possible error and 7x under the smallest fp32-angle error.
constexpr double kTolRopeF32 = 1e-6;

template <class T>
constexpr double tol() { return std::is_same_v<T, double> ? kTolF64 : kTolF32; }
template <class T>
constexpr double rope_tol() { return std::is_same_v<T, double> ? kTolF64 : kTolRopeF32; }

enum class Freq { SPEC, HF };  // theta^(-2i/R) as in the spec, or 1 / theta^(2i/R) as HF writes it

// The spec §2.3 rotation, per token, head and pair, angles in fp64 (or fp32 when asked, to show
// that the tests can tell the difference).
MatD naive_rope(const MatD& x, int heads, int d, int R, double theta, const Pos& pos,
                Freq freq = Freq::SPEC, bool fp32_angles = false) {
  MatD y = x;  // [T, heads*d]; channels >= R pass through
  for (Eigen::Index t = 0; t < x.rows(); ++t)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < R / 2; ++i) {
        const double inv = freq == Freq::SPEC ? std::pow(theta, -2.0 * i / R)
                                              : 1.0 / std::pow(theta, 2.0 * i / R);
        double a = static_cast<double>(pos[t]) * inv;
        if (fp32_angles)
          a = static_cast<float>(static_cast<float>(pos[t]) * static_cast<float>(inv));
        const double r0 = x(t, h * d + i), r1 = x(t, h * d + i + R / 2);
        y(t, h * d + i) = r0 * std::cos(a) - r1 * std::sin(a);
        y(t, h * d + i + R / 2) = r1 * std::cos(a) + r0 * std::sin(a);
      }
  return y;
}

MatD naive_norm_heads(const MatD& x, int heads, int d, const Eigen::VectorXd& w, double eps) {
  MatD y(x.rows(), x.cols());  // [T, heads*d]
  for (Eigen::Index t = 0; t < x.rows(); ++t)
    for (int h = 0; h < heads; ++h) {
      double ss = 0;
      for (int i = 0; i < d; ++i) ss += x(t, h * d + i) * x(t, h * d + i);
      const double rms = std::sqrt(ss / d + eps);
      for (int i = 0; i < d; ++i) y(t, h * d + i) = x(t, h * d + i) / rms * (1.0 + w[i]);
    }
  return y;
}

// Both ends of the range, small positions, and random ones up to 2^20 (M3's 1M context).
Pos test_positions(std::mt19937_64& g, int extra) {
  Pos p{0, 1, 2, 127, 128, 1000, (1 << 20) - 1, 1 << 20};
  std::uniform_int_distribution<std::int64_t> u(0, 1 << 20);
  for (int i = 0; i < extra; ++i) p.push_back(u(g));
  return p;
}

struct Geometry { int heads, d, R; };
constexpr Geometry kGeometries[] = {{1, 2, 2}, {3, 8, 8}, {1, 17, 6}, {4, 32, 16},
                                    {64, 128, 64}, {2, 9, 0}, {5, 1, 0}};

std::string label(Geometry s) {
  return "heads=" + std::to_string(s.heads) + " d=" + std::to_string(s.d) +
         " R=" + std::to_string(s.R);
}

template <class T>
void check_rope_formula() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const Pos pos = test_positions(g, 8);
  for (Geometry s : kGeometries) {
    SCOPED_TRACE(label(s));
    const Mat<T> x0 = m3::test::randn<T>(static_cast<Eigen::Index>(pos.size()), s.heads * s.d, g);
    Mat<T> x = x0;  // [T, heads*d], rotated in place
    rope_neox<T>(x, s.heads, s.d, s.R, kTheta, pos);
    const MatD ref = naive_rope(x0.template cast<double>(), s.heads, s.d, s.R, kTheta, pos);
    EXPECT_GT(x0.norm(), 0);
    EXPECT_GT(ref.norm(), 0);
    EXPECT_TRUE(x.allFinite());
    EXPECT_LE(rel_l2(x, ref), rope_tol<T>());
    // Pass-through channels are copied, not recomputed: bitwise equal (all of them when R = 0).
    for (Eigen::Index t = 0; t < x.rows(); ++t)
      for (int h = 0; h < s.heads; ++h)
        for (int c = s.R; c < s.d; ++c) ASSERT_EQ(x(t, h * s.d + c), x0(t, h * s.d + c));
    if (s.R > 2 && std::is_same_v<T, float>) {
      // The bound above is not vacuous: fp32 angles at these positions would break it. (R = 2
      // is skipped: its one frequency is 1, so fp32 angles are exact integers there.)
      const MatD fp32_angles = naive_rope(x0.template cast<double>(), s.heads, s.d, s.R, kTheta,
                                          pos, Freq::SPEC, /*fp32_angles=*/true);
      EXPECT_GT(rel_l2(fp32_angles, ref), kTolRopeF32);
    }
  }
}
TEST(RopeNeox_f32, SpecFormula_PositionsTo2p20) { check_rope_formula<float>(); }
TEST(RopeNeox_f64, SpecFormula_PositionsTo2p20) { check_rope_formula<double>(); }

// HF computes inv_freq as 1 / theta^(2i/R). Mathematically the same; in fp64 the two differ by an
// ulp or two of inv_freq (<= 4.4e-16 relative), which at p <= 2^20 moves an angle by <= 4.7e-10
// rad, plus 1.2e-10 for rounding p * inv_freq differently. Each output moves by at most the angle
// error times its pair's norm, so rel-L2 <= 6e-10; 2e-9 leaves room.
TEST(RopeNeox_f64, HfInverseFrequencyForm) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const Pos pos = test_positions(g, 24);
  const MatD x0 = m3::test::randn<double>(static_cast<Eigen::Index>(pos.size()), 4 * 128, g);
  MatD x = x0;
  rope_neox<double>(x, 4, 128, 64, kTheta, pos);
  const MatD ref = naive_rope(x0, 4, 128, 64, kTheta, pos, Freq::HF);
  EXPECT_GT(ref.norm(), 0);
  EXPECT_LE(rel_l2(x, ref), 2e-9);
}

// A rotation keeps the norm of each head's rotary part. fp64: each pair's norm changes by a few
// ulp (cos^2 + sin^2 = 1 to ~2 ulp, one rounding per output), so 1e-14 (~45 ulp) is generous.
// fp32: one rounding per output, 6e-8 relative each, so 1e-6.
template <class T>
void check_norm_preserved(double tolerance) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const Pos pos = test_positions(g, 16);
  const int heads = 3, d = 40, R = 32;
  const Mat<T> x0 = m3::test::randn<T>(static_cast<Eigen::Index>(pos.size()), heads * d, g);
  Mat<T> x = x0;
  rope_neox<T>(x, heads, d, R, kTheta, pos);
  for (Eigen::Index t = 0; t < x.rows(); ++t)
    for (int h = 0; h < heads; ++h) {
      const double before = x0.row(t).segment(h * d, R).template cast<double>().norm();
      const double after = x.row(t).segment(h * d, R).template cast<double>().norm();
      ASSERT_GT(before, 0);
      EXPECT_LE(std::abs(after - before) / before, tolerance) << "t=" << t << " h=" << h;
    }
}
TEST(RopeNeox_f32, NormPreserved) { check_norm_preserved<float>(1e-6); }
TEST(RopeNeox_f64, NormPreserved) { check_norm_preserved<double>(1e-14); }

// RoPE's point: rot(q, p) . rot(k, p') depends on p - p' only. At p ~ 1e6 each fp64 angle p *
// inv_freq is rounded to 0.5 ulp(2^20) = 1.2e-10 rad; the pow error is common to both positions
// and cancels to first order. Three such roundings bound the relative angle error by ~3.5e-10, and
// by Cauchy-Schwarz the dot moves by at most |q| |k| times that: 1e-9 |q| |k| leaves 3x room.
TEST(RopeNeox_f64, DotDependsOnlyOnOffset) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const int d = 128, R = 64;  // M3's head: half the channels rotated
  const MatD q = m3::test::randn<double>(1, d, g), k = m3::test::randn<double>(1, d, g);
  const double scale = q.norm() * k.norm();
  ASSERT_GT(scale, 0);
  auto rotated_dot = [&](std::int64_t p, std::int64_t p_prime) {
    MatD qr = q, kr = k;
    const Pos pq{p}, pk{p_prime};
    rope_neox<double>(qr, 1, d, R, kTheta, pq);
    rope_neox<double>(kr, 1, d, R, kTheta, pk);
    return qr.row(0).dot(kr.row(0));
  };
  for (std::int64_t delta : {0, 1, 17, 4096, 999999}) {
    SCOPED_TRACE("delta=" + std::to_string(delta));
    const double base = rotated_dot(delta, 0);
    for (std::int64_t p0 : {std::int64_t{1}, std::int64_t{48576}, std::int64_t{1000000} - delta,
                            std::int64_t{(1 << 20)} - delta})
      EXPECT_LE(std::abs(rotated_dot(p0 + delta, p0) - base), 1e-9 * scale) << "p'=" << p0;
  }
  // Not vacuous: the dot does change with the offset, by the order of |q||k|/sqrt(d) ~ 0.09 |q||k|
  // for random vectors; 1e-3 |q||k| fails only if the rotation does (almost) nothing.
  double spread = 0;
  for (std::int64_t delta : {1, 17, 4096, 999999})
    spread = std::max(spread, std::abs(rotated_dot(delta, 0) - rotated_dot(0, 0)));
  EXPECT_GT(spread, 1e-3 * scale);
}

// qk_norm_rope = per-head Gemma RMSNorm, then the rotation, on every geometry; also in place.
template <class T>
void check_qk_norm_rope() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const Pos pos = test_positions(g, 5);
  for (Geometry s : kGeometries) {
    SCOPED_TRACE(label(s));
    const Mat<T> x = m3::test::randn<T>(static_cast<Eigen::Index>(pos.size()), s.heads * s.d, g);
    const Vec<T> w = m3::test::randn_vec<T>(s.d, g, 0.5);  // [d]
    Mat<T> y(x.rows(), x.cols());                           // [T, heads*d]
    poison(y);
    qk_norm_rope<T>(x, s.heads, s.d, w, kEps, s.R, kTheta, pos, y);
    const MatD ref = naive_rope(naive_norm_heads(x.template cast<double>(), s.heads, s.d,
                                                 w.template cast<double>(), kEps),
                                s.heads, s.d, s.R, kTheta, pos);
    EXPECT_GT(x.norm(), 0);
    EXPECT_GT(ref.norm(), 0);
    EXPECT_TRUE(y.allFinite());
    EXPECT_LE(rel_l2(y, ref), tol<T>());
    Mat<T> in_place = x;
    qk_norm_rope<T>(in_place, s.heads, s.d, w, kEps, s.R, kTheta, pos, in_place);
    EXPECT_EQ(in_place, y);
  }
}
TEST(QkNormRope_f32, NormThenRope) { check_qk_norm_rope<float>(); }
TEST(QkNormRope_f64, NormThenRope) { check_qk_norm_rope<double>(); }

TEST(RopeNeox_f32, BadInput_Throws) {
  Mat<float> x = Mat<float>::Ones(2, 16);  // 2 heads of d = 8
  const Pos pos{0, 5};
  EXPECT_NO_THROW(rope_neox<float>(x, 2, 8, 8, kTheta, pos));
  EXPECT_THROW(rope_neox<float>(x, 2, 8, 7, kTheta, pos), std::invalid_argument);   // R odd
  EXPECT_THROW(rope_neox<float>(x, 2, 8, 10, kTheta, pos), std::invalid_argument);  // R > d
  EXPECT_THROW(rope_neox<float>(x, 2, 8, -2, kTheta, pos), std::invalid_argument);
  EXPECT_THROW(rope_neox<float>(x, 3, 8, 8, kTheta, pos), std::invalid_argument);   // cols
  EXPECT_THROW(rope_neox<float>(x, 0, 8, 8, kTheta, pos), std::invalid_argument);
  EXPECT_THROW(rope_neox<float>(x, 2, 8, 8, kTheta, Pos{0}), std::invalid_argument);
  EXPECT_THROW(rope_neox<float>(x, 2, 8, 8, kTheta, Pos{0, -1}), std::invalid_argument);
  EXPECT_THROW(rope_neox<float>(x, 2, 8, 8, 0.0, pos), std::invalid_argument);
  EXPECT_THROW(rope_neox<float>(x, 2, 8, 8, -5.0, pos), std::invalid_argument);
  Mat<float> y;
  EXPECT_NO_THROW(qk_norm_rope<float>(x, 2, 8, Vec<float>::Zero(8), kEps, 8, kTheta, pos, y));
  EXPECT_THROW(qk_norm_rope<float>(x, 2, 8, Vec<float>::Zero(7), kEps, 8, kTheta, pos, y),
               std::invalid_argument);
  EXPECT_THROW(qk_norm_rope<float>(x, 2, 8, Vec<float>::Zero(8), kEps, 9, kTheta, pos, y),
               std::invalid_argument);
  EXPECT_THROW(qk_norm_rope<float>(x, 2, 8, Vec<float>::Zero(8), -1.0, 8, kTheta, pos, y),
               std::invalid_argument);
}

}  // namespace
