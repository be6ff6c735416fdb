// Helpers of the GPU suites (label gpu): a clean skip where no GPU exists, bf16 up/download of
// Eigen matrices, and the bf16-emulating reference inputs (round_bf16 of fresh random data).
#pragma once

#include "gpu/runtime/buffer.h"
#include "gpu/runtime/device.h"
#include "reference/tensor.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

// Skips the test (reported as skipped, never failed) on a machine without a usable GPU.
#define M3_REQUIRE_GPU()                                                      \
  do {                                                                        \
    if (::m3::gpu::device_count() == 0) GTEST_SKIP() << "no CUDA device: GPU test skipped"; \
  } while (0)

namespace m3::test {

// Rounds every element to bf16 (the GPU's storage) so that both sides start from the same bits.
inline MatF bf16_exact(MatF m) {
  round_bf16_inplace(m);
  return m;
}

inline gpu::DeviceBuffer<gpu::bf16> upload_bf16(const MatF& m) {
  gpu::DeviceBuffer<gpu::bf16> d(static_cast<std::size_t>(m.size()));
  d.upload(gpu::to_bf16(m.data(), static_cast<std::size_t>(m.size())));
  return d;
}
inline gpu::DeviceBuffer<gpu::bf16> upload_bf16(const Vec<float>& v) {
  gpu::DeviceBuffer<gpu::bf16> d(static_cast<std::size_t>(v.size()));
  d.upload(gpu::to_bf16(v.data(), static_cast<std::size_t>(v.size())));
  return d;
}

inline MatF download_bf16(const gpu::DeviceBuffer<gpu::bf16>& d, Eigen::Index rows, Eigen::Index cols) {
  auto h = d.download();
  auto f = gpu::from_bf16(h.data(), h.size());
  MatF m(rows, cols);
  std::copy(f.begin(), f.begin() + rows * cols, m.data());
  return m;
}

// |a - b| <= ulps * 2^-8 * |b| + atol for every element (bf16 has an 8-bit significand: one ulp
// is 2^-7 relative at worst, 2^-8 at best); returns the number of violations.
inline long bf16_violations(const MatF& a, const MatF& b, double ulps, double atol) {
  long bad = 0;
  for (Eigen::Index i = 0; i < a.size(); ++i) {
    const double x = a.data()[i], y = b.data()[i];
    if (!(std::abs(x - y) <= ulps * 0x1p-8 * std::abs(y) + atol)) ++bad;
  }
  return bad;
}

}  // namespace m3::test
