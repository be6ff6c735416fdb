// MSA main branch (spec §3.5): exact attention of each query head over the union of the blocks its
// KV group selected, causal inside the local block. Selected blocks are visited in ascending id and
// adjacent ones merged into one key range, so a selection of every visible block runs the same
// products as dense attention. Only the D-term q.k dot products run in T; scaling, softmax and the
// P.V sum run in fp64 (DESIGN §3). One (query, group) at a time, so memory is linear in the keys
// attended and no [T, N] matrix is formed.
#include "reference/ops/msa_attention.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

namespace m3::ref {

namespace {

void check_args(Eigen::Index q_rows, Eigen::Index q_cols, Eigen::Index k_rows, Eigen::Index k_cols,
                Eigen::Index v_rows, Eigen::Index v_cols, std::span<const std::int64_t> q_pos,
                Eigen::Index sel_rows, int blk, const AttnDims& d) {
  if (d.Hq <= 0 || d.Hkv <= 0 || d.D <= 0 || d.Hq % d.Hkv != 0)
    throw std::invalid_argument(fmt::format(
        "msa_attention: expected Hq, Hkv, D > 0 and Hq % Hkv == 0, got Hq = {}, Hkv = {}, D = {}",
        d.Hq, d.Hkv, d.D));
  if (blk <= 0)
    throw std::invalid_argument(fmt::format("msa_attention: expected blk > 0, got {}", blk));
  const Eigen::Index qw = static_cast<Eigen::Index>(d.Hq) * d.D;
  const Eigen::Index kvw = static_cast<Eigen::Index>(d.Hkv) * d.D;
  if (q_cols != qw)
    throw std::invalid_argument(fmt::format(
        "msa_attention: q has {} columns, expected Hq*D = {}*{} = {}", q_cols, d.Hq, d.D, qw));
  if (k_cols != kvw)
    throw std::invalid_argument(fmt::format(
        "msa_attention: k has {} columns, expected Hkv*D = {}*{} = {}", k_cols, d.Hkv, d.D, kvw));
  if (v_cols != kvw)
    throw std::invalid_argument(fmt::format(
        "msa_attention: v has {} columns, expected Hkv*D = {}*{} = {}", v_cols, d.Hkv, d.D, kvw));
  if (v_rows != k_rows)
    throw std::invalid_argument(fmt::format(
        "msa_attention: v has {} rows, expected the {} rows (N) of k", v_rows, k_rows));
  if (static_cast<Eigen::Index>(q_pos.size()) != q_rows)
    throw std::invalid_argument(fmt::format(
        "msa_attention: q_pos has {} entries, expected one per q row = {}", q_pos.size(), q_rows));
  for (std::size_t t = 0; t < q_pos.size(); ++t)
    if (q_pos[t] < 0 || q_pos[t] >= k_rows)
      throw std::out_of_range(fmt::format(
          "msa_attention: q_pos[{}] = {}, expected in [0, N) with N = {} k rows", t, q_pos[t],
          k_rows));
  if (sel_rows != static_cast<Eigen::Index>(d.Hkv) * q_rows)
    throw std::invalid_argument(fmt::format(
        "msa_attention: sel has {} rows, expected Hkv*T = {}*{} = {}", sel_rows, d.Hkv, q_rows,
        static_cast<Eigen::Index>(d.Hkv) * q_rows));
}

// The key ranges [begin, end) of one selection row: its valid ids ascending, each block clipped
// to j <= p, adjacent blocks merged. -1 means "no block" in any slot (a -1 before a valid id is
// accepted); ids outside [-1, L] throw std::out_of_range; a repeated id or a row with no valid id
// throws std::invalid_argument (the union would be ill-defined or empty).
void selected_ranges(const MatI& sel, Eigen::Index row, std::int64_t p, int blk,
                     std::vector<std::int64_t>& ids,
                     std::vector<std::pair<std::int64_t, std::int64_t>>& ranges) {
  const std::int64_t L = p / blk;
  ids.clear();
  for (Eigen::Index s = 0; s < sel.cols(); ++s) {
    const std::int64_t b = sel(row, s);
    if (b == -1) continue;
    if (b < -1 || b > L)
      throw std::out_of_range(fmt::format(
          "msa_attention: sel({}, {}) = {}, expected -1 or a block id in [0, L] with L = "
          "floor(q_pos/blk) = floor({}/{}) = {}", row, s, b, p, blk, L));
    ids.push_back(b);
  }
  if (ids.empty())
    throw std::invalid_argument(fmt::format(
        "msa_attention: sel row {} has no valid block id, expected at least one", row));
  std::sort(ids.begin(), ids.end());
  if (auto dup = std::adjacent_find(ids.begin(), ids.end()); dup != ids.end())
    throw std::invalid_argument(fmt::format(
        "msa_attention: sel row {} holds block {} twice, expected distinct ids", row, *dup));
  ranges.clear();
  for (std::int64_t b : ids) {
    const std::int64_t j0 = b * blk, j1 = std::min<std::int64_t>(j0 + blk, p + 1);
    if (!ranges.empty() && ranges.back().second == j0) ranges.back().second = j1;
    else ranges.emplace_back(j0, j1);
  }
}

}  // namespace

template <class T>
void msa_attention(const Mat<T>& q, const Mat<T>& k, const Mat<T>& v,
                   std::span<const std::int64_t> q_pos, const MatI& sel, int blk,
                   const AttnDims& dims, Mat<T>& out, AttnCounter* counter) {
  check_args(q.rows(), q.cols(), k.rows(), k.cols(), v.rows(), v.cols(), q_pos, sel.rows(), blk,
             dims);
  const Eigen::Index n_tok = q.rows();
  const int D = dims.D, G = dims.Hq / dims.Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  // A caller passing k or v (or q) as out gets the result through a separate buffer, as the
  // resize would otherwise destroy inputs still being read.
  const bool aliased = &out == &q || &out == &k || &out == &v;
  Mat<T> separate;
  Mat<T>& dst = aliased ? separate : out;
  dst.resize(n_tok, static_cast<Eigen::Index>(dims.Hq) * D);  // [T, Hq*D]

  std::vector<std::int64_t> ids;                              // [valid ids of one row]
  std::vector<std::pair<std::int64_t, std::int64_t>> ranges;  // key ranges [begin, end)
  Mat<T> z_t;                         // [G, range keys]: one range's q.k products in T
  MatD v_d;                           // [range keys, D]: one range of v_g widened to fp64
  MatD z, acc;                        // [G, n keys attended], [G, D]: fp64 softmax and sum
  std::uint64_t keys_times_heads = 0;

  for (Eigen::Index t = 0; t < n_tok; ++t) {
    const std::int64_t p = q_pos[static_cast<std::size_t>(t)];
    for (int g = 0; g < dims.Hkv; ++g) {
      selected_ranges(sel, g * n_tok + t, p, blk, ids, ranges);
      std::int64_t n = 0;
      for (const auto& r : ranges) n += r.second - r.first;
      const Eigen::Map<const Mat<T>> q_g(q.row(t).data() + g * G * D, G, D);  // [G, D]

      // z_j = q_h . k_g(j) / sqrt(D) over the union, ranges in ascending key order.
      z.resize(G, n);
      Eigen::Index col = 0;
      for (const auto& [j0, j1] : ranges) {
        const Eigen::Index len = j1 - j0;
        z_t.resize(G, len);
        z_t.noalias() = q_g * k.block(j0, g * D, len, D).transpose();
        z.middleCols(col, len) = z_t.template cast<double>() * scale;
        col += len;
      }
      // Exact softmax in fp64: subtract the row max, keep the unnormalized weights, divide once.
      const Eigen::VectorXd z_max = z.rowwise().maxCoeff();  // [G]
      z = (z.colwise() - z_max).array().exp().matrix();
      const Eigen::VectorXd denom = z.rowwise().sum();  // [G]

      // P.V is the long reduction (up to every key of the context): fp64 throughout, with P kept
      // in fp64, so only the short D-term q.k dot products carry T's rounding.
      acc.setZero(G, D);
      col = 0;
      for (const auto& [j0, j1] : ranges) {
        const Eigen::Index len = j1 - j0;
        if constexpr (std::is_same_v<T, double>) {
          acc.noalias() += z.middleCols(col, len) * v.block(j0, g * D, len, D);
        } else {
          v_d = v.block(j0, g * D, len, D).template cast<double>();
          acc.noalias() += z.middleCols(col, len) * v_d;
        }
        col += len;
      }
      acc.array().colwise() /= denom.array();
      Eigen::Map<Mat<T>>(dst.row(t).data() + g * G * D, G, D) = acc.template cast<T>();
      keys_times_heads += static_cast<std::uint64_t>(G) * static_cast<std::uint64_t>(n);
    }
  }
  if (aliased) out.swap(separate);
  if (counter) {
    counter->qk_macs += keys_times_heads * static_cast<std::uint64_t>(D);
    counter->pv_macs += keys_times_heads * static_cast<std::uint64_t>(D);
  }
}

template void msa_attention<float>(const Mat<float>&, const Mat<float>&, const Mat<float>&,
                                   std::span<const std::int64_t>, const MatI&, int,
                                   const AttnDims&, Mat<float>&, AttnCounter*);
template void msa_attention<double>(const Mat<double>&, const Mat<double>&, const Mat<double>&,
                                    std::span<const std::int64_t>, const MatI&, int,
                                    const AttnDims&, Mat<double>&, AttnCounter*);

}  // namespace m3::ref
