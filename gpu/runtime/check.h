// Check macros for CUDA, cuBLAS and (later) NCCL calls: a failing call throws m3::gpu::GpuError
// naming the call, file:line, the device and (on multi-GPU runs) the rank. Usable from .cu and
// .cpp files alike (no fmt: nvcc 13 rejects fmt 9's consteval format strings).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace m3::gpu {

struct GpuError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The rank printed by the check macros, per thread; -1 (outside a rank) prints none. Set by
// gpu/parallel's Team in each rank's thread.
int& check_rank();

[[noreturn]] void throw_gpu_error(const char* lib, const char* call, const std::string& what, const char* file,
                                  int line);

const char* cublas_status_name(cublasStatus_t s);

}  // namespace m3::gpu

#define M3_CUDA_CHECK(call)                                                                   \
  do {                                                                                        \
    cudaError_t m3_err_ = (call);                                                             \
    if (m3_err_ != cudaSuccess)                                                               \
      ::m3::gpu::throw_gpu_error("CUDA", #call, cudaGetErrorString(m3_err_), __FILE__, __LINE__); \
  } while (0)

#define M3_CUBLAS_CHECK(call)                                                                      \
  do {                                                                                             \
    cublasStatus_t m3_st_ = (call);                                                                \
    if (m3_st_ != CUBLAS_STATUS_SUCCESS)                                                           \
      ::m3::gpu::throw_gpu_error("cuBLAS", #call, ::m3::gpu::cublas_status_name(m3_st_), __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: launch-configuration errors surface here, not at the next sync.
#define M3_CUDA_CHECK_LAUNCH() M3_CUDA_CHECK(cudaGetLastError())
