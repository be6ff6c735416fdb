// QK-norm + partial NeoX RoPE kernel; see qk_norm_rope.h. One block per token:
//  1. the block stages the token's row (n_heads*d bf16) in shared memory (16-byte vectors when
//     every row is 16-byte aligned), w [d] as fp32, and cos/sin [R/2] formed in fp64 from the
//     host's fp64 inv_freq;
//  2. each warp normalizes whole heads: a lane holds channels lane + 32j in registers, the sum of
//     squares is a warp shuffle reduction; the rotation partner (channel c +- R/2, usually another
//     lane's) is re-read from the staged bf16 row and normalized the same way; after __syncwarp the
//     warp overwrites its head in shared memory with the bf16 result;
//  3. the block writes the row to y and/or the cache row of its slot.
// Memory-bound: one read and one or two writes of each element.
#include "gpu/kernels/qk_norm_rope.h"

#include <cmath>
#include <cstdint>
#include <string>

namespace m3::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxD = 512;
constexpr int kMaxHalf = kMaxD / 2;

struct Params {
  const bf16* x;
  std::int64_t ldx;
  const bf16* w;
  const std::int64_t* positions;
  bf16* y;
  std::int64_t ldy;
  bf16* cache;
  std::int64_t cache_ld;
  const std::int64_t* slots;
  std::int64_t n_slots;
  int n_heads, d, half;
  float eps;
  double inv_freq[kMaxHalf];  // theta^(-2i/R), host fp64: [R/2]
};

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Copies n bf16 from src to dst (global <-> shared), by 16-byte vectors when kVec.
template <bool kVec>
__device__ void copy_row(bf16* dst, const bf16* src, int n) {
  if constexpr (kVec) {
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (int i = threadIdx.x; i < n / 8; i += kThreads) d4[i] = s4[i];
  } else {
    for (int i = threadIdx.x; i < n; i += kThreads) dst[i] = src[i];
  }
}

// kPerLane: channels per lane, d <= 32 * kPerLane.
template <int kPerLane, bool kVec>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* row = reinterpret_cast<bf16*>(smem_raw);  // [n_heads*d] this token's row, in then out
  __shared__ float ws[kMaxD];                      // [d] 1 + w
  __shared__ float cs[kMaxHalf], sn[kMaxHalf];     // [R/2] cos a, sin a

  const std::int64_t t = blockIdx.x;
  const int d = p.d, half = p.half, C = p.n_heads * d;
  if (half > 0) {
    const double pos = static_cast<double>(p.positions[t]);  // exact: positions are far below 2^53
    for (int i = threadIdx.x; i < half; i += kThreads) {
      double sv, cv;
      sincos(pos * p.inv_freq[i], &sv, &cv);
      cs[i] = static_cast<float>(cv);
      sn[i] = static_cast<float>(sv);
    }
  }
  for (int c = threadIdx.x; c < d; c += kThreads) ws[c] = 1.f + __bfloat162float(p.w[c]);
  copy_row<kVec>(row, p.x + t * p.ldx, C);
  __syncthreads();

  const int lane = threadIdx.x % 32, R = 2 * half;
  for (int h = threadIdx.x / 32; h < p.n_heads; h += kWarps) {
    bf16* head = row + h * d;  // [d]
    float v[kPerLane];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int c = lane + 32 * j;
      v[j] = c < d ? __bfloat162float(head[c]) : 0.f;
      ss += v[j] * v[j];
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float inv = rsqrtf(ss / d + p.eps);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int c = lane + 32 * j;
      float out = v[j] * inv * ws[c < d ? c : 0];
      if (c < R) {
        const bool lo = c < half;
        const int i = lo ? c : c - half;    // frequency index
        const int pc = lo ? c + half : i;   // rotation partner channel
        const float pv = __bfloat162float(head[pc]) * inv * ws[pc];
        out = lo ? out * cs[i] - pv * sn[i] : out * cs[i] + pv * sn[i];
      }
      v[j] = out;
    }
    __syncwarp();  // every lane has read its partners before any lane overwrites the head
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int c = lane + 32 * j;
      if (c < d) head[c] = __float2bfloat16_rn(v[j]);
    }
  }
  __syncthreads();

  if (p.y) copy_row<kVec>(p.y + t * p.ldy, row, C);
  if (p.cache) {
    const std::int64_t slot = p.slots[t];
    if (slot >= 0 && slot < p.n_slots) copy_row<kVec>(p.cache + slot * p.cache_ld, row, C);
  }
}

std::string dims(int n_heads, int d, int R, int T) {
  return "n_heads = " + std::to_string(n_heads) + ", d = " + std::to_string(d) + ", R = " + std::to_string(R) +
         ", T = " + std::to_string(T);
}

template <int kPerLane, bool kVec>
void launch(const Params& p, int T, std::size_t smem, cudaStream_t s) {
  auto kernel = qk_norm_rope_kernel<kPerLane, kVec>;
  // Above the 48 KB default the dynamic limit must be raised (static smem: ~4 KB of the 48).
  if (smem > 40 * 1024) M3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                           static_cast<int>(smem)));
  kernel<<<T, kThreads, smem, s>>>(p);
  M3_CUDA_CHECK_LAUNCH();
}

