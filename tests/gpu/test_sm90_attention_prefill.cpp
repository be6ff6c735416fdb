// gpu::sm90_attention_prefill (wgmma + TMA, Hopper only, D = 128) against the reference twin
// ref::attention_dense in fp32 on the same bf16-rounded q, k, v with the output rounded to bf16 (the
// bf16-emulating reference, the gate), in fp64 on the same inputs (the ground truth), and against
// the portable kernel gpu::attention_dense_prefill (mma.sync) on the same device buffers.
//
// What separates the GPU from the emulating reference: (a) the GPU rounds every softmax weight p to
// bf16 before P V (the reference keeps fp64 weights), (b) fp32 score / exp / sum arithmetic in a
// different order, (c) both round the output to bf16 once. Per element that bounds
//   |gpu - emu| <= u (|gpu| + |emu|) + (u + 2^-11) * sum_j w_j |v_j|,   u = 2^-8 (bf16 unit roundoff):
// (c) is at most half an ulp <= u relative on each side; (a) changes the output by
// sum_j w_j delta_j v_j with |delta_j| <= u; (b) perturbs each weight by dS / sqrt(D) relative,
// where q.k sums 128 exact bf16 products in fp32 (~4e-4 relative in the worst case at q_scale 8);
// 2^-11 ~ 4.9e-4 covers that. sum_j w_j |v_j| is itself computed with the reference on |v|.
// Both GPU kernels obey that bound, so their difference obeys the sum of their two bounds.
#include "gpu/kernels/attention_prefill.h"
#include "gpu/kernels/sm90_attention_prefill.h"
#include "reference/ops/attention_dense.h"
#include "tests/gpu/gpu_test_util.h"

#include <cstdint>
#include <cstring>
#include <iostream>
#include <numeric>
#include <vector>

using namespace m3;
using m3::test::bf16_exact;

