// LM head: the final Gemma RMSNorm (gpu/kernels/rms_norm) into a bf16 scratch, then the
// fp32-output cuBLAS projection (gpu/kernels/linear). No kernel of its own.
#include "gpu/kernels/lm_head.h"

#include "gpu/kernels/linear.h"
#include "gpu/kernels/rms_norm.h"

#include <string>

namespace m3::gpu {

void lm_head(cublasHandle_t handle, const bf16* h, const bf16* norm_w, double eps, const bf16* w, float* logits,
             bf16* scratch, int T, int H, int V, cudaStream_t s) {
  if (T < 0 || H <= 0 || V <= 0)
    throw GpuError("lm_head: T = " + std::to_string(T) + ", H = " + std::to_string(H) + ", V = " + std::to_string(V) +
                   ", expected T >= 0, H > 0 and V > 0");
  if (T == 0) return;
  if (!h || !norm_w || !w || !logits || !scratch)
    throw GpuError("lm_head: a null device pointer; expected h, norm_w, w, logits and scratch set");
  rms_norm(h, norm_w, eps, scratch, T, H, s);  // [T, H] bf16
  linear(handle, scratch, w, logits, T, H, V, s);  // [T, V] fp32
}

}  // namespace m3::gpu
