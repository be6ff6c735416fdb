// Dense causal GQA prefill attention on Hopper wgmma + TMA; see sm90_attention_prefill.h.
//
// Work split: one CTA per (query tile of 128 rows, query head), 3 warpgroups of 128 threads:
//   warpgroup 0, the producer: thread 0 loads the Q tile once, then K and V tiles of 128 keys
//     (key 0 up to the last key a real row of the tile sees) into 2 stages each, by TMA; keys
//     past the chunk (>= p0 + T) and query rows past T read as zeros (outside the tensor maps);
//   warpgroups 1 and 2, the consumers: rows 0-63 and 64-127 of the tile. Per key tile j:
//     S [64, 128] = Q K^T       8 x wgmma m64n128k16, A = Q and B = K from shared memory
//     causal mask on diagonal tiles, online softmax in fp32 (base 2), P = bf16(exp2(...))
//     O [64, 128] += P V        8 x wgmma m64n128k16, A = P from registers, B = V (MN-major)
//   software-pipelined: S of tile j and P V of tile j-1 are issued together, the softmax of tile
//   j runs while P V of tile j-1 is on the tensor cores, then O is rescaled by tile j's factor;
//   at the end O / rowsum, rounded to bf16 once, staged through the warpgroup's own Q rows.
//
// Shared-memory tiles (Q [128, 128], each K or V stage [128, 128], bf16) are stored as two column
// halves of 64 (one TMA box each: the 128-byte swizzle allows boxes at most 128 bytes wide). In a
// half, row r sits at byte r * 128 and its 16-byte chunk c at chunk c ^ (r & 7): TMA's 128-byte
// swizzle, which depends on the address bits alone, hence every half starts 1024-byte aligned. The
// wgmma descriptors read that same layout as the canonical 128-byte-swizzled one:
//   Q, K (K-major: the contraction dim D is contiguous): 8-row groups 1024 bytes apart (SBO); the
//     k-step of 16 dims is the start address + 32 bytes inside a half (the hardware applies the
//     XOR to the final address bits, so the offset start lands on the swizzled chunk), + one half
//     for steps 4-7;
//   V (MN-major for O += P V: the output dim D is contiguous, the contraction over keys is not):
//     8-key groups 1024 bytes apart (SBO), the two 64-dim halves one half apart (LBO); the k-step
//     of 16 keys is the start address + 16 * 128 bytes.
//
// Synchronization: mbarriers. full_k[s] / full_v[s] (1 arrival: the producer's expect_tx, then the
// TMA's byte count) say a stage is loaded; empty_k[s] / empty_v[s] (256 arrivals: every consumer
// thread after its wgmma.wait_group) say it may be overwritten. Parities follow the usual ring:
// tile j uses stage j % 2 at phase (j / 2) & 1; the producer waits the empties at the opposite
// parity, which a fresh barrier reports as completed, so the first two tiles load at once.
#include "gpu/kernels/sm90_attention_prefill.h"

#include "gpu/kernels/sm90_util.cuh"

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

namespace m3::gpu {
namespace {

using namespace sm90;

constexpr int kD = 128;          // head dim (M3: 128)
constexpr int kBlockM = 128;     // query rows a CTA: two consumer warpgroups of 64
constexpr int kBlockN = 128;     // keys a K/V tile
constexpr int kStages = 2;       // K/V ring depth
constexpr int kThreads = 384;    // producer + 2 consumer warpgroups
constexpr int kRowBytes = 128;   // bytes of one row of a column half
constexpr std::uint32_t kQHalf = kBlockM * kRowBytes;    // 16 KB: one column half of Q
constexpr std::uint32_t kKVHalf = kBlockN * kRowBytes;   // 16 KB: one column half of a K/V stage
constexpr std::uint32_t kQBytes = 2 * kQHalf;            // 32 KB
constexpr std::uint32_t kKVBytes = 2 * kKVHalf;          // 32 KB a stage
constexpr std::uint32_t kBarBytes = 8 * (1 + 4 * kStages);
// + 1024: the dynamic shared window is aligned up to 1024 bytes in the kernel (swizzle atoms).
constexpr int kSmemBytes = 1024 + static_cast<int>(kQBytes + 2 * kStages * kKVBytes + kBarBytes);
constexpr int kProducerRegs = 40;   // thread 0 issues TMA; the rest idle
constexpr int kConsumerRegs = 232;  // 128 * 40 + 256 * 232 = 64512 <= 65536 registers an SM
constexpr int kConsumerThreads = 256;
static_assert(kD == 2 * kBoxCols, "a row is two 128-byte column halves");

struct Args {
  bf16* out;  // [T, Hq*D]
  int p0, T, Hq, G;
  int n_qtiles;      // ceil(T / kBlockM)
  float scale_log2;  // log2(e) / sqrt(D): softmax in base 2 on raw q.k
};

#if defined(__CUDA_ARCH__)

// Two floats -> one register of two bf16 (lo = the lower column), round to nearest even.
__device__ __forceinline__ std::uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&h);
}
#endif  // __CUDA_ARCH__

