// MSA top-k block selection (spec §3.4): per (index head = KV group, query) the forced blocks plus
// the best non-forced visible blocks under the exact tie rule (score descending, block id
// ascending, NaN as -inf), laid out as msa_select.h states: chosen non-forced blocks in tie-rule
// order, then forced blocks ascending, then -1. select_candidates counts the non-forced block
// scores that compete for the budget: Hi*(L+1-|F|) per query when L+1 > K_blk, else 0 (cost.h).
#include "reference/ops/msa_select.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

namespace m3::ref {

namespace {

template <class T>
struct Candidate {
  T score;  // NaN already mapped to -inf, so the order below is a strict weak order
  std::int32_t id;
};

// Tie rule (msa_select.h): score descending, then block id ascending. Ids are distinct, so this
// is a total order.
template <class T>
bool ranks_before(const Candidate<T>& a, const Candidate<T>& b) {
  return select_ranks_before(a.score, a.id, b.score, b.id);
}

void check_args(Eigen::Index s_rows, Eigen::Index s_cols, std::span<const std::int64_t> q_pos,
                const MsaDims& d) {
  if (d.Hi <= 0 || d.BLK <= 0 || d.K_blk <= 0)
    throw std::invalid_argument(fmt::format(
        "msa_select: expected Hi, BLK, K_blk > 0, got Hi = {}, BLK = {}, K_blk = {}", d.Hi, d.BLK,
        d.K_blk));
  if (d.local_blocks < 0 || d.init_blocks < 0)
    throw std::invalid_argument(fmt::format(
        "msa_select: expected local_blocks, init_blocks >= 0, got {} and {}", d.local_blocks,
        d.init_blocks));
  // The budget includes the forced blocks; it must hold all of them even when none overlap.
  if (static_cast<std::int64_t>(d.K_blk) <
      static_cast<std::int64_t>(d.local_blocks) + d.init_blocks)
    throw std::invalid_argument(fmt::format(
        "msa_select: K_blk = {} is smaller than the forced blocks local_blocks + init_blocks = "
        "{} + {}", d.K_blk, d.local_blocks, d.init_blocks));
  const auto n_tok = static_cast<Eigen::Index>(q_pos.size());
  if (s_rows != static_cast<Eigen::Index>(d.Hi) * n_tok)
    throw std::invalid_argument(fmt::format(
        "msa_select: scores has {} rows, expected Hi*T = {}*{} = {}", s_rows, d.Hi, n_tok,
        static_cast<Eigen::Index>(d.Hi) * n_tok));
  std::int64_t p_max = -1;
  for (std::size_t t = 0; t < q_pos.size(); ++t) {
    if (q_pos[t] < 0)
      throw std::out_of_range(
          fmt::format("msa_select: q_pos[{}] = {}, expected >= 0", t, q_pos[t]));
    p_max = std::max(p_max, q_pos[t]);
  }
  if (n_tok > 0 && s_cols < p_max / d.BLK + 1)
    throw std::invalid_argument(fmt::format(
        "msa_select: scores has {} columns, expected NB >= floor(max(q_pos)/BLK) + 1 = "
        "floor({}/{}) + 1 = {}", s_cols, p_max, d.BLK, p_max / d.BLK + 1));
  if (p_max / d.BLK >= std::numeric_limits<std::int32_t>::max())
    throw std::invalid_argument(fmt::format(
        "msa_select: block id {} does not fit the int32 selection", p_max / d.BLK));
}

}  // namespace

template <class T>
void msa_select(const Mat<T>& scores, std::span<const std::int64_t> q_pos, const MsaDims& dims,
                MatI& sel, AttnCounter* counter) {
  check_args(scores.rows(), scores.cols(), q_pos, dims);
  const auto n_tok = static_cast<Eigen::Index>(q_pos.size());
  const int k_blk = dims.K_blk;
  sel.resize(static_cast<Eigen::Index>(dims.Hi) * n_tok, k_blk);  // [Hi*T, K_blk]
  sel.setConstant(-1);

  std::vector<Candidate<T>> cand;  // [non-forced visible blocks], reused across rows
  std::uint64_t examined = 0;

  for (Eigen::Index t = 0; t < n_tok; ++t) {
    // Forced F = [0, init_end) u [tail_begin, L]; n_free of the blocks between are chosen.
    const auto [L, init_end, tail_begin, n_valid, n_free] = select_row(q_pos[static_cast<std::size_t>(t)], dims);

    for (int i = 0; i < dims.Hi; ++i) {
      const Eigen::Index row = i * n_tok + t;
      cand.clear();
      for (std::int64_t b = init_end; b < tail_begin; ++b) {
        T s = scores(row, b);
        if (std::isnan(s)) s = -std::numeric_limits<T>::infinity();
        cand.push_back({s, static_cast<std::int32_t>(b)});
      }
      // Only a real top-k counts as examining scores (cost.h's model): when every visible block
      // fits the budget, none competes for it. The non-forced blocks are still ranked then, as
      // the output order of a row is the tie-rule order in every case.
      if (L + 1 > k_blk) examined += cand.size();
      const auto mid = cand.begin() + n_free;
      std::partial_sort(cand.begin(), mid, cand.end(), ranks_before<T>);
      Eigen::Index slot = 0;
      for (auto it = cand.begin(); it != mid; ++it) sel(row, slot++) = it->id;
      for (std::int64_t b = 0; b < init_end; ++b) sel(row, slot++) = static_cast<std::int32_t>(b);
      for (std::int64_t b = tail_begin; b <= L; ++b)
        sel(row, slot++) = static_cast<std::int32_t>(b);
    }
  }
  if (counter) counter->select_candidates += examined;
}

template void msa_select<float>(const Mat<float>&, std::span<const std::int64_t>, const MsaDims&,
                                MatI&, AttnCounter*);
template void msa_select<double>(const Mat<double>&, std::span<const std::int64_t>,
                                 const MsaDims&, MatI&, AttnCounter*);

}  // namespace m3::ref
