// MSA block-sparse attention for prefill chunks on the GPU, twin of m3::ref::msa_attention
// (reference/ops/msa_attention.h): query head h (group g = h / (Hq/Hkv)) attends the keys
//   K_t = { j : floor(j/blk) in sel[g*T + t] and j <= p_t },   z_j = q_h . k_g(j) / sqrt(D),
// fp32 softmax over that union, fp32 accumulation, one bf16 rounding of the output.
//
// KV-block-outer with query gathering (the decode form, msa_attention.h, is query-outer: every
// query re-reads its k_blk blocks, which is right for T = 1 and wasteful for a prefill chunk, where
// the local block is selected by every query in it and early blocks by many):
//  1. inverse lists on the device: for each (group g, block b) the (query t, slot) pairs whose
//     selection row holds b as a valid id, in ascending (t, slot) order (a stable radix sort of
//     the selection by key g*NB + b; NB = ceil(N/blk));
//  2. one CTA a tile of one list: it loads block b's K and V rows [blk, D] into shared memory once
//     and, for up to 64 / G gathered queries x the G heads of the group (M = 64 rows), computes
//     S = q.k^T on bf16 tensor cores (fp32 accumulate), the causal mask j <= p_t, the block's
//     softmax partial (m, l) and the unnormalized o = P.V (P split into bf16 hi + lo parts, two
//     MMAs, so P carries ~16 significant bits and the P.V sum is fp32-accurate, as in the decode
//     kernel), written to the workspace per (t, h, slot); on sm_90 with D = blk = 128 the same
//     tile runs on wgmma (sm90_msa_attention_prefill.cu), elsewhere on mma.sync;
//  3. a merge kernel combines each (t, h)'s slot partials by log-sum-exp in fp32 in slot order
//     (deterministic), normalizes, and rounds once to bf16.
// Queries are processed in chunks of T_c (partials sized for T_c, see the workspace formula below).
//
// Layouts (B = 1): q, out [T, Hq*D]; k, v caches, rows through cache_row(base, 0, j, N, Hkv*D,
// pages) (contiguous row j, or 128-row pages); q_pos [T] (device int64); sel [Hkv*T, k_blk] int32
// (msa_select's layout: row g*T + t).
// Selection entries and positions, exactly as msa_attention (the device cannot throw): -1 = unused,
// anywhere in a row; an id < 0 or > floor(p_t/blk) carries no keys; a row with no valid id gives a
// NaN output row; a position outside [0, N) gives a NaN row (its slots are all invalid). Repeated
// ids are not detected (the block counts twice): msa_select never emits them.
// Cache contract: every K/V row j < N that some query of a tile may see must hold finite values
// (a tile loads block b's rows up to the largest position among its queries; a query's masked keys
// then get weight exactly 0, and 0 * finite = 0). Rows past that position are never read.
//
// Paged caches (kv_cache.h): page ids are the caller's guarantee, as in every cache reader; a
// negative id (an unallocated page) is never read: the queries that would see one of its rows get
// a NaN output row.
//
// Requirements (checked, GpuError otherwise): D in {16, 32, 64, 128}; Hq % Hkv == 0 and
// G = Hq/Hkv <= 64; blk a multiple of 16 in [16, 128]; k_blk >= 1; N >= 1; Hkv*k_blk <= 2^29 and
// Hkv*ceil(N/blk) < 2^29; q, k, v, out and the workspace 16-byte aligned; with a page table,
// pages_per_seq * kPageRows >= N.
//
// Workspace (msa_attention_prefill_workspace_bytes), with T_c = min(T, floor(4 GiB / (Hq * k_blk
// * (4D + 8)))) (and Hkv * T_c * k_blk <= 2^29; T_c >= 1), E = Hkv * T_c * k_blk, QT = floor(64 / G),
// K = Hkv * ceil(N / blk), each part rounded up to 256 bytes, plus 256 bytes of alignment slack:
//   partial o   T_c * Hq * k_blk * D * 4        partial (m, l)   T_c * Hq * k_blk * 8
//   sort keys and values, in and out   4 * E * 4    list counts and offsets   3 * K * 4 + 8
//   tile table  (ceil(E / QT) + min(K, E)) * 16   radix-sort scratch (cub, for E items)
// M3 geometry (Hq 64, Hkv 4, D 128, k_blk 16): 520 KiB of partials a query, T_c = 8064 (~4.3 GB
// in all; a 4096-query chunk takes ~2.2 GB; the lists add ~1 MB a chunk at N = 1M). The budget is
// large on purpose: at 1M keys a chunk of 1008 queries leaves ~2 queries a (group, block) list,
// a half-empty tile for every K/V block load (msa_attention_prefill.cu has the measurements).
#pragma once

#include "gpu/kernels/attention_dense.h"
#include "gpu/kernels/kv_cache.h"
#include "gpu/runtime/buffer.h"
#include "reference/dims.h"

#include <cstddef>
#include <cstdint>

namespace m3::gpu {

// Bytes of workspace msa_attention_prefill needs for these arguments (0 when T <= 0 or the
// arguments are invalid; the call itself then reports what is wrong). Depends on the current
// device only through cub's radix-sort scratch size.
std::size_t msa_attention_prefill_workspace_bytes(int T, int N, int blk, int k_blk, const AttnDims& dims);

// q [T, Hq*D], k, v cache (rows via cache_row, b = 0), q_pos [T] (device int64), sel [Hkv*T, k_blk]
// (row g*T + t) -> out [T, Hq*D] bf16. workspace: at least msa_attention_prefill_workspace_bytes(T,
// N, blk, k_blk, dims) bytes of device memory, 16-byte aligned, contents need no initialization.
// Results are bit-identical from run to run (no floating-point atomics; fixed merge order).
void msa_attention_prefill(const bf16* q, const bf16* k, const bf16* v, const std::int64_t* q_pos,
                           const std::int32_t* sel, int T, int N, int blk, int k_blk, const AttnDims& dims,
                           bf16* out, cudaStream_t s, void* workspace, std::size_t workspace_bytes,
                           CachePages pages = {});

// True when a call with head dim D and blocks of blk keys takes the wgmma tile kernel on the
// current device (D = blk = 128 on compute capability 9.0 with an sm_90a build, not forced off by
// detail::set_msa_prefill_tiles); false where the portable mma.sync kernel runs.
bool msa_attention_prefill_uses_wgmma(int D, int blk);

namespace detail {
// Which tile kernel runs: Auto (the wgmma kernel, sm90_msa_attention_prefill.cu, where D = blk =
// 128 on a compute capability 9.0 device; the portable mma.sync kernel elsewhere), or the portable
// one forced, for tests that must run both on a Hopper card. Process-wide.
enum class PrefillTiles { Auto, Portable };
void set_msa_prefill_tiles(PrefillTiles t);
}  // namespace detail

}  // namespace m3::gpu
