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

// gate, up [R, I] -> act [R, I] (act may alias gate or up).
template <class T>
void swiglu_oai(const Mat<T>& gate, const Mat<T>& up, const SwigluParams& p, Mat<T>& act);

// x [R, H], w_gate, w_up [I, H], w_down [H, I] -> y [R, H].
template <class T>
void mlp_swiglu(const Mat<T>& x, const Mat<T>& w_gate, const Mat<T>& w_up, const Mat<T>& w_down,
                const SwigluParams& p, Mat<T>& y);

}  // namespace m3::ref
