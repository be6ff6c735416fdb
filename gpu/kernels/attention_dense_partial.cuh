// Split-K (flash-decoding) attention kernels shared by attention_dense and msa_attention; see
// attention_dense.h. One CTA = (query row, KV group, m-tile of 16 heads, split of the keys).
//  - K/V tiles of 16 x W keys (W warps: 4, or 8 in sparse clusters) stream through a cp.async
//    pipeline of 3 stages (2 at W = 8): 16-byte loads, rows padded by 16 bytes so that ldmatrix is
//    free of bank conflicts. Masked rows are zero-filled.
//  - Each warp scores 16 keys of a tile for the 16 head rows with mma.m16n8k16
//    (bf16 in, fp32 accumulate: q.k products are exact, sums fp32), keeps an fp32 online softmax
//    in base 2, and accumulates P.V with P split into bf16 hi + lo parts (two MMAs), so that P
//    carries ~16 significant bits instead of bf16's 8: the P.V sum is fp32-accurate.
//  - At the end the warps merge through shared memory and write one partial (o, m, l) per head.
//  - A merge kernel combines the splits of each (query, head) and rounds once to bf16. Sparse
//    launches whose grid is well under one wave and whose splits are <= 16 instead run the splits
//    of a (query, group, m-tile) as one thread-block cluster that merges through distributed
//    shared memory (the same formula; its sums run in split order, the merge kernel's in a tree
//    order, so the two paths differ in the last bits): no merge kernel, no partials in global memory.
//    Sparse launches are also programmatic dependents of msa_select (PDL, attention_dense.h).
//    Measured (H200, M3 decode at 1M, 16 blocks): b 1 18.7 -> 16.2 us; the whole index + select
//    + sparse chain 107.5 -> 103 us with PDL (2026-11-29). Cluster CTAs have 8 warps (one tile of
//    128 keys) where the whole grid's clusters are resident at once: b 1 16.0 -> 14.0 us, chain
//    102.8 -> 100.2 us (same day, fifth session; launch_clusters says why).
//  - Paged caches (kv_cache.h) are a separate instantiation (the contiguous one is unchanged): a
//    dense tile (64 keys aligned to 64) lies in one page, whose id is loaded one pipeline step
//    ahead, so the cp.async addresses never wait on it; a sparse CTA translates its selected blocks
//    to physical rows once, when it compacts the ids (blocks that divide a page), or looks each
//    row's page up (other BLK). Only the addresses change: the outputs are bit-identical.
//  - Fused selection (kSelect, msa_select_attention): the 8-warp cluster kernel with msa_select's
//    split path in front, so the decode chain is index -> one kernel instead of index -> select ->
//    attention. Measured (H200, M3 decode at 1M, b 1, 2026-11-30): chain 97.7 -> 92.5 us (70.2% of
//    the copy bandwidth); the first form, which ranked every candidate in every CTA, 94.1 us.
//
// This header holds the partial kernel (one CTA's keys -> its (o, m, l), and the cluster merge);
// attention_dense.cu, its only includer, holds the merge kernel, the split plans and the launchers.
#pragma once

