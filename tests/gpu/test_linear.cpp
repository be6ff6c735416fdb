// gpu::linear (cuBLAS, bf16 in, fp32 accumulation) against ref::linear in fp32 on the same
// bf16-rounded inputs, for both outputs (bf16, fp32), awkward sizes, misaligned rows, and
// bitwise determinism across repeats.
#include "gpu/kernels/linear.h"
#include "reference/ops/linear.h"
#include "tests/gpu/gpu_test_util.h"

#include <cmath>
#include <cstring>

using namespace m3;
using m3::test::bf16_exact;

namespace {

// fp32 output: both sides sum `in` exact bf16 x bf16 products in fp32, in different orders. A
// round-to-nearest recursive sum of n random terms has a relative rms error ~ u sqrt(n / 6)
// (u = 6e-8): 2e-6 at n = 8192. But tensor cores align and add the products of each MMA k-step
// into the accumulator with truncation (Fasi et al., "Numerical behavior of NVIDIA tensor cores",
// 2021), a biased error that grows with the number of steps rather than its square root: about
// u n / (16 * 3) = 1e-5 at n = 8192 with k-steps of 16. 1e-4 keeps a margin over both, and any
// indexing or layout error is O(1).
constexpr double kFp32Out = 1e-4;
// bf16 output: each element is additionally rounded once, |error| <= u |y| with u = 2^-8 the unit
// roundoff of bf16's 8-bit significand (7 stored bits + the implicit one), so ||error|| <= 2^-8 ||y||
// for the whole matrix whatever the distribution; plus the fp32 term above. (2^-9 was a bug: a
// single-element output rounds by up to 2^-8 of itself, and one H200 run drew 2.7e-3 at R=2, in=1.)
constexpr double kBf16Out = 0x1p-8 + kFp32Out;

struct Case {
  int R, in, out;
};

// x_offset shifts x by that many elements (rows not 16-byte aligned: cuBLAS must cope).
void run_case(const Case& c, int x_offset = 0) {
  SCOPED_TRACE("R=" + std::to_string(c.R) + " in=" + std::to_string(c.in) + " out=" + std::to_string(c.out) +
               " x_offset=" + std::to_string(x_offset));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  MatF x = bf16_exact(test::randn<float>(c.R, c.in, g));
  MatF w = bf16_exact(test::randn<float>(c.out, c.in, g, 1.0 / std::sqrt(c.in)));
  MatF ref;
  ref::linear(x, w, ref);  // [R, out] fp32
  ASSERT_GT(x.norm(), 0.0);
  ASSERT_GT(ref.norm(), 0.0);

  gpu::CublasHandle h;
  gpu::DeviceBuffer<gpu::bf16> dx(static_cast<std::size_t>(x.size()) + x_offset);
  {
    auto hx = gpu::to_bf16(x.data(), static_cast<std::size_t>(x.size()));
    hx.insert(hx.begin(), x_offset, gpu::bf16{});
    dx.upload(hx);
  }
  auto dw = test::upload_bf16(w);
  const gpu::bf16* xp = dx.data() + x_offset;

  // bf16 output
  gpu::DeviceBuffer<gpu::bf16> dy(static_cast<std::size_t>(c.R) * c.out);
  dy.fill_bytes(0xFF);  // NaN poison
  gpu::linear(h.get(), xp, dw.data(), dy.data(), c.R, c.in, c.out, nullptr);
  MatF y = test::download_bf16(dy, c.R, c.out);
  ASSERT_TRUE(y.allFinite());
  EXPECT_LE(test::rel_l2(y, ref), kBf16Out);
  // Determinism: cuBLAS without atomics gives the same bits on a repeat.
  const auto bits1 = dy.download();
  dy.fill_bytes(0xFF);
  gpu::linear(h.get(), xp, dw.data(), dy.data(), c.R, c.in, c.out, nullptr);
  const auto bits2 = dy.download();
  EXPECT_EQ(0, std::memcmp(bits1.data(), bits2.data(), bits1.size() * sizeof(gpu::bf16))) << "bf16 output not bitwise repeatable";

  // fp32 output
  gpu::DeviceBuffer<float> dyf(static_cast<std::size_t>(c.R) * c.out);
  dyf.fill_bytes(0xFF);
  gpu::linear(h.get(), xp, dw.data(), dyf.data(), c.R, c.in, c.out, nullptr);
  const auto hf = dyf.download();
  MatF yf = Eigen::Map<const MatF>(hf.data(), c.R, c.out);
  ASSERT_TRUE(yf.allFinite());
  EXPECT_LE(test::rel_l2(yf, ref), kFp32Out);
  // The bf16 output is the fp32 one rounded (same algorithm choice is not guaranteed across output
  // types, so this is the bf16 rule, not bit equality): within one bf16 ulp plus the fp32 noise.
  EXPECT_EQ(test::bf16_violations(y, yf, 2.0, kFp32Out * ref.cwiseAbs().maxCoeff()), 0);
}

}  // namespace

TEST(Linear_bf16, AwkwardSizes) {
  M3_REQUIRE_GPU();
  for (const Case& c : {Case{1, 7, 13}, Case{333, 7, 13}, Case{2, 1, 1}, Case{1, 1, 5}, Case{129, 257, 255},
                        Case{333, 64, 130}, Case{17, 6144, 9856}})
    run_case(c);
}

TEST(Linear_bf16, M3ProjectionShapes) {
  M3_REQUIRE_GPU();
  run_case({64, 6144, 512});   // k or v projection
  run_case({31, 8192, 6144});  // o projection (8192 = 64 heads x 128)
}

TEST(Linear_bf16, MisalignedRows) {
  M3_REQUIRE_GPU();
  run_case({5, 64, 24}, /*x_offset=*/1);
  run_case({33, 9, 31}, /*x_offset=*/3);
}

TEST(Linear_bf16, ZeroRowsIsNoop) {
  M3_REQUIRE_GPU();
  gpu::CublasHandle h;
  gpu::DeviceBuffer<gpu::bf16> x(8), w(8), y(8);
  EXPECT_NO_THROW(gpu::linear(h.get(), x.data(), w.data(), y.data(), 0, 8, 1, nullptr));
}

TEST(Linear_bf16, RejectsBadShapes) {
  M3_REQUIRE_GPU();
  gpu::CublasHandle h;
  gpu::DeviceBuffer<gpu::bf16> x(8), w(8), y(8);
  gpu::DeviceBuffer<float> yf(8);
  EXPECT_THROW(gpu::linear(h.get(), x.data(), w.data(), y.data(), 1, 0, 1, nullptr), gpu::GpuError);   // in = 0
  EXPECT_THROW(gpu::linear(h.get(), x.data(), w.data(), y.data(), 1, 8, 0, nullptr), gpu::GpuError);   // out = 0
  EXPECT_THROW(gpu::linear(h.get(), x.data(), w.data(), yf.data(), -1, 8, 1, nullptr), gpu::GpuError); // R < 0
  EXPECT_THROW(gpu::linear(nullptr, x.data(), w.data(), y.data(), 1, 8, 1, nullptr), gpu::GpuError);   // no handle
  EXPECT_THROW(gpu::linear(h.get(), x.data(), static_cast<const gpu::bf16*>(nullptr), y.data(), 1, 8, 1, nullptr),
               gpu::GpuError);
}
