// MSA index block-max scores; see msa_index.h. One CTA = (8 or 16 (query, index head) rows of one
// sequence, a chunk of whole blocks; one wave of equal chunks in decode). Index-K tiles of 64 keys
// (128 for fp8) stream through a 3-stage cp.async pipeline; each of the 4 warps scores slices of
// 16 keys (each inside one block, as BLK % 16 == 0) with mma.m16n8k16, keys as the M operand and
// the rows as one or two 8-row N tiles (bf16 in, fp32 accumulate), takes the NaN-propagating max
// over its keys and folds it into a per-(row, block) maximum in shared memory (atomicMax on an
// order-preserving uint32 image of the float). Keys as M: decode has 4 rows a sequence (T = 1,
// Hi = 4), which as the M operand (16 rows) wasted 3/4 of every MMA; as an 8-row N tile half as
// many MMAs do the same work. A slice that no valid row masks (all but the last of a decode
// row's) takes its max without per-key position tests.
// The fp8 variant stages the raw E4M3 bytes, widens each A fragment to f16 with one cvt a pair
// (exact) and multiplies in f16 (Q widened bf16 -> f16 once, exact for |q| >= 2^-17). Its
// fragments are read with vector loads: the MMA's k index kappa = 16 kk + 2 t + 8 h + e of thread
// t = lane % 4 (k-step kk, h, e in {0, 1}) takes the key's (and q's) dimension t Di/4 + 4 kk + 2 h
// + e, a bijection on [0, Di) applied to both operands, so thread t's bytes of a key are the
// contiguous quarter [t Di/4, (t+1) Di/4): two 16-byte loads a key at Di 128 where the natural
// order needs sixteen 2-byte loads (which measured the same: H200, 1M, 54.7 / 55.0 us at b 1,
// 335 / 341 us at b 8, 2026-11-29).
// Measured before keys-as-M (H200, 1M, 2026-11-29): bf16 b 1 80.1 us (3.35 TB/s of its 256 MiB,
// a plain read of 256 MiB 71.7 us), b 8 526 us (4.08 TB/s, a 1 GiB read 4.40); fp8 b 1 55.0 us
// (2.44 TB/s), b 8 341 us (3.15 TB/s): the fp8 path slower per byte by 1.3x, its MMA and
// conversion work per byte twice the bf16 path's.
// After it (H200, 1M): fp8 b 1 50.8 us, b 8 278 us (3.87 TB/s); bf16 unchanged, at its read.
// A contiguous cache's first tiles go out before the positions and q arrive (two cold DRAM round
// trips off the front of every CTA): bf16 b 1 78.9 -> 77.8 us, b 8 525 -> 516 us.
// Pipeline depth: 4, 6 and 8 stages measured no better than 3 (H200, decode at 1M: b 1 80.6 /
// 82.4 / 108 / 108 us, b 8 540 / 528 / 822 / 816 us; deeper pipelines cost resident CTAs). At b 1
// the ~12 us over the streaming time is launch, ramp and tail, which PDL partly hides (msa_select).
// Paged caches (kv_cache.h) are a separate instantiation: a tile (64 or 128 keys from a multiple of
// 16) spans at most two 128-row pages, whose ids are loaded one pipeline step ahead; a 16-key slice
// lies in one page, and a slice whose page id is negative scores NaN (read nothing).
#include "gpu/kernels/msa_index.h"

#include "gpu/kernels/attention_dense.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <string>