#include "gpu/kernels/attention_dense.h"
#include "gpu/kernels/msa_select_chunk.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace m3::gpu {
namespace detail {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileKeys = 16 * kWarps;  // 64: each warp scores 16 keys of a tile
constexpr int kRowsM = 16;              // MMA M: head rows of one m-tile
constexpr int kMaxSlots = 64;           // selection slots one sparse CTA may take
constexpr int kMinChunk = 2 * kTileKeys;  // shortest dense split: two tiles (both loads in flight)
constexpr int kMaxCluster = 16;         // sparse splits merged in a cluster (Hopper's largest, non-portable)
constexpr float kLog2e = 1.4426950408889634f;

// W warps a CTA; each scores 16 keys of a tile of 16*W keys. W = 4 everywhere but the sparse
// cluster path (W = 8, below).
template <int D, int W = kWarps>
struct Cfg {
  static_assert(D % 16 == 0 && D <= 128, "D must be a multiple of 16 and at most 128");
  static constexpr int kWarps = W;
  static constexpr int kThreads = W * 32;
  static constexpr int kTileKeys = 16 * W;
  // 4 warps: 3 tiles in flight (2 loading while 1 is computed). 8 warps (sparse clusters, one
  // 128-key block a CTA at M3's shape): 2, which keeps the pipeline at 136 KiB of the 227.
  static constexpr int kStages = W == 4 ? 3 : 2;
  static constexpr int kStride = D + 8;  // bf16 elements a smem row: +16 B shifts rows 4 banks
  static constexpr int kTileElems = kTileKeys * kStride;
  static constexpr int kPipeBytes = kStages * 2 * kTileElems * 2;  // K and V tiles
  static constexpr int kRedStride = D + 4;  // floats a row of the cross-warp merge buffer
  static constexpr int kRedBytes = W * kRowsM * kRedStride * 4;
  static constexpr int kSmemBytes = kPipeBytes > kRedBytes ? kPipeBytes : kRedBytes;
};

__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// Tile-key states in s_row besides a logical key j >= 0.
constexpr int kMasked = -1;      // past the range, past p, or an empty slot: weight 0
constexpr int kUnreadable = -2;  // its page id is negative (paged only): score +inf, NaN output

// The keys of one CTA as a logical sequence 0..n_logical-1 mapped to cache rows.
struct KeyMap {
  int c0 = 0, kv_end = 0;  // dense: rows [c0, kv_end)
  int n_logical = 0;
  const int* ids = nullptr;  // sparse: valid block ids of this split (shared memory)
  int blk = 0;
  std::int64_t p = 0;
};

// kCluster (sparse only): the splits of one (query, group, m-tile) are one thread-block cluster
// (rank = split) and merge through distributed shared memory; no workspace, no merge kernel.
// kSelect (fused selection, cluster path of 8 warps only): the cluster also selects the blocks
// from the index scores (a.scores) before attending; see the selection block below.
template <int D, bool kSparse, bool kPaged, bool kCluster = false, int kW = kWarps, bool kSelect = false>
__global__ void __launch_bounds__(kW * 32, kW == kWarps ? 2 : 1) attn_partial_kernel(const AttnLaunch a) {
  using C = Cfg<D, kW>;
  constexpr int kWarps = C::kWarps, kThreads = C::kThreads, kTileKeys = C::kTileKeys, kStages = C::kStages;
  static_assert(!kSelect || (kSparse && kCluster && kThreads == kSelThreads), "fused selection: 8-warp sparse clusters");
  // The selection (or with kSelect the scores) comes from the kernel before: wait before reading
  // anything, so that any producer order is safe.
  if constexpr (kSparse) pdl_wait();
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sk = reinterpret_cast<bf16*>(smem);  // [kStages][kTileKeys][kStride]
  bf16* sv = sk + kStages * C::kTileElems;   // [kStages][kTileKeys][kStride]
  float* red = reinterpret_cast<float*>(smem);  // [kWarps][kRowsM][kRedStride], after the loop
  __shared__ int s_row[kStages][kTileKeys];  // logical key j of every tile key, or kMasked / kUnreadable
  __shared__ int s_ids[kMaxSlots];
  // Sparse paged, BLK dividing the page: the page id of each compacted block (int32, not a row
  // offset: at D = 64 four CTAs an SM leave only 64 bytes of shared memory to spare).
  __shared__ std::int32_t s_page[kSparse && kPaged ? kMaxSlots : 1];
  __shared__ int s_nids;
  // Fused selection: every chunk's candidates, packed in chunk order (pushed by the cluster's
  // CTAs), sel_chunk_best's scratch, and the selection row.
  __shared__ unsigned long long s_cand[kSelect ? kMaxCluster * kSelMaxK : 1];
  __shared__ std::conditional_t<kSelect, SelScratch, char> s_scr;
  __shared__ std::int32_t s_sel[kSelect ? kSelMaxK : 1];
  __shared__ float s_m[kWarps][kRowsM], s_l[kWarps][kRowsM];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int G = a.Hq / a.Hkv, MT = (G + kRowsM - 1) / kRowsM;
  long x = blockIdx.x;
  int mt = 0, split = 0;
  if constexpr (kCluster) {  // a cluster's CTAs are consecutive: the split varies fastest
    split = static_cast<int>(x % a.splits); x /= a.splits;
    mt = static_cast<int>(x % MT); x /= MT;
  } else {
    mt = static_cast<int>(x % MT); x /= MT;  // m-tiles of a chunk adjacent: share K/V in L2
    split = static_cast<int>(x % a.splits); x /= a.splits;
  }
  const int g = static_cast<int>(x % a.Hkv); x /= a.Hkv;
  const int qrow = static_cast<int>(x);  // b*T + t
  const int b = qrow / a.T;
  const std::int64_t p = a.q_pos[qrow];
  const bool pos_ok = p >= 0 && p < a.N;
  const std::int64_t W = static_cast<std::int64_t>(a.Hkv) * D;  // cache row elements

  // Q fragments (A operand, rows = heads of this m-tile), straight from global memory.
  constexpr int kK = D / 16;  // k-steps of q.k
  std::uint32_t qa[kK][4];
  {
    const int r0 = mt * kRowsM + lane / 4, r1 = r0 + 8;  // rows within the group
    const bf16* qg = a.q + static_cast<std::int64_t>(qrow) * a.Hq * D + static_cast<std::int64_t>(g) * G * D;
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) {
      const int col = kk * 16 + (lane % 4) * 2;
      auto ld = [&](int r, int cc) -> std::uint32_t {
        return r < G ? *reinterpret_cast<const std::uint32_t*>(qg + r * D + cc) : 0u;
      };
      qa[kk][0] = ld(r0, col);
      qa[kk][1] = ld(r1, col);
      qa[kk][2] = ld(r0, col + 8);
      qa[kk][3] = ld(r1, col + 8);
    }
  }

