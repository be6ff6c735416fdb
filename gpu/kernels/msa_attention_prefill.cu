// MSA block-sparse prefill attention, KV-block-outer; see msa_attention_prefill.h. Per chunk of
// T_c queries, seven stream-ordered steps, none of which synchronizes with the host:
//   memset counts | list_keys (key = g*NB + id per selection entry, histogram) | cub stable radix
//   sort (keys, entry index) | list_scan (list starts, tile starts) | list_tiles (tile -> list)
//   | block_kernel (tensor-core partials) | merge_kernel (log-sum-exp over slots, bf16 out).
//
// block_kernel: 4 warps, 64 rows = QT = 64/G gathered queries x G heads, one m16 tile a warp.
// Shared memory: Q [64, D], K and V [blk, D] bf16, rows padded by 16 bytes (D + 8 elements) so that
// the 8 rows of an ldmatrix phase fall on 8 different 4-bank groups (no bank conflicts for D in
// {16, 32, 64, 128}). The block's keys are processed in sub-tiles of 64 (online softmax across
// them); keys 64..blk-1 stream in as a second cp.async group while sub-tile 0 is computed. A CTA
// walks tiles grid-stride (one wave of CTAs); tiles are ordered by (g, b), so the CTAs resident at
// one time work on the same few blocks and share them in L2.
// Per warp and sub-tile (fragment layouts of mma.m16n8k16, as in attention_dense.cu):
//   S [16, 64] = Q K^T   A = Q (ldmatrix), B = K rows (ldmatrix, non-transposed)
//   mask key i of the block unless i <= min(p_row - b*blk, blk - 1); online softmax in base 2
//   O [16, D] += P V     A = P from the S accumulators (bf16 hi + lo), B = V (ldmatrix.trans)
//
// Two tile kernels: block_kernel below (portable, mma.sync) and, where D = blk = 128 on sm_90, the
// wgmma one (sm90_msa_attention_prefill.cu), which the portable one's profile called for.
// Measured on an H200 (bench_gpu --benchmark_filter=MsaPrefill, M3 geometry, T = 4096 at the end
// of N keys, 15 random + own block), 2026-11-29: the wgmma tile kernel 2.82 / 2.85 / 2.89 / 3.25 ms
// at N = 16K / 64K / 256K / 1M (94 / 93 / 92 / 82 TFLOP/s attended), the portable one 4.22 / 4.22 /
// 4.31 / 4.82 ms (63 / 63 / 62 / 55), the decode-form kernel 6.41 ms at every N.
// ncu of block_kernel at 1M (4.18 ms of the 4.82): issue-bound, not memory-bound: 6.1 cycles
// between a warp's instructions with 2 warps a scheduler (208 registers, 87 KB of shared memory a
// CTA), DRAM 26% and L2 35% busy; prefetching the next tile's metadata (tile_info, entries and
// positions one tile ahead) and its Q / first K-V half behind the second sub-tile changed nothing
// (4.90 vs 4.79 ms, measured and dropped). The wgmma kernel takes it to 2.71 ms (same occupancy,
// 5.8 cycles an instruction, now mostly the cp.async address work and the softmax). The rest of a
// call: merge_kernel ~0.5 ms (2.1 GB of fp32 partials read back), list building < 0.2 ms.
#include "gpu/kernels/msa_attention_prefill.h"

#include "gpu/kernels/msa_attention_prefill_tiles.cuh"

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <string>

