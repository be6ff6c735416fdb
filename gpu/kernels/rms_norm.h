// Gemma RMSNorm on the GPU, twin of m3::ref::rms_norm (reference/ops/rms_norm.h), optionally fused
// with the residual add that precedes every norm in the layer:
//   h += delta (bf16 store, fp32 add);   y = bf16( h * rsqrt(mean(h^2) + eps) * (1 + w) )
// bf16 storage, fp32 arithmetic; the mean of squares in fp32 over one row (C <= 16K: the fp32 sum
// of C squares is accurate to ~C * 6e-8, far inside bf16's 3.9e-3).
#pragma once

#include "gpu/runtime/buffer.h"

namespace m3::gpu {

// x [R, C], w [C] -> y [R, C] (y may alias x).
void rms_norm(const bf16* x, const bf16* w, double eps, bf16* y, int R, int C, cudaStream_t s);

// h [R, C] += delta [R, C] (h updated in place), then y = rms_norm(h).
void add_rms_norm(bf16* h, const bf16* delta, const bf16* w, double eps, bf16* y, int R, int C, cudaStream_t s);

}  // namespace m3::gpu
