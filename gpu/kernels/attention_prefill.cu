// Dense causal GQA prefill attention on mma.sync (FlashAttention-2 style); see attention_prefill.h.
//
// Work split: one CTA per (query tile of kBr rows, query head); each warp owns kMT*16 query rows
// and keeps their fp32 output accumulator, running max and running sum in registers. The CTA walks
// the key tiles of kBc keys from key 0 up to the last key its rows can see (tiles wholly above the
// causal diagonal are never loaded), with cp.async double buffering: tile i+1's K and V stream into
// shared memory while tile i is multiplied. Per tile and warp:
//   S [16*kMT, kBc] = Q K^T          mma.sync m16n8k16, A = Q (ldmatrix), B = K (ldmatrix)
//   causal mask (only on tiles that cross the diagonal), online softmax in fp32, base 2
//   O [16*kMT, 128] += bf16(P) V     A = P straight from the S accumulators, B = V (ldmatrix.trans)
// and at the end O / rowsum, rounded to bf16 once, staged through shared memory for 16-byte stores.
//
// Why one head per CTA rather than the G heads of a KV group packed into one tile: the causal
// mask then depends on the row alone (a tile is kBr consecutive positions), so only the 1-3 key
// tiles that cross the diagonal need a mask and whole tiles above it are skipped; packing would
// put kBr/G positions in a tile, fine for short chunks but not what this kernel is for. The G heads
// that share K/V still share it through L2: the grid runs head-fastest, so the CTAs of one query
// tile and one group are resident together and read the same K/V tiles at nearly the same time.
// Query tiles run longest-first (the last tile sees the most keys) to even out the causal tail.
//
// Paged caches (kv_cache.h) are a second instantiation: a 64-key tile (aligned to 64) lies in one
// 128-row page, whose id is loaded one tile ahead, so the cp.async addresses never wait on it.
// Keys past the chunk's last position (p0 + T - 1) are never loaded in either layout (zero-filled
// instead: they are masked, so the result is the same, but rows past a sequence's length may hold
// anything, NaN included, and 0 * NaN would leak into P V).
//
// Shared-memory tiles are [rows, 128] bf16 = 16 chunks of 16 bytes a row, chunk c of row r stored
// at chunk c ^ (r & 7): the 8 rows one ldmatrix phase reads (and the 8 rows a cp.async phase writes)
// then hit 8 different 16-byte bank groups, conflict-free.
#include "gpu/kernels/attention_prefill.h"

#include "gpu/kernels/kv_cache.h"

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