  if constexpr (kSelect) {
    // The selection row of (query, group g = index head g), made by the cluster (the splits) with
    // msa_select's split-path algorithm (exact, so the same row): CTA c finds the best k of the
    // c-th chunk of the row's non-forced blocks and pushes them into every CTA's s_cand (barrier
    // A); each CTA then ranks its own candidates among all of them, 16 threads a candidate (an
    // all-pairs rank of every candidate in every CTA was ~1,100 of the kernel's ~4,300
    // instructions a warp: ncu, H200, M3 decode at 1M, 2026-11-30), and sends each chosen one to
    // the CTA whose slot it fills (barrier B). Every branch around a cluster barrier depends on
    // the row alone.
    const SelRow sr = sel_row(p, a.blk, a.NB, a.k_blk, a.local, a.init);
    const int P = a.splits, k = sr.ok ? sr.k : 0;
    const std::int64_t srow = (static_cast<std::int64_t>(b) * a.Hkv + g) * a.T + (qrow - b * a.T);
    // This CTA's slots that no choice fills: the forced blocks, then -1 (msa_select's row order).
    const int s0 = split * a.chunk, s1 = min(a.k_blk, s0 + a.chunk);
    for (int sl = max(s0, k) + tid; sl < s1; sl += kThreads) {
      const std::int32_t v = sr.ok ? sel_forced_slot(sr, sl) : -1;
      s_sel[sl] = v;
      if (mt == 0) a.sel_out[srow * a.k_blk + sl] = v;  // msa_select's output row (the trace, the caller)
    }
    if (k > 0) {
      __cluster_barrier_arrive_relaxed();  // its wait (below) proves every CTA running
      const int chunk = (sr.C + P - 1) / P;  // <= 4 kSelThreads (select_attention_run checks)
      const int beg = min(sr.C, split * chunk), id0 = sr.init_end + beg;
      // E = 2 keys a thread where the chunk allows (M3 at 1M: 512 blocks a CTA): half the radix
      // passes' per-key steps of E = 4.
      const float* src = a.scores + srow * a.NB + id0;
      const int n = min(sr.C - beg, chunk);
      const int want = chunk <= 2 * kSelThreads ? sel_chunk_best<2>(src, id0, n, k, s_scr)
                                                : sel_chunk_best<4>(src, id0, n, k, s_scr);
      // Candidates packed in chunk order: chunks 0 .. full-1 give min(k, chunk), chunk `full` the rest.
      const int full = sr.C / chunk, wf = min(k, chunk), wr = min(k, sr.C - full * chunk);
      const int off = min(split, full) * wf + (split > full ? wr : 0), total = full * wf + wr;
      __cluster_barrier_wait();
      for (int i = tid; i < want * P; i += kThreads) {
        const int c = i / want, j = i - c * want;
        static_cast<unsigned long long*>(__cluster_map_shared_rank(s_cand, c))[off + j] = s_scr.best[j];
      }
      __cluster_barrier_arrive();  // A: releases the pushes; the wait acquires every CTA's
      __cluster_barrier_wait();
      // Candidates are distinct (ids differ), so their ranks are a permutation and the best k are
      // the row's best k. Lane group of 16: candidate i, lane s counts the entries j = s mod 16.
      for (int i0 = 0; i0 < want; i0 += kThreads / 16) {
        const int i = i0 + tid / 16, sl = tid % 16;
        const unsigned long long x = i < want ? s_cand[off + i] : ~0ull;
        int r = 0;
        for (int j = sl; j < total; j += 16) r += s_cand[j] < x;
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
        if (sl == 0 && i < want && r < k) {
          const std::int32_t id = static_cast<std::int32_t>(x & 0xffffffffu);
          static_cast<std::int32_t*>(__cluster_map_shared_rank(s_sel, r / a.chunk))[r] = id;
          if (mt == 0) a.sel_out[srow * a.k_blk + r] = id;
        }
      }
      __cluster_barrier_arrive();  // B: releases the chosen ids into their CTAs' s_sel
      __cluster_barrier_wait();
    }
    __syncthreads();
  }