namespace m3::gpu {
namespace {

using msa_prefill::Args;
using msa_prefill::kLog2e;
using msa_prefill::kRows;

using detail::cp_async16;
using detail::cp_async_commit;
using detail::cp_async_wait;
using detail::ldmatrix_x4;
using detail::ldmatrix_x4_trans;
using detail::mma_bf16;
using detail::pack_bf16;
using detail::smem_u32;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
static_assert(kRows == 16 * kWarps, "one m16 tile of the 64 rows a warp");
constexpr int kSub = 64;            // keys a sub-tile (S accumulators of 8 n-tiles a warp)
constexpr int kMaxBlk = 128;
constexpr int kScanThreads = 1024;
constexpr int kMergeWarps = 8;
// Bytes of partials a chunk. Larger chunks put more queries in each (group, block) list, so a
// tile's K/V load serves more rows: measured (H200, T 4096 at the end of N, M3 geometry) 512 MiB
// (T_c 1008) / 2 GiB (4032) / 4 GiB (4096: one chunk): 7.54 / 5.12 / 4.83 ms at N = 1M and 5.13 /
// 4.50 / 4.30 ms at 256K. 4 GiB holds 8064 queries at M3 geometry; small models take T whole.
constexpr std::size_t kPartialBudget = std::size_t{4} << 30;
constexpr long kMaxEntries = 1L << 29;  // selection entries a chunk: E and the tile bound (<= 2E) fit int32


// The one validity rule of a selection entry (list building and merge must agree bit for bit):
// a position in [0, N) and 0 <= id <= floor(p / blk).
__device__ __forceinline__ bool slot_valid(std::int32_t id, std::int64_t p, int N, int blk) {
  return p >= 0 && p < N && id >= 0 && static_cast<std::int64_t>(id) * blk <= p;
}

// One thread an entry of the chunk's selection rows: its list key, and the list histogram.
__global__ void list_keys_kernel(const Args a) {
  const int per_g = a.Tc * a.k_blk;
  const int E = a.Hkv * per_g;
  const std::uint32_t sentinel = static_cast<std::uint32_t>(a.Hkv) * a.NB;
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < E; e += gridDim.x * blockDim.x) {
    const int g = e / per_g, rem = e - g * per_g;
    const int tl = rem / a.k_blk, slot = rem - tl * a.k_blk;
    const int t = a.t0 + tl;
    const std::int64_t p = a.q_pos[t];
    const std::int32_t id = a.sel[(static_cast<std::int64_t>(g) * a.T + t) * a.k_blk + slot];
    std::uint32_t key = sentinel;
    if (slot_valid(id, p, a.N, a.blk)) {
      key = static_cast<std::uint32_t>(g) * a.NB + static_cast<std::uint32_t>(id);
      atomicAdd(a.counts + key, 1u);  // integer: the result does not depend on the order
    }
    a.keys_in[e] = key;
    a.vals_in[e] = static_cast<std::uint32_t>(e);
  }
}

// One CTA: exclusive scans of the list sizes (entry_off) and of their tile counts (tile_off).
// Each thread takes a contiguous run of lists; the run totals are scanned across the block.
__global__ void __launch_bounds__(kScanThreads) list_scan_kernel(const Args a) {
  __shared__ int s_c[kScanThreads / 32], s_t[kScanThreads / 32];
  const int K = a.Hkv * a.NB;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int per = (K + kScanThreads - 1) / kScanThreads;
  const int i0 = min(K, tid * per), i1 = min(K, i0 + per);
  int c = 0, tl = 0;
  for (int i = i0; i < i1; ++i) {
    const int n = static_cast<int>(a.counts[i]);
    c += n;
    tl += (n + a.QT - 1) / a.QT;
  }
  int ic = c, it = tl;  // inclusive warp scans
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int xc = __shfl_up_sync(0xffffffffu, ic, o), xt = __shfl_up_sync(0xffffffffu, it, o);
    if (lane >= o) ic += xc, it += xt;
  }
  if (lane == 31) s_c[warp] = ic, s_t[warp] = it;
  __syncthreads();
  if (warp == 0) {
    int wc = s_c[lane], wt = s_t[lane];  // kScanThreads / 32 == 32 warps
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int xc = __shfl_up_sync(0xffffffffu, wc, o), xt = __shfl_up_sync(0xffffffffu, wt, o);
      if (lane >= o) wc += xc, wt += xt;
    }
    s_c[lane] = wc;  // inclusive over warps
    s_t[lane] = wt;
  }
  __syncthreads();
  int ec = (warp > 0 ? s_c[warp - 1] : 0) + ic - c, et = (warp > 0 ? s_t[warp - 1] : 0) + it - tl;
  for (int i = i0; i < i1; ++i) {
    const int n = static_cast<int>(a.counts[i]);
    a.entry_off[i] = ec;
    a.tile_off[i] = et;
    ec += n;
    et += (n + a.QT - 1) / a.QT;
  }
  if (tid == 0) {
    a.entry_off[K] = s_c[31];
    a.tile_off[K] = s_t[31];
  }
}
static_assert(kScanThreads == 32 * 32, "the second scan level is one warp");