namespace m3::gpu {
namespace {

using namespace detail;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = 16;   // (query, head) rows a CTA: two 8-row MMA n-tiles
constexpr int kMaxBpc = 256;   // blocks a chunk: the [16, bpc] maxima take <= 16 KiB of smem

struct IndexLaunch {
  const bf16* q = nullptr;
  const void* k = nullptr;  // bf16 or E4M3 bytes
  const std::int64_t* q_pos = nullptr;
  float* scores = nullptr;
  CachePages pages;  // idx_k layout (table == nullptr: contiguous)
  int B = 1, T = 0, N = 0, NB = 0, Hi = 0, BLK = 0;
  int bpc = 1, chunks = 1, tiles_per_seq = 1;
};

template <int Di, bool kFp8>
struct Cfg {
  // 16-key slices a warp scores per tile: fp8 tiles take two, so that every pipeline step (one
  // barrier) moves 16 KB either way; 3 stages keep 2 x 16 KB in flight a CTA, 3 CTAs an SM:
  // ~96 KB in flight an SM, twice Little's law's ~32 B/ns x ~1.5 us.
  static constexpr int kStages = 3;
  static constexpr int kSlices = kFp8 ? 2 : 1;
  static constexpr int kTileKeys = 16 * kWarps * kSlices;
  static constexpr int kElemBytes = kFp8 ? 1 : 2;
  // +16 B a row: consecutive rows start 4 banks apart (ldmatrix and the fp8 vector loads at Di 128
  // conflict-free; the vector loads at Di <= 64 are 2-way conflicted: M3 has Di 128)
  static constexpr int kRowBytes = Di * kElemBytes + 16;
  static constexpr int kPipeBytes = kStages * kTileKeys * kRowBytes;
  static constexpr int kMaxSmem = kPipeBytes + kMaxRows * kMaxBpc * 4;
};

// Order-preserving image of a float for atomicMax: NaN above everything (it must win the max,
// as the reference's PropagateNaN), -0 folded into +0.
__device__ __forceinline__ unsigned ord_key(float x) {
  if (x != x) return 0xFFFFFFFFu;
  if (x == 0.f) x = 0.f;
  const unsigned u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float from_ord(unsigned k) {
  if (k == 0xFFFFFFFFu) return __uint_as_float(0x7fc00000u);
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
// max that returns NaN when either input is NaN (the reference's PropagateNaN): one instruction
// from sm_80 on, where the select form took four.
__device__ __forceinline__ float nan_max(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#else
  return (a > b || a != a) ? a : b;
#endif
}

// Two E4M3 bytes -> f16x2, one cvt (exact: every E4M3 value, subnormals included, is a normal f16).
__device__ __forceinline__ std::uint32_t e4m3x2_to_f16x2(std::uint16_t v) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v), __NV_E4M3);
  return static_cast<std::uint32_t>(h.x) | (static_cast<std::uint32_t>(h.y) << 16);
}
// bf16x2 -> f16x2 (exact for |x| in [2^-17, 65504]; smaller values round at 2^-24 absolute).
__device__ __forceinline__ std::uint32_t bf16x2_to_f16x2(std::uint32_t v) {
  const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  const __half2 h = __floats2half2_rn(f.x, f.y);
  return *reinterpret_cast<const std::uint32_t*>(&h);
}
// c [16x8 fp32] += a [16x16 f16, row] * b [16x8 f16, col]
__device__ __forceinline__ void mma_f16(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// N words (4 bytes each) from shared memory at p, in the widest loads p's alignment allows:
// 16 bytes for N % 4 == 0 (p 16-byte aligned), 8 for N == 2, 4 for N == 1.
template <int N>
__device__ __forceinline__ void load_words(const unsigned char* p, std::uint32_t (&w)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const uint4 v = *reinterpret_cast<const uint4*>(p + 16 * i);
      w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
  } else if constexpr (N == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x; w[1] = v.y;
  } else {
    static_assert(N == 1, "Di in {16, 32, 64, 128}: N = Di/16 in {1, 2, 4, 8}");
    w[0] = *reinterpret_cast<const std::uint32_t*>(p);
  }
}

// kNT: 8-row n-tiles a CTA (rows = 8 kNT): 1 for decode-sized row counts (<= 8 rows a sequence,
// e.g. T = 1 at Hi = 4), 2 otherwise.
template <int Di, bool kFp8, bool kPaged, int kNT>
__global__ void __launch_bounds__(kThreads, 3) msa_index_kernel(const IndexLaunch a) {
  using C = Cfg<Di, kFp8>;
  constexpr int kRowsCta = 8 * kNT;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* tiles = smem;  // [kStages][kTileKeys][kRowBytes]
  unsigned* bmax = reinterpret_cast<unsigned*>(smem + C::kPipeBytes);  // [kRowsCta][bpc]
  __shared__ long long s_p[kRowsCta];  // position of each row; -1 = padding, -2 = invalid
  // Paged: slice s of the tile in stage st lies in a page with a negative id (its scores are NaN).
  __shared__ bool s_bad[kPaged ? C::kStages : 1][kPaged ? C::kTileKeys / 16 : 1];

  pdl_trigger();  // the selection may launch now: it waits for this whole grid before reading scores
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;  // MMA fragment row group and thread-in-group
  const int chunk = static_cast<int>(blockIdx.x % a.chunks);
  const int rt_all = static_cast<int>(blockIdx.x / a.chunks);
  const int b = rt_all / a.tiles_per_seq, rt = rt_all % a.tiles_per_seq;
  const int rows_seq = a.T * a.Hi, r0 = rt * kRowsCta;
  const int nrows = rows_seq - r0 < kRowsCta ? rows_seq - r0 : kRowsCta;
  const int bpc = a.bpc;

  const int cb0 = chunk * bpc, cb1 = min(a.NB, cb0 + bpc);
  const std::int64_t c0 = static_cast<std::int64_t>(cb0) * a.BLK;
  constexpr int kTileKeys = C::kTileKeys;

  // Contiguous caches: this thread's 16-byte column of the chunk's first key row it copies; a
  // tile's rows follow at fixed strides. Paged: through the page ids.
  constexpr int kChunks = Di * C::kElemBytes / 16;
  constexpr int kRowsPerPass = kThreads / kChunks;
  constexpr std::int64_t kRowG = Di * C::kElemBytes;  // bytes of a key row in global memory
  const unsigned char* kcol = static_cast<const unsigned char*>(a.k) +
                              (static_cast<std::int64_t>(b) * a.N + c0 + tid / kChunks) * kRowG + (tid % kChunks) * 16;
  // pg: the tile's page ids from tile_pages (paged only); nk: keys of the chunk that may be read.
  auto load_tile = [&](int tile, int st, int2 pg, int nk) {
    const int c = tid % kChunks;
    const int left = nk - tile * kTileKeys;  // keys of this tile below that bound
    const std::int64_t t0 = c0 + static_cast<std::int64_t>(tile) * kTileKeys;
    const unsigned char* src_t = kcol + static_cast<std::int64_t>(tile) * kTileKeys * kRowG;
#pragma unroll
    for (int pass = 0; pass < kTileKeys / kRowsPerPass; ++pass) {
      const int r = tid / kChunks + pass * kRowsPerPass;
      bool ok = r < left;
      const unsigned char* src = static_cast<const unsigned char*>(a.k);
      if constexpr (kPaged) {
        const std::int64_t j = t0 + r;
        const std::int32_t page = j / kPageRows == t0 / kPageRows ? pg.x : pg.y;
        const bool bad = ok && page < 0;
        ok = ok && !bad;
        if (ok) src = reinterpret_cast<const unsigned char*>(cache_row_in_page(static_cast<const unsigned char*>(a.k), page, j, kRowG)) + c * 16;
        if (c == 0 && r % 16 == 0) s_bad[st][r / 16] = bad;  // a slice's 16 keys share one page
      } else {
        if (ok) src = src_t + static_cast<std::int64_t>(pass) * kRowsPerPass * kRowG;
      }
      cp_async16(smem_u32(tiles + (st * kTileKeys + r) * C::kRowBytes + c * 16), src, ok);
    }
  };

  // Contiguous caches: the first kStages - 1 tiles are issued now, bounded by the chunk and the
  // cache (keys < N are valid memory), before the positions and q arrive: their DRAM round trips
  // (~1 us each with L2 cold) no longer precede the first tile's. Keys past the rows' positions
  // are masked below like any other. The cost: up to two tiles a CTA read for nothing where the
  // rows' positions end before the chunk (short sequences in a long contiguous cache; decode and
  // the study's shapes have p = N - 1, the model's caches are paged). Paged caches wait for the
  // positions: a page past a sequence may hold a stale id.
  if constexpr (!kPaged) {
    const std::int64_t end = min(static_cast<std::int64_t>(cb1) * a.BLK, static_cast<std::int64_t>(a.N));
    const int nk = end > c0 ? static_cast<int>(end - c0) : 0;
#pragma unroll
    for (int s = 0; s < C::kStages - 1; ++s) {
      load_tile(s, s, make_int2(0, 0), nk);
      cp_async_commit();
    }
  }

  if (tid < kRowsCta) {
    long long p = -1;
    if (tid < nrows) {
      p = a.q_pos[static_cast<std::int64_t>(b) * a.T + (r0 + tid) / a.Hi];
      if (p < 0 || p >= a.N) p = -2;  // invalid: masked everywhere, NaN row at the end
    }
    s_p[tid] = p;
  }
  for (int i = tid; i < kRowsCta * bpc; i += kThreads) bmax[i] = ord_key(-INFINITY);

  // Paged: the ids of the (at most two) pages of tile `tile`: its first key's page and the next
  // one. They depend on the chunk alone, so the first kStages tiles' ids are loaded here, in the
  // shadow of the positions' load, and every later tile's one pipeline step ahead. Ids past the
  // table are never read; ids of pages past the sequence (-1 or stale) are loaded but only used
  // for keys < kv_end, which lie in visible pages.
  auto tile_pages = [&](int tile) -> int2 {
    if constexpr (kPaged) {
      const std::int64_t lp0 = (c0 + static_cast<std::int64_t>(tile) * kTileKeys) / kPageRows;
      const std::int32_t pa = lp0 < a.pages.pages_per_seq ? cache_page(a.pages, b, lp0) : -1;
      const std::int32_t pb = lp0 + 1 < a.pages.pages_per_seq ? cache_page(a.pages, b, lp0 + 1) : -1;
      return make_int2(pa, pb);
    } else {
      return make_int2(0, 0);
    }
  };
  int2 first_pages[C::kStages];
#pragma unroll
  for (int s = 0; s < C::kStages; ++s) first_pages[s] = tile_pages(s);
  __syncthreads();

  // pmax bounds the keys read; pmin (the smallest valid position) marks the slices that no valid
  // row masks: there the block max needs no per-key test.
  long long pmax = -1, pmin = LLONG_MAX;
#pragma unroll
  for (int r = 0; r < kRowsCta; ++r) {
    pmax = s_p[r] > pmax ? s_p[r] : pmax;
    if (s_p[r] >= 0 && s_p[r] < pmin) pmin = s_p[r];
  }
  const std::int64_t kv_end = min(static_cast<std::int64_t>(cb1) * a.BLK, static_cast<std::int64_t>(pmax) + 1);
  const int n_keys = kv_end > c0 ? static_cast<int>(kv_end - c0) : 0;
  const int ntiles = (n_keys + kTileKeys - 1) / kTileKeys;
  // This thread's accumulator columns: rows 8 nt + 2 t4 + {0, 1}.
  long long pc[kNT][2];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    pc[nt][0] = s_p[8 * nt + 2 * t4];
    pc[nt][1] = s_p[8 * nt + 2 * t4 + 1];
  }