namespace {

constexpr int kD = 128;
constexpr double kU = 0x1p-8;  // bf16 unit roundoff (8 significant bits)
// Floor of the "GPU error vs fp64 <= 2 x emulating error vs fp64 + floor" rule: the one error the
// emulating reference does not make, rounding P to bf16, has RMS about u/sqrt(3) relative to the
// output for random V (the weights' rounding errors are independent and add like a random walk,
// as the output itself does); u covers it with margin.
constexpr double kFloor = kU;
// rel-L2 to the emulating reference and to the portable kernel: the bf16 paths' gate (DESIGN §4);
// measured ~2e-3 and ~1e-3 on an H200.
constexpr double kRelL2Gate = 1e-2;

// Skips (never fails) where the wgmma kernel cannot run: no GPU, or not a compute capability 9.0 GPU
// with this build's sm_90a code.
#define M3_REQUIRE_SM90()                                                                         \
  do {                                                                                            \
    M3_REQUIRE_GPU();                                                                             \
    if (!gpu::sm90_attention_prefill_available())                                                 \
      GTEST_SKIP() << "sm90_attention_prefill unavailable (needs compute capability 9.0 and an "  \
                      "sm_90a build): skipped";                                                   \
  } while (0)

struct Case {
  int T;
  std::int64_t p0;
  int N;
  int Hq, Hkv;
  double q_scale = 1.0;  // > 1 makes the softmax peaked (scores of std q_scale after 1/sqrt(D))
};

std::string describe(const Case& c) {
  return "T=" + std::to_string(c.T) + " p0=" + std::to_string(c.p0) + " N=" + std::to_string(c.N) +
         " Hq/Hkv=" + std::to_string(c.Hq) + "/" + std::to_string(c.Hkv) + " q_scale=" + std::to_string(c.q_scale);
}

// Elements of a past the per-element bound against b, where a and b each obey the bound above
// against the emulating reference emu (n_bounds = 1: b is emu; 2: b is another GPU result).
struct BoundCheck {
  long bad = 0;
  Eigen::Index worst = 0;
  double worst_ratio = 0;
};
BoundCheck check_bound(const MatF& a, const MatF& b, const MatF& emu, const MatF& wabs, int n_bounds) {
  BoundCheck r;
  for (Eigen::Index i = 0; i < a.size(); ++i) {
    const double x = a.data()[i], y = b.data()[i], e = emu.data()[i];
    // One kernel vs emu: u (|x| + |emu|) + (u + 2^-11) w (+ 1e-7, fp32 noise at 0). Two kernels: the
    // sum of both such bounds, u (|x| + |y|) + 2 u |emu| + 2 (u + 2^-11) w.
    const double bound = kU * (std::abs(x) + std::abs(y)) + (n_bounds - 1) * 2 * kU * std::abs(e) +
                         n_bounds * ((kU + 0x1p-11) * wabs.data()[i] + 1e-7);
    const double ratio = std::abs(x - y) / bound;
    if (!(ratio <= 1.0)) ++r.bad;
    if (!(ratio <= r.worst_ratio)) r.worst_ratio = ratio, r.worst = i;
  }
  return r;
}

// poison_tail: the cache rows past the chunk (p0 + T .. N - 1) hold NaN on the device; the kernel
// reads only keys 0..p0+T-1 (its contract), so the output must not see them.
void run_case(const Case& c, bool poison_tail = false) {
  SCOPED_TRACE(describe(c));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const AttnDims dims{c.Hq, c.Hkv, kD};
  MatF q = bf16_exact(test::randn<float>(c.T, c.Hq * kD, g, c.q_scale));  // [T, Hq*D]
  MatF k = bf16_exact(test::randn<float>(c.N, c.Hkv * kD, g));             // [N, Hkv*D]
  MatF v = bf16_exact(test::randn<float>(c.N, c.Hkv * kD, g));             // [N, Hkv*D]
  ASSERT_GT(q.norm(), 0.0);
  ASSERT_GT(k.norm(), 0.0);
  ASSERT_GT(v.norm(), 0.0);
  std::vector<std::int64_t> pos(c.T);  // [T]
  std::iota(pos.begin(), pos.end(), c.p0);

  MatF emu;  // [T, Hq*D]
  ref::attention_dense(q, k, v, pos, dims, emu);
  emu = bf16_exact(emu);
  MatD exact;  // [T, Hq*D]
  ref::attention_dense<double>(q.cast<double>(), k.cast<double>(), v.cast<double>(), pos, dims, exact);
  MatF wabs;  // [T, Hq*D] sum_j w_j |v_j|: the scale of the P-rounding error, element by element
  ref::attention_dense<float>(q, k, v.cwiseAbs(), pos, dims, wabs);
  ASSERT_GT(exact.norm(), 0.0);

  auto dq = test::upload_bf16(q), dk = test::upload_bf16(k), dv = test::upload_bf16(v);
  const std::size_t tail_row = static_cast<std::size_t>(c.p0 + c.T) * c.Hkv * kD;
  if (poison_tail && tail_row < dk.size()) {
    const std::size_t bytes = (dk.size() - tail_row) * sizeof(gpu::bf16);
    M3_CUDA_CHECK(cudaMemset(dk.data() + tail_row, 0xFF, bytes));  // bf16 NaN
    M3_CUDA_CHECK(cudaMemset(dv.data() + tail_row, 0xFF, bytes));
  }
  gpu::DeviceBuffer<gpu::bf16> dout(static_cast<std::size_t>(c.T) * c.Hq * kD);
  auto run = [&] {
    dout.fill_bytes(0xFF);  // NaN poison: every element must be written
    gpu::sm90_attention_prefill(dq.data(), dk.data(), dv.data(), c.p0, c.T, c.N, dims, dout.data(), nullptr);
    M3_CUDA_CHECK(cudaDeviceSynchronize());
    return dout.download();
  };
  const auto bits1 = run();
  MatF got = test::download_bf16(dout, c.T, c.Hq * kD);
  ASSERT_TRUE(got.allFinite()) << "an output element is NaN/Inf (unwritten, overflowed or a poisoned key read)";

  // Same inputs, same bits: a race (a stage refilled before both consumers released it, a missing
  // barrier phase) would move them.
  const auto bits2 = run();
  EXPECT_EQ(std::memcmp(bits1.data(), bits2.data(), bits1.size() * sizeof(gpu::bf16)), 0)
      << "two runs on the same inputs differ";

  gpu::DeviceBuffer<gpu::bf16> dport(static_cast<std::size_t>(c.T) * c.Hq * kD);
  dport.fill_bytes(0xFF);
  gpu::attention_dense_prefill(dq.data(), dk.data(), dv.data(), c.p0, c.T, c.N, dims, dport.data(), nullptr);
  M3_CUDA_CHECK(cudaDeviceSynchronize());
  MatF port = test::download_bf16(dport, c.T, c.Hq * kD);
  ASSERT_TRUE(port.allFinite()) << "the portable kernel's output has a NaN/Inf";

  const Eigen::Index cols = got.cols();
  const BoundCheck vs_emu = check_bound(got, emu, emu, wabs, 1);
  EXPECT_EQ(vs_emu.bad, 0) << "elements past the bound vs the emulating reference; worst at row "
                           << vs_emu.worst / cols << " col " << vs_emu.worst % cols << ": gpu "
                           << got.data()[vs_emu.worst] << " emu " << emu.data()[vs_emu.worst] << " (|err|/bound "
                           << vs_emu.worst_ratio << ")";
  const BoundCheck vs_port = check_bound(got, port, emu, wabs, 2);
  EXPECT_EQ(vs_port.bad, 0) << "elements past the bound vs the portable kernel; worst at row "
                            << vs_port.worst / cols << " col " << vs_port.worst % cols << ": sm90 "
                            << got.data()[vs_port.worst] << " portable " << port.data()[vs_port.worst]
                            << " (|diff|/bound " << vs_port.worst_ratio << ")";

  const double e_emu = test::rel_l2(emu, exact), e_gpu = test::rel_l2(got, exact);
  const double e_vs = test::rel_l2(got, emu), e_port = test::rel_l2(got, port);
  EXPECT_LE(e_gpu, 2 * e_emu + kFloor) << "gpu vs fp64 " << e_gpu << ", emulating reference vs fp64 " << e_emu;
  EXPECT_LE(e_vs, kRelL2Gate);
  EXPECT_LE(e_port, kRelL2Gate);
  std::cout << "  " << describe(c) << ": rel-L2 gpu-fp64 " << e_gpu << ", emu-fp64 " << e_emu << ", gpu-emu " << e_vs
            << ", gpu-portable " << e_port << ", worst |err|/bound " << vs_emu.worst_ratio << "\n";
}

// Around the 64-row warpgroup slice, the 128-row CTA tile and the 128-key K/V tile, and a long
// ragged one (2048 + 17: 17 tiles, the last one 17 keys / rows deep).
constexpr int kLengths[] = {1, 63, 64, 65, 127, 128, 129, 1000, 2048 + 17};

}  // namespace

