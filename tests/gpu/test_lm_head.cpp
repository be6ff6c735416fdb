// gpu::lm_head = rms_norm into a bf16 scratch + fp32-output cuBLAS GEMM, checked step by step:
//  1. the scratch (normed h) against bf16(ref::rms_norm) by the bf16 elementwise rule;
//  2. the logits against ref::linear in fp32 applied to the GPU's own scratch (so a norm rounding
//     flip does not blur the GEMM's fp32 bound);
//  3. the logits against ref::lm_head in fp32 (no intermediate rounding) by the bf16 path's rule.
#include "gpu/kernels/lm_head.h"
#include "reference/ops/linear.h"
#include "reference/ops/lm_head.h"
#include "reference/ops/rms_norm.h"
#include "tests/gpu/gpu_test_util.h"

#include <cmath>

using namespace m3;
using m3::test::bf16_exact;

namespace {

constexpr double kEps = 1e-6;
// The scratch differs from bf16(reference norm) by fp32 summation order and the rounding: equal or
// one ulp apart (the rms_norm suite's rule).
constexpr double kUlps = 2.0;
constexpr double kAtol = 1e-6;
// fp32 logits from the same bf16 operands: fp32 sums of H terms in different orders, with the
// tensor cores' truncating accumulation on the GPU side: the linear suite's bound and reasoning
// (tests/gpu/test_linear.cpp, kFp32Out).
constexpr double kFp32 = 1e-4;
// Against the unrounded fp32 reference the normed activation carries one bf16 rounding (<= 2^-9
// relative per element, ~2^-9/sqrt(3) rms), which the dot products average: rel-L2 ~1e-3, gated at
// the bf16 path's 1e-2 (DESIGN §4).
constexpr double kBf16Path = 1e-2;

void run_case(int T, int H, int V) {
  SCOPED_TRACE("T=" + std::to_string(T) + " H=" + std::to_string(H) + " V=" + std::to_string(V));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  MatF h = bf16_exact(test::randn<float>(T, H, g, 3.0));
  Vec<float> nw = test::randn_vec<float>(H, g, 0.1);
  for (Eigen::Index i = 0; i < H; ++i) nw[i] = round_bf16(nw[i]);
  MatF w = bf16_exact(test::randn<float>(V, H, g, 1.0 / std::sqrt(H)));

  gpu::CublasHandle handle;
  auto dh = test::upload_bf16(h), dnw = test::upload_bf16(nw), dw = test::upload_bf16(w);
  gpu::DeviceBuffer<gpu::bf16> dscratch(static_cast<std::size_t>(T) * H);
  gpu::DeviceBuffer<float> dlogits(static_cast<std::size_t>(T) * V);
  dscratch.fill_bytes(0xFF);  // NaN poison
  dlogits.fill_bytes(0xFF);
  gpu::lm_head(handle.get(), dh.data(), dnw.data(), kEps, dw.data(), dlogits.data(), dscratch.data(), T, H, V, nullptr);
  MatF scratch = test::download_bf16(dscratch, T, H);
  const auto hl = dlogits.download();
  MatF logits = Eigen::Map<const MatF>(hl.data(), T, V);
  ASSERT_TRUE(scratch.allFinite());
  ASSERT_TRUE(logits.allFinite());

  MatF normed;
  ref::rms_norm(h, nw, kEps, normed);
  normed = bf16_exact(normed);
  ASSERT_GT(normed.norm(), 0.0);
  EXPECT_EQ(test::bf16_violations(scratch, normed, kUlps, kAtol), 0);

  MatF from_scratch;
  ref::linear(scratch, w, from_scratch);
  ASSERT_GT(from_scratch.norm(), 0.0);
  EXPECT_LE(test::rel_l2(logits, from_scratch), kFp32);

  MatF ref;
  ref::lm_head(h, nw, kEps, w, ref);
  EXPECT_LE(test::rel_l2(logits, ref), kBf16Path);
}

}  // namespace

TEST(LmHead_bf16, AwkwardSizes) {
  M3_REQUIRE_GPU();
  run_case(1, 7, 13);
  run_case(5, 64, 1000);
  run_case(3, 33, 4099);
  run_case(33, 6144, 4099);  // M3 width, a vocabulary slice
}

TEST(LmHead_bf16, ScratchMayBeTheInput) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const int T = 4, H = 64, V = 100;
  MatF h = bf16_exact(test::randn<float>(T, H, g));
  Vec<float> nw = Vec<float>::Zero(H);
  MatF w = bf16_exact(test::randn<float>(V, H, g, 0.125));
  gpu::CublasHandle handle;
  auto dh = test::upload_bf16(h), dnw = test::upload_bf16(nw), dw = test::upload_bf16(w);
  gpu::DeviceBuffer<gpu::bf16> dscratch(static_cast<std::size_t>(T) * H);
  gpu::DeviceBuffer<float> a(static_cast<std::size_t>(T) * V), b(static_cast<std::size_t>(T) * V);
  gpu::lm_head(handle.get(), dh.data(), dnw.data(), kEps, dw.data(), a.data(), dscratch.data(), T, H, V, nullptr);
  gpu::lm_head(handle.get(), dh.data(), dnw.data(), kEps, dw.data(), b.data(), dh.data(), T, H, V, nullptr);
  EXPECT_EQ(a.download(), b.download()) << "in-place scratch changed the logits";
}

TEST(LmHead_bf16, RejectsBadShapes) {
  M3_REQUIRE_GPU();
  gpu::CublasHandle handle;
  gpu::DeviceBuffer<gpu::bf16> h(64), nw(64), w(64), s(64);
  gpu::DeviceBuffer<float> l(64);
  EXPECT_THROW(gpu::lm_head(handle.get(), h.data(), nw.data(), kEps, w.data(), l.data(), s.data(), 1, 0, 8, nullptr),
               gpu::GpuError);
  EXPECT_THROW(gpu::lm_head(handle.get(), h.data(), nw.data(), kEps, w.data(), l.data(), s.data(), 1, 8, 0, nullptr),
               gpu::GpuError);
  EXPECT_THROW(gpu::lm_head(handle.get(), h.data(), nw.data(), kEps, w.data(), l.data(), nullptr, 1, 8, 8, nullptr),
               gpu::GpuError);
  EXPECT_THROW(gpu::lm_head(nullptr, h.data(), nw.data(), kEps, w.data(), l.data(), s.data(), 1, 8, 8, nullptr),
               gpu::GpuError);
}
