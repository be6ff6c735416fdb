// SwiGLU-OAI kernel; see swiglu_oai.h. Elementwise and memory-bound: one thread per group of 8
// outputs (16-byte loads of gate and up, one 16-byte store) when I is a multiple of 8 and every
// base is 16-byte aligned, else one thread per output. Both layouts (separate gate/up, fused
// [gate | up] rows) are the same kernel with a row stride ld for gate and up.
#include "gpu/kernels/swiglu_oai.h"

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

namespace m3::gpu {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float swiglu1(float g, float u, const SwigluParams& p) {
  // Comparisons, not fminf/fmaxf: a NaN input must stay NaN (the reference's rule).
  if (g > p.limit) g = p.limit;  // the gate is clamped from above only
  if (u > p.limit) u = p.limit;
  if (u < -p.limit) u = -p.limit;
  // g * sigmoid(alpha g) as g / (1 + exp(-alpha g)): for a very negative g, exp overflows to +inf
  // and the quotient is -0, where (u + beta) * g first could overflow to -inf and give inf/inf.
  return (u + p.beta) * (g / (1.f + expf(-p.alpha * g)));
}

// kWidth outputs per thread (8: 16-byte vectors; 1: scalars). Row r of gate / up starts at
// r * ld; act is dense [R, I].
template <int kWidth>
__global__ void __launch_bounds__(kThreads) swiglu_kernel(const bf16* __restrict__ gate, const bf16* __restrict__ up,
                                                          std::int64_t ld, SwigluParams p, bf16* act, int I,
                                                          std::int64_t n_groups) {
  const std::int64_t idx = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= n_groups) return;
  const int per_row = I / kWidth;
  const std::int64_t r = idx / per_row;
  const int c = static_cast<int>(idx - r * per_row) * kWidth;
  const bf16* g = gate + r * ld + c;
  const bf16* u = up + r * ld + c;
  bf16* a = act + r * I + c;
  if constexpr (kWidth == 8) {
    const uint4 gv = *reinterpret_cast<const uint4*>(g);
    const uint4 uv = *reinterpret_cast<const uint4*>(u);
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&gv);
    const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&uv);
    uint4 av;
    __nv_bfloat162* a2 = reinterpret_cast<__nv_bfloat162*>(&av);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 gf = __bfloat1622float2(g2[k]), uf = __bfloat1622float2(u2[k]);
      a2[k] = __floats2bfloat162_rn(swiglu1(gf.x, uf.x, p), swiglu1(gf.y, uf.y, p));
    }
    *reinterpret_cast<uint4*>(a) = av;
  } else {
    *a = __float2bfloat16_rn(swiglu1(__bfloat162float(*g), __bfloat162float(*u), p));
  }
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

void run(const bf16* gate, const bf16* up, std::int64_t ld, const SwigluParams& p, bf16* act, int R, int I,
         const char* op, cudaStream_t s) {
  if (R < 0 || I <= 0)
    throw GpuError(std::string(op) + ": R = " + std::to_string(R) + ", I = " + std::to_string(I) +
                   ", expected R >= 0 and I > 0");
  // A negative (or NaN) limit would make the clamp of `up` an empty interval (the reference's check).
  if (!(p.limit >= 0.f))
    throw GpuError(std::string(op) + ": limit is " + std::to_string(p.limit) + ", expected >= 0");
  if (R == 0) return;
  if (!gate || !up || !act) throw GpuError(std::string(op) + ": a null device pointer; expected inputs and act set");
  const bool vec = I % 8 == 0 && aligned16(gate) && aligned16(up) && aligned16(act);
  const int width = vec ? 8 : 1;
  const std::int64_t n_groups = static_cast<std::int64_t>(R) * (I / width);
  const std::int64_t blocks = (n_groups + kThreads - 1) / kThreads;
  if (blocks > INT_MAX)
    throw GpuError(std::string(op) + ": R*I = " + std::to_string(static_cast<std::int64_t>(R) * I) +
                   " needs more than 2^31 - 1 blocks");
  if (vec) swiglu_kernel<8><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(gate, up, ld, p, act, I, n_groups);
  else swiglu_kernel<1><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(gate, up, ld, p, act, I, n_groups);
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace

void swiglu_oai(const bf16* gate, const bf16* up, const SwigluParams& p, bf16* act, int R, int I, cudaStream_t s) {
  run(gate, up, I, p, act, R, I, "swiglu_oai", s);
}

void swiglu_oai(const bf16* gate_up, const SwigluParams& p, bf16* act, int R, int I, cudaStream_t s) {
  if (gate_up && act && R > 0 && I > 0) {
    const auto* lo = reinterpret_cast<const char*>(gate_up);
    const auto* hi = lo + static_cast<std::size_t>(R) * 2 * I * sizeof(bf16);
    const auto* a = reinterpret_cast<const char*>(act);
    if (a < hi && a + static_cast<std::size_t>(R) * I * sizeof(bf16) > lo)
      throw GpuError("swiglu_oai (fused): act overlaps gate_up; expected a separate [R, I] buffer");
  }
  run(gate_up, gate_up ? gate_up + I : nullptr, 2 * static_cast<std::int64_t>(I), p, act, R, I, "swiglu_oai (fused)",
      s);
}

}  // namespace m3::gpu
