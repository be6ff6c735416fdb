// The Hopper (wgmma) tile kernel of msa_attention_prefill (see msa_attention_prefill.h and .cu):
// the same tiles, partials and contract as the portable mma.sync block_kernel, for D = blk = 128
// (M3's geometry). One CTA = one warpgroup (128 threads) walking tiles grid-stride; per tile:
//   metadata (warp 0: the tile's list, its gathered queries and their positions)
//   cp.async: Q rows [64, 128] and K [128, 128] (group 0), V [128, 128] (group 1), into the
//     128-byte-swizzled two-column-half layout that sm90_attention_prefill's TMA writes (row r of a
//     half at byte r * 128, its 16-byte chunk c at chunk c ^ (r & 7)), so the same wgmma
//     descriptors read them: Q, K K-major; V MN-major for O = P V
//   S [64, 128] = Q K^T     8 x wgmma m64n128k16 (A, B from shared memory)
//   the causal limit of each row (key i of the block visible iff i <= min(p - j0, blk - 1)), the
//     block's softmax partial in base 2 (max m, sum l), P = hi + lo (bf16 each, so P carries ~16
//     significant bits, as in the portable kernel: the partials are the same to fp32 rounding)
//   O [64, 128] = P_hi V + P_lo V   16 x wgmma m64n128k16 (A from registers)
//   partial O and (m, l) of every real row to the workspace, as block_kernel writes them.
// Why: the portable kernel is issue-bound (ncu, H200, 4096 queries at the end of 1M keys: 6.1
// cycles between a warp's instructions, 2 warps a scheduler, tensor pipe ~25% busy): 384
// mma.sync a warp a tile plus their fragment loads; the wgmma form issues 24 instructions a
// warpgroup for the same products. Measured (H200, 4096 queries at the end of 1M keys): tile
// kernel 4.18 -> 2.71 ms (ncu), the whole call 4.82 -> 3.25 ms; with the per-thread copy offsets
// hoisted out of the row loop (below) 3.44 -> 3.25 ms.
// Cross-proxy ordering: cp.async writes shared memory through the generic proxy and wgmma reads it
// through the async proxy, so every thread fences (fence.proxy.async) after its copies land and
// before the barrier that precedes the wgmma; wgmma.wait_group 0 precedes the next tile's copies.
#include "gpu/kernels/msa_attention_prefill_tiles.cuh"

#include "gpu/kernels/attention_dense.h"
#include "gpu/kernels/sm90_util.cuh"

#include <climits>
#include <cmath>
#include <cstdint>