__global__ void __launch_bounds__(kThreads, 1)
    sm90_prefill_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                        const __grid_constant__ CUtensorMap tm_v, const Args a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  const std::uint32_t raw = smem_addr(smem_raw);
  const std::uint32_t base = (raw + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
  unsigned char* const gbase = smem_raw + (base - raw);  // generic pointer to the same byte
  const std::uint32_t sQ = base;                               // [2 halves][128 rows][128 B]
  const std::uint32_t sK = sQ + kQBytes;                       // [kStages][2 halves][128 rows][128 B]
  const std::uint32_t sV = sK + kStages * kKVBytes;            // same
  const std::uint32_t bar_q = sV + kStages * kKVBytes;         // then full_k, full_v, empty_k, empty_v
  auto full_k = [&](int s) { return bar_q + 8u * (1 + s); };
  auto full_v = [&](int s) { return bar_q + 8u * (1 + kStages + s); };
  auto empty_k = [&](int s) { return bar_q + 8u * (1 + 2 * kStages + s); };
  auto empty_v = [&](int s) { return bar_q + 8u * (1 + 3 * kStages + s); };

  const int head = static_cast<int>(blockIdx.x % a.Hq);
  const int qtile = a.n_qtiles - 1 - static_cast<int>(blockIdx.x / a.Hq);  // longest rows first
  const int t0 = qtile * kBlockM;
  const int rows_here = min(kBlockM, a.T - t0);        // real (non-padding) rows of this tile
  const int pos0 = a.p0 + t0;                          // position of the tile's first query
  const int n_tiles = (pos0 + rows_here - 1) / kBlockN + 1;  // up to the last key a real row sees
  const int wg = static_cast<int>(threadIdx.x) / 128;

  if (threadIdx.x == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_k(s), 1);
      mbar_init(full_v(s), 1);
      mbar_init(empty_k(s), kConsumerThreads);
      mbar_init(empty_v(s), kConsumerThreads);
    }
    // Make the initialized barriers visible to the other threads and to the TMA unit (async proxy).
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    fence_async_shared();
  }
  __syncthreads();

  if (wg == 0) {
    // Producer. Keys past p0 + T and query rows past T lie outside the tensor maps: TMA writes zeros
    // there (and still counts the whole box's bytes), so no NaN of stale shared memory reaches a
    // product even where the mask zeroes the weight.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    if (threadIdx.x == 0) {
      const int kv_col = (head / a.G) * kD;
      mbar_expect_tx(bar_q, kQBytes);
      tma_load(sQ, &tm_q, head * kD, t0, bar_q);
      tma_load(sQ + kQHalf, &tm_q, head * kD + kBoxCols, t0, bar_q);
      for (int j = 0; j < n_tiles; ++j) {
        const int s = j % kStages;
        const std::uint32_t parity = ((j / kStages) & 1) ^ 1;
        const std::uint32_t k_dst = sK + s * kKVBytes, v_dst = sV + s * kKVBytes;
        mbar_wait(empty_k(s), parity);
        mbar_expect_tx(full_k(s), kKVBytes);
        tma_load(k_dst, &tm_k, kv_col, j * kBlockN, full_k(s));
        tma_load(k_dst + kKVHalf, &tm_k, kv_col + kBoxCols, j * kBlockN, full_k(s));
        mbar_wait(empty_v(s), parity);
        mbar_expect_tx(full_v(s), kKVBytes);
        tma_load(v_dst, &tm_v, kv_col, j * kBlockN, full_v(s));
        tma_load(v_dst + kKVHalf, &tm_v, kv_col + kBoxCols, j * kBlockN, full_v(s));
      }
    }
    return;  // the consumers wait on every tile's full barrier, so the CTA outlives the copies
  }

  // ---- consumers ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
  const int cw = wg - 1;                         // rows 64 cw .. 64 cw + 63 of the tile
  const int ctid = static_cast<int>(threadIdx.x) - 128 * wg;
  const int lane = ctid & 31, warp = ctid >> 5;  // warp of the warpgroup: 16 rows each
  const int gid = lane >> 2, tq = lane & 3;      // accumulator fragment: rows gid, gid + 8; cols 2 tq, 2 tq + 1
  const int r0 = 64 * cw + 16 * warp + gid;      // this thread's first row in the tile (second: r0 + 8)
  const int pos_r0 = pos0 + r0;
  const int wg_pos0 = pos0 + 64 * cw;            // position of the warpgroup's first row

  float o[64];  // O [64, 128] accumulator: o[4 nt + e] = row r0 + 8 (e >> 1), col 8 nt + 2 tq + (e & 1)
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of the two rows (base-2 scaled scores)
  float l[2] = {0.f, 0.f};              // this thread's part of the two row sums

  const std::uint32_t q_rows = sQ + 64 * cw * kRowBytes;  // the warpgroup's 64 rows, half 0

  // Issues S = Q K^T for the K tile in stage s: 8 k-steps of 16 dims, 0-3 in column half 0, 4-7 in
  // half 1. Commits one wgmma group; the caller waits.
  auto issue_qk = [&](float (&sc)[64], int s) {
#pragma unroll
    for (int i = 0; i < 64; ++i) sc[i] = 0.f;
    const std::uint32_t k_tile = sK + s * kKVBytes;
    reg_fence(sc);
    wgmma_fence();
    wgmma_k128_ss(sc, q_rows, kQHalf, k_tile, kKVHalf, true);
    wgmma_commit();
  };
  // Issues O += P V for the V tile in stage s: 8 k-steps of 16 keys; V is [keys, D] with D
  // contiguous (MN-major B): LBO = the distance between the two 64-dim halves, SBO = between
  // 8-key groups. Commits one wgmma group; o and pf must stay untouched until it is waited for,
  // and their last writes must be fenced (reg_fence) before the caller's first wgmma.fence.
  auto issue_pv = [&](std::uint32_t (&pf)[kBlockN / 16][4], int s) {
    const std::uint32_t v_tile = sV + s * kKVBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
      wgmma_rs(o, pf[kk], desc_sw128(v_tile + kk * 16 * kRowBytes, kKVHalf, 1024));
    wgmma_commit();
  };
  // Causal mask and online softmax of key tile j: S -> P (fp32, in place); updates m and l, and
  // returns in corr the factor by which O must be rescaled before P V of this tile is added.
  auto softmax = [&](float (&sc)[64], int j, float (&corr)[2]) {
    const int j0 = j * kBlockN;
    if (j0 + kBlockN - 1 > wg_pos0) {  // only where the tile's last key passes the warpgroup's first row
#pragma unroll
      for (int i = 0; i < 64; ++i) {
        const int key = j0 + 8 * (i >> 2) + 2 * tq + (i & 1);
        const int pos = pos_r0 + 8 * ((i >> 1) & 1);
        if (key > pos) sc[i] = -INFINITY;
      }
    }
    // Per row (hr = 0: row r0, hr = 1: row r0 + 8); a row's 128 scores are spread over the 4
    // threads of a quad, so the max takes two shuffles.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) mx = fmaxf(mx, fmaxf(sc[4 * nt + 2 * hr], sc[4 * nt + 2 * hr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[hr], mx * a.scale_log2);
      // A row with no visible key yet keeps m = -inf; subtract 0 then so that exp2 gives 0, not NaN.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      corr[hr] = ex2(m[hr] - m_use);
      m[hr] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 16; ++nt)