// One thread a tile: its list (the last k with tile_off[k] <= i, a list with >= 1 tile since
// tile_off is nondecreasing and tile_off[K] > i), first entry and query count.
__global__ void list_tiles_kernel(const Args a) {
  const int K = a.Hkv * a.NB;
  const int total = min(a.tile_off[K], a.tile_bound);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    int lo = 0, hi = K - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (a.tile_off[mid] <= i) lo = mid;
      else hi = mid - 1;
    }
    const int start = a.entry_off[lo] + (i - a.tile_off[lo]) * a.QT;
    a.tile_info[i] = make_int4(lo, start, min(a.QT, a.entry_off[lo + 1] - start), 0);
  }
}

template <int D>
constexpr int smem_bytes(int blk) {
  return (kRows + 2 * blk) * (D + 8) * static_cast<int>(sizeof(bf16));
}

template <int D>
__global__ void __launch_bounds__(kThreads, 2) block_kernel(const Args a) {
  static_assert(D % 16 == 0 && D >= 16 && D <= 128, "D must be 16, 32, 64 or 128");
  constexpr int S = D + 8;      // smem row stride (elements): +16 bytes against bank conflicts
  constexpr int kCh = D / 8;    // 16-byte chunks a row
  constexpr int kKS = D / 16;   // k-steps of Q K^T
  constexpr int kDT = D / 8;    // n-tiles of O
  constexpr int kNT = kSub / 8; // n-tiles of S a sub-tile
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sQ = reinterpret_cast<bf16*>(smem);  // [kRows][S]
  bf16* sK = sQ + kRows * S;                 // [blk][S]
  bf16* sV = sK + a.blk * S;                 // [blk][S]
  __shared__ int s_tl[kRows], s_slot[kRows];  // gathered query i: chunk-local t and its slot
  __shared__ long long s_p[kRows];            // and its position
  __shared__ long long s_pmax;
  __shared__ int4 s_tile;
  __shared__ int s_bad;  // first block key on an unallocated page (INT_MAX: none)

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tq = lane & 3;  // fragment row group, thread in quad
  const int K = a.Hkv * a.NB;
  const int total = min(a.tile_off[K], a.tile_bound);
  const std::int64_t q_stride = static_cast<std::int64_t>(a.Hq) * D;
  const std::int64_t W = static_cast<std::int64_t>(a.Hkv) * D;  // cache row elements
  const float scale_log2 = kLog2e * rsqrtf(static_cast<float>(D));
  const int nsub = (a.blk + kSub - 1) / kSub;
  const int split = min(a.blk, kSub);
  const int warp_r0 = warp * 16;

  for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
    if (warp == 0) msa_prefill::load_tile_meta(a, tile, lane, s_tl, s_slot, s_p, s_pmax, s_tile, s_bad);
    __syncthreads();
    const int n_q = s_tile.z;
    const int g = s_tile.x / a.NB, blk_id = s_tile.x - g * a.NB;
    const std::int64_t j0 = static_cast<std::int64_t>(blk_id) * a.blk;  // the block's first key
    const std::int64_t pmax = s_pmax;  // < N: every entry of a list is valid
    const int rows_real = n_q * a.G;

    // Q rows: row r = query r / G, head r % G of group g; rows past the tile's queries are zeros.
    for (int idx = tid; idx < kRows * kCh; idx += kThreads) {
      const int r = idx / kCh, c = idx - r * kCh;
      const int qi = r / a.G, hh = r - qi * a.G;
      const bool ok = qi < n_q;
      const bf16* src =
          ok ? a.q + static_cast<std::int64_t>(a.t0 + s_tl[qi]) * q_stride + static_cast<std::int64_t>(g * a.G + hh) * D + c * 8
             : a.q;
      cp_async16(smem_u32(sQ + r * S + c * 8), src, ok);
    }
    // K and V rows i0..i1-1 of the block; keys past every query of the tile are zero-filled and
    // never read from global memory (they may lie past N, or be unwritten cache rows).
    // A row on an unallocated page (negative id) is zero-filled and recorded in s_bad, the first
    // such key of the block: the rows that see it get a NaN partial (so a NaN output), never a read.
    auto load_kv = [&](int i0, int i1) {
      for (int idx = tid; idx < (i1 - i0) * kCh; idx += kThreads) {
        const int i = i0 + idx / kCh, c = idx % kCh;
        const std::int64_t j = j0 + i;
        const bf16* row = j <= pmax ? cache_row(a.k, 0, j, a.N, W, a.pages) : nullptr;
        if (j <= pmax && row == nullptr) atomicMin(&s_bad, i);
        const bool ok = row != nullptr;
        const std::int64_t at = ok ? (row - a.k) + static_cast<std::int64_t>(g) * D + c * 8 : 0;  // K and V share the layout
        cp_async16(smem_u32(sK + i * S + c * 8), a.k + at, ok);
        cp_async16(smem_u32(sV + i * S + c * 8), a.v + at, ok);
      }
    };
    load_kv(0, split);
    cp_async_commit();  // group 0: Q and keys 0..63
    load_kv(split, a.blk);
    cp_async_commit();  // group 1: keys 64..blk-1 (empty when blk <= 64)

    // This thread's two rows (gid, gid + 8 of the warp's m-tile): key i of the block is visible
    // iff i <= lim. A valid row sees key 0 at least (its id <= floor(p/blk)); a padding row none.
    const bool active = warp_r0 < rows_real;  // warp-uniform
    int lim[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int qi = (warp_r0 + gid + 8 * hr) / a.G;
      const std::int64_t d = qi < n_q ? static_cast<std::int64_t>(s_p[qi]) - j0 : -1;
      lim[hr] = d < 0 ? -1 : static_cast<int>(d < a.blk - 1 ? d : a.blk - 1);
    }

    float o[kDT][4];
#pragma unroll
    for (int i = 0; i < kDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // running max (log2 units), row sum part
    std::uint32_t qf[kKS][4];

    cp_async_wait<1>();
    __syncthreads();  // Q and keys 0..63 visible to every warp
    if (active) {
#pragma unroll
      for (int ks = 0; ks < kKS; ++ks)
        ldmatrix_x4(qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3],
                    smem_u32(sQ + (warp_r0 + (lane & 15)) * S + ks * 16 + (lane >> 4) * 8));
    }
    for (int sub = 0; sub < nsub; ++sub) {
      if (sub == 1) {
        cp_async_wait<0>();
        __syncthreads();  // keys 64..blk-1 visible
      }
      if (!active) continue;
      const int kb = sub * kSub;  // the sub-tile's first key (block-relative)
      float s[kNT][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      // S = Q K^T. Matrices of one x4: keys 0-7 x d 0-7 | keys 0-7 x d 8-15 | keys 8-15 x d 0-7 |
      // keys 8-15 x d 8-15 (B fragments of two 8-key n-tiles). Pairs past blk are skipped.
#pragma unroll
      for (int ks = 0; ks < kKS; ++ks)
#pragma unroll
        for (int np = 0; np < kNT / 2; ++np) {
          if (kb + np * 16 < a.blk) {
            std::uint32_t b0, b1, b2, b3;
            const bf16* src = sK + (kb + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * S + ks * 16 + ((lane >> 3) & 1) * 8;
            ldmatrix_x4(b0, b1, b2, b3, smem_u32(src));
            mma_bf16(s[2 * np], qf[ks], b0, b1);
            mma_bf16(s[2 * np + 1], qf[ks], b2, b3);
          }
        }
      // Mask and scale: element e of n-tile nt is key kb + nt*8 + 2*tq + (e & 1) of row hr = e >> 1.
      // lim <= blk - 1, so keys past the block (unloaded, skipped above) are masked too.
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = kb + nt * 8 + 2 * tq + (e & 1);
          s[nt][e] = i <= lim[e >> 1] ? s[nt][e] * scale_log2 : -INFINITY;
        }
      // Online softmax per row; a row's 64 scores are spread over the 4 threads of a quad.
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * hr], s[nt][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[hr], mx);
        // No visible key yet: subtract 0 instead of -inf, so that exp2 gives 0, not NaN.
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float corr = exp2f(m[hr] - m_use);
        m[hr] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 2 * hr; e < 2 * hr + 2; ++e) {
            const float pr = exp2f(s[nt][e] - m_use);
            s[nt][e] = pr;
            sum += pr;
          }
        l[hr] = l[hr] * corr + sum;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          o[dt][2 * hr] *= corr;
          o[dt][2 * hr + 1] *= corr;
        }
      }
      // O += P V, P = hi + lo (bf16 each): the S accumulators of n-tiles 2kk, 2kk+1 are the A
      // fragment of k-step kk. Transposed V matrices: keys 0-7 x d 0-7 | keys 8-15 x d 0-7 |
      // keys 0-7 x d 8-15 | keys 8-15 x d 8-15.
