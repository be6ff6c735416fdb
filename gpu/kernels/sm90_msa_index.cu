// MSA index block scores of a prompt chunk on Hopper; see sm90_msa_index.h.
//
// Work split: one CTA per (tile of 64 queries, group of 4 index heads), 5 warpgroups:
//   warpgroup 0, the producer: thread 0 loads the group's Q tiles once ([64, 128] a head), then the
//     index-K tiles of 128 keys (tile j = block j; key 0 up to the last key a real row of the tile
//     sees) into kStages stages by TMA; keys past the chunk (>= p0 + T) and query rows past T read
//     as zeros (outside the tensor maps);
//   warpgroups 1..4, the consumers: index head h0 + c, the tile's 64 queries. Per key tile j:
//     S [64, 128] = Q K^T        8 x wgmma m64n128k16, A = Q and B = K from shared memory
//     causal mask on the tiles that cross the diagonal (a select, so a NaN of a future key is
//     dropped as the reference drops it), then each row's NaN-propagating max over the 128 keys:
//     per thread over its 32 columns, then over the quad (two shuffles).
//   The block maxima of 8 tiles are staged in shared memory per warp (its 16 rows) and written as
//   16 rows x 32 contiguous bytes, so the [Hi*T, NB] score rows get whole sectors rather than one
//   4-byte store a tile. The four warpgroups share every K tile: 4 x 2 MFLOP of MMA per 32 KB
//   of K read, where msa_index's 16-row CTAs do 0.5 MFLOP per 32 KB.
//
// Shared-memory tiles in the 128-byte swizzled layout of sm90_attention_prefill.cu (its header
// explains the descriptors): two column halves of 64 per tile, row r at byte r * 128 of its half,
// 8-row groups 1024 bytes apart (SBO); the k-step of 16 dims is + 32 bytes, + one half for 4-7.
//
// Synchronization: mbarriers. full[s] (1 arrival + the TMA's bytes) says stage s is loaded;
// empty[s] (128 arrivals per active consumer warpgroup) says it may be overwritten. Tile j of the
// CTA's range [j_begin, j_end) uses stage (j - j_begin) % kStages at phase ((j - j_begin) / kStages)
// & 1; the producer waits the empties at the opposite parity, which a fresh barrier reports as
// completed.
#include "gpu/kernels/sm90_msa_index.h"

#include "gpu/kernels/sm90_util.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

