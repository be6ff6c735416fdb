// Dense causal GQA prefill attention for Hopper (sm_90a): warpgroup MMA (wgmma) with operands in
// shared memory, loaded by the tensor memory accelerator (TMA), FlashAttention-3 style. The same
// contract as the portable twin gpu::attention_dense_prefill (attention_prefill.h), which runs on
// mma.sync and is the path on every other GPU:
//   out[t, h] = sum_{j <= p0+t} softmax_j(q[t, h] . k[j, g] / sqrt(D)) v[j, g],   g = h / (Hq/Hkv).
// bf16 in and out; fp32 accumulators; online softmax in fp32, base 2; P rounded to bf16 for P V;
// the output normalized in fp32 and rounded to bf16 once (the same numerics as the portable twin).
//
// What is in (the fast path):
//   - one CTA = 128 query rows of one head: 3 warpgroups, a producer (one thread issues TMA loads,
//     the rest idle with their registers given to the consumers by setmaxnreg) and two consumers
//     of 64 rows each;
//   - K and V tiles of 128 keys, two stages each, in the 128-byte swizzled layout that both TMA
//     writes and the wgmma descriptors read; full/empty mbarriers between producer and consumers;
//   - S = Q K^T by wgmma m64n128k16 with A (Q) and B (K) from shared memory; O += P V with A = P
//     from registers (the S accumulator layout is the A fragment layout) and B = V from shared
//     memory, MN-major (the descriptor's transpose bit), so V needs no transposed copy;
//   - intra-warpgroup overlap (FA3 §3.2): S = Q K^T of tile j and P V of tile j-1 are issued
//     back to back, and the softmax of tile j runs while the tensor cores do P V of tile j-1;
//   - causal: key tiles wholly above a CTA's last row are never loaded; the mask is applied only
//     on tiles that cross the diagonal; CTAs run longest-first, heads fastest so that the Hq/Hkv
//     heads sharing a K/V tile run together and share it through L2.
// Measured on an H200 with bench_gpu (M3 heads, T = N, p0 = 0, TFLOP/s on 2*Hq*D*N^2, medians):
// 594 at 8K, 617 at 16K, 624 at 32K, 601 at 128K, against 357 / 362 / 364 / 354 for
// attention_dense_prefill in the same run. Without the overlap this kernel ran ~10% slower (a
// standalone harness, same run: 596 / 615 / 564 against 666 / 701 / 629 with it).
// What would come next (not done): ping-pong scheduling of the two consumer warpgroups (FA3
// §3.1: named barriers so that one warpgroup's softmax runs under the other's GEMMs), rescaling O
// between the two issues instead of after P V, kBlockN 176 or a third K/V stage, an L2-aware
// persistent tile scheduler, and the paged K/V layout (kv_cache.h: a 128-key tile is one page, so
// one TMA box per page and tile would do).
#pragma once

#include "gpu/kernels/kv_cache.h"
#include "gpu/runtime/buffer.h"
#include "reference/dims.h"

#include <cstdint>

namespace m3::gpu {

// True when the current device can run sm90_attention_prefill: compute capability 9.0 and this
// library built with sm_90a code (the only target whose machine code has wgmma). Cached per device.
bool sm90_attention_prefill_available();

// q [T, Hq*D] (query t at position p0 + t), k, v [N, Hkv*D] (row j = position j) -> out [T, Hq*D].
// Requires D = 128, Hq % Hkv == 0, p0 >= 0, T >= 0, p0 + T <= N, 16-byte aligned pointers and
// sm90_attention_prefill_available(); throws GpuError otherwise. T = 0 launches nothing. out must
// not alias q, k or v. Only keys 0..p0+T-1 are read (rows past the chunk may hold anything).
// Contiguous caches only: pages.table != nullptr throws GpuError (use attention_dense_prefill).
void sm90_attention_prefill(const bf16* q, const bf16* k, const bf16* v, std::int64_t p0, int T, int N,
                            const AttnDims& dims, bf16* out, cudaStream_t s, CachePages pages = {});

}  // namespace m3::gpu
