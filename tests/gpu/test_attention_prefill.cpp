// gpu::attention_dense_prefill (mma.sync FlashAttention-2 style, D = 128) against the reference twin
// ref::attention_dense: in fp32 on the same bf16-rounded q, k, v with the output rounded to bf16
// (the bf16-emulating reference, the gate) and in fp64 on the same inputs (the ground truth).
//
// What separates the GPU from the emulating reference: (a) the GPU rounds every softmax weight p to
// bf16 before P V (the reference keeps fp64 weights), (b) fp32 score / exp / sum arithmetic in a
// different order, (c) both round the output to bf16 once. Per element that bounds
//   |gpu - emu| <= u (|gpu| + |emu|) + (u + 2^-11) * sum_j w_j |v_j|,   u = 2^-8 (bf16 unit roundoff):
// (c) is at most half an ulp <= u relative on each side; (a) changes the output by
// sum_j w_j delta_j v_j with |delta_j| <= u; (b) perturbs each weight by dS / sqrt(D) relative,
// where q.k sums 128 exact bf16 products in fp32: dS ~ sqrt(128) * 2^-24 * |partials| in practice
// (~1e-6 relative to the weight), 128 * 2^-24 * sum|q_i k_i| ~ 4e-4 in the worst case at q_scale 8;
// 2^-11 ~ 4.9e-4 covers that. sum_j w_j |v_j| is itself computed with the reference on |v|.
//
// Paged caches (kv_cache.h): the same k, v scattered into a pool of permuted 128-row pages (spare
// rows and every row past the chunk, p0 + T .. N-1, NaN; pages past it unallocated): the output
// must be bit-identical to the contiguous run's, and a negative page id must give NaN exactly for
// the 128-query tiles that load it (all rows of the tile, as documented).
#include "gpu/kernels/attention_prefill.h"
#include "reference/ops/attention_dense.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/paged_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <numeric>
#include <random>
#include <vector>

using namespace m3;
using m3::test::bf16_exact;
using m3::test::make_pages;
using m3::test::PageTable;
using m3::test::scatter_pages;
using m3::test::scattered_positions;