namespace m3::gpu {
namespace {

using namespace sm90;

constexpr int kDi = 128;         // index head dim (M3: 128)
constexpr int kBlk = 128;        // keys a tile = the MSA block size (M3: 128)
constexpr int kQ = 64;           // queries a CTA: one wgmma M
constexpr int kHeads = 4;        // index heads a CTA: one consumer warpgroup each (M3: Hi = 4)
constexpr int kStages = 3;       // K ring depth: 2 tiles in flight while one is consumed
constexpr int kThreads = 128 * (1 + kHeads);
constexpr int kFlush = 8;        // tiles whose maxima a warp stages before writing 8 floats a row
constexpr int kRowBytes = 128;   // bytes of one row of a column half
constexpr std::uint32_t kQHalf = kQ * kRowBytes;         // 8 KB
constexpr std::uint32_t kQBytes = 2 * kQHalf;            // 16 KB a head
constexpr std::uint32_t kKHalf = kBlk * kRowBytes;       // 16 KB
constexpr std::uint32_t kKBytes = 2 * kKHalf;            // 32 KB a stage
constexpr std::uint32_t kStageBytes = kHeads * 4 * 16 * kFlush * 4;  // [heads][warps][16 rows][kFlush] fp32
constexpr std::uint32_t kBarBytes = 8 * (1 + 2 * kStages);
// + 1024: the dynamic shared window is aligned up to 1024 bytes in the kernel (swizzle atoms).
constexpr int kSmemBytes = 1024 + static_cast<int>(kHeads * kQBytes + kStages * kKBytes + kStageBytes + kBarBytes);
// No setmaxnreg: ptxas fits the consumers in the 96 registers a thread that 640 threads leave
// (no spills), and an increase must come out of the CTA's own launch allocation (640 x 96), which
// a producer decrease to 24 would not cover for 512 consumers at more than 114: the first version
// asked for 120 and hung in setmaxnreg.inc (H200, 2026-11-29).
static_assert(kDi == 2 * kBoxCols, "a row is two 128-byte column halves");
static_assert(kSmemBytes <= 227 * 1024, "over the sm_90 shared-memory limit a CTA");

struct Args {
  float* scores;  // [Hi*T, NB]
  long long p0;
  int T, NB, Hi;
  int n_qtiles;   // ceil(T / kQ)
  int n_groups;   // ceil(Hi / kHeads)
  int n_splits;   // CTAs sharing a query tile's key blocks (disjoint ranges of whole kFlush groups)
};

__global__ void __launch_bounds__(kThreads, 1)
    sm90_msa_index_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                          const Args a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t raw = smem_addr(smem_raw);
  const std::uint32_t base = (raw + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
  unsigned char* const gbase = smem_raw + (base - raw);
  const std::uint32_t sQ = base;                              // [kHeads][2 halves][64 rows][128 B]
  const std::uint32_t sK = sQ + kHeads * kQBytes;             // [kStages][2 halves][128 rows][128 B]
  const std::uint32_t sStage = sK + kStages * kKBytes;        // block maxima, see kStageBytes
  const std::uint32_t bar_q = sStage + kStageBytes;           // then full[kStages], empty[kStages]
  auto full = [&](int s) { return bar_q + 8u * (1 + s); };
  auto empty = [&](int s) { return bar_q + 8u * (1 + kStages + s); };
  float* const stage_f = reinterpret_cast<float*>(gbase + (sStage - base));

  const int split = static_cast<int>(blockIdx.x % a.n_splits);
  const int group = static_cast<int>(blockIdx.x / a.n_splits % a.n_groups);
  const int qtile = a.n_qtiles - 1 - static_cast<int>(blockIdx.x / a.n_splits / a.n_groups);  // longest rows first
  const int h0 = group * kHeads;
  const int nh = min(kHeads, a.Hi - h0);                     // active consumer warpgroups
  const int t0 = qtile * kQ;
  const int rows_here = min(kQ, a.T - t0);
  const long long pos0 = a.p0 + t0;                          // position of the tile's first query
  const int n_tiles = static_cast<int>((pos0 + rows_here - 1) / kBlk) + 1;  // blocks a real row sees
  // This CTA's blocks [j_begin, j_end): whole kFlush groups, so a flush never covers another's.
  const int per = ((n_tiles + a.n_splits - 1) / a.n_splits + kFlush - 1) / kFlush * kFlush;
  const int j_begin = min(n_tiles, split * per), j_end = min(n_tiles, j_begin + per);
  const int wg = static_cast<int>(threadIdx.x) / 128;

  if (threadIdx.x == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 128 * nh);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    if (threadIdx.x == 0) {
      mbar_expect_tx(bar_q, nh * kQBytes);
      for (int c = 0; c < nh; ++c) {
        tma_load(sQ + c * kQBytes, &tm_q, (h0 + c) * kDi, t0, bar_q);
        tma_load(sQ + c * kQBytes + kQHalf, &tm_q, (h0 + c) * kDi + kBoxCols, t0, bar_q);
      }
      for (int j = j_begin; j < j_end; ++j) {
        const int s = (j - j_begin) % kStages;
        mbar_wait(empty(s), (((j - j_begin) / kStages) & 1) ^ 1);
        mbar_expect_tx(full(s), kKBytes);
        tma_load(sK + s * kKBytes, &tm_k, 0, j * kBlk, full(s));
        tma_load(sK + s * kKBytes + kKHalf, &tm_k, kBoxCols, j * kBlk, full(s));
      }
    }
    return;  // the consumers wait on every tile's full barrier, so the CTA outlives the copies
  }

