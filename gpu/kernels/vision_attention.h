// Bidirectional (non-causal) multi-head attention of the vision tower on the GPU, twin of the
// per-head softmax(q k^T / sqrt(D)) v in m3::vision_forward (reference/vision.cpp):
//   out[i, h] = sum_j softmax_j(q[i, h] . k[j, h] / sqrt(D)) v[j, h]     for all P x P pairs
// Flash-style (FlashAttention-2 forward): one CTA of 4 warps owns 64 queries of one head, streams
// the keys in tiles of 64 through shared memory, keeps the scores in registers (bf16 mma.sync
// m16n8k16, fp32 accumulation), an fp32 online softmax in base 2, P rounded to bf16 for the P.V
// MMA (FlashAttention's one extra rounding: a relative error of <= 2^-9 per weight, random in
// sign, that averages over the keys), and one bf16 rounding of the normalized output.
// Why a kernel of its own: attention_dense.h compiles D in {16, 32, 64, 128} (M3's tower has
// D = 80) and serves a causal KV cache; padding heads to 128 would spend 60% more MMA work and a
// copy, and cuBLAS batched GEMMs + a softmax kernel would write the [heads, P, P] scores to HBM:
// 5 GB in fp32 at P = 9216 (1344^2), several times the GEMM time in traffic. This kernel takes
// any D that is a multiple of 16 up to 128, straight from the fused qkv rows (stride ld).
#pragma once

#include "gpu/runtime/buffer.h"

namespace m3::gpu {

// q, k, v: P rows of stride ld elements, head h at columns [h*D, h*D + D) of each (e.g. the three
// slices of one [P, 3*Hv] qkv buffer with ld = 3*Hv) -> out [P, heads*D] (row stride heads*D).
// Requirements (GpuError otherwise): D % 16 == 0 and 16 <= D <= 128; ld % 8 == 0 and
// ld >= heads*D; q, k, v, out 16-byte aligned; out must not overlap q, k, v.
void vision_attention(const bf16* q, const bf16* k, const bf16* v, int ld, int P, int heads, int D, bf16* out,
                      cudaStream_t s);

}  // namespace m3::gpu
