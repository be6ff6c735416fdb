// Shared test helpers: fresh random inputs (seed printed, M3_TEST_SEED reproduces a run),
// poisoning, and the error metrics tests assert on.
#pragma once

#include "reference/tensor.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace m3::test {

// A fresh seed per process unless M3_TEST_SEED is set; every test that draws inputs should
// SCOPED_TRACE(seed_note()) so a failure names the seed that reproduces it.
inline std::uint64_t test_seed() {
  static const std::uint64_t seed = [] {
    if (const char* s = std::getenv("M3_TEST_SEED")) return static_cast<std::uint64_t>(std::strtoull(s, nullptr, 0));
    return (static_cast<std::uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  }();
  return seed;
}
inline std::string seed_note() { return "M3_TEST_SEED=" + std::to_string(test_seed()); }

// One generator per test, derived from the process seed and the test's name, so adding a test
// does not change the inputs of the others.
inline std::mt19937_64 test_rng() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string key = info ? std::string(info->test_suite_name()) + "." + info->name() : "none";
  return std::mt19937_64(test_seed() ^ std::hash<std::string>{}(key));
}

template <class T>
Mat<T> randn(Eigen::Index rows, Eigen::Index cols, std::mt19937_64& g, double scale = 1.0) {
  std::normal_distribution<double> nd(0.0, scale);
  Mat<T> m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(nd(g));
  return m;
}
template <class T>
Vec<T> randn_vec(Eigen::Index n, std::mt19937_64& g, double scale = 1.0) {
  std::normal_distribution<double> nd(0.0, scale);
  Vec<T> v(n);
  for (Eigen::Index i = 0; i < n; ++i) v[i] = static_cast<T>(nd(g));
  return v;
}

// n token ids drawn uniformly from [0, vocab).
inline std::vector<std::int32_t> random_tokens(int n, int vocab, std::mt19937_64& g) {
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = d(g);
  return t;
}

// Fills with NaN so that any element an op forgets to write fails the comparison.
template <class M>
void poison(M& m) {
  using S = typename M::Scalar;
  if constexpr (std::numeric_limits<S>::has_quiet_NaN) m.setConstant(std::numeric_limits<S>::quiet_NaN());
  else m.setConstant(S(-123456));
}

// ||a - b|| / ||b|| in fp64; +inf when b is zero and a is not (never a vacuous pass).
template <class DA, class DB>
double rel_l2(const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b) {
  double num = 0, den = 0;
  for (Eigen::Index i = 0; i < a.rows(); ++i)
    for (Eigen::Index j = 0; j < a.cols(); ++j) {
      double x = static_cast<double>(a(i, j)), y = static_cast<double>(b(i, j));
      num += (x - y) * (x - y);
      den += y * y;
    }
  if (den == 0) return num == 0 ? 0.0 : std::numeric_limits<double>::infinity();
  return std::sqrt(num / den);
}

}  // namespace m3::test