  // ---- consumers ----
  const int c = wg - 1;
  if (c >= nh) return;  // a head past Hi: never counted in the empty barriers
  const int head = h0 + c;
  const int ctid = static_cast<int>(threadIdx.x) - 128 * wg;
  const int lane = ctid & 31, warp = ctid >> 5;  // warp of the warpgroup: 16 rows each
  const int gid = lane >> 2, tq = lane & 3;      // accumulator fragment: rows gid, gid + 8; cols 2 tq, 2 tq + 1
  const int r_lo = 16 * warp + gid;              // this thread's first row in the tile (second: r_lo + 8)
  const long long pos_lo = pos0 + r_lo;
  const long long warp_pos0 = pos0 + 16 * warp;  // the warp's first row: masks start past it
  float* const wstage = stage_f + (c * 4 + warp) * 16 * kFlush;  // [16 rows][kFlush]
  const std::uint32_t q_tile = sQ + c * kQBytes;
  const long long NB = a.NB;
  float* const out_rows = a.scores + (static_cast<long long>(head) * a.T + t0 + 16 * warp) * NB;  // the warp's row 0
  const int warp_rows = min(16, rows_here - 16 * warp);  // real rows of this warp (may be <= 0)

  // Writes the staged maxima of tiles j8 .. j8 + n - 1 of the warp's 16 rows: lane pairs cover one
  // row's n contiguous floats.
  auto flush = [&](int j8, int n) {
    __syncwarp();
    for (int i = lane; i < 16 * n; i += 32) {
      const int r = i / n, col = i % n;
      if (r < warp_rows) out_rows[r * NB + j8 + col] = wstage[r * kFlush + col];
    }
    __syncwarp();
  };

  mbar_wait(bar_q, 0);
  for (int j = j_begin; j < j_end; ++j) {
    const int s = (j - j_begin) % kStages;
    float sc[64];  // S [64, 128]: sc[4 nt + e] = row r_lo + 8 (e >> 1), key 8 nt + 2 tq + (e & 1) of the tile
    mbar_wait(full(s), ((j - j_begin) / kStages) & 1);
    const std::uint32_t k_tile = sK + s * kKBytes;
    reg_fence(sc);
    wgmma_fence();
    wgmma_k128_ss(sc, q_tile, kQHalf, k_tile, kKHalf, false);
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(sc);
    mbar_arrive(empty(s));  // this thread's wgmma reads of the stage are complete

    const long long j0 = static_cast<long long>(j) * kBlk;
    if (j0 + kBlk - 1 > warp_pos0) {  // the tile's last key passes the warp's first row
#pragma unroll
      for (int i = 0; i < 64; ++i) {
        const long long key = j0 + 8 * (i >> 2) + 2 * tq + (i & 1);
        const long long pos = pos_lo + 8 * ((i >> 1) & 1);
        sc[i] = key > pos ? -INFINITY : sc[i];
      }
    }
    const int slot = j % kFlush;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) mx = max_nan(mx, max_nan(sc[4 * nt + 2 * hr], sc[4 * nt + 2 * hr + 1]));
      mx = max_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = max_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      if (tq == 0) wstage[(gid + 8 * hr) * kFlush + slot] = mx;
    }
    if (slot == kFlush - 1 || j == j_end - 1) flush(j - slot, slot + 1);
  }

  // Blocks no row of the tile reaches: -inf up to column NB - 1, a row's columns contiguous (split 0).
  const int rest = split == 0 ? static_cast<int>(NB - n_tiles) : 0;
  if (rest > 0)
    for (int i = lane; i < 16 * rest; i += 32) {
      const int r = i / rest, col = i % rest;
      if (r < warp_rows) out_rows[r * NB + n_tiles + col] = -INFINITY;
    }