  // q is the MMA's B operand (keys are A: M = 16 keys, N = 8 rows): thread (g, t4) holds row
  // 8 nt + g at the k indices 16 kk + 2 t4 (+ 8) + {0, 1}, i.e. dimensions 16 kk + 2 t4 (+ 8), or
  // with the fp8 path's permutation t4 Di/4 + 4 kk (+ 2) (the header).
  constexpr int kK = Di / 16;
  std::uint32_t qb[kNT][kK][2];
  {
    const bf16* qs = a.q + (static_cast<std::int64_t>(b) * rows_seq + r0) * Di;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const int r = 8 * nt + g;
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        const int col = kFp8 ? t4 * (Di / 4) + kk * 4 : kk * 16 + t4 * 2;
        const int col8 = kFp8 ? col + 2 : col + 8;
        auto ld = [&](int cc) -> std::uint32_t {
          return r < nrows ? *reinterpret_cast<const std::uint32_t*>(qs + r * Di + cc) : 0u;
        };
        qb[nt][kk][0] = ld(col);
        qb[nt][kk][1] = ld(col8);
        if constexpr (kFp8) {  // the fp8 path multiplies in f16 (exact widening, the header)
          qb[nt][kk][0] = bf16x2_to_f16x2(qb[nt][kk][0]);
          qb[nt][kk][1] = bf16x2_to_f16x2(qb[nt][kk][1]);
        }
      }
    }
  }

  if constexpr (kPaged) {
#pragma unroll
    for (int s = 0; s < C::kStages - 1; ++s) {
      if (s < ntiles) load_tile(s, s, first_pages[s], n_keys);
      cp_async_commit();
    }
  }
  // Paged: the page ids of the next tile to load, fetched one step before their use.
  int2 next_pages = first_pages[C::kStages - 1];
  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();
    if (it + C::kStages - 1 < ntiles)
      load_tile(it + C::kStages - 1, (it + C::kStages - 1) % C::kStages, next_pages, n_keys);
    if constexpr (kPaged)
      if (it + C::kStages < ntiles) next_pages = tile_pages(it + C::kStages);
    cp_async_commit();

