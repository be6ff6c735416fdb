// MSA main branch: block-sparse exact attention (spec §3.5). Query head h (group g = h/(Hq/Hkv))
// attends K_t = { j : floor(j/BLK) in sel[g, t] and j <= p_t }, with z_j = q_h . k_g(j)/sqrt(D),
// an exact fp64 softmax over that union, blocks visited in ascending id for reproducibility.
#pragma once

#include "reference/dims.h"
#include "reference/tensor.h"

#include <cstdint>
#include <span>

namespace m3::ref {

// q [T, Hq*D], k, v [N, Hkv*D], q_pos [T] (< N), sel [Hkv*T, K_blk] (msa_select's layout, -1 =
// unused, allowed anywhere in a row; every valid id must be <= floor(q_pos[t]/blk), else
// std::out_of_range; a repeated id or a row without any valid id is std::invalid_argument)
// -> out [T, Hq*D]. A q_pos outside [0, N) throws std::out_of_range.
// counter (optional) gains qk_macs and pv_macs for the keys actually attended.
template <class T>
void msa_attention(const Mat<T>& q, const Mat<T>& k, const Mat<T>& v,
                   std::span<const std::int64_t> q_pos, const MatI& sel, int blk,
                   const AttnDims& dims, Mat<T>& out, AttnCounter* counter = nullptr);

}  // namespace m3::ref