TEST(Sm90AttentionPrefill_bf16, M3Heads_Hq64Hkv4_Lengths) {
  M3_REQUIRE_SM90();
  for (int T : kLengths) run_case({T, 0, T, 64, 4});
}

TEST(Sm90AttentionPrefill_bf16, Gqa16_Hq16Hkv1_Lengths) {
  M3_REQUIRE_SM90();
  for (int T : kLengths) run_case({T, 0, T, 16, 1});
}

TEST(Sm90AttentionPrefill_bf16, Mha_Hq8Hkv8_Lengths) {
  M3_REQUIRE_SM90();
  for (int T : kLengths) run_case({T, 0, T, 8, 8});
}

// A second chunk: queries at p0..p0+T-1 with N = p0 + T, p0 on and off the tile grid, so that a
// warpgroup's rows start mid-tile and the first rows see no key of the last tile.
TEST(Sm90AttentionPrefill_bf16, M3Heads_SecondChunk) {
  M3_REQUIRE_SM90();
  for (auto [T, p0] : {std::pair{1, 2064}, {63, 1}, {64, 64}, {65, 63}, {129, 1000}, {1000, 1065}})
    run_case({T, p0, static_cast<int>(p0) + T, 64, 4});
}

// Cache rows past the chunk (N > p0 + T) hold NaN: the kernel must never read them (TMA reads
// zeros there instead), or 0 * NaN would leak into P V.
TEST(Sm90AttentionPrefill_bf16, Gqa2_NaNPastTheChunk) {
  M3_REQUIRE_SM90();
  for (auto [T, p0] : {std::pair{1, 37}, {15, 37}, {64, 200}, {129, 63}, {300, 77}})
    run_case({T, p0, static_cast<int>(p0) + T + 100, 4, 2}, /*poison_tail=*/true);
}

