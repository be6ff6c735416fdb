// gpu::sm90_msa_index (wgmma + TMA, Hopper only, Di = BLK = 128) against ref::msa_index in fp32 on
// the same bf16 inputs, and against the portable gpu::msa_index on the same device buffers.
// Both sides sum the same exact bf16 products in fp32 in different orders, so a score is within
// 2 * gamma_Di * ||q_i|| * max_j ||k_j|| of the reference (gamma_n = n * 2^-24, the fp32 dot-product
// bound, doubled for the two sides), and the two GPU kernels within twice that of each other.
// -inf (blocks past a query's own block, the extra columns up to NB) and NaN / +-inf must match
// exactly. Index-K rows past the chunk (>= p0 + T) hold NaN: the kernel must not read them. Queries
// sit at p0..p0+T-1 with p0 and T awkward (inside a block, tiles of 64 queries cut short, a CTA's
// head group cut short for Hi = 5). Short chunks against long caches split the key blocks over
// several CTAs (disjoint ranges of whole 8-block groups; the last group of a range cut short).
#include "gpu/kernels/msa_index.h"
#include "gpu/kernels/sm90_msa_index.h"
#include "reference/ops/msa_index.h"
#include "tests/gpu/gpu_test_util.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

using namespace m3;
using m3::test::bf16_exact;

namespace {

constexpr int kDi = 128, kBlk = 128;
constexpr double kRelL2 = 1e-5;  // fp32 path (DESIGN §4): the scores are fp32 dot products

#define M3_REQUIRE_SM90()                                                                                    \
  do {                                                                                                       \
    M3_REQUIRE_GPU();                                                                                        \
    if (!gpu::sm90_msa_index_available())                                                                    \
      GTEST_SKIP() << "sm90_msa_index unavailable (needs compute capability 9.0 and an sm_90a build): skipped"; \
  } while (0)

struct Case {
  int T;
  std::int64_t p0;
  int N;  // cache rows; >= p0 + T (rows past p0 + T hold NaN)
  int Hi = 4;
  int extra_nb = 2;      // columns beyond ceil(N/BLK)
  bool special = false;  // +inf / NaN in a few visible index-K rows
};

std::string describe(const Case& c) {
  return "T=" + std::to_string(c.T) + " p0=" + std::to_string(c.p0) + " N=" + std::to_string(c.N) +
         " Hi=" + std::to_string(c.Hi) + " extra_nb=" + std::to_string(c.extra_nb) + (c.special ? " non-finite" : "");
}

void run_case(const Case& c) {
  SCOPED_TRACE(describe(c));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const MsaDims dims{c.Hi, kDi, kBlk, 16, 1, 0};
  const MatF q = bf16_exact(test::randn<float>(c.T, c.Hi * kDi, g));  // [T, Hi*Di]
  MatF k = bf16_exact(test::randn<float>(c.N, kDi, g));                 // [N, Di]
  const auto kv_end = static_cast<Eigen::Index>(c.p0 + c.T);
  if (c.special) {
    std::uniform_int_distribution<Eigen::Index> row(0, kv_end - 1), col(0, kDi - 1);
    for (int s = 0; s < 3; ++s) k(row(g), col(g)) = std::numeric_limits<float>::infinity();
    k(row(g), col(g)) = std::numeric_limits<float>::quiet_NaN();
  }
  for (Eigen::Index j = kv_end; j < c.N; ++j) k.row(j).setConstant(std::numeric_limits<float>::quiet_NaN());
  std::vector<std::int64_t> pos(c.T);  // [T]
  std::iota(pos.begin(), pos.end(), c.p0);
  const int NB = (c.N + kBlk - 1) / kBlk + c.extra_nb;

  auto dq = test::upload_bf16(q);
  auto dk = test::upload_bf16(k);
  gpu::DeviceBuffer<std::int64_t> dpos(pos.size());
  dpos.upload(pos);
  const std::size_t n_scores = static_cast<std::size_t>(c.Hi) * c.T * NB;
  gpu::DeviceBuffer<float> dsc(n_scores);
  dsc.fill_bytes(0xFF);  // NaN: every column of every row must be written
  gpu::sm90_msa_index(dq.data(), dk.data(), c.p0, c.T, c.N, NB, dims, dsc.data(), nullptr);
  const auto got = dsc.download();
  dsc.fill_bytes(0xFF);
  gpu::msa_index(dq.data(), dk.data(), dpos.data(), c.T, c.N, NB, dims, dsc.data(), nullptr);
  const auto portable = dsc.download();

  MatF ref;  // [Hi*T, NBr]
  ref::msa_index<float>(q, MatF(k.topRows(kv_end)), pos, dims, ref);
  float kmax = 0;
  for (Eigen::Index j = 0; j < kv_end; ++j)
    if (k.row(j).allFinite()) kmax = std::max(kmax, k.row(j).norm());
  double num = 0, den = 0;
  long finite = 0, bad = 0, bad_portable = 0;
  auto same_class = [](float a, float b) {  // NaN, -inf and +inf must match exactly
    if (std::isnan(b)) return std::isnan(a);
    if (std::isinf(b)) return a == b;
    return std::isfinite(a);
  };
  for (Eigen::Index r = 0; r < ref.rows(); ++r) {
    const int i = static_cast<int>(r / c.T), t = static_cast<int>(r % c.T);
    const double tol = 2.0 * kDi * 0x1p-24 * q.row(t).segment(static_cast<Eigen::Index>(i) * kDi, kDi).norm() * kmax;
    for (int col = 0; col < NB; ++col) {
      const float want = col < ref.cols() ? ref(r, col) : -std::numeric_limits<float>::infinity();
      const float a = got[static_cast<std::size_t>(r) * NB + col], p = portable[static_cast<std::size_t>(r) * NB + col];
      bool ok = same_class(a, want);
      if (ok && std::isfinite(want)) {
        ok = std::abs(a - want) <= tol;
        num += (a - want) * double(a - want);
        den += double(want) * want;
        ++finite;
      }
      if (!ok && ++bad <= 5)
        ADD_FAILURE() << "row " << r << " (head " << i << ", t " << t << ") block " << col << ": sm90 " << a << ", ref "
                      << want << " (tol " << tol << ")";
      const bool ok_p = same_class(a, p) && (!std::isfinite(p) || std::abs(a - p) <= 2 * tol);
      if (!ok_p && ++bad_portable <= 3)
        ADD_FAILURE() << "row " << r << " block " << col << ": sm90 " << a << ", msa_index " << p;
    }
  }
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(bad_portable, 0);
  EXPECT_GT(finite, 0);
  EXPECT_LE(std::sqrt(num / std::max(den, 1e-300)), kRelL2);
}

}  // namespace

