// Agreement metrics (metrics.h): one pass over the elements, sums in fp64.
#include "compare/metrics.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <stdexcept>

namespace m3::cmp {

Coord unravel(std::int64_t flat, const Dims& dims) {
  Coord c(dims.size(), 0);
  for (std::size_t k = dims.size(); k-- > 0;) {
    if (dims[k] <= 0) continue;
    c[k] = flat % dims[k];
    flat /= dims[k];
  }
  return c;
}

std::string coord_str(const Coord& c) { return fmt::format("[{}]", fmt::join(c, ", ")); }

namespace {

std::int64_t element_count(const Dims& dims) {
  std::int64_t n = 1;
  for (auto d : dims) n *= d;
  return n;
}

// Elements per leading-dimension row (1 for a vector).
std::int64_t row_size(const Dims& dims) {
  std::int64_t n = 1;
  for (std::size_t k = 1; k < dims.size(); ++k) n *= dims[k];
  return n;
}

void check_sizes(std::size_t a, std::size_t b, const Dims& dims, const char* what) {
  if (a != b || static_cast<std::int64_t>(a) != element_count(dims))
    throw std::invalid_argument(fmt::format("{}: a has {} elements and b {}, expected {} from the dims {}",
                                            what, a, b, element_count(dims), coord_str(dims)));
}

}  // namespace

FloatMetrics compare_float(std::span<const double> a, std::span<const double> b, const Dims& dims,
                           double atol, double rtol, const std::vector<bool>* row_mask,
                           std::span<const double> atol_extra) {
  check_sizes(a.size(), b.size(), dims, "compare_float");
  if (!atol_extra.empty() && atol_extra.size() != a.size())
    throw std::invalid_argument(fmt::format("compare_float: {} per-element atol terms for {} elements", atol_extra.size(),
                                            a.size()));
  FloatMetrics m;
  m.count = static_cast<std::int64_t>(a.size());
  const std::int64_t per_row = std::max<std::int64_t>(row_size(dims), 1);
  double num = 0, den = 0;
  bool have_max = false;
  for (std::int64_t i = 0; i < m.count; ++i) {
    if (row_mask && (*row_mask)[static_cast<std::size_t>(i / per_row)]) {
      ++m.masked;
      continue;
    }
    const double x = a[i], y = b[i];
    if (!std::isfinite(x) || !std::isfinite(y)) {
      // Same position and sign: NaN with NaN, +inf with +inf, -inf with -inf.
      const bool same = (std::isnan(x) && std::isnan(y)) || x == y;
      if (same) continue;
      Mismatch mm{unravel(i, dims), x, y};
      if (m.nonfinite_mismatches++ == 0) m.first_nonfinite = mm;
      if (std::isnan(x) && !std::isnan(y)) m.unexpected_nan = true;
      if (m.first.size() < kMaxReported) m.first.push_back(std::move(mm));
      continue;
    }
    ++m.compared;
    const double d = std::abs(x - y);
    num += d * d;
    den += y * y;
    if (!have_max || d > m.max_abs) {
      m.max_abs = d;
      m.max_at = {unravel(i, dims), x, y};
      have_max = true;
    }
    if (d <= atol + (atol_extra.empty() ? 0.0 : atol_extra[i]) + rtol * std::abs(y)) {
      ++m.passed;
    } else {
      ++m.violations;
      if (m.first.size() < kMaxReported) m.first.push_back({unravel(i, dims), x, y});
    }
  }
  m.ref_norm = std::sqrt(den);
  m.rel_l2 = den > 0 ? std::sqrt(num / den) : (num == 0 ? 0.0 : std::numeric_limits<double>::infinity());
  m.pass_pct = m.compared > 0 ? 100.0 * static_cast<double>(m.passed) / static_cast<double>(m.compared) : 100.0;
  return m;
}

bool near_tie_row(std::span<const std::int64_t> a, std::span<const std::int64_t> b,
                  const TieScores& ties, std::int64_t row) {
  const auto& s = ties.scores;
  if (row < 0 || row >= s.rows() || a.size() != b.size()) return false;
  std::set<std::int64_t> seen;  // a duplicate id is a bug, never a tie
  for (std::int64_t id : a)
    if (id >= 0 && !seen.insert(id).second) return false;
  double scale = 0;  // the row's largest finite |score|: what "within rounding" is relative to
  for (Eigen::Index c = 0; c < s.cols(); ++c)
    if (std::isfinite(s(row, c))) scale = std::max(scale, std::abs(s(row, c)));
  // NaN ranks as -inf (the tie rule's convention), so two such blocks tie with each other.
  auto score = [&](std::int64_t id) {
    const double v = s(row, id);
    return std::isnan(v) ? -std::numeric_limits<double>::infinity() : v;
  };
  for (std::size_t k = 0; k < a.size(); ++k) {
    if (a[k] == b[k]) continue;
    if (a[k] < 0 || b[k] < 0 || a[k] >= s.cols() || b[k] >= s.cols()) return false;
    const double sa = score(a[k]), sb = score(b[k]);
    if (sa == sb) continue;
    if (!std::isfinite(sa) || !std::isfinite(sb) || std::abs(sa - sb) > ties.rtol * scale) return false;
  }
  return true;
}

IndexMetrics compare_index(std::span<const std::int64_t> a, std::span<const std::int64_t> b,
                           const Dims& dims, const TieScores* ties) {
  check_sizes(a.size(), b.size(), dims, "compare_index");
  IndexMetrics m;
  m.count = static_cast<std::int64_t>(a.size());
  const std::int64_t per_row = std::max<std::int64_t>(row_size(dims), 1);
  m.rows = dims.empty() ? 1 : dims[0];
  m.row_differs.assign(static_cast<std::size_t>(m.rows), false);
  double jsum = 0;
  for (std::int64_t r = 0; r < m.rows; ++r) {
    auto ra = a.subspan(static_cast<std::size_t>(r * per_row), static_cast<std::size_t>(per_row));
    auto rb = b.subspan(static_cast<std::size_t>(r * per_row), static_cast<std::size_t>(per_row));
    bool differs = false;
    for (std::int64_t c = 0; c < per_row; ++c) {
      if (ra[c] == rb[c]) {
        ++m.equal;
        continue;
      }
      differs = true;
      if (m.first.size() < kMaxReported)
        m.first.push_back({unravel(r * per_row + c, dims), static_cast<double>(ra[c]), static_cast<double>(rb[c])});
    }
    std::set<std::int64_t> sa, sb;
    for (auto id : ra) if (id >= 0) sa.insert(id);
    for (auto id : rb) if (id >= 0) sb.insert(id);
    std::size_t inter = 0;
    for (auto id : sa) inter += sb.count(id);
    const std::size_t uni = sa.size() + sb.size() - inter;
    const double j = uni == 0 ? 1.0 : static_cast<double>(inter) / static_cast<double>(uni);
    jsum += j;
    if (j < m.jaccard_min) { m.jaccard_min = j; m.jaccard_min_row = r; }
    if (differs) {
      ++m.rows_differ;
      m.row_differs[static_cast<std::size_t>(r)] = true;
      if (ties && ties->scores.size() > 0 && near_tie_row(ra, rb, *ties, r)) ++m.rows_near_tie;
    }
  }
  m.exact_rate = m.count > 0 ? static_cast<double>(m.equal) / static_cast<double>(m.count) : 1.0;
  m.jaccard_mean = m.rows > 0 ? jsum / static_cast<double>(m.rows) : 1.0;
  return m;
}

double rel_l2(std::span<const double> a, std::span<const double> b) {
  if (a.size() != b.size())
    throw std::invalid_argument(fmt::format("rel_l2: a has {} elements, b {}", a.size(), b.size()));
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) continue;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  if (den == 0) return num == 0 ? 0.0 : std::numeric_limits<double>::infinity();
  return std::sqrt(num / den);
}

}  // namespace m3::cmp