// Peaked softmax (scores of std 8): the running max changes by large steps, so the rescaling of the
// accumulator and the row sum carries the result.
TEST(Sm90AttentionPrefill_bf16, Gqa16_PeakedSoftmax) {
  M3_REQUIRE_SM90();
  run_case({129, 64, 193, 16, 1, 8.0});
  run_case({300, 500, 800, 16, 1, 8.0});
}

// Many key tiles (34) in one pass: the 2-stage K/V ring over a long loop, phases wrapping many times.
TEST(Sm90AttentionPrefill_bf16, Gqa2_LongContext) {
  M3_REQUIRE_SM90();
  run_case({256, 4000, 4256, 4, 2});
}

// Argument checks come before the device check, so they hold on any GPU.
TEST(Sm90AttentionPrefill_bf16, RejectsBadArguments) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<gpu::bf16> b(64 * 1024);
  const gpu::bf16* p = b.data();
  gpu::bf16* o = b.data();
  EXPECT_THROW(gpu::sm90_attention_prefill(p, p, p, 0, 1, 1, {2, 1, 64}, o, nullptr), gpu::GpuError);    // D 64
  EXPECT_THROW(gpu::sm90_attention_prefill(p, p, p, 0, 1, 1, {3, 2, 128}, o, nullptr), gpu::GpuError);   // Hq % Hkv
  EXPECT_THROW(gpu::sm90_attention_prefill(p, p, p, 0, 1, 1, {0, 1, 128}, o, nullptr), gpu::GpuError);   // Hq 0
  EXPECT_THROW(gpu::sm90_attention_prefill(p, p, p, 5, 4, 8, {1, 1, 128}, o, nullptr), gpu::GpuError);   // p0+T > N
  EXPECT_THROW(gpu::sm90_attention_prefill(p, p, p, -1, 1, 8, {1, 1, 128}, o, nullptr), gpu::GpuError);  // p0 < 0
  EXPECT_THROW(gpu::sm90_attention_prefill(p, p, p, 0, -1, 8, {1, 1, 128}, o, nullptr), gpu::GpuError);  // T < 0
  EXPECT_THROW(gpu::sm90_attention_prefill(p + 1, p, p, 0, 1, 8, {1, 1, 128}, o, nullptr), gpu::GpuError);  // align
  EXPECT_THROW(gpu::sm90_attention_prefill(nullptr, p, p, 0, 1, 8, {1, 1, 128}, o, nullptr), gpu::GpuError);
  const std::int32_t* table = reinterpret_cast<const std::int32_t*>(p);
  EXPECT_THROW(gpu::sm90_attention_prefill(p, p, p, 0, 1, 8, {1, 1, 128}, o, nullptr, gpu::CachePages{table, 1}),
               gpu::GpuError);  // paged caches go to the portable kernel
  EXPECT_NO_THROW(gpu::sm90_attention_prefill(nullptr, nullptr, nullptr, 3, 0, 3, {1, 1, 128}, nullptr, nullptr));
}
