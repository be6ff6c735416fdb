// MSA index branch scoring (spec §3.2): block-max scores of the index queries against the
// index-K cache.  s_i(t, j) = qI_i(t) . kI(j)  (no scale, no ReLU, no head weights);
//   S_i(t, b) = max over j in block b with j <= p_t of s_i(t, j)
// for every visible block b = 0..floor(p_t/BLK) (the partial local block included, so a query at
// position p costs Hi*Di*(p+1) multiply-adds: the analytic model's 2*Hi*Di*n FLOPs).
// The projections, norms and RoPE of qI / kI are done by the caller (linear + qk_norm_rope).
#pragma once

#include "reference/dims.h"
#include "reference/tensor.h"

#include <cstdint>
#include <span>

namespace m3::ref {

// idx_q [T, Hi*Di], idx_k [N, Di] (index-K cache, row j = position j), q_pos [T] (< N)
// -> scores [Hi*T, NB] with row i*T + t, NB = floor(max(q_pos)/BLK) + 1; entries of blocks past
// a query's own block are -inf; T = 0 gives a 0 x 0 matrix. A q_pos outside [0, N) throws
// std::out_of_range. Accumulation in T (fp32 scores in the fp32 and bf16 modes).
// counter (optional) gains index_macs.
template <class T>
void msa_index(const Mat<T>& idx_q, const Mat<T>& idx_k, std::span<const std::int64_t> q_pos,
               const MsaDims& dims, Mat<T>& scores, AttnCounter* counter = nullptr);

}  // namespace m3::ref
