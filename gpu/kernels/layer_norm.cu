// LayerNorm (+ fused residual and bias add) kernels; see layer_norm.h. One block per row; each
// thread keeps its slice of the row in registers between the two reductions and the write.
#include "gpu/kernels/layer_norm.h"
#include "gpu/kernels/rms_norm.h"  // detail::block_sum

#include <string>

namespace m3::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxPerThread = 64;  // C <= 256 * 64 = 16384 (the tower: Hv = 1280)

// kAdd: h += delta + bias first (bf16 store). kNorm: write y = LN(h).
template <bool kAdd, bool kNorm>
__global__ void __launch_bounds__(kThreads) layer_norm_kernel(bf16* h, const float* delta, const float* bias,
                                                              const float* w, const float* b, float eps, bf16* y,
                                                              int C) {
  const size_t row = blockIdx.x;
  bf16* hr = h + row * C;
  float v[kMaxPerThread];  // this thread's elements of the row: c = threadIdx.x + i * kThreads
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxPerThread; ++i) {
    const int c = threadIdx.x + i * kThreads;
    v[i] = 0.f;
    if (c < C) {
      float x = __bfloat162float(hr[c]);
      if constexpr (kAdd) {
        // The residual stream is bf16 (like the text model's): round the sum, normalize the rounded value.
        const bf16 r = __float2bfloat16_rn(x + delta[row * C + c] + (bias ? bias[c] : 0.f));
        hr[c] = r;
        x = __bfloat162float(r);
      }
      v[i] = x;
      sum += x;
    }
  }
  if constexpr (kNorm) {
    const float mean = detail::block_sum<kThreads>(sum) / C;
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxPerThread; ++i) {
      const int c = threadIdx.x + i * kThreads;
      if (c < C) ss += (v[i] - mean) * (v[i] - mean);
    }
    const float inv = rsqrtf(detail::block_sum<kThreads>(ss) / C + eps);
#pragma unroll
    for (int i = 0; i < kMaxPerThread; ++i) {
      const int c = threadIdx.x + i * kThreads;
      if (c < C) y[row * C + c] = __float2bfloat16_rn((v[i] - mean) * inv * w[c] + b[c]);
    }
  }
}

void check(const char* call, int R, int C) {
  if (R < 0 || C <= 0 || C > kThreads * kMaxPerThread)
    throw GpuError(std::string(call) + ": R = " + std::to_string(R) + ", C = " + std::to_string(C) +
                   ", expected R >= 0 and 0 < C <= " + std::to_string(kThreads * kMaxPerThread));
}

}  // namespace

void layer_norm(const bf16* x, const float* w, const float* b, double eps, bf16* y, int R, int C, cudaStream_t s) {
  check("layer_norm", R, C);
  if (R == 0) return;
  // h is read-only without kAdd; the cast only serves the shared kernel signature.
  layer_norm_kernel<false, true>
      <<<R, kThreads, 0, s>>>(const_cast<bf16*>(x), nullptr, nullptr, w, b, static_cast<float>(eps), y, C);
  M3_CUDA_CHECK_LAUNCH();
}

void add_layer_norm(bf16* h, const float* delta, const float* bias, const float* w, const float* b, double eps,
                    bf16* y, int R, int C, cudaStream_t s) {
  check("add_layer_norm", R, C);
  if (y != nullptr && y == h) throw GpuError("add_layer_norm: y aliases h, expected separate buffers");
  if (R == 0) return;
  if (y)
    layer_norm_kernel<true, true><<<R, kThreads, 0, s>>>(h, delta, bias, w, b, static_cast<float>(eps), y, C);
  else
    layer_norm_kernel<true, false><<<R, kThreads, 0, s>>>(h, delta, bias, nullptr, nullptr, 0.f, nullptr, C);
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace m3::gpu