#pragma unroll
        for (int e = 2 * hr; e < 2 * hr + 2; ++e) {
          const float p = ex2(fmaf(sc[4 * nt + e], a.scale_log2, -m_use));
          sc[4 * nt + e] = p;
          sum += p;
        }
      l[hr] = l[hr] * corr[hr] + sum;
    }
  };
  // P in bf16 as the A fragments of P V: the accumulator columns 16 kk .. 16 kk + 15 are exactly
  // k-step kk's A fragment (rows gid / gid + 8, cols 2 tq, 2 tq + 1 and 8 more). Called only with
  // no wgmma in flight: ptxas serializes every wgmma whose A registers are written while a
  // wgmma group is pending (warning C7513).
  auto to_bf16 = [&](const float (&sc)[64], std::uint32_t (&pf)[kBlockN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      pf[kk][0] = pack_bf16(sc[8 * kk + 0], sc[8 * kk + 1]);
      pf[kk][1] = pack_bf16(sc[8 * kk + 2], sc[8 * kk + 3]);
      pf[kk][2] = pack_bf16(sc[8 * kk + 4], sc[8 * kk + 5]);
      pf[kk][3] = pack_bf16(sc[8 * kk + 6], sc[8 * kk + 7]);
    }
  };

  // Software pipeline (FA3's intra-warpgroup overlap): while the tensor cores run P V of tile j-1,
  // the warpgroup computes the softmax of tile j, whose S = Q K^T was issued just before. O is
  // rescaled by tile j's correction only after P V of tile j-1 has landed in it.
  mbar_wait(bar_q, 0);
  std::uint32_t pf[kBlockN / 16][4];  // P of the previous tile, bf16: the A operand of its P V
  {
    float sc[64], corr[2];
    mbar_wait(full_k(0), 0);
    issue_qk(sc, 0);
    wgmma_wait<0>();
    reg_fence(sc);
    mbar_arrive(empty_k(0));  // this thread's wgmma reads of K are complete
    softmax(sc, 0, corr);  // corr: O is still 0
    to_bf16(sc, pf);
  }
  for (int j = 1; j < n_tiles; ++j) {
    const int s = j % kStages, sp = (j - 1) % kStages;
    float sc[64], corr[2];
    mbar_wait(full_k(s), (j / kStages) & 1);
    reg_fence(o);  // every write of o and pf precedes both wgmma.fences below
    reg_fence(pf);
    issue_qk(sc, s);
    mbar_wait(full_v(sp), ((j - 1) / kStages) & 1);
    issue_pv(pf, sp);
    wgmma_wait<1>();  // groups complete in order: S of tile j is in, P V of tile j-1 may still run
    reg_fence(sc);
    mbar_arrive(empty_k(s));
    softmax(sc, j, corr);
    wgmma_wait<0>();
    reg_fence(o);
    mbar_arrive(empty_v(sp));
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
      o[4 * nt + 0] *= corr[0];
      o[4 * nt + 1] *= corr[0];
      o[4 * nt + 2] *= corr[1];
      o[4 * nt + 3] *= corr[1];
    }
    to_bf16(sc, pf);
  }
  {
    const int s = (n_tiles - 1) % kStages;
    mbar_wait(full_v(s), ((n_tiles - 1) / kStages) & 1);
    reg_fence(o);
    reg_fence(pf);
    issue_pv(pf, s);
    wgmma_wait<0>();
    reg_fence(o);
    mbar_arrive(empty_v(s));
  }

  // Epilogue: O / l in fp32, one bf16 rounding, written into this warpgroup's own 64 rows of the Q
  // tile (only its own wgmma read them, and they completed), in the same swizzled layout, so that
  // the global stores below are 16 bytes wide and coalesced.
  fence_async_shared();  // async-proxy reads, then generic writes
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float lsum = l[hr];
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;  // lsum >= 1 on every row (its max key: p = 1)
    const int r = r0 + 8 * hr;
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
      const std::uint32_t at = (nt / 8) * kQHalf + r * kRowBytes + (((nt % 8) ^ (r & 7)) << 4) + 4 * tq;
      *reinterpret_cast<std::uint32_t*>(gbase + at) = pack_bf16(o[4 * nt + 2 * hr] * inv, o[4 * nt + 2 * hr + 1] * inv);
    }
  }
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + cw) : "memory");  // the warpgroup's 4 warps only

  const std::size_t q_stride = static_cast<std::size_t>(a.Hq) * kD;
  bf16* og = a.out + static_cast<std::size_t>(t0) * q_stride + static_cast<std::size_t>(head) * kD;
