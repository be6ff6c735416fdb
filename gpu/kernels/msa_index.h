// MSA index-branch block scores on the GPU, twin of m3::ref::msa_index (reference/ops/msa_index.h):
//   s_i(t, j) = qI_i(t) . kI(j)   (no scale; fp32 accumulation of exact bf16 products)
//   S_i(t, b) = max over j in block b with j <= p_t of s_i(t, j);  -inf for blocks b > p_t/BLK.
// A NaN dot product makes its block score NaN (the reference's PropagateNaN); msa_select ranks it
// as -inf. One CTA scores a chunk of blocks for 8 or 16 (query, index head) rows at once with bf16
// tensor-core MMAs, reading each index-K row of the chunk once for all of them (the index-K cache
// [N, Di] is shared by the Hi heads): decode is bound by the n*Di*2 bytes of that read.
//
// Batching: B sequences of T queries; idx_q / q_pos rows b*T + t, idx_k rows b*N + j, scores rows
// (b*Hi + i)*T + t (the reference's [Hi*T, NB] per sequence). B = 1 is the reference's layout.
// NB (the scores' column count) must be >= ceil(N/BLK), so every visible block has a column; the
// columns past a query's own block are written -inf (all NB columns of every row are written).
// A query whose position is outside [0, N) gets a NaN row.
// Paged index-K cache (kv_cache.h): with pages.table set, idx_k is a page pool and sequence b's key
// j is physical row table[b*pages_per_seq + j/128]*128 + j%128 (N = the logical capacity). The
// pages holding keys 0..p_t must have ids >= 0; a block containing a visible key of a page with a
// negative id scores NaN (msa_select ranks it as -inf). Scores are bit-identical to the contiguous
// layout's. Requirements (GpuError otherwise):
// Di in {16, 32, 64, 128}; BLK a positive multiple of 16 (so that a warp's 16 keys lie in one block);
// 16-byte aligned idx_q and idx_k.
#pragma once

#include "gpu/kernels/kv_cache.h"
#include "gpu/runtime/buffer.h"
#include "reference/dims.h"

#include <cuda_fp8.h>

#include <cstdint>

namespace m3::gpu {

// idx_q [B*T, Hi*Di] bf16, idx_k [B*N, Di] bf16 (paged: [n_pages*128, Di]), q_pos [B*T]
// -> scores [B*Hi*T, NB] fp32.
void msa_index(const bf16* idx_q, const bf16* idx_k, const std::int64_t* q_pos, int T, int N, int NB,
               const MsaDims& dims, float* scores, cudaStream_t s, int B = 1, CachePages pages = {});

// The same with an fp8 E4M3 index-K cache (no scale, as the MSA decode kernels store it, spec §6):
// every E4M3 value is exact in f16, in which this path multiplies (fp32 accumulation); idx_q is
// widened bf16 -> f16, exact for |q| >= 2^-17 (smaller elements round at 2^-24 absolute, far
// below the fp32 summation noise), so the scores are those of msa_index on the decoded cache.
void msa_index_fp8(const bf16* idx_q, const __nv_fp8_e4m3* idx_k, const std::int64_t* q_pos, int T,
                   int N, int NB, const MsaDims& dims, float* scores, cudaStream_t s, int B = 1,
                   CachePages pages = {});

namespace detail {
// The row tile msa_index runs (process-wide; for tests and the benchmark's A/B): Auto takes 8-row
// tiles where a sequence has <= 8 (query, head) rows (decode) and 16-row tiles otherwise; Rows16
// takes 16-row tiles (two 8-row MMA N tiles) always: the tile decode used before 8-row tiles, run
// by today's kernel (not the former one, which had the rows as the MMA's M). The scores are
// bit-identical: rows 0-7 of a 16-row tile run the very MMAs of an 8-row tile.
enum class IndexRowTile { Auto, Rows16 };
void set_index_row_tile(IndexRowTile t);
}  // namespace detail

}  // namespace m3::gpu
