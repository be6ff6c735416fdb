// linear through cublasGemmEx; see linear.h for the row-major mapping. No kernel of our own: this
// file is the one place that spells out the cuBLAS call, so every projection (and the peak GEMM
// benchmark) goes through the same algorithm choice.
#include "gpu/kernels/linear.h"

#include <string>

namespace m3::gpu {
namespace {

void gemm(cublasHandle_t h, const bf16* x, const bf16* w, void* y, cudaDataType_t y_type, int R, int in, int out,
          cudaStream_t s) {
  if (!h) throw GpuError("linear: null cuBLAS handle; expected one made by CublasHandle");
  if (R < 0 || in <= 0 || out <= 0)
    throw GpuError("linear: R = " + std::to_string(R) + ", in = " + std::to_string(in) + ", out = " +
                   std::to_string(out) + ", expected R >= 0, in > 0 and out > 0");
  if (R == 0) return;
  if (!x || !w || !y) throw GpuError("linear: a null device pointer (x, w or y); expected all three set");
  M3_CUBLAS_CHECK(cublasSetStream(h, s));
  // alpha and beta below live on the host; a caller may have left the handle in device mode.
  M3_CUBLAS_CHECK(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST));
  // fp32 scalars: CUBLAS_COMPUTE_32F takes alpha and beta in the compute type.
  const float alpha = 1.f, beta = 0.f;
  M3_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, /*m=*/out, /*n=*/R, /*k=*/in, &alpha,
                               /*A=*/w, CUDA_R_16BF, /*lda=*/in, /*B=*/x, CUDA_R_16BF, /*ldb=*/in, &beta,
                               /*C=*/y, y_type, /*ldc=*/out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

void linear(cublasHandle_t h, const bf16* x, const bf16* w, bf16* y, int R, int in, int out, cudaStream_t s) {
  gemm(h, x, w, y, CUDA_R_16BF, R, in, out, s);
}

void linear(cublasHandle_t h, const bf16* x, const bf16* w, float* y, int R, int in, int out, cudaStream_t s) {
  gemm(h, x, w, y, CUDA_R_32F, R, in, out, s);
}

}  // namespace m3::gpu