namespace {

constexpr int kD = 128;
constexpr double kU = 0x1p-8;  // bf16 unit roundoff (8 significant bits)
// Floor of the "GPU error vs fp64 <= 2 x emulating error vs fp64 + floor" rule: the one error the
// emulating reference does not make, rounding P to bf16, has RMS about u/sqrt(3) relative to the
// output for random V (the rounding errors of the weights are independent, so they add like the
// output's own random-walk magnitude); u covers it with margin.
constexpr double kFloor = kU;
// rel-L2 to the emulating reference: the bf16 paths' gate (DESIGN §4); expected ~2e-3 here.
constexpr double kRelL2Gate = 1e-2;

struct Case {
  int T;
  std::int64_t p0;
  int N;
  int Hq, Hkv;
  double q_scale = 1.0;  // > 1 makes the softmax peaked (scores of std q_scale after 1/sqrt(D))
  bool paged = false;    // also run on a paged copy of k, v: bit-identical output
  int bad_page = -1;     // paged: this logical page gets id -1
};

std::string describe(const Case& c) {
  return "T=" + std::to_string(c.T) + " p0=" + std::to_string(c.p0) + " N=" + std::to_string(c.N) +
         " Hq/Hkv=" + std::to_string(c.Hq) + "/" + std::to_string(c.Hkv) + " q_scale=" + std::to_string(c.q_scale) +
         (c.paged ? " paged" : "") + (c.bad_page >= 0 ? " bad page " + std::to_string(c.bad_page) : "");
}

// The paged run against the contiguous output bits `want` (one sequence of p0 + T keys).
void check_paged(const Case& c, const MatF& q, const MatF& k, const MatF& v, const std::vector<gpu::bf16>& want,
                 std::mt19937_64& g) {
  const AttnDims dims{c.Hq, c.Hkv, kD};
  const std::vector<int> lens{static_cast<int>(c.p0) + c.T};  // rows past the chunk stay NaN
  PageTable t = make_pages(c.N, lens, 3, g);
  if (c.bad_page >= 0) t.ids[c.bad_page] = -1;
  const std::int64_t W = static_cast<std::int64_t>(c.Hkv) * kD;
  gpu::DeviceBuffer<gpu::bf16> pk(static_cast<std::size_t>(t.n_pages) * gpu::kPageRows * W), pv(pk.size());
  pk.upload(scatter_pages(gpu::to_bf16(k.data(), static_cast<std::size_t>(k.size())), c.N, W, lens, t));
  pv.upload(scatter_pages(gpu::to_bf16(v.data(), static_cast<std::size_t>(v.size())), c.N, W, lens, t));
  gpu::DeviceBuffer<std::int32_t> dtab(t.ids.size());
  dtab.upload(t.ids);
  auto dq = test::upload_bf16(q);
  gpu::DeviceBuffer<gpu::bf16> dout(static_cast<std::size_t>(c.T) * c.Hq * kD);
  dout.fill_bytes(0xFF);
  gpu::attention_dense_prefill(dq.data(), pk.data(), pv.data(), c.p0, c.T, c.N, dims, dout.data(), nullptr,
                               gpu::CachePages{dtab.data(), t.pps});
  const auto got = dout.download();
  const std::size_t row = static_cast<std::size_t>(c.Hq) * kD;
  long differ = 0, not_nan = 0;
  for (int r = 0; r < c.T; ++r) {
    // The 128-query tile of row r loads the keys up to its last row's position.
    const std::int64_t last = c.p0 + std::min(c.T, (r / 128 + 1) * 128) - 1;
    const bool bad = c.bad_page >= 0 && std::int64_t{c.bad_page} * gpu::kPageRows <= last;
    for (std::size_t i = r * row; i < (r + 1) * row; ++i) {
      if (bad) not_nan += !std::isnan(gpu::from_bf16(&got[i], 1)[0]);
      else differ += std::memcmp(&got[i], &want[i], sizeof(gpu::bf16)) != 0;
    }
  }
  EXPECT_EQ(differ, 0) << "paged output elements that differ from the contiguous run's bits";
  EXPECT_EQ(not_nan, 0) << "outputs of query tiles that load an unallocated page are not NaN";
}

void run_case(const Case& c) {
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
  gpu::DeviceBuffer<gpu::bf16> dout(static_cast<std::size_t>(c.T) * c.Hq * kD);
  dout.fill_bytes(0xFF);  // NaN poison: every element must be written
  gpu::attention_dense_prefill(dq.data(), dk.data(), dv.data(), c.p0, c.T, c.N, dims, dout.data(), nullptr);
  M3_CUDA_CHECK(cudaDeviceSynchronize());
  const auto bits1 = dout.download();
  MatF got = test::download_bf16(dout, c.T, c.Hq * kD);
  ASSERT_TRUE(got.allFinite()) << "an output element is NaN/Inf (unwritten or overflowed)";

  // Same inputs, same bits: a race (missing barrier, stage reused too early) would move them.
  dout.fill_bytes(0xFF);
  gpu::attention_dense_prefill(dq.data(), dk.data(), dv.data(), c.p0, c.T, c.N, dims, dout.data(), nullptr);
  M3_CUDA_CHECK(cudaDeviceSynchronize());
  const auto bits2 = dout.download();
  EXPECT_EQ(std::memcmp(bits1.data(), bits2.data(), bits1.size() * sizeof(gpu::bf16)), 0)
      << "two runs on the same inputs differ";
  if (c.paged) check_paged(c, q, k, v, bits1, g);

  long bad = 0;
  Eigen::Index worst = -1;
  double worst_ratio = 0;
  for (Eigen::Index i = 0; i < got.size(); ++i) {
    const double x = got.data()[i], y = emu.data()[i];
    const double bound = kU * (std::abs(x) + std::abs(y)) + (kU + 0x1p-11) * wabs.data()[i] + 1e-7;
    const double ratio = std::abs(x - y) / bound;
    if (!(ratio <= 1.0)) ++bad;
    if (!(ratio <= worst_ratio)) worst_ratio = ratio, worst = i;
  }
  const Eigen::Index cols = got.cols();
  EXPECT_EQ(bad, 0) << "elements past the bound; worst at row " << worst / cols << " col " << worst % cols
                    << ": gpu " << got.data()[worst] << " emu " << emu.data()[worst] << " (|err|/bound "
                    << worst_ratio << ")";

  const double e_emu = test::rel_l2(emu, exact), e_gpu = test::rel_l2(got, exact), e_vs = test::rel_l2(got, emu);
  EXPECT_LE(e_gpu, 2 * e_emu + kFloor) << "gpu vs fp64 " << e_gpu << ", emulating reference vs fp64 " << e_emu;
  EXPECT_LE(e_vs, kRelL2Gate);
  std::cout << "  " << describe(c) << ": rel-L2 gpu-fp64 " << e_gpu << ", emu-fp64 " << e_emu << ", gpu-emu " << e_vs
            << ", worst |err|/bound " << worst_ratio << "\n";
}

}  // namespace

// The awkward chunk lengths around the 128-row query tile and the 64-key tile, from 0.
TEST(AttentionPrefill_bf16, Gqa16_AwkwardLengths) {
  M3_REQUIRE_GPU();
  for (int T : {1, 15, 64, 127, 128, 129, 300}) run_case({T, 0, T, 16, 1});
}