  KeyMap km;
  km.p = p;
  // Sparse paged: a selected block lies in one page (s_page holds its id) when BLK divides the page.
  const bool page_blocks = kSparse && kPaged && kPageRows % a.blk == 0;
  if constexpr (!kSparse) {
    km.c0 = split * a.chunk;
    km.kv_end = pos_ok ? static_cast<int>(std::min<std::int64_t>(km.c0 + a.chunk, p + 1)) : km.c0;
    km.n_logical = std::max(0, km.kv_end - km.c0);
  } else {
    // Compact this split's valid ids (0 <= id <= floor(p/blk)) in slot order; -1 and out-of-range
    // ids carry no keys. Warp 0, 32 slots a round: the loads go out together.
    if (warp == 0) {
      int n = 0;
      if (pos_ok) {
        const std::int32_t* srow =
            kSelect ? s_sel : a.sel + ((static_cast<std::int64_t>(b) * a.Hkv + g) * a.T + (qrow - b * a.T)) * a.k_blk;
        const int s0 = split * a.chunk, s1 = std::min(a.k_blk, s0 + a.chunk);
        for (int base = s0; base < s1; base += 32) {
          const int s = base + lane;
          const std::int32_t id = s < s1 ? srow[s] : -1;
          const bool ok = id >= 0 && static_cast<std::int64_t>(id) * a.blk <= p;
          const unsigned m = __ballot_sync(0xffffffffu, ok);
          if (ok) {
            const int at = n + __popc(m & ((1u << lane) - 1u));
            s_ids[at] = id;
            if constexpr (kPaged) {
              if (page_blocks)  // first key id*blk <= p < N: its logical page is in the table
                s_page[at] = cache_page(a.pages, b, static_cast<std::int64_t>(id) * a.blk / kPageRows);
            }
          }
          n += __popc(m);
        }
      }
      if (lane == 0) s_nids = n;
    }
    __syncthreads();
    km.ids = s_ids;
    km.blk = a.blk;
    km.n_logical = s_nids * a.blk;
  }
  const int ntiles = (km.n_logical + kTileKeys - 1) / kTileKeys;