#pragma unroll
    for (int sl = 0; sl < C::kSlices; ++sl) {
      const int slice = warp * C::kSlices + sl;
      const std::int64_t js = c0 + it * kTileKeys + slice * 16;  // first key of this warp's slice
      if (js >= kv_end) break;  // warp-uniform (later slices start later); no barrier below
      const unsigned char* kt = tiles + ((it % C::kStages) * kTileKeys + slice * 16) * C::kRowBytes;
      float sc[kNT][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
      // fp8: this thread's quarter of key g's row and of key g + 8's, Di/4 bytes each, as kK
      // words: word kk holds the k-step's two E4M3 pairs (low half h = 0, high h = 1).
      std::uint32_t w_lo[kK], w_hi[kK];
      if constexpr (kFp8) {
        const unsigned char* ra = kt + g * C::kRowBytes + t4 * (Di / 4);
        load_words<kK>(ra, w_lo);
        load_words<kK>(ra + 8 * C::kRowBytes, w_hi);
      }
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        std::uint32_t ka[4];  // A fragment: keys g, g + 8 at k 2 t4 + {0, 1}, then + 8
        if constexpr (kFp8) {
          ka[0] = e4m3x2_to_f16x2(static_cast<std::uint16_t>(w_lo[kk]));
          ka[1] = e4m3x2_to_f16x2(static_cast<std::uint16_t>(w_hi[kk]));
          ka[2] = e4m3x2_to_f16x2(static_cast<std::uint16_t>(w_lo[kk] >> 16));
          ka[3] = e4m3x2_to_f16x2(static_cast<std::uint16_t>(w_hi[kk] >> 16));
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) mma_f16(sc[nt], ka, qb[nt][kk][0], qb[nt][kk][1]);
        } else {
          // lanes 8m .. 8m + 7 address matrix m: keys (m & 1) * 8 + 0..7, dimensions + (m >> 1) * 8
          const unsigned char* src = kt + ((lane & 7) + ((lane >> 3) & 1) * 8) * C::kRowBytes +
                                     (kk * 16 + (lane >> 4) * 8) * 2;
          ldmatrix_x4(ka[0], ka[1], ka[2], ka[3], smem_u32(src));
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) mma_bf16(sc[nt], ka, qb[nt][kk][0], qb[nt][kk][1]);
        }
      }
      if constexpr (kPaged)
        if (s_bad[it % C::kStages][slice])  // unreadable keys: NaN, which wins every block max
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[nt][e] = __uint_as_float(0x7fc00000u);
      // sc[nt]: keys js + g (e = 0, 1) and js + g + 8 (e = 2, 3) x rows 8 nt + 2 t4 + (e & 1).
      // v[2 nt + e]: this thread's max over its two keys for row 8 nt + 2 t4 + e.
      constexpr int kV = 2 * kNT;
      float v[kV];
      const bool unmasked = js + 15 <= pmin;  // warp-uniform: no valid row masks a key here
      const std::int64_t ja = js + g, jb = ja + 8;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x = sc[nt][e], y = sc[nt][e + 2];
          v[2 * nt + e] = unmasked ? nan_max(x, y)
                                   : nan_max(ja <= pc[nt][e] ? x : -INFINITY, jb <= pc[nt][e] ? y : -INFINITY);
        }
      // Max over the 8 threads of a column (lane bits 2-4) by halving exchanges: at lane bit o a
      // thread keeps one half of its values and folds in its partner's copy of that half, so the
      // kV values take 4 (kV = 4) or 3 (kV = 2) shuffles instead of 3 kV. Afterwards v[0] is the
      // column max of value idx: (lane >> 3) & 3 for kV = 4, lane >> 4 for kV = 2.
      int idx = 0, n = kV;