namespace m3::gpu {
namespace {

constexpr int kD = 128;           // head dim of the fast path (M3: 128)
constexpr int kChunks = kD / 8;   // 16-byte chunks per bf16 row
constexpr int kDTiles = kD / 8;   // n-tiles of the output accumulator (8 dims each)
constexpr int kDSteps = kD / 16;  // k-steps of Q K^T (16 dims each)
constexpr int kBcMain = 64;       // keys a K/V tile of the launched configuration
static_assert(kPageRows % kBcMain == 0, "a K/V tile must lie in one cache page");

__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// Element offset of chunk c (8 bf16) of row r in a swizzled [rows, 128] tile.
__device__ __forceinline__ int swz(int r, int c) { return r * kD + ((c ^ (r & 7)) << 3); }

// 16 bytes global -> shared, bypassing L1; valid == false writes 16 zero bytes and reads nothing
// (src must still be a mapped address: callers pass a row of the same tile).
__device__ __forceinline__ void cp_async16(std::uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldsm_x4(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c [16x8 fp32] += a [16x16 bf16, row] * b [16x8 bf16, col].
__device__ __forceinline__ void mma_bf16(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                         std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x on the SFU (relative error ~2^-22, far below the bf16 rounding of P); 2^-inf = +0.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two floats -> one register of two bf16 (lo = the lower column), round to nearest even.
__device__ __forceinline__ std::uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&h);
}

struct Args {
  const bf16* q;  // [T, Hq*D]
  const bf16* k;  // [N, Hkv*D]
  const bf16* v;  // [N, Hkv*D]
  bf16* out;      // [T, Hq*D]
  CachePages pages;  // k / v layout (table == nullptr: contiguous rows 0..N-1)
  int p0, T, N, Hq, G, Hkv;
  int n_qtiles;      // ceil(T / kBr)
  float scale_log2;  // log2(e) / sqrt(D): softmax in base 2 on raw q.k
};

template <int kWarps, int kMT, int kBc>
struct Tile {
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kMT * 16;
  static constexpr int kBr = kWarps * kWarpRows;
  static constexpr int kKTiles = kBc / 8;    // n-tiles of S (8 keys each)
  static constexpr int kPSteps = kBc / 16;   // k-steps of P V (16 keys each)
  static constexpr int kQElems = kBr * kD;   // sQ [kBr, 128]
  static constexpr int kKVElems = kBc * kD;  // one stage of sK or sV [kBc, 128]
  static constexpr int kSmemBytes = (kQElems + 4 * kKVElems) * static_cast<int>(sizeof(bf16));
  static_assert(kBc % 16 == 0 && (kBc * kChunks) % kThreads == 0, "K/V tile must split evenly");
  static_assert((kBr * kChunks) % kThreads == 0, "Q tile must split evenly");
};

// kWarps warps of kMT m-tiles each; kBc keys a tile; kQRegs keeps the warp's Q fragments in
// registers for the whole loop (else they are re-read from shared memory at every tile).
template <int kWarps, int kMT, int kBc, bool kQRegs, int kMinBlocks, bool kPaged>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) prefill_kernel(const Args a) {
  using L = Tile<kWarps, kMT, kBc>;
  static_assert(!kPaged || kPageRows % kBc == 0, "a K/V tile must lie in one cache page");
  // 1024-aligned: the ldmatrix addresses below apply the swizzle by XOR on the whole shared
  // address, which needs every tile row (256 bytes) to start on a 256-byte boundary.
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // [kBr, 128]
  bf16* sK = sQ + L::kQElems;                    // [2][kBc, 128]
  bf16* sV = sK + 2 * L::kKVElems;               // [2][kBc, 128]
  if (smem_addr(smem_raw) % 256 != 0) __trap();  // the XOR addressing would read wrong rows
  // Paged: set when a tile this CTA loads has a negative page id (written by thread 0 only, read
  // after the loop's last barrier); the CTA's output rows are then NaN.
  __shared__ int s_bad_page;
  if constexpr (kPaged)
    if (threadIdx.x == 0) s_bad_page = 0;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gid = lane >> 2, tq = lane & 3;  // mma fragment coordinates: row group, thread in quad
  const int head = static_cast<int>(blockIdx.x % a.Hq);
  const int qtile = a.n_qtiles - 1 - static_cast<int>(blockIdx.x / a.Hq);  // longest rows first
  const int t0 = qtile * L::kBr;
  const int rows_here = min(L::kBr, a.T - t0);  // real (non-padding) rows of this tile
  const int pos0 = a.p0 + t0;                   // position of the tile's first query
  const int n_ktiles = (pos0 + rows_here - 1) / kBc + 1;  // up to the last key a real row sees
  const int warp_r0 = warp * L::kWarpRows;
  const bool warp_idle = warp_r0 >= rows_here;  // only padding rows: nothing to compute or store

  const std::size_t q_stride = static_cast<std::size_t>(a.Hq) * kD;
  const std::size_t kv_stride = static_cast<std::size_t>(a.Hkv) * kD;
  const bf16* qg = a.q + t0 * q_stride + static_cast<std::size_t>(head) * kD;
  const int kvh = head / a.G;
  const bf16* kg = a.k + static_cast<std::size_t>(kvh) * kD;
  const bf16* vg = a.v + static_cast<std::size_t>(kvh) * kD;

  // Copy roles: thread tid moves chunk tid % 16 of rows tid / 16 + i * kRowStep. kRowStep is a
  // multiple of 8, so all rows of one thread share r & 7, hence one swizzled chunk: its shared
  // addresses are a base + i * kRowStep * 256 (immediates), not a table held in registers.
  constexpr int kRowStep = L::kThreads / kChunks;
  static_assert(kRowStep % 8 == 0, "copy rows of one thread must share their swizzle");
  const int cp_row = tid / kChunks, cp_ch = tid % kChunks;
  const std::uint32_t cp_off = swz(cp_row, cp_ch) * sizeof(bf16);
  // Q tile; padding rows (t >= T) read as zeros.
#pragma unroll
  for (int i = 0; i < L::kBr / kRowStep; ++i) {
    const int r = cp_row + i * kRowStep;
    const bool ok = r < rows_here;
    cp_async16(smem_addr(sQ) + cp_off + i * kRowStep * kD * sizeof(bf16), qg + (ok ? r : 0) * q_stride + cp_ch * 8, ok);
  }
  // K and V tile starting at key j0 into stage st; keys past the last query's position read as
  // zeros so that a masked p = 0 never meets a NaN/Inf (of a cache row past the sequence, or of
  // uninitialized shared memory) in P V (their source address is row 0, mapped, and not read).
  // page: the tile's page id (paged only; a negative one loads zeros and flags the CTA).
  const std::uint32_t k_dst = smem_addr(sK) + cp_off, v_dst = smem_addr(sV) + cp_off;
  const int kv_end = a.p0 + a.T;  // <= N
  auto tile_page = [&](int j0) -> std::int32_t {
    if constexpr (kPaged) return cache_page(a.pages, 0, j0 / kPageRows);  // j0 <= p0 + T - 1 < N
    else return 0;
  };
  auto load_kv = [&](int st, int j0, std::int32_t page) {
    std::size_t first = static_cast<std::size_t>(j0 + cp_row) * kv_stride + cp_ch * 8;
    bool page_ok = true;
    if constexpr (kPaged) {
      page_ok = page >= 0;
      if (!page_ok && tid == 0) s_bad_page = 1;
      first = (static_cast<std::size_t>(page_ok ? page : 0) * kPageRows + j0 % kPageRows + cp_row) * kv_stride +
              cp_ch * 8;
    }
#pragma unroll
    for (int i = 0; i < kBc / kRowStep; ++i) {
      const bool ok = page_ok && j0 + cp_row + i * kRowStep < kv_end;
      const std::size_t at = ok ? first + static_cast<std::size_t>(i * kRowStep) * kv_stride : 0;
      const std::uint32_t dst = st * (L::kKVElems * sizeof(bf16)) + i * kRowStep * kD * sizeof(bf16);
      cp_async16(k_dst + dst, kg + at, ok);
      cp_async16(v_dst + dst, vg + at, ok);
    }
  };
  load_kv(0, 0, tile_page(0));
  cp_async_commit();
  std::int32_t next_page = n_ktiles > 1 ? tile_page(kBc) : 0;  // paged: tile 1's, fetched a tile ahead

  float o[kMT][kDTiles][4];  // output accumulator, C-fragment layout: rows gid, gid+8
  float m[kMT][2], l[kMT][2];  // running max (base-2 scaled) and this thread's part of the row sum
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][dt][e] = 0.f;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      m[mi][hr] = -INFINITY;
      l[mi][hr] = 0.f;
    }
  }
  std::uint32_t qf[kQRegs ? kMT : 1][kQRegs ? kDSteps : 1][4];

  // ldmatrix lane roles (see the fragment layouts of mma.m16n8k16): A and V.trans take rows
  // lane & 15 and chunk half lane >> 4; K takes rows (lane & 7) + 8 * (lane >> 4), chunk half
  // (lane >> 3) & 1, so one x4 gives the B fragments of two 8-key n-tiles.
  //
  // Addresses: row r's chunk c sits at byte r*256 + ((c ^ (r & 7)) << 4). The row blocks read here
  // start at multiples of 8 rows, so r & 7 is the lane's own constant, and c = 2*step + half with
  // the step in bits 1-3: the address of step i is the step-0 address XOR (i << 5), which touches
  // bits 5-7 only, and whole 16-row blocks further are + 4096 (an ldmatrix immediate). So each
  // fragment load costs one XOR instead of a table of precomputed addresses in registers.
  const int a_row = lane & 15, a_half = lane >> 4;
  const int k_row = (lane & 7) + ((lane >> 4) << 3), k_half = (lane >> 3) & 1;
  const std::uint32_t a_lane = a_row * 256 + ((a_half ^ (a_row & 7)) << 4);  // Q and V.trans
  const std::uint32_t k_lane = k_row * 256 + ((k_half ^ (k_row & 7)) << 4);  // K
  const std::uint32_t q_addr = smem_addr(sQ) + warp_r0 * 256 + a_lane;       // step 0, m-tile 0
  constexpr std::uint32_t kKVBytes = L::kKVElems * sizeof(bf16);

  for (int it = 0; it < n_ktiles; ++it) {
    const int j0 = it * kBc;
    if (it + 1 < n_ktiles) load_kv((it + 1) & 1, j0 + kBc, next_page);
    if constexpr (kPaged)
      if (it + 2 < n_ktiles) next_page = tile_page(j0 + 2 * kBc);
    cp_async_commit();    // possibly empty: keeps "all but the newest group" = tile it (and Q)
    cp_async_wait<1>();
    __syncthreads();
    const std::uint32_t k_addr = smem_addr(sK) + (it & 1) * kKVBytes + k_lane;  // this stage, step 0
    const std::uint32_t v_addr = smem_addr(sV) + (it & 1) * kKVBytes + a_lane;

    if constexpr (kQRegs) {
      if (it == 0) {
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
          for (int ks = 0; ks < kDSteps; ++ks)
            ldsm_x4(qf[mi][ks], (q_addr ^ (ks << 5)) + mi * 4096);
      }
    }
    // A warp whose rows all lie before j0 sees none of this tile (and none of the later ones).
    if (!warp_idle && j0 <= pos0 + warp_r0 + L::kWarpRows - 1) {
      float s[kMT][L::kKTiles][4];
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
        for (int nt = 0; nt < L::kKTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mi][nt][e] = 0.f;

      // S = Q K^T
#pragma unroll
      for (int ks = 0; ks < kDSteps; ++ks) {
        std::uint32_t af[kMT][4];
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
          if constexpr (kQRegs) {
#pragma unroll
            for (int e = 0; e < 4; ++e) af[mi][e] = qf[mi][ks][e];
          } else {
            ldsm_x4(af[mi], (q_addr ^ (ks << 5)) + mi * 4096);
          }
        }
#pragma unroll
        for (int np = 0; np < L::kKTiles / 2; ++np) {
          std::uint32_t b[4];
          ldsm_x4(b, (k_addr ^ (ks << 5)) + np * 4096);
#pragma unroll
          for (int mi = 0; mi < kMT; ++mi) {
            mma_bf16(s[mi][2 * np], af[mi], b[0], b[1]);
            mma_bf16(s[mi][2 * np + 1], af[mi], b[2], b[3]);
          }
        }
      }

      // Causal mask, only where the tile's last key passes the warp's first row.
      if (j0 + kBc - 1 > pos0 + warp_r0) {
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
          for (int nt = 0; nt < L::kKTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int pos = pos0 + warp_r0 + mi * 16 + gid + 8 * (e >> 1);
              const int key = j0 + nt * 8 + 2 * tq + (e & 1);
              if (key > pos) s[mi][nt][e] = -INFINITY;
            }
      }

      // Online softmax, per row (hr = 0: row gid, hr = 1: row gid + 8); a row's kBc scores are
      // spread over the 4 threads of a quad, so max reductions take two shuffles.
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < L::kKTiles; ++nt) mx = fmaxf(mx, fmaxf(s[mi][nt][2 * hr], s[mi][nt][2 * hr + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(m[mi][hr], mx * a.scale_log2);
          // A row with no visible key yet keeps m = -inf; subtract 0 then so that exp2 gives 0, not NaN.
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          const float corr = ex2(m[mi][hr] - m_use);
          m[mi][hr] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < L::kKTiles; ++nt)
#pragma unroll
            for (int e = 2 * hr; e < 2 * hr + 2; ++e) {
              const float p = ex2(fmaf(s[mi][nt][e], a.scale_log2, -m_use));
              s[mi][nt][e] = p;
              sum += p;
            }
          l[mi][hr] = l[mi][hr] * corr + sum;
#pragma unroll
          for (int dt = 0; dt < kDTiles; ++dt) {
            o[mi][dt][2 * hr] *= corr;
            o[mi][dt][2 * hr + 1] *= corr;
          }
        }

      // O += P V: the S accumulators of n-tiles 2kk, 2kk+1 are exactly the A fragment of k-step kk.
#pragma unroll
      for (int kk = 0; kk < L::kPSteps; ++kk) {
        std::uint32_t pf[kMT][4];
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
          pf[mi][0] = pack_bf16(s[mi][2 * kk][0], s[mi][2 * kk][1]);
          pf[mi][1] = pack_bf16(s[mi][2 * kk][2], s[mi][2 * kk][3]);
          pf[mi][2] = pack_bf16(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
          pf[mi][3] = pack_bf16(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < kDTiles / 2; ++dp) {
          std::uint32_t b[4];
          ldsm_x4_t(b, (v_addr ^ (dp << 5)) + kk * 4096);
#pragma unroll
          for (int mi = 0; mi < kMT; ++mi) {
            mma_bf16(o[mi][2 * dp], pf[mi], b[0], b[1]);
            mma_bf16(o[mi][2 * dp + 1], pf[mi], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with stage it & 1 before iteration it + 1 refills it
  }

  if (warp_idle) return;  // no barrier follows: the epilogue touches only this warp's rows
  // Epilogue: O / l in fp32, one bf16 rounding, staged in this warp's own rows of sQ (only this
  // warp ever read them, and no copy into sQ is pending) so that global stores are 16 bytes wide.
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float lsum = l[mi][hr];
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
      float inv = lsum > 0.f ? 1.f / lsum : 0.f;  // lsum >= 1 on real rows (the max key: p = 1)
      if constexpr (kPaged)
        if (s_bad_page) inv = __int_as_float(0x7fc00000);  // an unreadable page: a visible NaN row
      const int r = warp_r0 + mi * 16 + gid + 8 * hr;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
        *reinterpret_cast<std::uint32_t*>(sQ + swz(r, dt) + 2 * tq) =
            pack_bf16(o[mi][dt][2 * hr] * inv, o[mi][dt][2 * hr + 1] * inv);
    }
  __syncwarp();
  bf16* og = a.out + t0 * q_stride + static_cast<std::size_t>(head) * kD;
#pragma unroll
  for (int i = 0; i < L::kWarpRows * kChunks / 32; ++i) {
    const int c = lane + i * 32, r = warp_r0 + c / kChunks, ch = c % kChunks;
    if (r < rows_here)
      *reinterpret_cast<uint4*>(og + r * q_stride + ch * 8) = *reinterpret_cast<const uint4*>(sQ + swz(r, ch));
  }
}

// Launches one configuration of the kernel: grid = query tiles x heads, flattened head-fastest.
template <int kWarps, int kMT, int kBc, bool kQRegs, int kMinBlocks, bool kPaged>
void launch(Args a, cudaStream_t s) {
  using L = Tile<kWarps, kMT, kBc>;
  auto* kernel = prefill_kernel<kWarps, kMT, kBc, kQRegs, kMinBlocks, kPaged>;
  a.n_qtiles = (a.T + L::kBr - 1) / L::kBr;
  const long long blocks = static_cast<long long>(a.n_qtiles) * a.Hq;
  if (blocks > INT_MAX)
    throw GpuError("attention_dense_prefill: " + std::to_string(blocks) + " blocks (T = " + std::to_string(a.T) +
                   ", Hq = " + std::to_string(a.Hq) + "), expected at most " + std::to_string(INT_MAX));
  // More than 48 KB of dynamic shared memory needs the opt-in (per device, so set at every call).
  M3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kSmemBytes));
  kernel<<<static_cast<unsigned>(blocks), L::kThreads, L::kSmemBytes, s>>>(a);
  M3_CUDA_CHECK_LAUNCH();
}

std::string dims_note(const AttnDims& d) {
  return "Hq = " + std::to_string(d.Hq) + ", Hkv = " + std::to_string(d.Hkv) + ", D = " + std::to_string(d.D);
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace

void attention_dense_prefill(const bf16* q, const bf16* k, const bf16* v, std::int64_t p0, int T, int N,
                             const AttnDims& dims, bf16* out, cudaStream_t s, CachePages pages) {
  const std::string op = "attention_dense_prefill: ";
  if (dims.Hq <= 0 || dims.Hkv <= 0 || dims.Hq % dims.Hkv != 0)
    throw GpuError(op + dims_note(dims) + ", expected Hq, Hkv > 0 and Hq % Hkv == 0");
  if (dims.D != kD)
    throw GpuError(op + "D = " + std::to_string(dims.D) + ", expected D = " + std::to_string(kD) +
                   " (the only head dim this kernel is built for)");
  if (T < 0 || N < 0 || p0 < 0 || p0 + T > N)
    throw GpuError(op + "p0 = " + std::to_string(p0) + ", T = " + std::to_string(T) + ", N = " + std::to_string(N) +
                   ", expected p0 >= 0, T >= 0 and p0 + T <= N (queries at positions p0..p0+T-1 of the cache)");
  detail::check_cache_pages("attention_dense_prefill", pages, N);
  if (T == 0) return;
  if (!q || !k || !v || !out)
    throw GpuError(op + "null pointer among q, k, v, out, expected device pointers");
  if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(out))
    throw GpuError(op + "q, k, v and out must be 16-byte aligned (the kernel moves 16-byte chunks)");
  Args a{q, k, v, out, pages, static_cast<int>(p0), T, N, dims.Hq, dims.Hq / dims.Hkv, dims.Hkv, 0,
         static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(kD)))};
  // 4 warps x 32 rows = 128 queries, 64 keys a tile, Q re-read from shared memory; 96 KB of shared
  // memory and 255 registers (ptxas -v: 40 bytes of spill, the four running row sums, one L1 load
  // and store each per key tile) give 2 CTAs an SM. Measured on an H200 (M3 heads, N = T = 8K-32K,
  // same run): 367-369 TFLOP/s, against 309-324 for 8 warps x 16 rows with Q in registers, 318-325
  // for 4 x 16, 349-369 for 8 x 32 (Br 256, 1 CTA an SM), 250-320 for 32-key tiles. Two m-tiles a
  // warp halve the ldmatrix traffic per mma (every K/V fragment feeds two row blocks): with 16-row
  // warps, shared-memory bandwidth rather than the tensor cores sets the pace.
  if (pages.table) launch<4, 2, kBcMain, false, 2, true>(a, s);
  else launch<4, 2, kBcMain, false, 2, false>(a, s);
}

}  // namespace m3::gpu
