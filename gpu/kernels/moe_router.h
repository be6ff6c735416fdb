// MoE router on the GPU, twin of m3::ref::moe_router (reference/ops/moe_router.h, spec §4):
//   r = x W_gate^T (fp32: x widened from bf16, W_gate fp32, fp32 accumulation);  s = sigmoid(r);
//   experts = top-K_e by (s + bias desc, id asc), NaN ranking as -inf;
//   weights = s / sum of the chosen s (renormalize) or s itself; the bias never enters the weights.
//
// Two kernels, no cuBLAS: (1) the logits as a register-tiled fp32 GEMM that reads x in bf16 and
// widens it in registers. cuBLAS has no bf16 x fp32 GEMM, so it would need x copied to fp32 first
// (a [T, H] fp32 scratch: 100 MB at T = 4096) and a handle; the router's signature (the
// reference's) takes neither. Every logit is a plain sequential fp32 sum over h in the same order,
// so identical rows of W_gate give bit-identical logits (exact ties stay exact ties) and the
// result is deterministic. (2) one warp per token: sigmoid evaluated in fp64 and rounded to fp32
// (the reference's expression, so equal logits give equal scores), biased keys in fp32 (the
// reference's fp32 add), K_e rounds of a warp arg-max under the tie rule, weights renormalized in
// fp64 in the reference's order.
//
// Limits: E <= 1024 (a warp's shared-memory keys and a 32-bit taken-mask per lane), 1 <= top_k <= E.
#pragma once

#include "gpu/runtime/buffer.h"

#include <cstdint>

namespace m3::gpu {

// x [T, H] bf16, w_gate [E, H] fp32, bias [E] fp32 -> logits [T, E] fp32, experts [T, K_e] int32,
// weights [T, K_e] fp32 (K_e = top_k). All pointers are device memory.
void moe_router(const bf16* x, const float* w_gate, const float* bias, int top_k, bool renormalize, float* logits,
                std::int32_t* experts, float* weights, int T, int H, int E, cudaStream_t s);

}  // namespace m3::gpu
