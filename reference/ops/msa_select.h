// MSA top-k block selection (spec §3.4), one selection per (query, index head = KV group).
// With L = floor(p_t / BLK) the query's own block:
//   forced  F = {0 .. init_blocks-1} u {L-local_blocks+1 .. L}, clipped to [0, L]
//   if L + 1 <= K_blk: every visible block 0..L is selected, the remaining slots are -1
//   else: the K_blk - |F| best non-forced blocks of 0..L, then F
// Tie rule: score descending, then block id ascending; NaN counts as -inf.
// Output order of a row: the chosen non-forced blocks in tie-rule order, then the forced blocks
// in ascending id (so M3's local block sits in the last valid slot, as in the MSA kernels), then
// -1 padding. Exactly min(K_blk, L+1) valid entries, no duplicates.
#pragma once

#include "reference/dims.h"
#include "reference/tensor.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>

namespace m3::ref {

// The layout of one selection row for a query at position p, by the rule above: its own block L,
// the forced blocks [0, init_end) and [tail_begin, L] (F without overlap), the non-forced visible
// blocks [init_end, tail_begin) of which n_free are chosen, n_valid = min(K_blk, L+1) entries.
// K_blk >= local + init >= |F|, so n_free >= 0; when L + 1 <= K_blk it equals the number of
// non-forced blocks and every visible block is chosen. Shared with msa_attention_cp.
struct SelectRow {
  std::int64_t L, init_end, tail_begin, n_valid, n_free;
};
inline SelectRow select_row(std::int64_t p, const MsaDims& d) {
  SelectRow r;
  r.L = p / d.BLK;
  r.init_end = std::min<std::int64_t>(d.init_blocks, r.L + 1);
  r.tail_begin = std::max(std::max<std::int64_t>(r.L - d.local_blocks + 1, 0), r.init_end);
  r.n_valid = std::min<std::int64_t>(d.K_blk, r.L + 1);
  r.n_free = r.n_valid - (r.init_end + (r.L + 1 - r.tail_begin));
  return r;
}

// The tie rule as a strict total order on (score, block id): score descending with NaN as -inf,
// then id ascending. True when (sa, ia) ranks before (sb, ib). Shared with msa_attention_cp,
// whose shards' candidates must merge in exactly this order.
template <class T>
inline bool select_ranks_before(T sa, std::int32_t ia, T sb, std::int32_t ib) {
  const T lo = -std::numeric_limits<T>::infinity();
  if (sa != sa) sa = lo;
  if (sb != sb) sb = lo;
  if (sa != sb) return sa > sb;
  return ia < ib;
}

// scores [Hi*T, NB] (msa_index's layout; NB >= floor(max(q_pos)/BLK)+1), q_pos [T]
// -> sel [Hi*T, K_blk] int32. counter (optional) gains select_candidates: per (query, head) the
// non-forced visible blocks L+1-|F| when L+1 > K_blk, else 0 (every visible block is taken and no
// score decides anything), the rule of reference/cost.h. A q_pos < 0 throws std::out_of_range.
template <class T>
void msa_select(const Mat<T>& scores, std::span<const std::int64_t> q_pos, const MsaDims& dims,
                MatI& sel, AttnCounter* counter = nullptr);

}  // namespace m3::ref