namespace m3::gpu::msa_prefill {
namespace {

using namespace sm90;
using detail::cp_async16;
using detail::cp_async_commit;
using detail::cp_async_wait;

constexpr int kD = 128;
constexpr int kBlk = 128;
constexpr int kThreads = 128;  // one warpgroup
constexpr int kRowBytes = 128;  // bytes of one row of a column half
constexpr std::uint32_t kQHalf = kRows * kRowBytes;  // 8 KB
constexpr std::uint32_t kKVHalf = kBlk * kRowBytes;  // 16 KB
constexpr std::uint32_t kQBytes = 2 * kQHalf;
constexpr std::uint32_t kKVBytes = 2 * kKVHalf;
// + 1024: the dynamic window is aligned up to 1024 bytes in the kernel (swizzle atoms).
constexpr int kSmemBytes = 1024 + static_cast<int>(kQBytes + 2 * kKVBytes);


__global__ void __launch_bounds__(kThreads, 2) sm90_tile_kernel(const Args a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t raw = smem_addr(smem_raw);
  const std::uint32_t sQ = (raw + 1023u) & ~1023u;  // [2 halves][64 rows][128 B]
  const std::uint32_t sK = sQ + kQBytes;             // [2 halves][128 rows][128 B]
  const std::uint32_t sV = sK + kKVBytes;            // same
  __shared__ int s_tl[kRows], s_slot[kRows];  // gathered query i: chunk-local t and its slot
  __shared__ long long s_p[kRows];            // and its position
  __shared__ long long s_pmax;
  __shared__ int4 s_tile;
  __shared__ int s_bad;  // first block key on an unallocated page (INT_MAX: none)

  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tq = lane & 3;  // accumulator fragment: rows gid, gid + 8; cols 2 tq, 2 tq + 1
  const int r0 = 16 * warp + gid;            // this thread's first row (second: r0 + 8)
  const int K = a.Hkv * a.NB;
  const int total = min(a.tile_off[K], a.tile_bound);
  const std::int64_t q_stride = static_cast<std::int64_t>(a.Hq) * kD;
  const std::int64_t W = static_cast<std::int64_t>(a.Hkv) * kD;  // cache row elements
  const float scale_log2 = kLog2e * rsqrtf(static_cast<float>(kD));

  for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
    if (warp == 0) load_tile_meta(a, tile, lane, s_tl, s_slot, s_p, s_pmax, s_tile, s_bad);
    __syncthreads();
    const int n_q = s_tile.z;
    const int g = s_tile.x / a.NB, blk_id = s_tile.x - g * a.NB;
    const std::int64_t j0 = static_cast<std::int64_t>(blk_id) * kBlk;  // the block's first key
    const std::int64_t pmax = s_pmax;  // < N: every entry of a list is valid

    // Q rows (row r = query r / G, head r % G of group g; rows past the tile's queries are zeros)
    // and K rows as group 0, V rows as group 1. Keys past every query of the tile are zero-filled
    // and never read (they may lie past N or be unwritten); a row on an unallocated page is
    // zero-filled and recorded in s_bad (the rows that see it get a NaN partial).
    static_assert(kThreads == 128 && kD == 128, "16 chunks a row, 8 rows a pass of 128 threads");
    // Each thread copies 16-byte chunk c of rows rl, rl + 8, ...: all of them share (row & 7), so
    // the swizzled chunk offset is one per thread, and K and V share each row's cache offset.
    const int c = tid & 15, rl = tid >> 4;
    const std::uint32_t sw = (c >> 3) * kQHalf + (((c & 7) ^ (rl & 7)) << 4);
    const std::uint32_t sw_kv = (c >> 3) * kKVHalf + (((c & 7) ^ (rl & 7)) << 4);
#pragma unroll
    for (int k = 0; k < kRows / 8; ++k) {
      const int r = rl + 8 * k, qi = r / a.G;
      const bool ok = qi < n_q;
      const bf16* src = ok ? a.q + static_cast<std::int64_t>(a.t0 + s_tl[qi]) * q_stride +
                                 static_cast<std::int64_t>(g * a.G + r - qi * a.G) * kD + c * 8
                           : a.q;
      cp_async16(sQ + sw + r * kRowBytes, src, ok);
    }
    std::int64_t off[kBlk / 8];  // element offset of this thread's chunk of row rl + 8 k (-1: zero-fill)
#pragma unroll
    for (int k = 0; k < kBlk / 8; ++k) {
      const int i = rl + 8 * k;
      const std::int64_t j = j0 + i;
      const bf16* row = j <= pmax ? cache_row(a.k, 0, j, a.N, W, a.pages) : nullptr;
      if (j <= pmax && row == nullptr) atomicMin(&s_bad, i);
      off[k] = row != nullptr ? (row - a.k) + static_cast<std::int64_t>(g) * kD + c * 8 : -1;
      cp_async16(sK + sw_kv + i * kRowBytes, a.k + (off[k] < 0 ? 0 : off[k]), off[k] >= 0);
    }
    cp_async_commit();
#pragma unroll
    for (int k = 0; k < kBlk / 8; ++k)  // the same rows: K and V share the layout and page table
      cp_async16(sV + sw_kv + (rl + 8 * k) * kRowBytes, a.v + (off[k] < 0 ? 0 : off[k]), off[k] >= 0);
    cp_async_commit();

    // This thread's two rows: key i of the block is visible iff i <= lim (-1: a padding row).
    int lim[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int qi = (r0 + 8 * hr) / a.G;
      const std::int64_t d = qi < n_q ? static_cast<std::int64_t>(s_p[qi]) - j0 : -1;
      lim[hr] = d < 0 ? -1 : static_cast<int>(d < kBlk - 1 ? d : kBlk - 1);
    }

    cp_async_wait<1>();
    fence_async_shared();
    __syncthreads();  // Q and K visible to the async proxy
    float sc[64];     // S [64, 128]: sc[4 nt + e] = row r0 + 8 (e >> 1), key 8 nt + 2 tq + (e & 1)
#pragma unroll
    for (int i = 0; i < 64; ++i) sc[i] = 0.f;
    reg_fence(sc);
    wgmma_fence();
    wgmma_k128_ss(sc, sQ, kQHalf, sK, kKVHalf, false);
    wgmma_commit();
    cp_async_wait<0>();  // V lands while S runs
    fence_async_shared();
    __syncthreads();  // V visible to the async proxy
    wgmma_wait<0>();
    reg_fence(sc);

    // Mask, block softmax in base 2 (max on raw scores: the scale is positive), P = hi + lo.
    float m[2], l[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      if (lim[hr] < kBlk - 1) {
#pragma unroll
        for (int nt = 0; nt < 16; ++nt)
#pragma unroll
          for (int e = 2 * hr; e < 2 * hr + 2; ++e)
            if (8 * nt + 2 * tq + (e & 1) > lim[hr]) sc[4 * nt + e] = -INFINITY;
      }
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) mx = fmaxf(mx, fmaxf(sc[4 * nt + 2 * hr], sc[4 * nt + 2 * hr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      m[hr] = mx * scale_log2;
      // A padding row sees no key: subtract 0 instead of -inf, so that exp2 gives 0, not NaN.
      const float m_use = m[hr] == -INFINITY ? 0.f : m[hr];
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 16; ++nt)
#pragma unroll
        for (int e = 2 * hr; e < 2 * hr + 2; ++e) {
          const float p = ex2(fmaf(sc[4 * nt + e], scale_log2, -m_use));
          sc[4 * nt + e] = p;
          sum += p;
        }
      l[hr] = sum;
    }
    // The accumulator columns 16 kk .. 16 kk + 15 are k-step kk's A fragment of P V.
    std::uint32_t ph[8][4], pl[8][4];
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const float lo = sc[8 * kk + 2 * x], hi = sc[8 * kk + 2 * x + 1];
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
        ph[kk][x] = *reinterpret_cast<const std::uint32_t*>(&h);
        pl[kk][x] = detail::pack_bf16(lo - __low2float(h), hi - __high2float(h));  // exact differences
      }
    float o[64];  // O [64, 128]: o[4 nt + e] = row r0 + 8 (e >> 1), dim 8 nt + 2 tq + (e & 1)
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    reg_fence(o);
    reg_fence(ph);
    reg_fence(pl);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) wgmma_rs(o, ph[kk], desc_sw128(sV + kk * 16 * kRowBytes, kKVHalf, 1024));
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) wgmma_rs(o, pl[kk], desc_sw128(sV + kk * 16 * kRowBytes, kKVHalf, 1024));
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(o);