void run(const bf16* x, std::int64_t ldx, int n_heads, int d, const bf16* w, double eps, int R, double theta,
         const std::int64_t* positions, bf16* y, std::int64_t ldy, int T, bf16* cache, std::int64_t cache_ld,
         const std::int64_t* slots, std::int64_t n_slots, const char* op, cudaStream_t s) {
  const std::string where = std::string(op) + ": " + dims(n_heads, d, R, T);
  if (n_heads <= 0 || d <= 0 || d > kMaxD || T < 0)
    throw GpuError(where + "; expected n_heads > 0, 0 < d <= " + std::to_string(kMaxD) + " and T >= 0");
  if (R < 0 || R > d || R % 2 != 0) throw GpuError(where + "; expected an even R with 0 <= R <= d");
  if (R > 0 && !(theta > 0.0 && std::isfinite(theta)))
    throw GpuError(where + "; theta = " + std::to_string(theta) + ", expected a finite value > 0");
  if (!(eps >= 0.0) || !std::isfinite(eps))
    throw GpuError(where + "; eps = " + std::to_string(eps) + ", expected a finite value >= 0");
  const std::int64_t C = static_cast<std::int64_t>(n_heads) * d;
  if (ldx < C || (y && ldy < C) || (cache && cache_ld < C) || n_slots < 0)
    throw GpuError(where + "; ldx = " + std::to_string(ldx) + ", ldy = " + std::to_string(ldy) + ", cache_ld = " +
                   std::to_string(cache_ld) + ", n_slots = " + std::to_string(n_slots) +
                   ", expected strides >= n_heads*d = " + std::to_string(C) + " and n_slots >= 0");
  if (T == 0) return;
  if (!x || !w || (R > 0 && !positions) || (!y && !cache) || (cache && !slots))
    throw GpuError(where + "; a null device pointer: expected x, w, positions (when R > 0), y or cache, and "
                           "slots with the cache");
  // In place is safe row for row (a block stages its whole row before writing it); with another
  // stride, block t would overwrite rows that other blocks have not read yet.
  if (y && y == x && ldy != ldx)
    throw GpuError(where + "; y aliases x with ldy = " + std::to_string(ldy) + ", expected ldy == ldx = " +
                   std::to_string(ldx));
  int dev = 0, max_smem = 0;
  M3_CUDA_CHECK(cudaGetDevice(&dev));
  M3_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const std::size_t smem = static_cast<std::size_t>(C) * sizeof(bf16);
  constexpr std::size_t kStatic = (kMaxD + 2 * kMaxHalf) * sizeof(float);
  if (smem + kStatic > static_cast<std::size_t>(max_smem))
    throw GpuError(where + "; a token's row of n_heads*d = " + std::to_string(C) + " bf16 needs " +
                   std::to_string(smem + kStatic) + " bytes of shared memory, the device allows " +
                   std::to_string(max_smem));

  Params p{};
  p.x = x;
  p.ldx = ldx;
  p.w = w;
  p.positions = positions;
  p.y = y;
  p.ldy = ldy;
  p.cache = cache;
  p.cache_ld = cache_ld;
  p.slots = slots;
  p.n_slots = n_slots;
  p.n_heads = n_heads;
  p.d = d;
  p.half = R / 2;
  p.eps = static_cast<float>(eps);
  // The reference's own expression, so both sides rotate by the same fp64 frequencies.
  for (int i = 0; i < R / 2; ++i) p.inv_freq[i] = std::pow(theta, -2.0 * i / R);

  const bool vec = C % 8 == 0 && ldx % 8 == 0 && aligned16(x) && (!y || (ldy % 8 == 0 && aligned16(y))) &&
                   (!cache || (cache_ld % 8 == 0 && aligned16(cache)));
  if (d <= 128) {
    if (vec) launch<4, true>(p, T, smem, s);
    else launch<4, false>(p, T, smem, s);
  } else {
    if (vec) launch<16, true>(p, T, smem, s);
    else launch<16, false>(p, T, smem, s);
  }
}

}  // namespace

void qk_norm_rope(const bf16* x, int n_heads, int d, const bf16* w, double eps, int R, double theta,
                  const std::int64_t* positions, bf16* y, int T, cudaStream_t s) {
  const std::int64_t C = static_cast<std::int64_t>(n_heads) * d;
  if (!y && T > 0) throw GpuError("qk_norm_rope: y is null; expected a device pointer to [T, n_heads*d]");
  run(x, C, n_heads, d, w, eps, R, theta, positions, y, C, T, nullptr, 0, nullptr, 0, "qk_norm_rope", s);
}

void qk_norm_rope_to_cache(const bf16* x, std::int64_t ldx, int n_heads, int d, const bf16* w, double eps, int R,
                           double theta, const std::int64_t* positions, bf16* y, std::int64_t ldy, int T,
                           bf16* cache, std::int64_t cache_ld, const std::int64_t* slots, std::int64_t n_slots,
                           cudaStream_t s) {
  run(x, ldx, n_heads, d, w, eps, R, theta, positions, y, ldy, T, cache, cache_ld, slots, n_slots,
      "qk_norm_rope_to_cache", s);
}

}  // namespace m3::gpu
