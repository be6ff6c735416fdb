// gpu::rms_norm / add_rms_norm against the bf16-emulating reference twin (ref::rms_norm in fp32 on
// bf16 inputs, output rounded to bf16): they differ only by fp32 summation order and the final
// rounding, so every element is within one bf16 ulp.
#include "gpu/kernels/rms_norm.h"
#include "reference/ops/rms_norm.h"
#include "tests/gpu/gpu_test_util.h"

using namespace m3;
using m3::test::bf16_exact;

namespace {

// One ulp of the final rounding, plus 2^-8 relative for the fp32 reduction order flipping a
// rounding (the pre-rounding values differ by ~1e-7 relative): 2 ulps at 2^-8.
constexpr double kUlps = 2.0;
constexpr double kAtol = 1e-6;  // values near zero: (1 + w) * tiny x, absolute noise of fp32

void run_case(int R, int C, bool fused) {
  SCOPED_TRACE("R=" + std::to_string(R) + " C=" + std::to_string(C) + (fused ? " fused" : ""));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  MatF h = bf16_exact(test::randn<float>(R, C, g, 2.0));
  MatF delta = bf16_exact(test::randn<float>(R, C, g));
  Vec<float> w = test::randn_vec<float>(C, g, 0.1);
  for (Eigen::Index i = 0; i < C; ++i) w[i] = round_bf16(w[i]);
  // Reference: the residual sum rounded to bf16 (the GPU stores the stream in bf16), then the norm.
  MatF x = fused ? bf16_exact(h + delta) : h;
  MatF ref;
  ref::rms_norm(x, w, 1e-6, ref);
  ref = bf16_exact(ref);

  auto dh = test::upload_bf16(h), dd = test::upload_bf16(delta), dw = test::upload_bf16(w);
  gpu::DeviceBuffer<gpu::bf16> dy(static_cast<std::size_t>(R) * C);
  dy.fill_bytes(0xFF);  // NaN poison: every element must be written
  if (fused) gpu::add_rms_norm(dh.data(), dd.data(), dw.data(), 1e-6, dy.data(), R, C, nullptr);
  else gpu::rms_norm(dh.data(), dw.data(), 1e-6, dy.data(), R, C, nullptr);
  MatF y = test::download_bf16(dy, R, C);
  ASSERT_TRUE(y.allFinite());
  ASSERT_GT(ref.norm(), 0.0);
  EXPECT_EQ(test::bf16_violations(y, ref, kUlps, kAtol), 0);
  if (fused) {
    MatF h_after = test::download_bf16(dh, R, C);
    EXPECT_TRUE((h_after.array() == x.array()).all()) << "residual stream not updated to bf16(h + delta)";
  }
}

}  // namespace

TEST(RmsNorm_bf16, AwkwardSizes) {
  M3_REQUIRE_GPU();
  for (auto [R, C] : {std::pair{1, 1}, {3, 7}, {17, 128}, {64, 6144}, {5, 16384}, {33, 257}}) run_case(R, C, false);
}

TEST(RmsNorm_bf16, FusedResidualAdd) {
  M3_REQUIRE_GPU();
  for (auto [R, C] : {std::pair{1, 64}, {9, 512}, {31, 6144}}) run_case(R, C, true);
}

TEST(RmsNorm_bf16, RejectsBadShapes) {
  M3_REQUIRE_GPU();
  EXPECT_THROW(gpu::rms_norm(nullptr, nullptr, 1e-6, nullptr, 1, 0, nullptr), gpu::GpuError);
  EXPECT_THROW(gpu::rms_norm(nullptr, nullptr, 1e-6, nullptr, 1, 20000, nullptr), gpu::GpuError);
}
