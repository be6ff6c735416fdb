// QK-norm + partial NeoX RoPE on the GPU, twin of m3::ref::qk_norm_rope (reference/ops/qk_norm_rope.h):
// per head, Gemma RMSNorm over d channels (weight w [d] shared by all heads), then rotation of the
// first R channels by the token's absolute position:
//   for i < R/2:  a = p * theta^(-2i/R);  (x[i], x[i+R/2]) -> (x[i] cos a - x[i+R/2] sin a,
//                                                            x[i+R/2] cos a + x[i] sin a)
// Numerics: bf16 in and out, one rounding. The mean of squares, the normalization and the rotation
// are fp32. The angle is NOT fp32: p reaches 2^20, where an fp32 p * inv_freq is off by ~0.06 rad.
// inv_freq = theta^(-2i/R) is computed on the host in fp64 (the reference's own std::pow, so the
// same bits), and each block forms a = double(p) * inv_freq and cos/sin in fp64 on the device
// (CUDA's double sincos: <= 2 ulp, full range reduction), then rounds cos/sin to fp32 for the
// rotation. A table of cos/sin per position would need 2^20 x R/2 entries per call: not worth it
// for R/2 double sincos per token, which a block shares across all of its heads.
//
// Limits: d <= 512 (two register tiles: d <= 128 and d <= 512), R even with 0 <= R <= d, and the
// token's row n_heads*d bf16 must fit one block's shared memory (n_heads*d <= ~110K on Hopper).
#pragma once

#include "gpu/runtime/buffer.h"

#include <cstdint>

namespace m3::gpu {

// x [T, n_heads*d], w [d], positions [T] (device, int64) -> y [T, n_heads*d]. y may alias x.
// Positions should be >= 0 (the reference throws otherwise); a negative one is rotated by its
// negative angle, reading and writing nothing out of bounds. positions may be null when R == 0.
void qk_norm_rope(const bf16* x, int n_heads, int d, const bf16* w, double eps, int R, double theta,
                  const std::int64_t* positions, bf16* y, int T, cudaStream_t s);

// The same op on strided rows, writing the result also into a cache (the K and index-K caches):
//   x row t at x + t*ldx (ldx >= n_heads*d: e.g. a slice of the fused [q|k|v|idx_q|idx_k] GEMM
//   output, ldx = its full width);  y row t at y + t*ldy (y may be null: cache only; y may alias x
//   only with ldy == ldx);  cache row slots[t] at cache + slots[t]*cache_ld receives y's row
//   (n_heads*d values). The cache is [n_slots, cache_ld] row-major, i.e. token-major pages: a cache
//   paged in BLK-token pages has slot = page*BLK + offset. slots (device, int64) outside
//   [0, n_slots) are skipped: nothing is written for that token's cache row (the caller, who owns
//   the page table on the host, validates slots; the kernel only guarantees no stray write).
void qk_norm_rope_to_cache(const bf16* x, std::int64_t ldx, int n_heads, int d, const bf16* w, double eps, int R,
                           double theta, const std::int64_t* positions, bf16* y, std::int64_t ldy, int T,
                           bf16* cache, std::int64_t cache_ld, const std::int64_t* slots, std::int64_t n_slots,
                           cudaStream_t s);

}  // namespace m3::gpu