  // Dense paged: the page id of tile `tile` (its 64 keys, aligned to 64, lie in one page; called
  // for tiles < ntiles only, whose first key is < kv_end <= N: inside the table).
  auto tile_page = [&](int tile) -> std::int32_t {
    if constexpr (kPaged && !kSparse) return cache_page(a.pages, b, (km.c0 + tile * kTileKeys) / kPageRows);
    else return 0;
  };
  // Loads tile `tile` into stage `st`: 64 rows x D/8 16-byte chunks of K and of V. page: the
  // tile's page id (dense paged only).
  auto load_tile = [&](int tile, int st, std::int32_t page) {
    constexpr int kChunks = D / 8;
    constexpr int kRowsPerPass = kThreads / kChunks;
    const int c = tid % kChunks;
    const std::int64_t off = static_cast<std::int64_t>(g) * D + c * 8;
    for (int r = tid / kChunks; r < kTileKeys; r += kRowsPerPass) {
      const int i = tile * kTileKeys + r;  // logical key of the CTA
      int j = kMasked;
      const bf16* rk = nullptr;  // the key's K row; V's is at the same offset
      if constexpr (!kSparse) {
        if (km.c0 + i < km.kv_end) {
          j = km.c0 + i;
          if constexpr (kPaged) rk = page < 0 ? nullptr : cache_row_in_page(a.k, page, j, W);
          else rk = cache_row(a.k, b, j, a.N, W, CachePages{});
        }
      } else if (i < km.n_logical) {
        const int slot = i / km.blk, in = i - slot * km.blk;
        const std::int64_t jl = static_cast<std::int64_t>(km.ids[slot]) * km.blk + in;
        if (jl <= km.p) {
          j = static_cast<int>(jl);
          if constexpr (!kPaged) rk = cache_row(a.k, b, j, a.N, W, CachePages{});
          else if (page_blocks) rk = s_page[slot] < 0 ? nullptr : cache_row_in_page(a.k, s_page[slot], j, W);
          else rk = cache_row(a.k, b, j, a.N, W, a.pages);  // j <= p < N: inside the table
        }
      }
      if (j >= 0 && rk == nullptr) j = kUnreadable;
      const bool ok = j >= 0;
      const bf16* srck = ok ? rk + off : a.k;
      const bf16* srcv = ok ? a.v + (rk - a.k) + off : a.v;
      cp_async16(smem_u32(sk + st * C::kTileElems + r * C::kStride + c * 8), srck, ok);
      cp_async16(smem_u32(sv + st * C::kTileElems + r * C::kStride + c * 8), srcv, ok);
      if (c == 0) s_row[st][r] = j;
    }
  };

