// Bias + 3-D RoPE over the fused qkv rows; see vision_rope3d.h. One block per patch row, a thread
// per output element: each rotated element reads its pair partner, so no element is written before
// both of its inputs are read (input and output are separate buffers).
#include "gpu/kernels/vision_rope3d.h"

#include <cmath>
#include <string>

namespace m3::gpu {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) vision_rope3d_kernel(const float* qkv, const float* bias,
                                                                 const std::int32_t* pos, int heads, int hd, int rd,
                                                                 float log2_theta, bf16* y) {
  const int Hv = heads * hd, W = 3 * Hv, half = 3 * rd / 2, per_axis = rd / 2;
  const size_t row = blockIdx.x;
  const float* x = qkv + row * W;
  for (int c = threadIdx.x; c < W; c += kThreads) {
    float v = x[c] + (bias ? bias[c] : 0.f);
    const int d = c % hd;
    if (c < 2 * Hv && d < 2 * half) {
      const int i = d < half ? d : d - half;  // the pair (i, i + half) of this head
      const int partner = c + (d < half ? half : -half);
      const float u = x[partner] + (bias ? bias[partner] : 0.f);
      const int axis = i / per_axis, j = i % per_axis;
      const float inv_freq = exp2f(-2.f * j / rd * log2_theta);  // theta^(-2j/rd)
      float sn, cs;
      sincosf(static_cast<float>(pos[3 * row + axis]) * inv_freq, &sn, &cs);
      // d < half: x1 = v, x2 = u -> x1 cos - x2 sin;  d >= half: x2 = v, x1 = u -> x2 cos + x1 sin.
      v = d < half ? v * cs - u * sn : v * cs + u * sn;
    }
    y[row * W + c] = __float2bfloat16_rn(v);
  }
}

}  // namespace

void vision_rope3d(const float* qkv, const float* bias, const std::int32_t* pos, const VisionRopeDims& dm, bf16* y,
                   int P, cudaStream_t s) {
  if (P < 0 || dm.heads <= 0 || dm.head_dim <= 0 || dm.rope_dims < 0 || dm.rope_dims % 2 != 0 ||
      3 * dm.rope_dims > dm.head_dim || !(dm.theta > 0))
    throw GpuError("vision_rope3d: P = " + std::to_string(P) + ", heads = " + std::to_string(dm.heads) +
                   ", head_dim = " + std::to_string(dm.head_dim) + ", rope_dims = " + std::to_string(dm.rope_dims) +
                   ": expected P >= 0, heads, head_dim > 0, rope_dims even with 3 * rope_dims <= head_dim, theta > 0");
  if (P == 0) return;
  vision_rope3d_kernel<<<P, kThreads, 0, s>>>(qkv, bias, pos, dm.heads, dm.head_dim, dm.rope_dims,
                                              static_cast<float>(std::log2(dm.theta)), y);
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace m3::gpu
