// Shared between msa_attention_prefill.cu (list building, the portable mma.sync tile kernel, the
// merge) and sm90_msa_attention_prefill.cu (the Hopper wgmma tile kernel): the arguments of one
// chunk and the launcher of the sm90 tile kernel. Included by .cu files only.
#pragma once

#include "gpu/kernels/kv_cache.h"
#include "gpu/runtime/buffer.h"

#include <climits>
#include <cstdint>

namespace m3::gpu::msa_prefill {

constexpr int kRows = 64;  // M rows a tile: gathered queries x the G heads of their group
constexpr float kLog2e = 1.4426950408889634f;

struct Args {
  const bf16* q;                // [T, Hq*D]
  const bf16* k;                // cache rows via cache_row
  const bf16* v;
  const std::int64_t* q_pos;    // [T]
  const std::int32_t* sel;      // [Hkv*T, k_blk]
  bf16* out;                    // [T, Hq*D]
  CachePages pages;
  int T, N, Hq, Hkv, G, blk, k_blk;
  int NB;      // ceil(N / blk): blocks a group; list key = g*NB + b, K = Hkv*NB, sentinel K
  int QT;      // queries a tile: 64 / G
  int t0, Tc;  // this chunk: queries t0 .. t0 + Tc - 1
  int tile_bound;  // entries of tile_info (an upper bound on this chunk's tiles)
  std::uint32_t* keys_in;   // [E] list key of entry e = (g*Tc + tl)*k_blk + slot (K if invalid)
  std::uint32_t* keys_out;  // [E] sorted
  std::uint32_t* vals_in;   // [E] e
  std::uint32_t* vals_out;  // [E] entries sorted by key, ascending e within a key
  std::uint32_t* counts;    // [K] valid entries a list
  int* entry_off;           // [K+1] first sorted entry of each list
  int* tile_off;            // [K+1] first tile of each list; tile_off[K] = tiles of the chunk
  int4* tile_info;          // [tile_bound] (list key, first entry, queries, 0)
  float* part_o;            // [Tc*Hq, k_blk, D] unnormalized partial outputs
  float2* part_ml;          // [Tc*Hq, k_blk] (max of the scaled scores in log2 units, sum of weights)
};

#if defined(__CUDACC__)
// Warp 0 of a tile kernel (lane = its lane) loads tile `tile`'s metadata into shared memory: its
// gathered queries (QT <= 64: two a lane at most) as chunk-local t, slot and position, the largest
// position, the tile_info row, and the unallocated-page marker reset to INT_MAX (none). The caller's
// barrier publishes them.
__device__ __forceinline__ void load_tile_meta(const Args& a, int tile, int lane, int* s_tl, int* s_slot,
                                               long long* s_p, long long& s_pmax, int4& s_tile, int& s_bad) {
  const int4 ti = a.tile_info[tile];
  long long pm = -1;
  for (int i = lane; i < ti.z; i += 32) {
    const int e = static_cast<int>(a.vals_out[ti.y + i]);
    const int row = e / a.k_blk;  // g*Tc + tl
    const int tl = row % a.Tc;
    const long long p = a.q_pos[a.t0 + tl];
    s_tl[i] = tl;
    s_slot[i] = e - row * a.k_blk;
    s_p[i] = p;
    pm = p > pm ? p : pm;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const long long x = __shfl_xor_sync(0xffffffffu, pm, o);
    pm = x > pm ? x : pm;
  }
  if (lane == 0) {
    s_pmax = pm;
    s_tile = ti;
    s_bad = INT_MAX;
  }
}
#endif  // __CUDACC__

// True when the wgmma tile kernel serves these arguments: D = blk = 128 (one m64n128k16 S tile a
// block) on a compute capability 9.0 device with an sm_90a build.
bool sm90_tiles_available(int D, int blk);
// CTAs of the wgmma tile kernel resident on the device at once (its grid: one wave).
int sm90_tiles_resident();
// Launches the wgmma tile kernel on a chunk whose lists and tile table are built.
void sm90_tiles_launch(const Args& a, int grid, cudaStream_t s);

}  // namespace m3::gpu::msa_prefill