#pragma unroll
      for (int o = 16; o >= 4; o >>= 1) {
        if (n > 1) {
          const bool up = (lane & o) != 0;  // this thread keeps the upper half
          const int h = n / 2;
#pragma unroll
          for (int i = 0; i < h; ++i) {
            const float keep = up ? v[i + h] : v[i], give = up ? v[i] : v[i + h];
            v[i] = nan_max(keep, __shfl_xor_sync(0xffffffffu, give, o));
          }
          idx += up ? h : 0;
          n = h;
        } else {
          v[0] = nan_max(v[0], __shfl_xor_sync(0xffffffffu, v[0], o));
        }
      }
      // Lanes whose bits below the last halving bit are clear write (one atomic each); the others
      // hold copies. kV = 4: lanes with bit 2 clear; kV = 2: bits 2 and 3 clear.
      const bool writer = kV == 4 ? (lane & 4) == 0 : (lane & 12) == 0;
      if (writer) {
        const int r = 8 * (idx / 2) + 2 * t4 + idx % 2;
        const int bl = static_cast<int>(js / a.BLK) - cb0;
        if (r < nrows && v[0] != -INFINITY) atomicMax(&bmax[r * bpc + bl], ord_key(v[0]));
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  const int nbc = cb1 - cb0;
  for (int idx = tid; idx < nrows * nbc; idx += kThreads) {
    const int r = idx / nbc, bl = idx % nbc, blk_id = cb0 + bl;
    const long long p = s_p[r];
    const int t = (r0 + r) / a.Hi, i = (r0 + r) % a.Hi;
    float v;
    if (p < 0) v = __uint_as_float(0x7fc00000u);
    else if (blk_id > p / a.BLK) v = -INFINITY;
    else v = from_ord(bmax[r * bpc + bl]);
    a.scores[((static_cast<std::int64_t>(b) * a.Hi + i) * a.T + t) * a.NB + blk_id] = v;
  }
}