#pragma unroll
      for (int kk = 0; kk < kNT / 2; ++kk) {
        if (kb + kk * 16 < a.blk) {
          std::uint32_t ph[4], pl[4];
#pragma unroll
          for (int x = 0; x < 4; ++x) {  // a0..a3: n-tile 2kk + (x >> 1), row half x & 1
            const float lo = s[2 * kk + (x >> 1)][2 * (x & 1)], hi = s[2 * kk + (x >> 1)][2 * (x & 1) + 1];
            const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
            ph[x] = *reinterpret_cast<const std::uint32_t*>(&h);
            pl[x] = pack_bf16(lo - __low2float(h), hi - __high2float(h));  // exact differences
          }
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            std::uint32_t v0, v1, v2, v3;
            const bf16* src = sV + (kb + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + dp * 16 + (lane >> 4) * 8;
            ldmatrix_x4_trans(v0, v1, v2, v3, smem_u32(src));
            mma_bf16(o[2 * dp], ph, v0, v1);
            mma_bf16(o[2 * dp], pl, v0, v1);
            mma_bf16(o[2 * dp + 1], ph, v2, v3);
            mma_bf16(o[2 * dp + 1], pl, v2, v3);
          }
        }
      }
    }

    // Partials of the tile's real rows: (t, h, slot) -> part_o row ((tl*Hq + h)*k_blk + slot).
    if (active) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float lsum = l[hr];
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
        const int r = warp_r0 + gid + 8 * hr, qi = r / a.G;
        if (qi < n_q) {
          const int h = g * a.G + (r - qi * a.G);
          const std::int64_t prow = (static_cast<std::int64_t>(s_tl[qi]) * a.Hq + h) * a.k_blk + s_slot[qi];
          float* po = a.part_o + prow * D + 2 * tq;
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt)
            *reinterpret_cast<float2*>(po + dt * 8) = make_float2(o[dt][2 * hr], o[dt][2 * hr + 1]);
          if (tq == 0) a.part_ml[prow] = make_float2(lim[hr] >= s_bad ? NAN : m[hr], lsum);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with sQ/sK/sV and the tile's lists before the next tile
  }
}

