// Device discovery (device.h).
#include "gpu/runtime/device.h"

#include "gpu/runtime/check.h"

#include <cstdio>

namespace m3::gpu {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later calls start clean
    return 0;
  }
  return n;
}

DeviceInfo device_info(int device) {
  cudaDeviceProp p{};
  M3_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  DeviceInfo d;
  d.name = p.name;
  d.sm_count = p.multiProcessorCount;
  d.cc_major = p.major;
  d.cc_minor = p.minor;
  d.l2_bytes = static_cast<std::size_t>(p.l2CacheSize);
  int cur = 0;
  M3_CUDA_CHECK(cudaGetDevice(&cur));
  M3_CUDA_CHECK(cudaSetDevice(device));
  M3_CUDA_CHECK(cudaMemGetInfo(&d.free_bytes, &d.total_bytes));
  M3_CUDA_CHECK(cudaSetDevice(cur));
  M3_CUDA_CHECK(cudaDriverGetVersion(&d.driver_version));
  M3_CUDA_CHECK(cudaRuntimeGetVersion(&d.runtime_version));
  return d;
}

std::string describe(const DeviceInfo& d) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "gpu: %s, %d SMs, cc %d.%d, %.1f GiB (%.1f free), L2 %.0f MiB, driver %d.%d",
                d.name.c_str(), d.sm_count, d.cc_major, d.cc_minor, d.total_bytes / 1073741824.0,
                d.free_bytes / 1073741824.0, d.l2_bytes / 1048576.0, d.driver_version / 1000,
                (d.driver_version % 1000) / 10);
  return buf;
}

}  // namespace m3::gpu