#pragma unroll
  for (int i = 0; i < 64 * (kD / 8) / 128; ++i) {
    const int c = ctid + 128 * i, r = 64 * cw + c / 16, ch = c % 16;
    if (r < rows_here) {
      const std::uint32_t at = (ch / 8) * kQHalf + r * kRowBytes + (((ch % 8) ^ (r & 7)) << 4);
      *reinterpret_cast<uint4*>(og + r * q_stride + ch * 8) = *reinterpret_cast<const uint4*>(gbase + at);
    }
  }
#else
  // Built without sm_90a machine code (wgmma needs it): sm90_attention_prefill_available() is
  // false there and the launcher refuses, so this body never runs.
  __trap();
#endif
}

std::string dims_note(const AttnDims& d) {
  return "Hq = " + std::to_string(d.Hq) + ", Hkv = " + std::to_string(d.Hkv) + ", D = " + std::to_string(d.D);
}

}  // namespace

bool sm90_attention_prefill_available() { return sm90::available(); }

void sm90_attention_prefill(const bf16* q, const bf16* k, const bf16* v, std::int64_t p0, int T, int N,
                            const AttnDims& dims, bf16* out, cudaStream_t s, CachePages pages) {
  const std::string op = "sm90_attention_prefill: ";
  if (pages.table != nullptr) throw GpuError(op + "paged caches: use attention_dense_prefill");
  if (dims.Hq <= 0 || dims.Hkv <= 0 || dims.Hq % dims.Hkv != 0)
    throw GpuError(op + dims_note(dims) + ", expected Hq, Hkv > 0 and Hq % Hkv == 0");
  if (dims.D != kD)
    throw GpuError(op + "D = " + std::to_string(dims.D) + ", expected D = " + std::to_string(kD) +
                   " (the only head dim this kernel is built for)");
  if (T < 0 || N < 0 || p0 < 0 || p0 + T > N)
    throw GpuError(op + "p0 = " + std::to_string(p0) + ", T = " + std::to_string(T) + ", N = " + std::to_string(N) +
                   ", expected p0 >= 0, T >= 0 and p0 + T <= N (queries at positions p0..p0+T-1 of the cache)");
  if (T == 0) return;
  if (!q || !k || !v || !out) throw GpuError(op + "null pointer among q, k, v, out, expected device pointers");
  if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(out))
    throw GpuError(op + "q, k, v and out must be 16-byte aligned (TMA and the 16-byte stores need it)");
  if (!sm90_attention_prefill_available())
    throw GpuError(op + "needs a compute capability 9.0 GPU and an sm_90a build; use attention_dense_prefill");

  Args a{out, static_cast<int>(p0), T, dims.Hq, dims.Hq / dims.Hkv, (T + kBlockM - 1) / kBlockM,
         static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(kD)))};
  const long long blocks = static_cast<long long>(a.n_qtiles) * a.Hq;
  if (blocks > INT_MAX)
    throw GpuError(op + std::to_string(blocks) + " blocks (T = " + std::to_string(T) + ", Hq = " +
                   std::to_string(dims.Hq) + "), expected at most " + std::to_string(INT_MAX));
  const CUtensorMap tm_q = make_map(q, T, dims.Hq * kD, kBlockM, "sm90_attention_prefill", "q");
  // K and V end at the chunk's last position, not at N: rows past it may hold anything (NaN
  // included), and 0 * NaN in P V would leak into the output; TMA reads zeros past the end instead.
  const int kv_rows = static_cast<int>(p0) + T;
  const CUtensorMap tm_k = make_map(k, kv_rows, dims.Hkv * kD, kBlockN, "sm90_attention_prefill", "k");
  const CUtensorMap tm_v = make_map(v, kv_rows, dims.Hkv * kD, kBlockN, "sm90_attention_prefill", "v");
  // More than 48 KB of dynamic shared memory needs the opt-in (per device, so set at every call).
  M3_CUDA_CHECK(cudaFuncSetAttribute(sm90_prefill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  sm90_prefill_kernel<<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, s>>>(tm_q, tm_k, tm_v, a);
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace m3::gpu
