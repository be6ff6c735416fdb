// Device discovery that never fails on a machine without a GPU (CI): device_count() is 0 there.
#pragma once

#include <cstddef>
#include <string>

namespace m3::gpu {

// Number of usable CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();

struct DeviceInfo {
  std::string name;
  int sm_count = 0;
  int cc_major = 0, cc_minor = 0;
  std::size_t total_bytes = 0, free_bytes = 0;
  std::size_t l2_bytes = 0;
  int driver_version = 0;   // e.g. 13000
  int runtime_version = 0;
};
DeviceInfo device_info(int device = 0);
// "gpu: NVIDIA H100 80GB HBM3, 132 SMs, cc 9.0, 79.1 GiB (78.5 free), L2 50 MiB, driver 13.0"
std::string describe(const DeviceInfo& d);

}  // namespace m3::gpu
