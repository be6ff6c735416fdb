// MSA with the caches split by sequence over R shards: context parallelism (DESIGN §6), as a
// multi-GPU run performs it, here on one CPU as the specification the GPU path must match.
// Shard r holds keys [shard_begin[r], shard_begin[r+1]) of the K, V and index-K caches; interior
// boundaries are multiples of BLK (or N: empty shards at the end), so every block lies in one shard. For each query and KV group:
//   1. each shard scores its own blocks (msa_index on its keys; a block's score is the same
//      block max as on the whole cache) and keeps its best non-forced candidates under the tie
//      rule (msa_select.h), with global block ids: at most the budget K_blk - |F|;
//   2. the candidates of all shards merge under the same rule; since a block in the global top-k
//      is in its shard's top-k, the result is exactly msa_select's selection, in its slot order;
//   3. each shard attends the selected blocks it holds, keeping a partial (m, l, o) per query head:
//      its max logit, the sum of its weights e^(z - m) and its unnormalized output (fp64);
//   4. the partials merge by log-sum-exp: out = sum_r e^(m_r - M) o_r / sum_r e^(m_r - M) l_r.
// What a multi-GPU implementation exchanges is visible here: steps 1-2 move R x (K_blk) (score,
// id) pairs per (query, group), step 4 R x (D + 2) floats per (query, head) -- never keys.
#pragma once

#include "reference/dims.h"
#include "reference/tensor.h"

#include <cstdint>
#include <span>

namespace m3::ref {

// q [T, Hq*D], idx_q [T, Hi*Di], k, v [N, Hkv*D], idx_k [N, Di], q_pos [T] (< N),
// shard_begin [R+1] (0 = b_0 <= b_1 <= ... <= b_R = N, interior b_r multiples of BLK or N; empty
// shards allowed) -> sel [Hkv*T, K_blk] (msa_select's layout and order) and out [T, Hq*D].
// Requires Hi == Hkv (one index head per KV group, as in M3). The q.k and index products run in T;
// softmax, partials and their merge in fp64, as ref::msa_attention. Bad shapes or boundaries throw
// std::invalid_argument; a q_pos outside [0, N) throws std::out_of_range.
template <class T>
void msa_attention_cp(const Mat<T>& q, const Mat<T>& idx_q, const Mat<T>& k, const Mat<T>& v,
                      const Mat<T>& idx_k, std::span<const std::int64_t> q_pos,
                      std::span<const std::int64_t> shard_begin, const MsaDims& msa,
                      const AttnDims& attn, MatI& sel, Mat<T>& out);

}  // namespace m3::ref
