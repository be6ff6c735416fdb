// Tests of ref::linear (reference/ops/linear.h): y = x W^T against a plain fp64 loop, both dtypes,
// awkward sizes, aliasing and bad shapes.
#include "reference/ops/linear.h"

#include "tests/test_util.h"

#include <stdexcept>
#include <string>

namespace {

using m3::Mat;
using m3::MatD;
using m3::ref::linear;
using m3::test::poison;
using m3::test::rel_l2;

// fp64 vs fp64: only the summation order differs (blocked GEMM vs a loop) over <= 257 terms.
constexpr double kTolF64 = 1e-12;
// fp32 vs fp64: unit roundoff 6e-8 and dots of <= 257 terms: a few 1e-7 at worst, 1e-5 is ample.
constexpr double kTolF32 = 1e-5;

MatD naive_linear(const MatD& x, const MatD& w) {
  MatD y(x.rows(), w.rows());  // [R, out]
  for (Eigen::Index r = 0; r < x.rows(); ++r)
    for (Eigen::Index o = 0; o < w.rows(); ++o) {
      double s = 0;
      for (Eigen::Index i = 0; i < x.cols(); ++i) s += x(r, i) * w(o, i);
      y(r, o) = s;
    }
  return y;
}

template <class T>
void check_sizes(double tol) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  struct Size { int R, in, out; };
  for (Size s : {Size{1, 1, 1}, Size{1, 17, 5}, Size{7, 33, 65}, Size{16, 128, 129},
                 Size{129, 257, 31}}) {
    SCOPED_TRACE("R=" + std::to_string(s.R) + " in=" + std::to_string(s.in) +
                 " out=" + std::to_string(s.out));
    const Mat<T> x = m3::test::randn<T>(s.R, s.in, g);   // [R, in]
    const Mat<T> w = m3::test::randn<T>(s.out, s.in, g);  // [out, in]
    Mat<T> y(s.R, s.out);                                // [R, out]
    poison(y);
    linear<T>(x, w, y);
    const MatD ref = naive_linear(x.template cast<double>(), w.template cast<double>());
    ASSERT_EQ(y.rows(), s.R);
    ASSERT_EQ(y.cols(), s.out);
    EXPECT_GT(x.norm(), 0);
    EXPECT_GT(ref.norm(), 0);
    EXPECT_TRUE(y.allFinite());
    EXPECT_LE(rel_l2(y, ref), tol);
  }
}
TEST(Linear_f32, AwkwardSizes) { check_sizes<float>(kTolF32); }
TEST(Linear_f64, AwkwardSizes) { check_sizes<double>(kTolF64); }

// y is resized whatever it held before.
TEST(Linear_f64, ResizesOutput) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const MatD x = m3::test::randn<double>(3, 4, g), w = m3::test::randn<double>(5, 4, g);
  MatD y(11, 2);
  poison(y);
  linear<double>(x, w, y);
  ASSERT_EQ(y.rows(), 3);
  ASSERT_EQ(y.cols(), 5);
  EXPECT_LE(rel_l2(y, naive_linear(x, w)), kTolF64);
}

// Writing the result over x (a square W keeps the shape) must give the same values.
TEST(Linear_f32, OutputAliasesInput) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  Mat<float> x = m3::test::randn<float>(9, 24, g);
  const Mat<float> w = m3::test::randn<float>(24, 24, g);
  Mat<float> separate;
  linear<float>(x, w, separate);
  linear<float>(x, w, x);
  EXPECT_EQ(x, separate);
}

TEST(Linear_f32, BadShape_Throws) {
  const Mat<float> x = Mat<float>::Ones(2, 8), w = Mat<float>::Ones(3, 7);
  Mat<float> y;
  EXPECT_THROW(linear<float>(x, w, y), std::invalid_argument);
  EXPECT_THROW(linear<float>(x, Mat<float>::Ones(8, 2), y), std::invalid_argument);
  EXPECT_NO_THROW(linear<float>(x, Mat<float>::Ones(3, 8), y));
}

}  // namespace
