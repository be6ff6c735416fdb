// gpu::stream_read (gpu/runtime/stream_read.h), the read-bandwidth probe of bench_gpu: its word is
// the XOR of every 32-bit word of the buffer, computed on the host, at sizes around the grid's
// stride and unroll (each byte must be read exactly once: a word read twice or skipped changes the
// XOR for random data), with a poisoned output (reset by the probe, or folded into without the
// reset); bad sizes and alignments are refused.
#include "gpu/runtime/stream_read.h"

#include "gpu/runtime/buffer.h"
#include "gpu/runtime/check.h"
#include "tests/gpu/gpu_test_util.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

namespace {

unsigned host_xor(const std::vector<std::uint32_t>& w, std::size_t n) {
  unsigned a = 0;
  for (std::size_t i = 0; i < n; ++i) a ^= w[i];
  return a;
}

TEST(GpuStreamRead, XorOfEveryWordAtAwkwardSizes) {
  M3_REQUIRE_GPU();
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  // Sizes in 16-byte vectors: none, one, a few, around one CTA (256), around the unrolled grid
  // stride of a wave (SMs x occupancy x 256 x 4: ~0.5-1.5 M vectors on Hopper), and a large odd one.
  const std::size_t sizes[] = {0, 1, 3, 255, 257, 4097, 540671, 540673, 1081343, 3333333};
  std::vector<std::uint32_t> host(3333333 * 4);  // [words]
  for (auto& w : host) w = static_cast<std::uint32_t>(g());
  m3::gpu::DeviceBuffer<std::uint32_t> d(host.size());  // [words]
  d.upload(host);
  m3::gpu::DeviceBuffer<unsigned> out(1);  // [1]
  m3::gpu::Stream s;
  for (std::size_t n16 : sizes) {
    SCOPED_TRACE("vectors " + std::to_string(n16));
    out.fill_bytes(0xA5, s.get());  // poison: the probe must reset it
    m3::gpu::stream_read(d.data(), n16 * 16, out.data(), s.get());
    s.sync();
    EXPECT_EQ(out.download()[0], host_xor(host, n16 * 4));
  }
  // An offset start (16-byte aligned) reads from there on.
  m3::gpu::stream_read(d.data() + 4, 4096 * 16, out.data(), s.get());
  s.sync();
  unsigned want = 0;
  for (std::size_t i = 4; i < 4 + 4096 * 4; ++i) want ^= host[i];
  EXPECT_EQ(out.download()[0], want);
  // zero_out = false (bench_gpu's timed calls): folded into the word as it stands.
  out.fill_bytes(0xA5, s.get());
  m3::gpu::stream_read(d.data(), 4097 * 16, out.data(), s.get(), /*zero_out=*/false);
  s.sync();
  EXPECT_EQ(out.download()[0], 0xA5A5A5A5u ^ host_xor(host, 4097 * 4));
}

TEST(GpuStreamRead, RefusesUnalignedPointersAndSizes) {
  M3_REQUIRE_GPU();
  m3::gpu::DeviceBuffer<std::uint32_t> d(64);  // [words]
  m3::gpu::DeviceBuffer<unsigned> out(1);    // [1]
  EXPECT_THROW(m3::gpu::stream_read(d.data(), 24, out.data(), nullptr), m3::gpu::GpuError);
  EXPECT_THROW(m3::gpu::stream_read(d.data() + 1, 16, out.data(), nullptr), m3::gpu::GpuError);
}

}  // namespace