    // Partials of the tile's real rows: (t, h, slot) -> part_o row ((tl*Hq + h)*k_blk + slot).
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float lsum = l[hr];
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
      const int r = r0 + 8 * hr, qi = r / a.G;
      if (qi < n_q) {
        const int h = g * a.G + (r - qi * a.G);
        const std::int64_t prow = (static_cast<std::int64_t>(s_tl[qi]) * a.Hq + h) * a.k_blk + s_slot[qi];
        float* po = a.part_o + prow * kD + 2 * tq;
#pragma unroll
        for (int nt = 0; nt < 16; ++nt)
          *reinterpret_cast<float2*>(po + nt * 8) = make_float2(o[4 * nt + 2 * hr], o[4 * nt + 2 * hr + 1]);
        if (tq == 0) a.part_ml[prow] = make_float2(lim[hr] >= s_bad ? NAN : m[hr], lsum);
      }
    }
    fence_async_shared();  // the wgmma reads (async proxy) are complete before the next copies
    __syncthreads();       // every thread is done with the tile's metadata and shared memory
  }
#else
  // Built without sm_90a machine code: sm90_tiles_available() is false there, so this never runs.
  __trap();
#endif
}

}  // namespace

bool sm90_tiles_available(int D, int blk) { return D == kD && blk == kBlk && sm90::available(); }

int sm90_tiles_resident() {
  return detail::resident_ctas(reinterpret_cast<const void*>(sm90_tile_kernel), kThreads, kSmemBytes);
}

void sm90_tiles_launch(const Args& a, int grid, cudaStream_t s) {
  sm90_tile_kernel<<<static_cast<unsigned>(grid), kThreads, kSmemBytes, s>>>(a);
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace m3::gpu::msa_prefill
