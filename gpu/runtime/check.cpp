// Check-macro support (check.h).
#include "gpu/runtime/check.h"

namespace m3::gpu {

int& check_rank() {
  thread_local int rank = -1;  // gpu/parallel's Team runs one thread a rank and sets each thread's
  return rank;
}

void throw_gpu_error(const char* lib, const char* call, const std::string& what, const char* file, int line) {
  int dev = -1;
  cudaGetDevice(&dev);
  std::string msg = std::string(lib) + " call " + call + " failed: " + what + " at " + file + ":" +
                    std::to_string(line) + " (device " + std::to_string(dev);
  if (check_rank() >= 0) msg += ", rank " + std::to_string(check_rank());
  msg += ")";
  throw GpuError(msg);
}

const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "unknown cuBLAS status";
}

}  // namespace m3::gpu
