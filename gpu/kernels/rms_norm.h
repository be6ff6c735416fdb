// Gemma RMSNorm on the GPU, twin of m3::ref::rms_norm (reference/ops/rms_norm.h), optionally fused
// with the residual add that precedes every norm in the layer:
//   h += delta (bf16 store, fp32 add);   y = bf16( h * rsqrt(mean(h^2) + eps) * (1 + w) )
// bf16 storage, fp32 arithmetic; the mean of squares in fp32 over one row (C <= 16K: the fp32 sum
// of C squares is accurate to ~C * 6e-8, far inside bf16's 3.9e-3).
#pragma once

#include "gpu/runtime/buffer.h"

namespace m3::gpu {

// x [R, C], w [C] -> y [R, C] (y may alias x).
void rms_norm(const bf16* x, const bf16* w, double eps, bf16* y, int R, int C, cudaStream_t s);

// h [R, C] += delta [R, C] (h updated in place), then y = rms_norm(h).
void add_rms_norm(bf16* h, const bf16* delta, const bf16* w, double eps, bf16* y, int R, int C, cudaStream_t s);

#if defined(__CUDACC__)
namespace detail {
// Sum of v over a block of Threads threads (a multiple of 32, at most 1024), returned to every
// thread; the norm kernels' reduction (rms_norm.cu, layer_norm.cu). Its closing barrier lets a
// kernel call it again (LayerNorm's mean, then its variance).
template <int Threads>
__device__ __forceinline__ float block_sum(float v) {
  static_assert(Threads % 32 == 0 && Threads <= 1024, "whole warps, at most 32 of them");
  __shared__ float warp_sums[Threads / 32];
  __shared__ float total;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < Threads / 32 ? warp_sums[lane] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) total = v;
  __syncthreads();
  const float t = total;
  __syncthreads();  // the next call may overwrite warp_sums / total only after everyone read them
  return t;
}
}  // namespace detail
#endif

}  // namespace m3::gpu