long ceil_div(long x, long y) { return (x + y - 1) / y; }

// Resident CTAs at the largest shared-memory footprint (raises the kernel's limit to it).
template <int Di, bool kFp8, bool kPaged, int kNT>
int slots() {
  return resident_ctas(reinterpret_cast<const void*>(msa_index_kernel<Di, kFp8, kPaged, kNT>), kThreads,
                       Cfg<Di, kFp8>::kMaxSmem);
}

std::atomic<detail::IndexRowTile> g_row_tile{detail::IndexRowTile::Auto};

template <int Di, bool kFp8, bool kPaged, int kNT>
void launch_kernel(const IndexLaunch& a, cudaStream_t s) {
  using C = Cfg<Di, kFp8>;
  const int smem = C::kPipeBytes + 8 * kNT * a.bpc * 4;
  slots<Di, kFp8, kPaged, kNT>();
  const long ctas = static_cast<long>(a.chunks) * a.B * a.tiles_per_seq;
  msa_index_kernel<Di, kFp8, kPaged, kNT><<<static_cast<unsigned>(ctas), kThreads, smem, s>>>(a);
  M3_CUDA_CHECK_LAUNCH();
}

template <int Di, bool kFp8, int kNT>
void launch(const IndexLaunch& a, cudaStream_t s) {
  if (a.pages.table) launch_kernel<Di, kFp8, true, kNT>(a, s);
  else launch_kernel<Di, kFp8, false, kNT>(a, s);
}

