// Dense causal GQA attention for prefill chunks on the tensor cores (FlashAttention-2 style), a GPU
// twin of m3::ref::attention_dense (reference/ops/attention_dense.h) for the case where the T
// queries are one contiguous chunk at positions p0..p0+T-1:
//   out[t, h] = sum_{j <= p0+t} softmax_j(q[t, h] . k[j, g] / sqrt(D)) v[j, g],   g = h / (Hq/Hkv).
// bf16 in and out; q.k and p.v on mma.sync bf16 with fp32 accumulators; online softmax in fp32
// (base 2, the scale folded with log2 e); the probabilities are rounded to bf16 for the p.v
// product, the output is normalized in fp32 and rounded to bf16 once. Portable to sm_80+.
// Memory is linear in N: no [T, N] score matrix is ever stored.
#pragma once

#include "gpu/kernels/kv_cache.h"
#include "gpu/runtime/buffer.h"
#include "reference/dims.h"

#include <cstdint>

namespace m3::gpu {

// q [T, Hq*D] (query t at position p0 + t), k, v [N, Hkv*D] (row j = position j) -> out [T, Hq*D].
// Requires D = 128, Hq % Hkv == 0, p0 >= 0, T >= 0, p0 + T <= N, and 16-byte aligned pointers;
// throws GpuError otherwise. T = 0 launches nothing. out must not alias q, k or v. Only keys
// 0..p0+T-1 are read (rows past the chunk may hold anything).
// Paged cache (kv_cache.h; one sequence, B = 1): with pages.table set ([pages_per_seq] page ids,
// pages_per_seq * 128 >= N), k and v are page pools and key j is physical row
// table[j/128]*128 + j%128. The pages of keys 0..p0+T-1 must have ids >= 0: a 128-query tile of
// the chunk that loads a page with a negative id gets NaN output rows (all of its heads). The
// outputs are bit-identical to the contiguous layout's.
void attention_dense_prefill(const bf16* q, const bf16* k, const bf16* v, std::int64_t p0, int T, int N,
                             const AttnDims& dims, bf16* out, cudaStream_t s, CachePages pages = {});

}  // namespace m3::gpu
