// Non-causal flash attention for the vision tower; see vision_attention.h.
// Fragment layouts of mma.sync m16n8k16 (g = lane / 4, t = lane % 4; "pair" = 2 bf16 in one u32):
//   A 16x16 (row): a0 = (g, 2t), a1 = (g+8, 2t), a2 = (g, 2t+8), a3 = (g+8, 2t+8)     (pairs along k)
//   B 16x8 (col):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C 16x8 fp32:   c0, c1 = (g, 2t), (g, 2t+1);  c2, c3 = (g+8, 2t), (g+8, 2t+1)
// S = Q K^T: B[k = d][n = key] is K's row `key`: ldmatrix (no transpose) from K rows in smem.
// O = P V: the C layout of two adjacent n8 score tiles is the A layout of one k16 step (P never
// leaves registers); B[k = key][n = d] is V transposed: ldmatrix .trans loads it from V rows.
// Shared rows are padded by 8 bf16 (16 bytes): the 8 rows a fragment load touches then start in
// different banks for every D % 16 == 0 (row stride (D+8)/2 words, and ldmatrix rows of 16 bytes).
#include "gpu/kernels/vision_attention.h"

#include <cmath>
#include <cstdint>
#include <string>

namespace m3::gpu {
namespace {

constexpr int kWarps = 4;
constexpr int kBM = 16 * kWarps;  // queries a CTA: 16 a warp (one MMA row tile)
constexpr int kBN = 64;           // keys a tile
constexpr int kThreads = 32 * kWarps;

__device__ __forceinline__ void mma_bf16(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                         std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ std::uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);  // lo in the low half: the lower column
  return *reinterpret_cast<const std::uint32_t*>(&p);
}

__device__ __forceinline__ std::uint32_t ld_u32(const bf16* p) { return *reinterpret_cast<const std::uint32_t*>(p); }

__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 bf16 matrices from shared memory, lane l giving the address of row l % 8 of matrix l / 8.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const bf16* row) {
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// Rows [row0, row0 + 64) of x (stride ld, head columns already offset) -> sm [64][D+8] with
// cp.async (16 bytes a copy, bypassing L1), committed as one group; rows >= P are zero-filled
// (src-size 0: nothing read), never garbage: a zero weight times a NaN would still be NaN.
template <int D>
__device__ __forceinline__ void load_tile_async(bf16 (*sm)[D + 8], const bf16* x, int ld, int row0, int P) {
  constexpr int kChunks = D / 8;  // 16-byte chunks a row
  for (int i = threadIdx.x; i < kBN * kChunks; i += kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool in = row0 + r < P;
    const bf16* src = x + static_cast<size_t>(in ? row0 + r : 0) * ld + c;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(&sm[r][c])), "l"(src),
                 "r"(in ? 16 : 0));
  }
  asm volatile("cp.async.commit_group;\n" ::);
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");  // no smem read moves above it
}

template <int D>
__global__ void __launch_bounds__(kThreads) vision_attention_kernel(const bf16* q, const bf16* k, const bf16* v,
                                                                    int ld, int P, float scale_log2, bf16* out) {
  static_assert(D % 16 == 0 && D <= 128, "D a multiple of 16, at most 128");
  __shared__ __align__(16) bf16 ks[kBN][D + 8];  // [keys, D] (first holds the CTA's Q tile)
  __shared__ __align__(16) bf16 vs[kBN][D + 8];  // [keys, D]
  const int h = blockIdx.y, q0 = blockIdx.x * kBM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int Hv_out = gridDim.y * D;
  q += h * D, k += h * D, v += h * D;

  // Q fragments stay in registers for the whole key loop: qf[kk] covers dims [16kk, 16kk + 16).
  static_assert(kBM == kBN, "the Q tile borrows the K buffer");
  load_tile_async<D>(ks, q, ld, q0, P);
  cp_async_wait<0>();
  __syncthreads();
  std::uint32_t qf[D / 16][4];
  const int r0 = warp * 16 + g;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    qf[kk][0] = ld_u32(&ks[r0][kk * 16 + 2 * t]);
    qf[kk][1] = ld_u32(&ks[r0 + 8][kk * 16 + 2 * t]);
    qf[kk][2] = ld_u32(&ks[r0][kk * 16 + 2 * t + 8]);
    qf[kk][3] = ld_u32(&ks[r0 + 8][kk * 16 + 2 * t + 8]);
  }

  float o[D / 8][4] = {};                     // [16 rows, D] of this warp, C layout per n8 tile
  float m[2] = {-INFINITY, -INFINITY};        // running max (log2 units) of rows g and g+8
  float l[2] = {0.f, 0.f};                    // this thread's share of the running sums
  // Loads overlap the MMAs: V(n) streams in during S = Q K(n)^T, K(n+1) during O += P V(n); one K
  // and one V buffer suffice (the shared memory of the synchronous version).
  __syncthreads();  // every warp holds its Q fragments: ks is free
  load_tile_async<D>(ks, k, ld, 0, P);
  for (int kv0 = 0; kv0 < P; kv0 += kBN) {
    cp_async_wait<0>();
    __syncthreads();  // K(n) visible to all; every warp is done with V(n-1)
    load_tile_async<D>(vs, v, ld, kv0, P);

    float s[kBN / 8][4] = {};  // scores [16 rows, 64 keys]
    // K rows 8nt..8nt+15 (two n8 tiles), dims 16kk..16kk+15: four matrices (keys +0/+8) x (dims +0/+8).
#pragma unroll
    for (int nt = 0; nt < kBN / 8; nt += 2)
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        std::uint32_t b[4];
        ldmatrix_x4<false>(b, &ks[nt * 8 + (lane % 8) + (lane / 16) * 8][kk * 16 + ((lane / 8) % 2) * 8]);
        mma_bf16(s[nt], qf[kk], b[0], b[1]);
        mma_bf16(s[nt + 1], qf[kk], b[2], b[3]);
      }
    __syncthreads();  // every warp is done with K(n)
    if (kv0 + kBN < P) {
      load_tile_async<D>(ks, k, ld, kv0 + kBN, P);
      cp_async_wait<1>();  // V(n) landed; K(n+1) may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // V(n) visible to all

    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool valid = kv0 + nt * 8 + 2 * t + (e & 1) < P;
        s[nt][e] = valid ? s[nt][e] * scale_log2 : -INFINITY;
        mx[e / 2] = fmaxf(mx[e / 2], s[nt][e]);
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the 4 threads of a quad share rows g and g+8
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    }
    // Every tile has at least one valid key, so mx is finite; on the first tile m = -inf and
    // alpha = exp2(-inf) = 0 clears nothing (o and l are zero).
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      alpha[r] = exp2f(m[r] - mx[r]);
      m[r] = mx[r];
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nt][e] *= alpha[e / 2];

