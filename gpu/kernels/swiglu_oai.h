// SwiGLU-OAI activation on the GPU, twin of m3::ref::swiglu_oai (reference/ops/swiglu_oai.h):
//   g = min(gate, limit);  u = clamp(up, -limit, limit);  act = (u + beta) * g * sigmoid(alpha * g)
// bf16 in and out, fp32 arithmetic (accurate expf), one rounding. NaN inputs stay NaN, as in the
// reference (the clamps are comparisons, never fminf/fmaxf, which would drop the NaN).
#pragma once

#include "gpu/runtime/buffer.h"

namespace m3::gpu {

// The reference's m3::ref::SwigluParams (same defaults: spec §2.4) in fp32. Declared here, not
// reused, so that no .cu file has to pull Eigen through reference/tensor.h.
struct SwigluParams {
  float alpha = 1.702f;
  float limit = 7.0f;
  float beta = 1.0f;
};

// gate, up [R, I] -> act [R, I]. act may alias gate or up (elementwise, same index).
void swiglu_oai(const bf16* gate, const bf16* up, const SwigluParams& p, bf16* act, int R, int I, cudaStream_t s);

// Fused-projection layout: gate_up [R, 2I] = [gate | up] per row (gate first, spec §2.4), the
// output of one GEMM against the stacked [w_gate; w_up] -> act [R, I]. act must not overlap gate_up.
void swiglu_oai(const bf16* gate_up, const SwigluParams& p, bf16* act, int R, int I, cudaStream_t s);

}  // namespace m3::gpu
