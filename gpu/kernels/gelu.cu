// Bias + GELU(erf) and bias-add epilogues; see gelu.h. Elementwise, grid-stride over R*C.
#include "gpu/kernels/gelu.h"

#include <algorithm>
#include <string>

namespace m3::gpu {
namespace {

constexpr int kThreads = 256;

template <bool kGelu>
__global__ void __launch_bounds__(kThreads) bias_act_kernel(const float* x, const float* b, bf16* y, size_t n, int C) {
  for (size_t i = blockIdx.x * size_t{kThreads} + threadIdx.x; i < n; i += size_t{gridDim.x} * kThreads) {
    float v = x[i] + (b ? b[i % C] : 0.f);
    if constexpr (kGelu) v = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));  // 1/sqrt(2)
    y[i] = __float2bfloat16_rn(v);
  }
}

template <bool kGelu>
void launch(const char* call, const float* x, const float* b, bf16* y, int R, int C, cudaStream_t s) {
  if (R < 0 || C <= 0)
    throw GpuError(std::string(call) + ": R = " + std::to_string(R) + ", C = " + std::to_string(C) +
                   ", expected R >= 0 and C > 0");
  const size_t n = static_cast<size_t>(R) * C;
  if (n == 0) return;
  // Enough blocks to fill any current GPU several times over; the loop covers the rest.
  const int blocks = static_cast<int>(std::min<size_t>((n + kThreads - 1) / kThreads, 65536));
  bias_act_kernel<kGelu><<<blocks, kThreads, 0, s>>>(x, b, y, n, C);
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace

void bias_gelu(const float* x, const float* b, bf16* y, int R, int C, cudaStream_t s) {
  launch<true>("bias_gelu", x, b, y, R, C, s);
}

void bias_add(const float* x, const float* b, bf16* y, int R, int C, cudaStream_t s) {
  launch<false>("bias_add", x, b, y, R, C, s);
}

}  // namespace m3::gpu
