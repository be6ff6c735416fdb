// LayerNorm with bias on the GPU (the vision tower's pre_layrnorm, layer_norm1 and layer_norm2),
// twin of the reference's layer_norm in reference/vision.cpp, optionally fused with the residual
// add (and the producing projection's bias) that precedes every norm of a ViT block:
//   h = bf16(h + delta + bias)          (delta: an fp32 GEMM output, bias: that GEMM's bias)
//   y = bf16( (h - mean(h)) * rsqrt(var(h) + eps) * w + b )
// bf16 storage of h and y; fp32 arithmetic. The GEMM before the add writes fp32 (linear's fp32
// overload), so the projection, its bias and the residual sum round to bf16 once, not twice.
// mean and var are two-pass over the row held in registers (var = mean((h - mean)^2)): no
// cancellation of E[h^2] - E[h]^2 when |mean| >> std. The fp32 sums of C <= 16K terms are accurate
// to ~C * 6e-8 relative, far inside bf16's 2^-8.
// w, b, bias are fp32 (vision.h: the tower keeps LayerNorm parameters and biases in fp32; they are
// a few KB, and rounding them would add an error the checkpoint's bf16 values do not have).
#pragma once

#include "gpu/runtime/buffer.h"

namespace m3::gpu {

// x [R, C], w [C], b [C] -> y [R, C] (y may alias x).
void layer_norm(const bf16* x, const float* w, const float* b, double eps, bf16* y, int R, int C, cudaStream_t s);

// h [R, C] = bf16(h + delta [R, C] + bias [C]) in place, then y [R, C] = layer_norm(h) (y must not
// alias h). bias may be null (no bias). y == nullptr: only the residual update (the last block,
// whose output feeds the projector without a norm); w and b are then unused.
void add_layer_norm(bf16* h, const float* delta, const float* bias, const float* w, const float* b, double eps,
                    bf16* y, int R, int C, cudaStream_t s);

}  // namespace m3::gpu