// One warp a (query, head): M = max over valid slots, then out = sum_s 2^(m_s - M) o_s /
// sum_s 2^(m_s - M) l_s accumulated in ascending slot order, rounded once to bf16. Invalid slots
// were never written and are never read. No valid slot (or a bad position): 0/0 = NaN, on purpose.
template <int D>
__global__ void __launch_bounds__(kMergeWarps * 32) merge_kernel(const Args a) {
  constexpr int kPer = D >= 32 ? D / 32 : 1;  // dims a lane
  constexpr int kLanes = D / kPer;            // lanes holding dims (16 for D = 16)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kMergeWarps + warp;  // tl*Hq + h
  if (row >= static_cast<std::int64_t>(a.Tc) * a.Hq) return;  // whole warps: no barrier follows
  const int tl = static_cast<int>(row / a.Hq), h = static_cast<int>(row - static_cast<std::int64_t>(tl) * a.Hq);
  const int g = h / a.G, t = a.t0 + tl;
  const std::int64_t p = a.q_pos[t];
  const std::int32_t* srow = a.sel + (static_cast<std::int64_t>(g) * a.T + t) * a.k_blk;
  const float2* ml = a.part_ml + row * a.k_blk;
  const float* po = a.part_o + row * a.k_blk * D + lane * kPer;

  float M = -INFINITY;
  for (int base = 0; base < a.k_blk; base += 32) {
    const int s = base + lane;
    if (s < a.k_blk && slot_valid(srow[s], p, a.N, a.blk)) M = fmaxf(M, ml[s].x);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));

  float acc[kPer];
#pragma unroll
  for (int c = 0; c < kPer; ++c) acc[c] = 0.f;
  float L = 0.f;
  for (int base = 0; base < a.k_blk; base += 32) {
    const int s = base + lane;
    const bool ok = s < a.k_blk && slot_valid(srow[s], p, a.N, a.blk);
    float w = 0.f, lw = 0.f;
    if (ok) {
      const float2 v = ml[s];
      w = exp2f(v.x - M);
      lw = v.y;
    }
    unsigned valid = __ballot_sync(0xffffffffu, ok);
    while (valid) {  // ascending slots
      const int i = __ffs(valid) - 1;
      valid &= valid - 1;
      const float wi = __shfl_sync(0xffffffffu, w, i), li = __shfl_sync(0xffffffffu, lw, i);
      L += wi * li;
      if (lane < kLanes) {
        const float* src = po + static_cast<std::int64_t>(base + i) * D;
        if constexpr (kPer == 4) {
          const float4 x = *reinterpret_cast<const float4*>(src);
          acc[0] += wi * x.x;
          acc[1] += wi * x.y;
          acc[2] += wi * x.z;
          acc[3] += wi * x.w;
        } else if constexpr (kPer == 2) {
          const float2 x = *reinterpret_cast<const float2*>(src);
          acc[0] += wi * x.x;
          acc[1] += wi * x.y;
        } else {
          acc[0] += wi * src[0];
        }
      }
    }
  }
  if (lane < kLanes) {
    bf16* dst = a.out + static_cast<std::int64_t>(t) * a.Hq * D + static_cast<std::int64_t>(h) * D + lane * kPer;
#pragma unroll
    for (int c = 0; c < kPer; ++c) dst[c] = __float2bfloat16_rn(L > 0.f ? acc[c] / L : NAN);
  }
}

