// QK-norm + partial NeoX RoPE (spec §2.3, §3.2). Angles, cos and sin are fp64 whatever T is:
// positions reach 2^20, where an fp32 angle p * inv_freq is off by up to ~0.06 rad. The rotation
// itself is also done in fp64 and rounded to T once per output.
#include "reference/ops/qk_norm_rope.h"

#include "reference/ops/rms_norm.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>
#include <vector>

namespace m3::ref {
namespace {

// Shared by rope_neox and qk_norm_rope so that qk_norm_rope rejects bad input before it writes y.
template <class T>
void check_rope_args(const char* op, const Mat<T>& x, int n_heads, int d, int R, double theta,
                     std::span<const std::int64_t> positions) {
  if (n_heads <= 0 || d <= 0)
    throw std::invalid_argument(
        fmt::format("{}: n_heads = {}, d = {}, expected both > 0", op, n_heads, d));
  if (x.cols() != static_cast<Eigen::Index>(n_heads) * d)
    throw std::invalid_argument(fmt::format("{}: x has {} columns, expected n_heads*d = {}*{} = {}",
                                            op, x.cols(), n_heads, d, n_heads * d));
  if (x.rows() != static_cast<Eigen::Index>(positions.size()))
    throw std::invalid_argument(fmt::format("{}: x has {} rows, expected T = positions.size() = {}",
                                            op, x.rows(), positions.size()));
  if (R < 0 || R > d || R % 2 != 0)
    throw std::invalid_argument(
        fmt::format("{}: rotary dims R = {}, expected an even R with 0 <= R <= d = {}", op, R, d));
  if (R > 0 && !(theta > 0.0 && std::isfinite(theta)))
    throw std::invalid_argument(
        fmt::format("{}: theta = {}, expected a finite value > 0", op, theta));
  for (std::size_t t = 0; t < positions.size(); ++t)
    if (positions[t] < 0)
      throw std::invalid_argument(fmt::format(
          "{}: positions[{}] = {}, expected an absolute position >= 0", op, t, positions[t]));
}

template <class T>
void rotate(Mat<T>& x, int n_heads, int d, int R, double theta,
            std::span<const std::int64_t> positions) {
  if (R == 0) return;
  const int half = R / 2;
  std::vector<double> inv_freq(half), cos_a(half), sin_a(half);  // [R/2] each
  for (int i = 0; i < half; ++i) inv_freq[i] = std::pow(theta, -2.0 * i / R);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const double p = static_cast<double>(positions[t]);  // exact: positions are far below 2^53
    for (int i = 0; i < half; ++i) {
      cos_a[i] = std::cos(p * inv_freq[i]);
      sin_a[i] = std::sin(p * inv_freq[i]);
    }
    for (int h = 0; h < n_heads; ++h) {
      T* xh = x.data() + t * x.cols() + static_cast<Eigen::Index>(h) * d;  // [d], one head
      for (int i = 0; i < half; ++i) {
        const double r0 = static_cast<double>(xh[i]), r1 = static_cast<double>(xh[i + half]);
        xh[i] = static_cast<T>(r0 * cos_a[i] - r1 * sin_a[i]);
        xh[i + half] = static_cast<T>(r1 * cos_a[i] + r0 * sin_a[i]);
      }
    }
  }
}

}  // namespace

template <class T>
void rope_neox(Mat<T>& x, int n_heads, int d, int R, double theta,
               std::span<const std::int64_t> positions) {
  check_rope_args("rope_neox", x, n_heads, d, R, theta, positions);
  rotate(x, n_heads, d, R, theta, positions);
}

template <class T>
void qk_norm_rope(const Mat<T>& x, int n_heads, int d, const Vec<T>& w, double eps, int R,
                  double theta, std::span<const std::int64_t> positions, Mat<T>& y) {
  check_rope_args("qk_norm_rope", x, n_heads, d, R, theta, positions);
  if (w.size() != d)
    throw std::invalid_argument(
        fmt::format("qk_norm_rope: w has {} elements, expected d = {}", w.size(), d));
  rms_norm_heads(x, n_heads, w, eps, y);  // [T, n_heads*d]; y may be x
  rotate(y, n_heads, d, R, theta, positions);
}

template void rope_neox<float>(Mat<float>&, int, int, int, double, std::span<const std::int64_t>);
template void rope_neox<double>(Mat<double>&, int, int, int, double, std::span<const std::int64_t>);
template void qk_norm_rope<float>(const Mat<float>&, int, int, const Vec<float>&, double, int,
                                  double, std::span<const std::int64_t>, Mat<float>&);
template void qk_norm_rope<double>(const Mat<double>&, int, int, const Vec<double>&, double, int,
                                   double, std::span<const std::int64_t>, Mat<double>&);

}  // namespace m3::ref