void run(const char* op, const bf16* idx_q, const void* idx_k, const std::int64_t* q_pos, int T, int N,
         int NB, const MsaDims& d, float* scores, cudaStream_t s, int B, bool fp8, CachePages pages) {
  const std::string o = op;
  if (d.Hi <= 0 || !is_compiled_dim(d.Di))
    throw GpuError(o + ": Hi = " + std::to_string(d.Hi) + ", Di = " + std::to_string(d.Di) +
                   ", expected Hi > 0 and Di in {16, 32, 64, 128} (the compiled index dims)");
  if (d.BLK <= 0 || d.BLK % 16 != 0)
    throw GpuError(o + ": BLK = " + std::to_string(d.BLK) + ", expected a positive multiple of 16");
  if (T < 0 || N < 1 || B < 1)
    throw GpuError(o + ": T = " + std::to_string(T) + ", N = " + std::to_string(N) + ", B = " +
                   std::to_string(B) + ", expected T >= 0, N >= 1, B >= 1");
  const long nb_min = ceil_div(N, d.BLK);
  if (NB < nb_min)
    throw GpuError(o + ": NB = " + std::to_string(NB) + ", expected >= ceil(N/BLK) = ceil(" + std::to_string(N) +
                   "/" + std::to_string(d.BLK) + ") = " + std::to_string(nb_min));
  check_cache_pages(op, pages, N);
  if (T == 0) return;
  if (idx_q == nullptr || idx_k == nullptr || q_pos == nullptr || scores == nullptr)
    throw GpuError(o + ": a null pointer among idx_q, idx_k, q_pos, scores; expected device pointers");
  if (reinterpret_cast<std::uintptr_t>(idx_q) % 16 != 0 || reinterpret_cast<std::uintptr_t>(idx_k) % 16 != 0)
    throw GpuError(o + ": idx_q or idx_k is not 16-byte aligned");
  IndexLaunch a;
  a.q = idx_q; a.k = idx_k; a.q_pos = q_pos; a.scores = scores;
  a.pages = pages;
  a.B = B; a.T = T; a.N = N; a.NB = NB; a.Hi = d.Hi; a.BLK = d.BLK;
  // 8-row tiles where a sequence has <= 8 rows (decode): half the MMAs of 16-row tiles, whose
  // rows 9-16 would be padding. Otherwise 16-row tiles: each key is read once for 16 rows.
  const bool rows8 = static_cast<long>(T) * d.Hi <= 8 && g_row_tile.load(std::memory_order_relaxed) == detail::IndexRowTile::Auto;
  a.tiles_per_seq = static_cast<int>(ceil_div(static_cast<long>(T) * d.Hi, rows8 ? 8 : kMaxRows));
  const long row_tiles = static_cast<long>(B) * a.tiles_per_seq;
  // One wave of equal chunks for decode; many row tiles (a prefill chunk) get the fewest chunks.
  const int resident = with_compiled_dim(d.Di, [&](auto di) {
    constexpr int D = decltype(di)::value;
    if (rows8) return fp8 ? slots<D, true, false, 1>() : slots<D, false, false, 1>();
    return fp8 ? slots<D, true, false, 2>() : slots<D, false, false, 2>();
  });
  const long want = std::max(1L, resident / row_tiles);
  const long chunks = std::clamp(want, ceil_div(NB, kMaxBpc), static_cast<long>(NB));
  a.bpc = static_cast<int>(ceil_div(NB, chunks));
  a.chunks = static_cast<int>(ceil_div(NB, a.bpc));
  if (static_cast<double>(a.chunks) * row_tiles > 2147483647.0)
    throw GpuError(o + ": " + std::to_string(row_tiles) + " row tiles x " + std::to_string(a.chunks) +
                   " chunks exceed the grid limit");
  with_compiled_dim(d.Di, [&](auto di) {
    constexpr int D = decltype(di)::value;
    if (rows8) fp8 ? launch<D, true, 1>(a, s) : launch<D, false, 1>(a, s);
    else fp8 ? launch<D, true, 2>(a, s) : launch<D, false, 2>(a, s);
  });
}

}  // namespace

void detail::set_index_row_tile(detail::IndexRowTile t) { g_row_tile.store(t, std::memory_order_relaxed); }

void msa_index(const bf16* idx_q, const bf16* idx_k, const std::int64_t* q_pos, int T, int N, int NB,
               const MsaDims& dims, float* scores, cudaStream_t s, int B, CachePages pages) {
  run("msa_index", idx_q, idx_k, q_pos, T, N, NB, dims, scores, s, B, false, pages);
}

void msa_index_fp8(const bf16* idx_q, const __nv_fp8_e4m3* idx_k, const std::int64_t* q_pos, int T,
                   int N, int NB, const MsaDims& dims, float* scores, cudaStream_t s, int B, CachePages pages) {
  run("msa_index_fp8", idx_q, idx_k, q_pos, T, N, NB, dims, scores, s, B, true, pages);
}

}  // namespace m3::gpu
