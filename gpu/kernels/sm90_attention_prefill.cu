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

#include <cuda.h>          // CUtensorMap and its enums (types only: the driver call goes through the runtime)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <climits>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>

namespace m3::gpu {
namespace {

constexpr int kD = 128;          // head dim (M3: 128)
constexpr int kBlockM = 128;     // query rows a CTA: two consumer warpgroups of 64
constexpr int kBlockN = 128;     // keys a K/V tile
constexpr int kStages = 2;       // K/V ring depth
constexpr int kThreads = 384;    // producer + 2 consumer warpgroups
constexpr int kBoxCols = 64;     // a TMA box row: 64 bf16 = 128 bytes, the swizzle span
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
__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarriers and TMA ----
__device__ __forceinline__ void mbar_init(std::uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(std::uint32_t bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(std::uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Spins until the phase of the given parity has completed.
__device__ __forceinline__ void mbar_wait(std::uint32_t bar, std::uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "LAB_WAIT:\n"  // a label inside braces is local to them: each inlined copy has its own
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra LAB_WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// One 2D box (64 columns x rows) of a tensor map into shared memory at dst; completes on bar.
__device__ __forceinline__ void tma_load(std::uint32_t dst, const CUtensorMap* map, int col, int row,
                                         std::uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(col), "r"(row), "r"(bar)
      : "memory");
}

// ---- wgmma ----
// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
// offsets (all in 16-byte units), layout type 1 in bits 62-63; base offset 0 (1024-aligned atoms).
__device__ __forceinline__ std::uint64_t desc_sw128(std::uint32_t addr, std::uint32_t lbo, std::uint32_t sbo) {
  return static_cast<std::uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<std::uint64_t>(lbo >> 4) << 16) |
         (static_cast<std::uint64_t>(sbo >> 4) << 32) | (std::uint64_t{1} << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most kPending of this warpgroup's committed wgmma groups are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across wgmma issue / wait
// (the wgmma writes them asynchronously, which the asm operands alone do not express).
// Used before wgmma.fence (so every write of those registers precedes it, as PTX requires) and
// after wgmma.wait_group.
__device__ __forceinline__ void reg_fence(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int kN>
__device__ __forceinline__ void reg_fence(std::uint32_t (&r)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[i][e])::"memory");
}

#define M3_F8(i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define M3_F64 M3_F8(0), M3_F8(8), M3_F8(16), M3_F8(24), M3_F8(32), M3_F8(40), M3_F8(48), M3_F8(56)
#define M3_D64                                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "  \
  "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "  \
  "%62, %63}"

// d [64x128 fp32] (+)= A [64x16 bf16, K-major smem] * B [16x128 bf16, K-major smem]; accumulate
// into d when acc != 0, else overwrite it.
__device__ __forceinline__ void wgmma_ss(float (&d)[64], std::uint64_t da, std::uint64_t db, int acc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " M3_D64 ", %64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : M3_F64
      : "l"(da), "l"(db), "r"(acc));
}
// d [64x128 fp32] += A [64x16 bf16, registers] * B [16x128 bf16, MN-major smem (transpose bit)].
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const std::uint32_t (&a)[4], std::uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " M3_D64 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n"
      "}\n"
      : M3_F64
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(1));
}
#undef M3_D64
#undef M3_F64
#undef M3_F8

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
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
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
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      const std::uint32_t qoff = (ks / 4) * kQHalf + (ks % 4) * 32;
      const std::uint32_t koff = (ks / 4) * kKVHalf + (ks % 4) * 32;
      wgmma_ss(sc, desc_sw128(q_rows + qoff, 16, 1024), desc_sw128(k_tile + koff, 16, 1024), 1);
    }
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
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // async-proxy reads, then generic writes
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

// Writes 1 when this build's code for the device has the sm_90a features (wgmma, setmaxnreg).
__global__ void probe_kernel(int* flag) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *flag = 1;
#else
  *flag = 0;
#endif
}

bool probe_device() {
  int major = 0, minor = 0, dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0) return false;  // sm_90a code runs on compute capability 9.0 only
  int* d = nullptr;
  int flag = 0;
  bool ok = cudaMalloc(&d, sizeof(int)) == cudaSuccess;
  if (ok) {
    probe_kernel<<<1, 1>>>(d);
    ok = cudaGetLastError() == cudaSuccess && cudaMemcpy(&flag, d, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
  }
  if (d) cudaFree(d);
  cudaGetLastError();  // a failed probe (no image for this device) must not poison later calls
  return ok && flag == 1;
}

// cuTensorMapEncodeTiled through the runtime's driver entry point (the library links cudart only).
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    M3_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
    if (q != cudaDriverEntryPointSuccess || p == nullptr)
      throw GpuError("sm90_attention_prefill: the driver has no cuTensorMapEncodeTiled (needs CUDA 12+)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// Row-major bf16 [rows, cols] in global memory, read as boxes of [box_rows, 64] with the 128-byte
// swizzle; reads outside the matrix return zeros.
CUtensorMap make_map(const bf16* p, int rows, int cols, int box_rows, const char* name) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * sizeof(bf16)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBoxCols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<bf16*>(p), dims, strides,
                                    box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw GpuError(std::string("sm90_attention_prefill: cuTensorMapEncodeTiled failed for ") + name + " (error " +
                   std::to_string(static_cast<int>(r)) + ", " + std::to_string(rows) + " x " + std::to_string(cols) +
                   ")");
  return map;
}

std::string dims_note(const AttnDims& d) {
  return "Hq = " + std::to_string(d.Hq) + ", Hkv = " + std::to_string(d.Hkv) + ", D = " + std::to_string(d.D);
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace

bool sm90_attention_prefill_available() {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static bool result[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    cudaGetLastError();
    return false;
  }
  std::call_once(once[dev], [dev] { result[dev] = probe_device(); });
  return result[dev];
}

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
  const CUtensorMap tm_q = make_map(q, T, dims.Hq * kD, kBlockM, "q");
  // K and V end at the chunk's last position, not at N: rows past it may hold anything (NaN
  // included), and 0 * NaN in P V would leak into the output; TMA reads zeros past the end instead.
  const int kv_rows = static_cast<int>(p0) + T;
  const CUtensorMap tm_k = make_map(k, kv_rows, dims.Hkv * kD, kBlockN, "k");
  const CUtensorMap tm_v = make_map(v, kv_rows, dims.Hkv * kD, kBlockN, "v");
  // More than 48 KB of dynamic shared memory needs the opt-in (per device, so set at every call).
  M3_CUDA_CHECK(cudaFuncSetAttribute(sm90_prefill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  sm90_prefill_kernel<<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, s>>>(tm_q, tm_k, tm_v, a);
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace m3::gpu