#else
  // Built without sm_90a machine code: sm90_msa_index_available() is false and the launcher refuses.
  __trap();
#endif
}

}  // namespace

bool sm90_msa_index_available() { return sm90::available(); }

void sm90_msa_index(const bf16* idx_q, const bf16* idx_k, std::int64_t p0, int T, int N, int NB, const MsaDims& dims,
                    float* scores, cudaStream_t s) {
  const std::string op = "sm90_msa_index: ";
  if (dims.Di != kDi || dims.BLK != kBlk)
    throw GpuError(op + "Di = " + std::to_string(dims.Di) + ", BLK = " + std::to_string(dims.BLK) +
                   ", expected Di = 128 and BLK = 128 (the only shape this kernel is built for; use msa_index)");
  if (dims.Hi < 1) throw GpuError(op + "Hi = " + std::to_string(dims.Hi) + ", expected >= 1");
  if (T < 0 || N < 0 || p0 < 0 || p0 + T > N)
    throw GpuError(op + "p0 = " + std::to_string(p0) + ", T = " + std::to_string(T) + ", N = " + std::to_string(N) +
                   ", expected p0 >= 0, T >= 0 and p0 + T <= N (queries at positions p0..p0+T-1 of the cache)");
  const long long need_nb = (static_cast<long long>(N) + kBlk - 1) / kBlk;
  if (NB < need_nb)
    throw GpuError(op + "NB = " + std::to_string(NB) + ", expected >= ceil(N / BLK) = " + std::to_string(need_nb));
  if (T == 0) return;
  if (!idx_q || !idx_k || !scores) throw GpuError(op + "null pointer among idx_q, idx_k, scores, expected device pointers");
  if (!aligned16(idx_q) || !aligned16(idx_k)) throw GpuError(op + "idx_q and idx_k must be 16-byte aligned (TMA needs it)");
  if (!sm90_msa_index_available())
    throw GpuError(op + "needs a compute capability 9.0 GPU and an sm_90a build; use msa_index");

  Args a{scores, static_cast<long long>(p0), T, NB, dims.Hi, (T + kQ - 1) / kQ, (dims.Hi + kHeads - 1) / kHeads, 1};
  // Short chunks have too few query tiles for the SMs (T = 4096 at M3's heads: 64 CTAs on 132 SMs,
  // 354 TFLOP/s against 564 at T = 16384 on an H200): split the key blocks so that about two waves
  // run, each CTA keeping >= 32 blocks (so its pipeline fills and the flushes stay whole).
  {
    const long long ctas = static_cast<long long>(a.n_qtiles) * a.n_groups;
    const long long blocks_max = (p0 + T + kBlk - 1) / kBlk;
    int dev = 0, sms = 0;
    M3_CUDA_CHECK(cudaGetDevice(&dev));
    M3_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    const long long want = (2LL * sms + ctas - 1) / ctas;
    a.n_splits = static_cast<int>(std::max(1LL, std::min(want, blocks_max / 32)));
  }
  const long long blocks = static_cast<long long>(a.n_qtiles) * a.n_groups * a.n_splits;
  if (blocks > INT_MAX) throw GpuError(op + std::to_string(blocks) + " blocks, expected at most " + std::to_string(INT_MAX));
  const CUtensorMap tm_q = make_map(idx_q, T, static_cast<std::int64_t>(dims.Hi) * kDi, kQ, "sm90_msa_index", "idx_q");
  // K ends at the chunk's last position: rows past it may hold anything; TMA reads zeros there
  // (and the causal mask drops them anyway).
  const CUtensorMap tm_k = make_map(idx_k, p0 + T, kDi, kBlk, "sm90_msa_index", "idx_k");
  M3_CUDA_CHECK(cudaFuncSetAttribute(sm90_msa_index_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  sm90_msa_index_kernel<<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, s>>>(tm_q, tm_k, a);
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace m3::gpu
