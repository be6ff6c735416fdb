// The vision tower's 3-D RoPE on the GPU, twin of m3::vision_rope3d (reference/vision.h), fused
// with the qkv projection's bias add: the epilogue of the [P, 3*Hv] qkv GEMM.
//   x = qkv + bias                                  (fp32: the GEMM's fp32 output)
//   q, k (the first 2*Hv columns), per head of head_dim dims, the first 3*rd dims rotated:
//     for i < half = 3*rd/2:  a = pos[axis = i / (rd/2)] * theta^(-2 (i % (rd/2)) / rd)
//       (x[i], x[i+half]) -> (x[i] cos a - x[i+half] sin a,  x[i+half] cos a + x[i] sin a)
//     dims 3*rd..head_dim-1 pass through; v (the last Hv columns) gets the bias only
//   y = bf16(x)                                     (one rounding: GEMM + bias + rotation)
// Angles in fp32: positions are patch-grid coordinates (< 2016/14 = 144), where an fp32 angle is
// off by < 144 * 2^-24 ~ 1e-5 rad, far below the 2^-8 of the bf16 output. cos/sin are CUDA's
// full-range sincosf (not the __sincosf intrinsic, whose error grows with the argument).
#pragma once

#include "gpu/runtime/buffer.h"

#include <cstdint>

namespace m3::gpu {

struct VisionRopeDims {
  int heads = 16, head_dim = 80;  // Hv = heads * head_dim
  int rope_dims = 26;             // rd: rotated dims an axis, 3 axes (t, h, w); even, 3*rd <= head_dim
  double theta = 1e4;
};

// qkv [P, 3*Hv] (fp32), bias [3*Hv] (fp32, may be null), pos [P, 3] (device, int32 (t, h, w))
// -> y [P, 3*Hv] (bf16; must not alias qkv).
void vision_rope3d(const float* qkv, const float* bias, const std::int32_t* pos, const VisionRopeDims& dims, bf16* y,
                   int P, cudaStream_t s);

}  // namespace m3::gpu