  constexpr int kN = D / 8;  // n-tiles of the output
  float o[kN][4];
#pragma unroll
  for (int i = 0; i < kN; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows lane/4 and lane/4 + 8
  const float scale_log2 = kLog2e * rsqrtf(static_cast<float>(D));

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntiles) load_tile(s, s, tile_page(s));
    cp_async_commit();
  }
  // Dense paged: the page id of the next tile to load, fetched one step before its use.
  std::int32_t next_page = kStages - 1 < ntiles ? tile_page(kStages - 1) : 0;
  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile `it` visible to all; every warp is done with tile it-1's stage
    if (it + kStages - 1 < ntiles) load_tile(it + kStages - 1, (it + kStages - 1) % kStages, next_page);
    if constexpr (kPaged && !kSparse)
      if (it + kStages < ntiles) next_page = tile_page(it + kStages);
    cp_async_commit();

    const int st = it % kStages;
    const bf16* kt = sk + st * C::kTileElems + warp * 16 * C::kStride;
    const bf16* vt = sv + st * C::kTileElems + warp * 16 * C::kStride;
    float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) {
      std::uint32_t b0, b1, b2, b3;
      // Matrices: keys 0-7 x d 0-7 | keys 0-7 x d 8-15 | keys 8-15 x d 0-7 | keys 8-15 x d 8-15.
      const bf16* src = kt + ((lane & 7) + ((lane >> 4) << 3)) * C::kStride + kk * 16 + ((lane >> 3) & 1) * 8;
      ldmatrix_x4(b0, b1, b2, b3, smem_u32(src));
      mma_bf16(sc[0], qa[kk], b0, b1);
      mma_bf16(sc[1], qa[kk], b2, b3);
    }
    // Mask and scale: element e of n-tile nt is key warp*16 + nt*8 + (lane%4)*2 + (e&1).
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = warp * 16 + nt * 8 + (lane % 4) * 2 + (e & 1);
        const int sr = s_row[st][key];
        if constexpr (kPaged)  // +inf for an unreadable key: its weight is 2^(inf - inf) = NaN, and
                               // so are the query's o, l and (through both merges) its output
          sc[nt][e] = sr >= 0 ? sc[nt][e] * scale_log2 : (sr == kMasked ? -INFINITY : INFINITY);
        else
          sc[nt][e] = sr >= 0 ? sc[nt][e] * scale_log2 : -INFINITY;
      }
    float t0 = fmaxf(fmaxf(sc[0][0], sc[0][1]), fmaxf(sc[1][0], sc[1][1]));
    float t1 = fmaxf(fmaxf(sc[0][2], sc[0][3]), fmaxf(sc[1][2], sc[1][3]));
    t0 = fmaxf(t0, __shfl_xor_sync(0xffffffffu, t0, 1));
    t0 = fmaxf(t0, __shfl_xor_sync(0xffffffffu, t0, 2));
    t1 = fmaxf(t1, __shfl_xor_sync(0xffffffffu, t1, 1));
    t1 = fmaxf(t1, __shfl_xor_sync(0xffffffffu, t1, 2));
    const float n0 = fmaxf(m0, t0), n1 = fmaxf(m1, t1);
    // A row with no unmasked key yet has max -inf: subtract 0 instead, so exp2 gives 0, not NaN.
    const float u0 = n0 == -INFINITY ? 0.f : n0, u1 = n1 == -INFINITY ? 0.f : n1;
    const float alpha0 = exp2f(m0 - u0), alpha1 = exp2f(m1 - u1);
    m0 = n0;
    m1 = n1;
    float pr[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      pr[nt][0] = exp2f(sc[nt][0] - u0);
      pr[nt][1] = exp2f(sc[nt][1] - u0);
      pr[nt][2] = exp2f(sc[nt][2] - u1);
      pr[nt][3] = exp2f(sc[nt][3] - u1);
    }
    l0 = l0 * alpha0 + (pr[0][0] + pr[0][1] + pr[1][0] + pr[1][1]);
    l1 = l1 * alpha1 + (pr[0][2] + pr[0][3] + pr[1][2] + pr[1][3]);
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      o[i][0] *= alpha0;
      o[i][1] *= alpha0;
      o[i][2] *= alpha1;
      o[i][3] *= alpha1;
    }
    // P as the A operand (rows = heads, k = the warp's 16 keys), split into bf16 hi + lo.
    std::uint32_t ph[4], pl[4];
    {
      const float h00 = bf16_round(pr[0][0]), h01 = bf16_round(pr[0][1]);
      const float h02 = bf16_round(pr[0][2]), h03 = bf16_round(pr[0][3]);
      const float h10 = bf16_round(pr[1][0]), h11 = bf16_round(pr[1][1]);
      const float h12 = bf16_round(pr[1][2]), h13 = bf16_round(pr[1][3]);
      ph[0] = pack_bf16(h00, h01);
      ph[1] = pack_bf16(h02, h03);
      ph[2] = pack_bf16(h10, h11);
      ph[3] = pack_bf16(h12, h13);
      pl[0] = pack_bf16(pr[0][0] - h00, pr[0][1] - h01);
      pl[1] = pack_bf16(pr[0][2] - h02, pr[0][3] - h03);
      pl[2] = pack_bf16(pr[1][0] - h10, pr[1][1] - h11);
      pl[3] = pack_bf16(pr[1][2] - h12, pr[1][3] - h13);
    }
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      std::uint32_t v0, v1, v2, v3;
      // Transposed matrices: keys 0-7 x d 0-7 | keys 8-15 x d 0-7 | keys 0-7 x d 8-15 | keys 8-15 x d 8-15.
      const bf16* src = vt + ((lane & 7) + ((lane >> 3) & 1) * 8) * C::kStride + dp * 16 + (lane >> 4) * 8;
      ldmatrix_x4_trans(v0, v1, v2, v3, smem_u32(src));
      mma_bf16(o[2 * dp], ph, v0, v1);
      mma_bf16(o[2 * dp], pl, v0, v1);
      mma_bf16(o[2 * dp + 1], ph, v2, v3);
      mma_bf16(o[2 * dp + 1], pl, v2, v3);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused below

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const int r0 = lane / 4, r1 = r0 + 8;
  if (lane % 4 == 0) {
    s_m[warp][r0] = m0;
    s_m[warp][r1] = m1;
    s_l[warp][r0] = l0;
    s_l[warp][r1] = l1;
  }
  float* rw = red + warp * kRowsM * C::kRedStride;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const int col = i * 8 + (lane % 4) * 2;
    *reinterpret_cast<float2*>(rw + r0 * C::kRedStride + col) = make_float2(o[i][0], o[i][1]);
    *reinterpret_cast<float2*>(rw + r1 * C::kRedStride + col) = make_float2(o[i][2], o[i][3]);
  }
  __syncthreads();

  const int nrows = G - mt * kRowsM < kRowsM ? G - mt * kRowsM : kRowsM;
  // Cluster merge: this CTA's merged rows go to shared memory past the warps' buffer.
  float* cl_o = red + kWarps * kRowsM * C::kRedStride;  // [kRowsM, D]
  float2* cl_ml = reinterpret_cast<float2*>(cl_o + kRowsM * D);  // [kRowsM] (max, sum)
  // Each row's warp weights 2^(m_w - M) and its (M, L), once a row rather than once an element
  // (the per-element form, 4 exp2f an element, was by count ~900 of the ~4,250 instructions a warp
  // that ncu measured in a b1 decode CTA, H200, 2026-11-29).
  // s_m[w][r] becomes warp w's weight, 0 for a warp that saw no key: its keys were all masked,
  // their V rows zero-filled, so it holds o = 0 and adds +0 (the same bits as skipping it). The
  // row's (M, L) go to s_l[0][r], s_l[1][r], whose sums are no longer needed: no extra shared
  // memory (at D 64 four 4-warp CTAs an SM leave none to spare).
  if (tid < nrows) {
    const int r = tid;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w][r]);
    float L = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float mw = s_m[w][r];
      float sw = 0.f;
      if (mw != -INFINITY) {
        sw = exp2f(mw - M);
        L += sw * s_l[w][r];
      }
      s_m[w][r] = sw;
    }
    s_l[0][r] = M;
    s_l[1][r] = L;
  }
  __syncthreads();
  for (int idx = tid; idx < nrows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const float M = s_l[0][r], L = s_l[1][r];
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) acc += s_m[w][r] * red[(w * kRowsM + r) * C::kRedStride + d];
    if constexpr (kCluster) {
      cl_o[r * D + d] = acc;
      if (d == 0) cl_ml[r] = make_float2(M, L);
    } else {
      const int h = g * G + mt * kRowsM + r;
      const std::int64_t prow = (static_cast<std::int64_t>(qrow) * a.Hq + h) * a.splits + split;
      a.part_o[prow * D + d] = acc;
      if (d == 0) a.part_ml[prow] = make_float2(M, L);
    }
  }
  if constexpr (kCluster) {
    // The attn_merge_kernel formula over the cluster's splits, in split order; CTA `split` takes
    // rows split, split + splits, ... The barrier publishes every CTA's rows (release / acquire);
    // the second keeps each CTA's shared memory alive until the others have read it.
    __cluster_barrier_arrive();
    __cluster_barrier_wait();
    float* s_w = s_m[0];   // [kMaxCluster] split weights of the row (s_m, s_l are free after the CTA merge)
    float* s_wl = s_l[0];  // [kMaxCluster] weight x sum of each split
    for (int r = split; r < nrows; r += a.splits) {
      // Warp 0 gathers the splits' (max, sum) (one remote load a lane), forms the weights.
      float L = 0.f;
      if (warp == 0) {
        const float2 ml = lane < a.splits ? static_cast<const float2*>(__cluster_map_shared_rank(cl_ml, lane))[r]
                                          : make_float2(-INFINITY, 0.f);
        float M = ml.x;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
        const float w = ml.x == -INFINITY ? 0.f : exp2f(ml.x - M);  // an empty split weighs nothing
        if (lane < a.splits) {
          s_w[lane] = w;
          s_wl[lane] = w * ml.y;
        }
      }
      __syncthreads();
      for (int c = 0; c < a.splits; ++c) L += s_wl[c];
      for (int d = tid; d < D; d += kThreads) {
        // Every remote load issued before the first is used (one distributed-shared-memory
        // latency, not splits / 4 of them); summed in split order.
        float v[kMaxCluster];
#pragma unroll
        for (int c = 0; c < kMaxCluster; ++c)
          v[c] = c < a.splits ? static_cast<const float*>(__cluster_map_shared_rank(cl_o, c))[r * D + d] : 0.f;
        float acc = 0.f;
#pragma unroll
        for (int c = 0; c < kMaxCluster; ++c)
          if (c < a.splits) acc += s_w[c] * v[c];
        const int h = g * G + mt * kRowsM + r;
        // No key at all (an empty selection, a position outside [0, N)): 0/0 -> NaN, on purpose.
        a.out[(static_cast<std::int64_t>(qrow) * a.Hq + h) * D + d] = __float2bfloat16_rn(L > 0.f ? acc / L : NAN);
      }
      __syncthreads();  // s_w is rewritten for the next row
    }
    __cluster_barrier_arrive();
    __cluster_barrier_wait();
  }
}

}  // namespace
}  // namespace detail
}  // namespace m3::gpu