// ---- host side ----

long ceil_div(long x, long y) { return (x + y - 1) / y; }
std::size_t round256(std::size_t x) { return (x + 255) / 256 * 256; }

// Chunking, list sizes and the workspace carve-up for one set of arguments (already validated).
struct Plan {
  int G = 0, QT = 0, NB = 0, K = 0, end_bit = 0;
  int Tc = 0;        // queries a chunk
  long E = 0;        // selection entries of a full chunk
  long bound = 0;    // tile-table entries of a full chunk
  std::size_t cub_bytes = 0;
  std::size_t off_o = 0, off_ml = 0, off_kin = 0, off_kout = 0, off_vin = 0, off_vout = 0, off_cnt = 0,
              off_eoff = 0, off_toff = 0, off_tiles = 0, off_cub = 0, total = 0;
};

long tile_bound(long E, int QT, int K) { return ceil_div(E, QT) + std::min<long>(K, E); }

std::size_t sort_scratch(long E, int end_bit) {
  std::size_t bytes = 0;
  M3_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const std::uint32_t*>(nullptr),
                                                static_cast<std::uint32_t*>(nullptr),
                                                static_cast<const std::uint32_t*>(nullptr),
                                                static_cast<std::uint32_t*>(nullptr), static_cast<int>(E), 0,
                                                end_bit));
  return bytes;
}

Plan make_plan(int T, int N, int blk, int k_blk, const AttnDims& d) {
  Plan p;
  p.G = d.Hq / d.Hkv;
  p.QT = kRows / p.G;
  p.NB = static_cast<int>(ceil_div(N, blk));
  p.K = d.Hkv * p.NB;
  p.end_bit = 1;
  while ((1L << p.end_bit) <= static_cast<long>(p.K)) ++p.end_bit;  // keys 0..K (K = sentinel)
  const std::size_t per_query = static_cast<std::size_t>(d.Hq) * k_blk * (static_cast<std::size_t>(d.D) * 4 + 8);
  long tc = static_cast<long>(kPartialBudget / per_query);
  tc = std::min(tc, kMaxEntries / (static_cast<long>(d.Hkv) * k_blk));
  p.Tc = static_cast<int>(std::clamp(tc, 1L, static_cast<long>(T)));
  p.E = static_cast<long>(d.Hkv) * p.Tc * k_blk;
  p.bound = tile_bound(p.E, p.QT, p.K);
  const long last = T - (ceil_div(T, p.Tc) - 1) * static_cast<long>(p.Tc);  // queries of the last chunk
  p.cub_bytes = std::max(sort_scratch(p.E, p.end_bit), sort_scratch(static_cast<long>(d.Hkv) * last * k_blk, p.end_bit));
  const std::size_t prow = static_cast<std::size_t>(p.Tc) * d.Hq * k_blk;
  std::size_t at = 0;
  auto take = [&](std::size_t bytes) {
    const std::size_t o = at;
    at += round256(bytes);
    return o;
  };
  const std::size_t e4 = static_cast<std::size_t>(p.E) * 4, k4 = static_cast<std::size_t>(p.K + 1) * 4;
  p.off_o = take(prow * d.D * sizeof(float));
  p.off_ml = take(prow * sizeof(float2));
  p.off_kin = take(e4);
  p.off_kout = take(e4);
  p.off_vin = take(e4);
  p.off_vout = take(e4);
  p.off_cnt = take(k4);
  p.off_eoff = take(k4);
  p.off_toff = take(k4);
  p.off_tiles = take(static_cast<std::size_t>(p.bound) * sizeof(int4));
  p.off_cub = take(p.cub_bytes);
  p.total = at + 256;  // slack: the carve-up starts at the first 256-aligned byte
  return p;
}

