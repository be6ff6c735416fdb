// Bias add + exact GELU on the GPU, the epilogue of the vision tower's fc1, the projector's
// linear_1 and the merger's linear_1 (twin of gelu in reference/vision.cpp); bias add alone for
// the projections that are not followed by an activation (linear_2 of the projector and merger):
//   y = bf16( gelu(x + b) ),  gelu(v) = 0.5 v (1 + erf(v / sqrt(2)))      (bias_gelu)
//   y = bf16( x + b )                                                    (bias_add)
// x is the fp32 output of the GEMM (linear's fp32 overload), so the projection, its bias and the
// activation round to bf16 once. erff is CUDA's full-precision erf (<= 2 ulp), not a tanh fit.
#pragma once

#include "gpu/runtime/buffer.h"

namespace m3::gpu {

// x [R, C], b [C] (may be null: no bias) -> y [R, C].
void bias_gelu(const float* x, const float* b, bf16* y, int R, int C, cudaStream_t s);
void bias_add(const float* x, const float* b, bf16* y, int R, int C, cudaStream_t s);

}  // namespace m3::gpu
