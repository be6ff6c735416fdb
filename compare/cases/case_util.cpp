// Tensor helpers of the op cases (case.h): seeded generators and views as reference types.
#include "compare/cases/case.h"

#include "reference/rng.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <stdexcept>

namespace m3::cases {

Tensor randn(const cmp::Dims& dims, std::uint64_t seed, std::string_view stream, double scale) {
  const CounterRng rng(seed, stream);
  Tensor t;
  t.dims = dims;
  t.f.resize(static_cast<std::size_t>(element_count(dims)));
  for (std::size_t i = 0; i < t.f.size(); ++i) t.f[i] = scale * rng.normal(i);
  return t;
}

Tensor positions(std::int64_t T, std::int64_t N, std::int64_t blk, std::int64_t k_blk, std::uint64_t seed,
                 std::string_view stream) {
  // The edges first: the last key (always: it fixes NB, and T = 1 is a decode step), one key
  // only, and the block and top-k boundaries where the visible blocks cross 1 and K_blk.
  std::vector<std::int64_t> want = {N - 1, 0, blk - 1, blk, k_blk * blk - 1, k_blk * blk, k_blk * blk + 1};
  std::set<std::int64_t> s;
  for (std::int64_t p : want)
    if (p >= 0 && p < N && static_cast<std::int64_t>(s.size()) < T) s.insert(p);
  const CounterRng rng(seed, stream);
  std::vector<std::int64_t> out(s.begin(), s.end());
  for (std::uint64_t i = 0; static_cast<std::int64_t>(out.size()) < T; ++i) {
    const auto p = static_cast<std::int64_t>(rng.bits(i) % static_cast<std::uint64_t>(N));
    // Distinct while that is possible; repeats only once every position is taken.
    if (static_cast<std::int64_t>(s.size()) < N && !s.insert(p).second) continue;
    out.push_back(p);
  }
  std::sort(out.begin(), out.end());
  Tensor t;
  t.dims = {T};
  t.i = std::move(out);
  return t;
}

namespace {

std::int64_t rows_of(const Tensor& t) { return t.dims.empty() ? 1 : t.dims[0]; }

}  // namespace

template <class T>
Mat<T> mat(const Tensor& t) {
  const std::int64_t r = rows_of(t);
  const std::int64_t c = r > 0 ? element_count(t.dims) / r : 0;
  Mat<T> m(r, c);
  for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(t.f[static_cast<std::size_t>(i)]);
  return m;
}

template <class T>
Mat<T> slice(const Tensor& t, std::int64_t k) {
  if (t.dims.size() != 3 || k < 0 || k >= t.dims[0])
    throw std::logic_error(fmt::format("slice {} of a tensor of rank {}", k, t.dims.size()));
  Mat<T> m(t.dims[1], t.dims[2]);
  const std::size_t off = static_cast<std::size_t>(k * m.size());
  for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(t.f[off + static_cast<std::size_t>(i)]);
  return m;
}

template <class T>
Vec<T> vec(const Tensor& t) {
  Vec<T> v(static_cast<Eigen::Index>(t.f.size()));
  for (Eigen::Index i = 0; i < v.size(); ++i) v[i] = static_cast<T>(t.f[static_cast<std::size_t>(i)]);
  return v;
}

MatI ids(const Tensor& t) {
  const std::int64_t r = rows_of(t);
  MatI m(r, r > 0 ? element_count(t.dims) / r : 0);
  for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<std::int32_t>(t.i[static_cast<std::size_t>(i)]);
  return m;
}

std::vector<std::int32_t> ids_vec(const Tensor& t) { return {t.i.begin(), t.i.end()}; }

template <class T>
Tensor from_mat(const Mat<T>& m) {
  Tensor t;
  t.dims = {m.rows(), m.cols()};
  t.f.assign(m.data(), m.data() + m.size());
  return t;
}

Tensor from_ids(const MatI& m) {
  Tensor t;
  t.dims = {m.rows(), m.cols()};
  t.i.assign(m.data(), m.data() + m.size());
  return t;
}

template Mat<float> mat<float>(const Tensor&);
template Mat<double> mat<double>(const Tensor&);
template Mat<float> slice<float>(const Tensor&, std::int64_t);
template Mat<double> slice<double>(const Tensor&, std::int64_t);
template Vec<float> vec<float>(const Tensor&);
template Vec<double> vec<double>(const Tensor&);
template Tensor from_mat<float>(const Mat<float>&);
template Tensor from_mat<double>(const Mat<double>&);

MatD swiglu_rounding_scale(const MatD& x, const MatD& w_gate, const MatD& w_up, const MatD& w_down, double alpha,
                           double limit, double beta) {
  const MatD gate = x * w_gate.transpose(), up = x * w_up.transpose();  // [T, I]
  MatD m(gate.rows(), gate.cols()), act(gate.rows(), gate.cols());      // [T, I]
  for (Eigen::Index t = 0; t < gate.rows(); ++t)
    for (Eigen::Index j = 0; j < gate.cols(); ++j) {
      const double gt = gate(t, j), ut = up(t, j);
      const double g = std::min(gt, limit), u = std::clamp(ut, -limit, limit);
      const double s = 1.0 / (1.0 + std::exp(-alpha * g));
      act(t, j) = (u + beta) * g * s;
      const double d_gate = gt < limit ? (u + beta) * g * (s + alpha * g * s * (1.0 - s)) : 0.0;  // d act/d gate * gate
      const double d_up = std::abs(ut) < limit ? g * s * u : 0.0;                                // d act/d up * up
      m(t, j) = std::abs(act(t, j)) + std::abs(d_gate) + std::abs(d_up);
    }
  return m * w_down.cwiseAbs().transpose() + (act * w_down.transpose()).cwiseAbs();
}

}  // namespace m3::cases
