// Gemma RMSNorm (spec §2.2): y = x * rsqrt(mean(x^2) + eps) * (1 + w). The mean of squares is
// accumulated in fp64 whatever T is (DESIGN §3), and each output is formed in fp64 and rounded to
// T once, as HF rounds once at the end.
#include "reference/ops/rms_norm.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

namespace m3::ref {
namespace {

void check_eps(const char* op, double eps) {
  if (!(eps >= 0.0) || !std::isfinite(eps))
    throw std::invalid_argument(fmt::format("{}: eps = {}, expected a finite value >= 0", op, eps));
}

// Normalizes n contiguous values src -> dst (dst may equal src): every value of src is read by the
// sum of squares before the first one is written, which is what makes in-place calls correct.
template <class T>
void norm_span(const T* src, const T* w, Eigen::Index n, double eps, T* dst) {
  double ss = 0.0;
  for (Eigen::Index i = 0; i < n; ++i) {
    const double v = static_cast<double>(src[i]);
    ss += v * v;
  }
  const double inv = 1.0 / std::sqrt(ss / static_cast<double>(n) + eps);
  for (Eigen::Index i = 0; i < n; ++i)
    dst[i] = static_cast<T>(static_cast<double>(src[i]) * inv * (1.0 + static_cast<double>(w[i])));
}

}  // namespace

template <class T>
void rms_norm(const Mat<T>& x, const Vec<T>& w, double eps, Mat<T>& y) {
  if (w.size() != x.cols())
    throw std::invalid_argument(fmt::format(
        "rms_norm: w has {} elements, expected x.cols() = C = {}", w.size(), x.cols()));
  check_eps("rms_norm", eps);
  const Eigen::Index R = x.rows(), C = x.cols();
  if (&y != &x) y.resize(R, C);  // [R, C]; resizing an aliased y would free x
  if (C == 0) return;
  for (Eigen::Index r = 0; r < R; ++r)
    norm_span(x.data() + r * C, w.data(), C, eps, y.data() + r * C);
}

template <class T>
void rms_norm_heads(const Mat<T>& x, int n_heads, const Vec<T>& w, double eps, Mat<T>& y) {
  const Eigen::Index d = w.size();
  if (n_heads <= 0)
    throw std::invalid_argument(fmt::format("rms_norm_heads: n_heads = {}, expected > 0", n_heads));
  if (d == 0) throw std::invalid_argument("rms_norm_heads: w is empty, expected d = w.size() >= 1");
  if (x.cols() != n_heads * d)
    throw std::invalid_argument(fmt::format(
        "rms_norm_heads: x has {} columns, expected n_heads*d = {}*{} = {}", x.cols(), n_heads, d,
        n_heads * d));
  check_eps("rms_norm_heads", eps);
  const Eigen::Index R = x.rows(), C = x.cols();
  if (&y != &x) y.resize(R, C);  // [R, n_heads*d]
  for (Eigen::Index r = 0; r < R; ++r)
    for (int h = 0; h < n_heads; ++h)
      norm_span(x.data() + r * C + h * d, w.data(), d, eps, y.data() + r * C + h * d);
}

template void rms_norm<float>(const Mat<float>&, const Vec<float>&, double, Mat<float>&);
template void rms_norm<double>(const Mat<double>&, const Vec<double>&, double, Mat<double>&);
template void rms_norm_heads<float>(const Mat<float>&, int, const Vec<float>&, double, Mat<float>&);
template void rms_norm_heads<double>(const Mat<double>&, int, const Vec<double>&, double,
                                     Mat<double>&);

}  // namespace m3::ref
