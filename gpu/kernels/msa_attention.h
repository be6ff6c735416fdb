// MSA main branch on the GPU (block-sparse exact attention), twin of m3::ref::msa_attention
// (reference/ops/msa_attention.h): query head h (group g = h / (Hq/Hkv)) attends the keys
//   K_t = { j : floor(j/blk) in sel[g, t] and j <= p_t },   z_j = q_h . k_g(j) / sqrt(D),
// fp32 online softmax over that union, fp32 accumulation, one bf16 rounding of the output.
// Query-outer split-K: one CTA per (query, KV group, a few selected blocks), the G heads of the
// group together (each selected K/V row read once per group), partial (o, m, l) per CTA merged by
// log-sum-exp (the machinery of attention_dense.h, detail::attention_run): for small grids (decode)
// the splits of one (query, group) form a thread-block cluster and merge in distributed shared
// memory, else a merge kernel reads fp32 partials from the workspace (which is then unused, but
// still required: whether a cluster fits is the device's answer at launch).
// Launched as a programmatic dependent (PDL) of the kernel before it in the stream: it waits for
// that grid before reading anything, so any producer order is safe; after msa_select its launch
// overlaps the selection's tail.
//
// Batching as in attention_dense.h: B sequences, q / q_pos / out rows b*T + t, cache rows b*N + j,
// sel rows (b*Hkv + g)*T + t (msa_select's layout per sequence). B = 1 is the reference's layout.
// Paged caches as in attention_dense.h (kv_cache.h): with pages.table set, sequence b's key j is
// physical row table[b*pages_per_seq + j/128]*128 + j%128; the pages of the selected blocks must
// have ids >= 0 (a query that would read a negative id gets a NaN output row). Bit-identical to
// the contiguous layout.
// Selection entries: -1 = unused, anywhere in a row. The device cannot throw, so where the
// reference throws the GPU degrades visibly instead: an id < 0 or > floor(p_t/blk) carries no
// keys, a row with no valid id gives a NaN output row, a position outside [0, N) a NaN row.
// Repeated ids are not detected (the block would count twice): msa_select never emits them.
#pragma once

#include "gpu/kernels/kv_cache.h"
#include "gpu/runtime/buffer.h"
#include "reference/dims.h"

#include <cstddef>
#include <cstdint>

namespace m3::gpu {

// Bytes of workspace msa_attention needs (0 when T == 0); sized to the current device, as
// attention_dense_workspace_bytes.
std::size_t msa_attention_workspace_bytes(int T, int k_blk, const AttnDims& dims, int B = 1);

// q [B*T, Hq*D], k, v [B*N, Hkv*D] (paged: [n_pages*128, Hkv*D]), q_pos [B*T],
// sel [B*Hkv*T, k_blk] int32 -> out [B*T, Hq*D]. D in {16, 32, 64, 128}; blk > 0; workspace of
// msa_attention_workspace_bytes(T, k_blk, dims, B) bytes (the same for both layouts).
void msa_attention(const bf16* q, const bf16* k, const bf16* v, const std::int64_t* q_pos,
                   const std::int32_t* sel, int T, int N, int blk, int k_blk, const AttnDims& dims,
                   bf16* out, cudaStream_t s, void* workspace, std::size_t workspace_bytes, int B = 1,
                   CachePages pages = {});

// The decode chain's last two ops in one call: msa_select(scores -> sel) then msa_attention(sel ->
// out), with the arguments of those two (dims.Hkv == md.Hi: each KV group attends the blocks its
// index head chose; md.BLK is the sparse block). Where msa_attention would run its splits as
// 8-warp clusters (decode at small batch: attention_dense.h's SparseMerge) and md.K_blk <= 64 and
// ceil(NB / splits) <= 1024, the two are one kernel: each cluster selects its (query, group)'s
// blocks by the same exact algorithm as msa_select's split path (a radix select a chunk, the
// candidates ranked; so the same row) and attends them at once, saving a kernel hand-off and the
// separate selection grid. sel and out are bit-identical to the two calls either way (the fused
// kernel is msa_attention's cluster kernel with the selection in front). Arguments are checked as
// by both calls, before anything launches. Workspace as msa_attention's
// (msa_attention_workspace_bytes(T, md.K_blk, dims, B) bytes, 16-byte aligned).
// Returns true where the fused kernel ran, false where the two launches did. Measured (H200, M3
// decode at 1M, index + this, 2026-11-30): b 1 97.7 -> 92.5 us (bf16 index-K), 70.2 -> 64.4 us
// (fp8); b 8 is unchanged (557 us: its grid takes the merge kernel, which does not fuse).
bool msa_select_attention(const float* scores, int NB, const MsaDims& md, const bf16* q, const bf16* k,
                          const bf16* v, const std::int64_t* q_pos, int T, int N, const AttnDims& dims,
                          std::int32_t* sel, bf16* out, cudaStream_t s, void* workspace,
                          std::size_t workspace_bytes, int B = 1, CachePages pages = {});

namespace detail {
// Process-wide switch for tests and benchmarks: false makes msa_select_attention always take the
// two launches (the fused kernel's reference).
void set_select_attention_fusion(bool on);
}  // namespace detail

}  // namespace m3::gpu