// Chunked prefill: queries at p0..p0+T-1 with p0 not a tile multiple, and keys past the chunk in the
// cache (N > p0 + T) that no query may see.
TEST(AttentionPrefill_bf16, Gqa2_Chunked) {
  M3_REQUIRE_GPU();
  for (auto [T, p0] : {std::pair{1, 37}, {15, 37}, {64, 200}, {127, 1}, {128, 64}, {129, 63}, {300, 77}})
    run_case({T, p0, static_cast<int>(p0) + T + 5, 4, 2});
}

TEST(AttentionPrefill_bf16, Gqa8_OneKvHead) {
  M3_REQUIRE_GPU();
  run_case({129, 0, 129, 8, 1});
  run_case({200, 1000, 1200, 8, 1});
}

// M3's heads (64 q / 4 kv), short chunks so the fp64 reference stays fast.
TEST(AttentionPrefill_bf16, M3Heads_ShortChunks) {
  M3_REQUIRE_GPU();
  run_case({33, 100, 133, 64, 4});
  run_case({1, 999, 1000, 64, 4});
}

// Peaked softmax (scores of std 8): the running max changes by large steps, so the rescaling of the
// accumulator and the row sum carries the result.
TEST(AttentionPrefill_bf16, Gqa16_PeakedSoftmax) {
  M3_REQUIRE_GPU();
  run_case({129, 64, 193, 16, 1, 8.0});
  run_case({64, 500, 600, 4, 2, 8.0});
}

// Many key tiles (67) in one pass: the double-buffered K/V pipeline over a long loop.
TEST(AttentionPrefill_bf16, Gqa2_LongContext) {
  M3_REQUIRE_GPU();
  run_case({256, 4000, 4256, 4, 2});
}

// A chunk of a page multiple (256 from 0), one of a page + 1 (129), chunked ones from p0 inside a
// page, and capacity N past the chunk (rows never read: NaN in the pool).
TEST(AttentionPrefill_bf16, Paged_BitIdentical) {
  M3_REQUIRE_GPU();
  run_case({256, 0, 256, 16, 1, 1.0, true});
  run_case({129, 0, 300, 4, 2, 1.0, true});
  run_case({300, 77, 500, 4, 2, 1.0, true});
  run_case({200, 1000, 1300, 8, 1, 1.0, true});
  run_case({33, 100, 133, 64, 4, 1.0, true});
}

TEST(AttentionPrefill_bf16, Paged_NegativePageId_GivesNaNTiles) {
  M3_REQUIRE_GPU();
  // Page 2 = keys 256..383: query tile 0 (positions 77..204) is clean, tiles 1 and 2 are NaN.
  run_case({300, 77, 500, 4, 2, 1.0, true, 2});
}

TEST(AttentionPrefill_bf16, RejectsBadArguments) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<gpu::bf16> b(64 * 1024);
  const gpu::bf16* p = b.data();
  gpu::bf16* o = b.data();
  EXPECT_THROW(gpu::attention_dense_prefill(p, p, p, 0, 1, 1, {2, 1, 64}, o, nullptr), gpu::GpuError);   // D 64
  EXPECT_THROW(gpu::attention_dense_prefill(p, p, p, 0, 1, 1, {3, 2, 128}, o, nullptr), gpu::GpuError);  // Hq % Hkv
  EXPECT_THROW(gpu::attention_dense_prefill(p, p, p, 0, 1, 1, {0, 1, 128}, o, nullptr), gpu::GpuError);  // Hq 0
  EXPECT_THROW(gpu::attention_dense_prefill(p, p, p, 5, 4, 8, {1, 1, 128}, o, nullptr), gpu::GpuError);  // p0+T > N
  EXPECT_THROW(gpu::attention_dense_prefill(p, p, p, -1, 1, 8, {1, 1, 128}, o, nullptr), gpu::GpuError);  // p0 < 0
  EXPECT_THROW(gpu::attention_dense_prefill(p, p, p, 0, -1, 8, {1, 1, 128}, o, nullptr), gpu::GpuError);  // T < 0
  EXPECT_THROW(gpu::attention_dense_prefill(p + 1, p, p, 0, 1, 8, {1, 1, 128}, o, nullptr), gpu::GpuError);  // align
  EXPECT_THROW(gpu::attention_dense_prefill(nullptr, p, p, 0, 1, 8, {1, 1, 128}, o, nullptr), gpu::GpuError);
  gpu::DeviceBuffer<std::int32_t> tab(4);
  EXPECT_THROW(gpu::attention_dense_prefill(p, p, p, 0, 1, 300, {1, 1, 128}, o, nullptr, gpu::CachePages{tab.data(), 2}),
               gpu::GpuError);  // 2 pages < 300 rows
  EXPECT_NO_THROW(gpu::attention_dense_prefill(nullptr, nullptr, nullptr, 3, 0, 3, {1, 1, 128}, nullptr, nullptr));
}
