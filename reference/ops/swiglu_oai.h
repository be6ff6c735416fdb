// SwiGLU-OAI MLP (spec §2.4), used by the dense MLP, each routed expert and the shared expert:
//   g = min(gate, limit); u = clamp(up, -limit, limit)
//   act = (u + beta) * g * sigmoid(alpha * g);  y = W_down act
#pragma once

#include "reference/tensor.h"

namespace m3::ref {

struct SwigluParams {
  double alpha = 1.702;
  double limit = 7.0;
  double beta = 1.0;
};

// Where an MLP's intermediates are rounded. NONE: kept in T (the fp32 and fp64 modes). BF16: gate,
// up, act and the output rounded to bf16, where the GPU path stores them (the bf16-emulating mode,
// DESIGN §3): without it a bf16 run differs from the GPU by roundings of O(1) intermediates that
// no output-level tolerance can tell from a kernel error once an output cancels.
enum class Rounding { NONE, BF16 };

// gate, up [R, I] -> act [R, I] (act may alias gate or up).
template <class T>
void swiglu_oai(const Mat<T>& gate, const Mat<T>& up, const SwigluParams& p, Mat<T>& act);

// x [R, H], w_gate, w_up [I, H], w_down [H, I] -> y [R, H].
template <class T>
void mlp_swiglu(const Mat<T>& x, const Mat<T>& w_gate, const Mat<T>& w_up, const Mat<T>& w_down,
                const SwigluParams& p, Mat<T>& y, Rounding r = Rounding::NONE);

}  // namespace m3::ref
