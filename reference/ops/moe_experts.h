// MoE experts + shared expert (spec §4): y = scale * sum_{e chosen} w_e Expert_e(x) + Shared(x),
// each a SwiGLU-OAI MLP; the weighted sum is accumulated in T, the shared expert is unweighted.
#pragma once

#include "reference/ops/swiglu_oai.h"
#include "reference/tensor.h"

#include <vector>

namespace m3::ref {

// One SwiGLU-OAI MLP's weights: gate, up [I, H], down [H, I].
template <class T>
struct MlpWeights {
  Mat<T> gate;
  Mat<T> up;
  Mat<T> down;
};

// x [T, H], experts [T, K_e] (ids < experts_w.size()), weights [T, K_e], shared (ignored when its
// matrices are empty) -> y [T, H]. Each expert runs once on the rows routed to it. r: where each
// MLP's intermediates and output are rounded (mlp_swiglu); the weighted sum stays in T.
template <class T>
void moe_experts(const Mat<T>& x, const MatI& experts, const Mat<T>& weights,
                 const std::vector<MlpWeights<T>>& experts_w, const MlpWeights<T>& shared,
                 double routed_scale, const SwigluParams& p, Mat<T>& y, Rounding r = Rounding::NONE);

}  // namespace m3::ref
