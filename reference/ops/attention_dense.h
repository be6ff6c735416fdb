// Dense causal GQA attention (spec §2.3): query head h uses KV head g = h / (Hq/Hkv);
// z_j = q_h . k_g(j) / sqrt(D) for every cache key j <= p_t; softmax in fp64; out = sum p_j v_g(j).
// Memory stays linear in N: scores are formed one query row at a time, never as an N x N matrix.
#pragma once

#include "reference/dims.h"
#include "reference/tensor.h"

#include <cstdint>
#include <span>

namespace m3::ref {

// q [T, Hq*D] (post norm + RoPE), k, v [N, Hkv*D] (the cache: row j = position j),
// q_pos [T] with 0 <= q_pos[t] < N -> out [T, Hq*D].
// counter (optional) gains the q.k and p.v multiply-adds executed.
template <class T>
void attention_dense(const Mat<T>& q, const Mat<T>& k, const Mat<T>& v,
                     std::span<const std::int64_t> q_pos, const AttnDims& dims, Mat<T>& out,
                     AttnCounter* counter = nullptr);

}  // namespace m3::ref
