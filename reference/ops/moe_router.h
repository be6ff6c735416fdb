// MoE router (spec §4): r = W_gate x (fp32 or wider, never bf16); s = sigmoid(r);
// choice = top-K_e of s + bias (tie: lower expert id); weight_e = s_e / sum over chosen s
// (the bias never enters the weights). The routed scale (x2.0) is applied by moe_experts.
#pragma once

#include "reference/tensor.h"

namespace m3::ref {

// x [T, H], w_gate [E, H], bias [E] -> logits [T, E], experts [T, K_e] int32 (order: biased score
// descending, then id ascending), weights [T, K_e] (renormalized when `renormalize`, else raw s_e).
template <class T>
void moe_router(const Mat<T>& x, const Mat<T>& w_gate, const Vec<T>& bias, int top_k,
                bool renormalize, Mat<T>& logits, MatI& experts, Mat<T>& weights);

}  // namespace m3::ref
