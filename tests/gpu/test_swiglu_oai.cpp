// gpu::swiglu_oai (separate gate/up and fused [gate | up] rows) against the bf16-emulating
// reference twin (ref::swiglu_oai in fp32 on bf16 inputs, evaluated in fp64 per element, rounded
// to bf16). Inputs are wide (sd 4) so that many cross the clamps, and planted values sit exactly on
// them, one bf16 ulp either side, far beyond them, and at u = -beta (act exactly 0).
#include "gpu/kernels/swiglu_oai.h"
#include "reference/ops/swiglu_oai.h"
#include "tests/gpu/gpu_test_util.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

using namespace m3;
using m3::test::bf16_exact;

namespace {

// The fp32 evaluation (accurate expf, a handful of roundings, no cancellation: u + beta is exact
// for bf16 u and beta = 1) is within ~1e-6 relative of the fp64 one, so the bf16 results are equal
// or one ulp apart when they straddle a rounding boundary: 2 ulps at 2^-8 leaves a margin.
constexpr double kUlps = 2.0;
constexpr double kAtol = 1e-6;  // results of magnitude ~1e-6 and below: g * sigmoid(alpha g) with tiny g

ref::SwigluParams to_ref(const gpu::SwigluParams& p) {
  // The reference takes doubles: give it the GPU's fp32 values so both clamp at the same limit.
  return {static_cast<double>(p.alpha), static_cast<double>(p.limit), static_cast<double>(p.beta)};
}

// Plants clamp-edge values into the first elements of m (bf16-exact for limit 7).
void plant_edges(MatF& m, float limit) {
  // The bf16 neighbours of the limit (limit >= 0; below 0 there is no lower neighbour to plant).
  const std::uint16_t bits = float_to_bf16_bits(limit);
  const float ulp_above = bf16_bits_to_float(static_cast<std::uint16_t>(bits + 1));
  const float ulp_below = limit > 0.f ? bf16_bits_to_float(static_cast<std::uint16_t>(bits - 1)) : 0.f;
  const float v[] = {limit,   -limit, ulp_above, -ulp_above, ulp_below, -ulp_below, 100.f,    -100.f, 1e30f,
                     -1e30f, -3e38f, 0.f,       -0.f,        -1.f,      1.f,        -1e-30f, 3e38f};
  for (std::size_t i = 0; i < std::size(v) && static_cast<Eigen::Index>(i) < m.size(); ++i)
    m.data()[(i * 7919) % m.size()] = round_bf16(v[i]);  // scattered, so both paths and rows see them
}

struct Case {
  int R, I;
};

void run_case(const Case& c, const gpu::SwigluParams& p, int offset = 0) {
  SCOPED_TRACE("R=" + std::to_string(c.R) + " I=" + std::to_string(c.I) + " alpha=" + std::to_string(p.alpha) +
               " limit=" + std::to_string(p.limit) + " beta=" + std::to_string(p.beta) +
               " offset=" + std::to_string(offset));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  MatF gate = bf16_exact(test::randn<float>(c.R, c.I, g, 4.0));
  MatF up = bf16_exact(test::randn<float>(c.R, c.I, g, 4.0));
  plant_edges(gate, p.limit);
  plant_edges(up, p.limit);
  MatF ref;
  ref::swiglu_oai(gate, up, to_ref(p), ref);
  ref = bf16_exact(ref);
  ASSERT_GT(ref.norm(), 0.0);
  ASSERT_TRUE(ref.allFinite());

  const std::size_t n = static_cast<std::size_t>(c.R) * c.I;
  // Separate inputs; `offset` elements in front break 16-byte alignment (scalar path).
  auto upload_at = [&](const MatF& m) {
    gpu::DeviceBuffer<gpu::bf16> d(n + offset);
    auto h = gpu::to_bf16(m.data(), n);
    h.insert(h.begin(), offset, gpu::bf16{});
    d.upload(h);
    return d;
  };
  auto dg = upload_at(gate), du = upload_at(up);
  gpu::DeviceBuffer<gpu::bf16> da(n + offset);
  da.fill_bytes(0xFF);  // NaN poison
  gpu::swiglu_oai(dg.data() + offset, du.data() + offset, p, da.data() + offset, c.R, c.I, nullptr);
  auto raw = da.download();
  auto f = gpu::from_bf16(raw.data() + offset, n);
  MatF act = Eigen::Map<const MatF>(f.data(), c.R, c.I);
  ASSERT_TRUE(act.allFinite());
  EXPECT_EQ(test::bf16_violations(act, ref, kUlps, kAtol), 0);
  EXPECT_LE(test::rel_l2(act, ref), 1e-2);  // the bf16 path's global rule (DESIGN §4)

  // Fused rows [gate | up]: the same arithmetic, so the same bits as the separate call.
  MatF gu(c.R, 2 * c.I);
  gu << gate, up;
  gpu::DeviceBuffer<gpu::bf16> dfused(2 * n + offset);
  {
    auto h = gpu::to_bf16(gu.data(), 2 * n);
    h.insert(h.begin(), offset, gpu::bf16{});
    dfused.upload(h);
  }
  gpu::DeviceBuffer<gpu::bf16> da2(n + offset);
  da2.fill_bytes(0xFF);
  gpu::swiglu_oai(dfused.data() + offset, p, da2.data() + offset, c.R, c.I, nullptr);
  const auto raw2 = da2.download();
  EXPECT_EQ(0, std::memcmp(raw.data() + offset, raw2.data() + offset, n * sizeof(gpu::bf16)))
      << "fused layout differs from separate gate/up";

  // In place over gate (elementwise, same index): same bits again.
  gpu::swiglu_oai(dg.data() + offset, du.data() + offset, p, dg.data() + offset, c.R, c.I, nullptr);
  const auto raw3 = dg.download();
  EXPECT_EQ(0, std::memcmp(raw.data() + offset, raw3.data() + offset, n * sizeof(gpu::bf16))) << "in place differs";
}

}  // namespace