std::string dims_str(const AttnDims& d) {
  return "Hq = " + std::to_string(d.Hq) + ", Hkv = " + std::to_string(d.Hkv) + ", D = " + std::to_string(d.D);
}
bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Throws GpuError unless the scalar arguments suit the kernels.
void check_dims(int T, int N, int blk, int k_blk, const AttnDims& d) {
  const std::string op = "msa_attention_prefill: ";
  if (d.Hq <= 0 || d.Hkv <= 0 || d.Hq % d.Hkv != 0 || d.Hq / d.Hkv > kRows)
    throw GpuError(op + dims_str(d) + ", expected Hq, Hkv > 0, Hq % Hkv == 0 and Hq/Hkv <= " + std::to_string(kRows) +
                   " (one CTA's 64 rows hold a query's whole group)");
  if (d.D != 16 && d.D != 32 && d.D != 64 && d.D != 128)
    throw GpuError(op + "D = " + std::to_string(d.D) + ", expected 16, 32, 64 or 128 (the compiled head dims)");
  if (blk < 16 || blk > kMaxBlk || blk % 16 != 0)
    throw GpuError(op + "blk = " + std::to_string(blk) + ", expected a multiple of 16 in [16, " +
                   std::to_string(kMaxBlk) + "] (one block's K and V sit in shared memory)");
  if (k_blk < 1)
    throw GpuError(op + "k_blk = " + std::to_string(k_blk) + ", expected >= 1");
  if (T < 0 || N < 1)
    throw GpuError(op + "T = " + std::to_string(T) + ", N = " + std::to_string(N) + ", expected T >= 0 and N >= 1");
  if (static_cast<long>(d.Hkv) * k_blk > kMaxEntries || static_cast<long>(d.Hkv) * ceil_div(N, blk) >= kMaxEntries)
    throw GpuError(op + "Hkv = " + std::to_string(d.Hkv) + ", k_blk = " + std::to_string(k_blk) + ", N = " +
                   std::to_string(N) + ", blk = " + std::to_string(blk) + ", expected Hkv*k_blk <= 2^29 and " +
                   "Hkv*ceil(N/blk) < 2^29 (list keys and entries are int32)");
}

std::atomic<detail::PrefillTiles> g_tiles{detail::PrefillTiles::Auto};

