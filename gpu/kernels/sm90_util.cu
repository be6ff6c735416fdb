// Host side of sm90_util.cuh: the sm_90a probe and tensor-map encoding.
#include "gpu/kernels/sm90_util.cuh"

#include <mutex>
#include <string>

namespace m3::gpu::sm90 {
namespace {

// Writes 1 when this build's code for the device has the sm_90a features (wgmma, setmaxnreg).
__global__ void probe_kernel(int* flag) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *flag = 1;
#else
  *flag = 0;
#endif
}

bool probe_device() {
  int major = 0, minor = 0, dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0) return false;  // sm_90a code runs on compute capability 9.0 only
  int* d = nullptr;
  int flag = 0;
  bool ok = cudaMalloc(&d, sizeof(int)) == cudaSuccess;
  if (ok) {
    probe_kernel<<<1, 1>>>(d);
    ok = cudaGetLastError() == cudaSuccess && cudaMemcpy(&flag, d, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
  }
  if (d) cudaFree(d);
  cudaGetLastError();  // a failed probe (no image for this device) must not poison later calls
  return ok && flag == 1;
}

// cuTensorMapEncodeTiled through the runtime's driver entry point (the library links cudart only).
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    M3_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q));
    if (q != cudaDriverEntryPointSuccess || p == nullptr)
      throw GpuError("the driver has no cuTensorMapEncodeTiled (the sm90 kernels need CUDA 12+)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

}  // namespace

bool available() {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static bool result[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    cudaGetLastError();
    return false;
  }
  std::call_once(once[dev], [dev] { result[dev] = probe_device(); });
  return result[dev];
}

CUtensorMap make_map(const bf16* p, std::int64_t rows, std::int64_t cols, int box_rows, const char* op,
                     const char* name) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * sizeof(bf16)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBoxCols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<bf16*>(p), dims, strides,
                                    box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw GpuError(std::string(op) + ": cuTensorMapEncodeTiled failed for " + name + " (error " +
                   std::to_string(static_cast<int>(r)) + ", " + std::to_string(rows) + " x " + std::to_string(cols) +
                   ")");
  return map;
}


}  // namespace m3::gpu::sm90