TEST(SwigluOai_bf16, AwkwardSizesAroundClamps) {
  M3_REQUIRE_GPU();
  const gpu::SwigluParams m3;  // spec §2.4: alpha 1.702, limit 7, beta 1
  for (const Case& c : {Case{1, 1}, Case{3, 7}, Case{5, 8}, Case{17, 257}, Case{33, 3072}, Case{2, 12288}, Case{1, 24}})
    run_case(c, m3);
}

TEST(SwigluOai_bf16, MisalignedScalarPath) {
  M3_REQUIRE_GPU();
  run_case({9, 64}, gpu::SwigluParams{}, /*offset=*/1);
  run_case({4, 3072}, gpu::SwigluParams{}, /*offset=*/3);
}

TEST(SwigluOai_bf16, OtherParams) {
  M3_REQUIRE_GPU();
  run_case({7, 40}, {1.0f, 3.5f, 0.5f});
  run_case({7, 40}, {1.702f, 0.0f, 1.0f});  // limit 0: g <= 0 and u = 0 everywhere
}

TEST(SwigluOai_bf16, NanStaysNan) {
  M3_REQUIRE_GPU();
  const int R = 2, I = 16;
  MatF gate = MatF::Constant(R, I, 0.5f), up = MatF::Constant(R, I, -2.f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  gate(0, 3) = nan;  // a NaN gate must not be clamped away to the limit
  up(1, 5) = nan;    // nor a NaN up
  MatF ref;
  ref::swiglu_oai(gate, up, to_ref(gpu::SwigluParams{}), ref);
  auto dg = test::upload_bf16(gate), du = test::upload_bf16(up);
  gpu::DeviceBuffer<gpu::bf16> da(R * I);
  da.fill_bytes(0x00);
  gpu::swiglu_oai(dg.data(), du.data(), gpu::SwigluParams{}, da.data(), R, I, nullptr);
  MatF act = test::download_bf16(da, R, I);
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < I; ++i) EXPECT_EQ(std::isnan(act(r, i)), std::isnan(ref(r, i))) << r << "," << i;
  EXPECT_TRUE(std::isnan(act(0, 3)));
  EXPECT_TRUE(std::isnan(act(1, 5)));
}

TEST(SwigluOai_bf16, RejectsBadArguments) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<gpu::bf16> a(64), b(64), c(64);
  EXPECT_THROW(gpu::swiglu_oai(a.data(), b.data(), {1.702f, -1.f, 1.f}, c.data(), 1, 8, nullptr), gpu::GpuError);
  EXPECT_THROW(gpu::swiglu_oai(a.data(), b.data(), {1.702f, NAN, 1.f}, c.data(), 1, 8, nullptr), gpu::GpuError);
  EXPECT_THROW(gpu::swiglu_oai(a.data(), b.data(), gpu::SwigluParams{}, c.data(), 1, 0, nullptr), gpu::GpuError);
  EXPECT_THROW(gpu::swiglu_oai(a.data(), b.data(), gpu::SwigluParams{}, c.data(), -1, 8, nullptr), gpu::GpuError);
  // Fused: act inside gate_up would race (rows have different strides).
  EXPECT_THROW(gpu::swiglu_oai(a.data(), gpu::SwigluParams{}, a.data() + 8, 2, 8, nullptr), gpu::GpuError);
}