#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      std::uint32_t pa[4];  // P [16 rows, keys 16kk..16kk+15] as an A fragment
      float p[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          p[j][e] = exp2f(s[2 * kk + j][e] - m[e / 2]);  // masked keys: exp2(-inf) = 0
          l[e / 2] += p[j][e];
        }
      pa[0] = pack_bf16(p[0][0], p[0][1]);
      pa[1] = pack_bf16(p[0][2], p[0][3]);
      pa[2] = pack_bf16(p[1][0], p[1][1]);
      pa[3] = pack_bf16(p[1][2], p[1][3]);
      // V rows 16kk..16kk+15, dims 16dn..16dn+15 as two B fragments: matrices (rows +0/+8) x (dims +0/+8).
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        std::uint32_t b[4];
        ldmatrix_x4<true>(b, &vs[kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8][dn * 16 + (lane / 16) * 8]);
        mma_bf16(o[2 * dn], pa, b[0], b[1]);
        mma_bf16(o[2 * dn + 1], pa, b[2], b[3]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + r0 + 8 * r;
    if (row >= P) continue;
    const float inv = 1.f / l[r];
    bf16* dst = out + static_cast<size_t>(row) * Hv_out + h * D;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
      *reinterpret_cast<__nv_bfloat162*>(dst + nt * 8 + 2 * t) =
          __floats2bfloat162_rn(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
  }
}

template <int D>
void launch(const bf16* q, const bf16* k, const bf16* v, int ld, int P, int heads, bf16* out, cudaStream_t s) {
  const dim3 grid((P + kBM - 1) / kBM, heads);
  // softmax(z / sqrt(D)) = 2^(z * log2(e) / sqrt(D) - max) / sum: one multiply folds both factors.
  const float scale_log2 = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(D)));
  vision_attention_kernel<D><<<grid, kThreads, 0, s>>>(q, k, v, ld, P, scale_log2, out);
  M3_CUDA_CHECK_LAUNCH();
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace

void vision_attention(const bf16* q, const bf16* k, const bf16* v, int ld, int P, int heads, int D, bf16* out,
                      cudaStream_t s) {
  const std::string args = "P = " + std::to_string(P) + ", heads = " + std::to_string(heads) +
                           ", D = " + std::to_string(D) + ", ld = " + std::to_string(ld);
  if (P < 0 || heads <= 0 || D < 16 || D > 128 || D % 16 != 0)
    throw GpuError("vision_attention: " + args + ": expected P >= 0, heads > 0 and D a multiple of 16 in [16, 128]");
  if (ld % 8 != 0 || ld < heads * D)
    throw GpuError("vision_attention: " + args + ": expected ld a multiple of 8 (16-byte rows) and >= heads * D");
  if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(out))
    throw GpuError("vision_attention: q, k, v and out must be 16-byte aligned");
  if (P == 0) return;
  switch (D) {
    case 16: return launch<16>(q, k, v, ld, P, heads, out, s);
    case 32: return launch<32>(q, k, v, ld, P, heads, out, s);
    case 48: return launch<48>(q, k, v, ld, P, heads, out, s);
    case 64: return launch<64>(q, k, v, ld, P, heads, out, s);
    case 80: return launch<80>(q, k, v, ld, P, heads, out, s);
    case 96: return launch<96>(q, k, v, ld, P, heads, out, s);
    case 112: return launch<112>(q, k, v, ld, P, heads, out, s);
    case 128: return launch<128>(q, k, v, ld, P, heads, out, s);
  }
}

}  // namespace m3::gpu