TEST(Sm90MsaIndex, AwkwardChunks_M3Heads) {
  M3_REQUIRE_SM90();
  run_case({1, 0, 1});
  run_case({37, 0, 37});
  run_case({64, 0, 64, 4, 0});  // NB exactly ceil(N/BLK)
  run_case({65, 0, 300});
  run_case({200, 5, 300});
  run_case({130, 127, 1000});
  run_case({129, 128, 257});
  run_case({300, 1000, 2049});
}

// Few query tiles against many blocks: the launcher splits the blocks over CTAs (on 132 SMs: 2, 4,
// 7 and 2 splits below; LongContext_LateChunk makes 17 and 31), the last range ending inside an
// 8-block group.
TEST(Sm90MsaIndex, KeySplits_ShortChunkLongCache) {
  M3_REQUIRE_SM90();
  run_case({100, 9000, 9300});
  run_case({64, 20000, 20100, 5});
  run_case({1, 30000, 30001});
  run_case({150, 12000, 12200, 4, 2, true});
}

TEST(Sm90MsaIndex, HeadGroups_CutShort) {
  M3_REQUIRE_SM90();
  for (int Hi : {1, 3, 5, 8}) run_case({77, 200, 500, Hi});
}

TEST(Sm90MsaIndex, NonFiniteKeysPropagate) {
  M3_REQUIRE_SM90();
  run_case({100, 0, 100, 4, 2, true});
  run_case({333, 2000, 5000, 4, 2, true});
}

TEST(Sm90MsaIndex, LongContext_LateChunk) {
  M3_REQUIRE_SM90();
  run_case({300, 70000, 70300});
  run_case({256, 129000, 131072, 4, 3});
}

TEST(Sm90MsaIndex, RejectsBadArguments) {
  M3_REQUIRE_SM90();
  auto dq = test::upload_bf16(MatF(MatF::Ones(8, 4 * kDi)));
  auto dk = test::upload_bf16(MatF(MatF::Ones(256, kDi)));
  gpu::DeviceBuffer<float> dsc(4 * 8 * 4);
  const MsaDims ok{4, kDi, kBlk, 16, 1, 0};
  EXPECT_THROW(gpu::sm90_msa_index(dq.data(), dk.data(), 0, 8, 256, 4, MsaDims{4, 64, kBlk, 16, 1, 0}, dsc.data(), nullptr),
               gpu::GpuError);  // Di 64
  EXPECT_THROW(gpu::sm90_msa_index(dq.data(), dk.data(), 0, 8, 256, 4, MsaDims{4, kDi, 64, 16, 1, 0}, dsc.data(), nullptr),
               gpu::GpuError);  // BLK 64
  EXPECT_THROW(gpu::sm90_msa_index(dq.data(), dk.data(), 250, 8, 256, 4, ok, dsc.data(), nullptr), gpu::GpuError);
  EXPECT_THROW(gpu::sm90_msa_index(dq.data(), dk.data(), 0, 8, 256, 1, ok, dsc.data(), nullptr), gpu::GpuError);  // NB
  EXPECT_THROW(gpu::sm90_msa_index(dq.data(), dk.data(), -1, 8, 256, 4, ok, dsc.data(), nullptr), gpu::GpuError);
  EXPECT_NO_THROW(gpu::sm90_msa_index(dq.data(), dk.data(), 0, 0, 256, 4, ok, dsc.data(), nullptr));  // T = 0
}
