// MoE router kernels; see moe_router.h.
//  logits_kernel: C [T, E] = X [T, H] W [E, H]^T in fp32. Block tile 64 tokens x 64 experts x 16 h,
//    256 threads, 4x4 outputs per thread; both operands are h-contiguous, so each k-tile is loaded
//    with each thread reading 4 consecutive h of one row (coalesced), stored transposed into
//    shared memory ([k][m], [k][n]) so the inner loop reads float4 rows; the next k-tile is
//    prefetched into registers while the current one is multiplied. Partial tiles (T, E, H not
//    multiples of the tile) load zeros and skip the stores.
//  topk_kernel: one warp per token (4 per block); the warp's biased keys [E] live in shared memory.
#include "gpu/kernels/moe_router.h"

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

namespace m3::gpu {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16;  // tokens, experts, h per block tile
constexpr int kGemmThreads = 256;            // 16 x 16 threads, 4 x 4 outputs each
constexpr int kTopkWarps = 4;
constexpr int kMaxE = 1024;  // 32 experts per lane in a 32-bit taken-mask

__global__ void __launch_bounds__(kGemmThreads) logits_kernel(const bf16* __restrict__ x, const float* __restrict__ w,
                                                              float* __restrict__ logits, int T, int H, int E) {
  __shared__ __align__(16) float As[kBK][kBM];  // [k][token]
  __shared__ __align__(16) float Bs[kBK][kBN];  // [k][expert]
  const int tid = threadIdx.x;
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.x) * kBM;
  const int n0 = blockIdx.y * kBN;
  // Loader mapping: row lr of the tile, 4 consecutive h starting at lk.
  const int lr = tid / 4, lk = (tid % 4) * 4;
  const bool a_row_ok = m0 + lr < T, b_row_ok = n0 + lr < E;
  const bf16* a_src = x + (a_row_ok ? (m0 + lr) * H : 0);
  const float* b_src = w + (b_row_ok ? static_cast<std::int64_t>(n0 + lr) * H : 0);
  float a_reg[4], b_reg[4];
  auto load = [&](int k0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = k0 + lk + j;
      a_reg[j] = a_row_ok && k < H ? __bfloat162float(a_src[k]) : 0.f;
      b_reg[j] = b_row_ok && k < H ? b_src[k] : 0.f;
    }
  };
  auto store = [&] {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      As[lk + j][lr] = a_reg[j];
      Bs[lk + j][lr] = b_reg[j];
    }
  };

  const int ty = tid / 16, tx = tid % 16;  // outputs: tokens ty*4.., experts tx*4..
  float acc[4][4] = {};
  load(0);
  for (int k0 = 0; k0 < H; k0 += kBK) {
    store();
    __syncthreads();
    if (k0 + kBK < H) load(k0 + kBK);  // in flight during the products below
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();  // the tile is consumed before the next store overwrites it
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const std::int64_t m = m0 + ty * 4 + i;
    if (m >= T) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx * 4 + j;
      if (n < E) logits[m * E + n] = acc[i][j];
    }
  }
}

// The reference's sigmoid: fp64, rounded to fp32. 1/(1+exp(-z)) is 0 (not NaN) when exp overflows.
__device__ __forceinline__ float sigmoid_f64(float z) {
  return static_cast<float>(1.0 / (1.0 + exp(-static_cast<double>(z))));
}

// (key, id) a ranks before (key, id) b: key descending, then id ascending.
__device__ __forceinline__ bool before(float ka, int ia, float kb, int ib) {
  return ka > kb || (ka == kb && ia < ib);
}

__global__ void __launch_bounds__(kTopkWarps * 32) topk_kernel(const float* __restrict__ logits,
                                                               const float* __restrict__ bias, int top_k,
                                                               bool renormalize, std::int32_t* __restrict__ experts,
                                                               float* __restrict__ weights, int T, int E) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* keys = reinterpret_cast<float*>(smem_raw) + warp * E;                                  // [E]
  int* chosen = reinterpret_cast<int*>(reinterpret_cast<float*>(smem_raw) + kTopkWarps * E) + warp * top_k;  // [K_e]
  const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * kTopkWarps + warp;
  if (t >= T) return;  // whole warps only: no block-wide barrier follows
  const float* z = logits + t * E;
  for (int e = lane; e < E; e += 32) {
    const float c = sigmoid_f64(z[e]) + bias[e];
    keys[e] = isnan(c) ? -INFINITY : c;  // NaN ranks last, like -inf (the reference's rule)
  }
  __syncwarp();

  unsigned taken = 0;  // bit j: expert lane + 32 j already chosen
  double sum = 0.0;    // sum of the chosen unbiased scores, in the reference's order
  for (int k = 0; k < top_k; ++k) {
    float bk = -INFINITY;
    int bi = INT_MAX;  // loses to every real expert, even one at -inf
    for (int e = lane, j = 0; e < E; e += 32, ++j)
      if (!((taken >> j) & 1u) && before(keys[e], e, bk, bi)) {
        bk = keys[e];
        bi = e;
      }
    for (int o = 16; o > 0; o >>= 1) {
      const float ok = __shfl_xor_sync(0xffffffffu, bk, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (before(ok, oi, bk, bi)) {
        bk = ok;
        bi = oi;
      }
    }
    // top_k <= E leaves an untaken expert every round, so bi is a real id here.
    if (bi % 32 == lane) taken |= 1u << (bi / 32);
    if (lane == 0) chosen[k] = bi;
    sum += static_cast<double>(sigmoid_f64(z[bi]));
  }
  __syncwarp();
  for (int k = lane; k < top_k; k += 32) {
    const int e = chosen[k];
    const double sv = static_cast<double>(sigmoid_f64(z[e]));
    experts[t * top_k + k] = e;
    weights[t * top_k + k] = static_cast<float>(renormalize ? sv / sum : sv);
  }
}

}  // namespace

void moe_router(const bf16* x, const float* w_gate, const float* bias, int top_k, bool renormalize, float* logits,
                std::int32_t* experts, float* weights, int T, int H, int E, cudaStream_t s) {
  const std::string dims = "T = " + std::to_string(T) + ", H = " + std::to_string(H) + ", E = " + std::to_string(E) +
                           ", top_k = " + std::to_string(top_k);
  if (T < 0 || H <= 0 || E <= 0 || E > kMaxE)
    throw GpuError("moe_router: " + dims + "; expected T >= 0, H > 0 and 0 < E <= " + std::to_string(kMaxE));
  if (top_k < 1 || top_k > E) throw GpuError("moe_router: " + dims + "; expected 1 <= top_k <= E");
  if (T == 0) return;
  if (!x || !w_gate || !bias || !logits || !experts || !weights)
    throw GpuError("moe_router: a null device pointer; expected x, w_gate, bias, logits, experts and weights set");
  const dim3 grid((T + kBM - 1) / kBM, (E + kBN - 1) / kBN);  // E <= 1024: grid.y <= 16
  logits_kernel<<<grid, kGemmThreads, 0, s>>>(x, w_gate, logits, T, H, E);
  M3_CUDA_CHECK_LAUNCH();
  // keys [warps][E] fp32 + chosen [warps][K_e] int32: at most 4 * 2 * 1024 * 4 = 32 KB.
  const std::size_t smem = static_cast<std::size_t>(kTopkWarps) * (E + top_k) * 4;
  topk_kernel<<<(T + kTopkWarps - 1) / kTopkWarps, kTopkWarps * 32, smem, s>>>(logits, bias, top_k, renormalize,
                                                                            experts, weights, T, E);
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace m3::gpu
