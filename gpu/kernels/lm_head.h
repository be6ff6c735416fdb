// LM head on the GPU, twin of m3::ref::lm_head (reference/ops/lm_head.h, spec §2.1):
//   logits [T, V] = linear(rms_norm(h, norm_w), W)   with fp32 logits
// The normed activation is stored in bf16 (scratch) between the two steps, as every activation
// is (DESIGN §3); the GEMM accumulates in fp32 and writes fp32 logits without a bf16 rounding,
// so near-equal top logits keep their order (greedy decode compares them).
#pragma once

#include "gpu/runtime/buffer.h"

namespace m3::gpu {

// h [T, H], norm_w [H], w [V, H] -> logits [T, V] fp32; scratch [T, H] bf16 (the normed h; may
// be h itself when h is not needed afterwards). Sets the handle's stream to s.
void lm_head(cublasHandle_t handle, const bf16* h, const bf16* norm_w, double eps, const bf16* w, float* logits,
             bf16* scratch, int T, int H, int V, cudaStream_t s);

}  // namespace m3::gpu
