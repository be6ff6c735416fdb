// linear on the GPU through cuBLAS, twin of m3::ref::linear (reference/ops/linear.h):
//   y [R, out] = x [R, in] W^T,   W [out, in] (checkpoint layout, row-major)
// bf16 inputs, fp32 accumulation (cublasGemmEx, CUBLAS_COMPUTE_32F: tensor cores, no TF32 or
// reduced-precision reductions), output bf16 (one rounding) or fp32 (logits, router).
//
// Row-major trick: a row-major [R, out] y is the column-major [out, R] matrix y^T = W x^T, and
// row-major W [out, in] / x [R, in] are column-major [in, out] / [in, R]; so the call is the
// column-major GEMM  C[m=out, n=R] = op_T(A = W, lda = in) * op_N(B = x, ldb = in),  ldc = out.
// No copies, any alignment (cuBLAS picks slower kernels for rows that are not 16-byte aligned).
//
// The handle's stream is set to `s` (cublasSetStream) on every call.
#pragma once

#include "gpu/runtime/buffer.h"

namespace m3::gpu {

// x [R, in], w [out, in] -> y [R, out] in bf16. R = 0 is a no-op. y must not overlap x or w.
void linear(cublasHandle_t h, const bf16* x, const bf16* w, bf16* y, int R, int in, int out, cudaStream_t s);

// Same product, y [R, out] in fp32 (no output rounding): the LM head's logits.
void linear(cublasHandle_t h, const bf16* x, const bf16* w, float* y, int R, int in, int out, cudaStream_t s);

}  // namespace m3::gpu