template <int D>
void run_chunks(Args a, const Plan& pl, cudaStream_t s, unsigned char* ws) {
  auto* kernel = block_kernel<D>;
  // Raises the kernel's dynamic shared-memory limit to the largest launch (blk = 128) once per device.
  const int resident = detail::resident_ctas(reinterpret_cast<const void*>(kernel), kThreads, smem_bytes<D>(kMaxBlk));
  const int smem = smem_bytes<D>(a.blk);
  const bool sm90 = msa_attention_prefill_uses_wgmma(D, a.blk);
  const int resident_sm90 = sm90 ? msa_prefill::sm90_tiles_resident() : 0;
  a.keys_in = reinterpret_cast<std::uint32_t*>(ws + pl.off_kin);
  a.keys_out = reinterpret_cast<std::uint32_t*>(ws + pl.off_kout);
  a.vals_in = reinterpret_cast<std::uint32_t*>(ws + pl.off_vin);
  a.vals_out = reinterpret_cast<std::uint32_t*>(ws + pl.off_vout);
  a.counts = reinterpret_cast<std::uint32_t*>(ws + pl.off_cnt);
  a.entry_off = reinterpret_cast<int*>(ws + pl.off_eoff);
  a.tile_off = reinterpret_cast<int*>(ws + pl.off_toff);
  a.tile_info = reinterpret_cast<int4*>(ws + pl.off_tiles);
  a.part_o = reinterpret_cast<float*>(ws + pl.off_o);
  a.part_ml = reinterpret_cast<float2*>(ws + pl.off_ml);
  for (int t0 = 0; t0 < a.T; t0 += pl.Tc) {
    a.t0 = t0;
    a.Tc = std::min(pl.Tc, a.T - t0);
    const long E = static_cast<long>(a.Hkv) * a.Tc * a.k_blk;
    const long bound = tile_bound(E, a.QT, pl.K);
    a.tile_bound = static_cast<int>(bound);
    M3_CUDA_CHECK(cudaMemsetAsync(a.counts, 0, static_cast<std::size_t>(pl.K) * sizeof(std::uint32_t), s));
    list_keys_kernel<<<static_cast<unsigned>(std::min(ceil_div(E, 256), 65536L)), 256, 0, s>>>(a);
    M3_CUDA_CHECK_LAUNCH();
    std::size_t cub_bytes = pl.cub_bytes;
    M3_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(ws + pl.off_cub, cub_bytes, a.keys_in, a.keys_out, a.vals_in,
                                                  a.vals_out, static_cast<int>(E), 0, pl.end_bit, s));
    list_scan_kernel<<<1, kScanThreads, 0, s>>>(a);
    M3_CUDA_CHECK_LAUNCH();
    list_tiles_kernel<<<static_cast<unsigned>(std::min(ceil_div(bound, 256), 65536L)), 256, 0, s>>>(a);
    M3_CUDA_CHECK_LAUNCH();
    if (sm90) {
      msa_prefill::sm90_tiles_launch(a, static_cast<int>(std::min<long>(bound, resident_sm90)), s);
    } else {
      kernel<<<static_cast<unsigned>(std::min<long>(bound, resident)), kThreads, smem, s>>>(a);
      M3_CUDA_CHECK_LAUNCH();
    }
    merge_kernel<D><<<static_cast<unsigned>(ceil_div(static_cast<long>(a.Tc) * a.Hq, kMergeWarps)), kMergeWarps * 32,
                      0, s>>>(a);
    M3_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

void detail::set_msa_prefill_tiles(PrefillTiles t) { g_tiles.store(t, std::memory_order_relaxed); }

bool msa_attention_prefill_uses_wgmma(int D, int blk) {
  return g_tiles.load(std::memory_order_relaxed) == detail::PrefillTiles::Auto &&
         msa_prefill::sm90_tiles_available(D, blk);
}

std::size_t msa_attention_prefill_workspace_bytes(int T, int N, int blk, int k_blk, const AttnDims& dims) {
  if (T <= 0) return 0;
  try {
    check_dims(T, N, blk, k_blk, dims);
  } catch (const GpuError&) {
    return 0;
  }
  return make_plan(T, N, blk, k_blk, dims).total;
}

void msa_attention_prefill(const bf16* q, const bf16* k, const bf16* v, const std::int64_t* q_pos,
                           const std::int32_t* sel, int T, int N, int blk, int k_blk, const AttnDims& dims,
                           bf16* out, cudaStream_t s, void* workspace, std::size_t workspace_bytes,
                           CachePages pages) {
  const std::string op = "msa_attention_prefill: ";
  check_dims(T, N, blk, k_blk, dims);
  detail::check_cache_pages("msa_attention_prefill", pages, N);
  if (T == 0) return;
  for (auto [name, ptr] : {std::pair<const char*, const void*>{"q", q}, {"k", k}, {"v", v}, {"out", out}})
    if (ptr == nullptr || !aligned16(ptr))
      throw GpuError(op + name + " is null or not 16-byte aligned, expected a 16-byte aligned device pointer");
  if (q_pos == nullptr || sel == nullptr)
    throw GpuError(op + "q_pos or sel is null, expected device pointers");
  const Plan pl = make_plan(T, N, blk, k_blk, dims);
  if (workspace == nullptr || workspace_bytes < pl.total || !aligned16(workspace))
    throw GpuError(op + "workspace of " + std::to_string(workspace_bytes) + " bytes at " +
                   std::to_string(reinterpret_cast<std::uintptr_t>(workspace)) + ", expected a 16-byte aligned buffer of >= " +
                   std::to_string(pl.total) + " bytes (msa_attention_prefill_workspace_bytes of the same arguments)");
  auto* ws = static_cast<unsigned char*>(workspace);
  ws += (256 - reinterpret_cast<std::uintptr_t>(ws) % 256) % 256;

  Args a{};
  a.q = q; a.k = k; a.v = v; a.q_pos = q_pos; a.sel = sel; a.out = out; a.pages = pages;
  a.T = T; a.N = N; a.Hq = dims.Hq; a.Hkv = dims.Hkv; a.G = pl.G; a.blk = blk; a.k_blk = k_blk;
  a.NB = pl.NB; a.QT = pl.QT;
  switch (dims.D) {
    case 16: run_chunks<16>(a, pl, s, ws); break;
    case 32: run_chunks<32>(a, pl, s, ws); break;
    case 64: run_chunks<64>(a, pl, s, ws); break;
    default: run_chunks<128>(a, pl, s, ws); break;
  }
}

}  // namespace m3::gpu
