// Tests of msa_attention_cp (reference/ops/msa_attention_cp.h), context-parallel MSA: on fresh
// random caches split into 1-5 shards at random block boundaries (empty shards, a shard past the
// query, the query's own block in any shard), the selection must equal msa_select on the whole
// cache's msa_index scores exactly (slot order included), also with many exact score ties across
// shards and NaN blocks; the output must equal msa_attention on that selection to fp64 rounding
// (fp32: the q.k products may round differently in a different product shape). Bad arguments give
// clear errors. Run: build/<dir>/tests/test_msa_attention_cp  (M3_TEST_SEED=<n> reproduces a draw)
#include "reference/ops/msa_attention.h"
#include "reference/ops/msa_attention_cp.h"
#include "reference/ops/msa_index.h"
#include "reference/ops/msa_select.h"

#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using m3::AttnDims;
using m3::Mat;
using m3::MatI;
using m3::MsaDims;
using m3::test::poison;

struct Shape {
  int T, N, Hkv, G, D, Di, BLK, K_blk, local, init;
};

// Random interior boundaries at block multiples below N (repeats give empty shards), R shards.
std::vector<std::int64_t> random_shards(int R, int N, int BLK, std::mt19937_64& g) {
  std::vector<std::int64_t> b = {0};
  std::uniform_int_distribution<int> blocks(0, (N - 1) / BLK + 1);
  for (int r = 1; r < R; ++r) b.push_back(std::min<std::int64_t>(std::int64_t{blocks(g)} * BLK, N));
  std::sort(b.begin() + 1, b.end());
  b.push_back(N);
  return b;
}

// ties: idx_q and idx_k integer-valued in [-1, 1], so block maxima tie often, across shards too.
// nan_block >= 0: that block's index keys are NaN (its score is NaN, ranked as -inf).
template <class T>
void run(const Shape& s, int R, bool decode, bool ties, int nan_block, std::mt19937_64& g) {
  const AttnDims ad{s.Hkv * s.G, s.Hkv, s.D};
  const MsaDims md{s.Hkv, s.Di, s.BLK, s.K_blk, s.local, s.init};  // Hi = Hkv: one index head a group
  Mat<T> q = m3::test::randn<T>(s.T, ad.Hq * s.D, g), k = m3::test::randn<T>(s.N, s.Hkv * s.D, g);  // [T, Hq*D], [N, Hkv*D]
  Mat<T> v = m3::test::randn<T>(s.N, s.Hkv * s.D, g);                                               // [N, Hkv*D]
  Mat<T> iq = m3::test::randn<T>(s.T, md.Hi * s.Di, g), ik = m3::test::randn<T>(s.N, s.Di, g);     // [T, Hi*Di], [N, Di]
  if (ties) {
    std::uniform_int_distribution<int> small(-1, 1);
    for (Eigen::Index i = 0; i < iq.size(); ++i) iq.data()[i] = static_cast<T>(small(g));
    for (Eigen::Index i = 0; i < ik.size(); ++i) ik.data()[i] = static_cast<T>(small(g));
  }
  if (nan_block >= 0)
    for (std::int64_t j = std::int64_t{nan_block} * s.BLK; j < std::min<std::int64_t>((nan_block + 1) * s.BLK, s.N); ++j)
      ik.row(j).setConstant(std::numeric_limits<T>::quiet_NaN());
  std::vector<std::int64_t> pos(static_cast<std::size_t>(s.T));  // [T]
  std::uniform_int_distribution<int> any(0, s.N - 1);
  for (auto& p : pos) p = decode ? s.N - 1 : any(g);
  const auto shards = random_shards(R, s.N, s.BLK, g);
  std::string where = "shards";
  for (auto b : shards) where += " " + std::to_string(b);
  SCOPED_TRACE(where + (ties ? ", ties" : "") + (nan_block >= 0 ? ", NaN block " + std::to_string(nan_block) : ""));

  Mat<T> scores, want_out, got_out;
  MatI want_sel, got_sel;
  m3::ref::msa_index<T>(iq, ik, pos, md, scores);
  m3::ref::msa_select<T>(scores, pos, md, want_sel);
  m3::ref::msa_attention<T>(q, k, v, pos, want_sel, s.BLK, ad, want_out);
  got_sel.resize(want_sel.rows(), want_sel.cols());
  got_sel.setConstant(-7);
  got_out.resize(want_out.rows(), want_out.cols());
  poison(got_out);
  m3::ref::msa_attention_cp<T>(q, iq, k, v, ik, pos, shards, md, ad, got_sel, got_out);

  ASSERT_EQ(got_sel.rows(), want_sel.rows());
  ASSERT_EQ(got_sel.cols(), want_sel.cols());
  for (Eigen::Index r = 0; r < want_sel.rows(); ++r)
    for (Eigen::Index c = 0; c < want_sel.cols(); ++c)
      ASSERT_EQ(got_sel(r, c), want_sel(r, c)) << "sel(" << r << ", " << c << ")";
  ASSERT_TRUE(got_out.allFinite());
  // fp64: both sides run the same T products and an fp64 softmax in another order (per shard,
  // then the merge): a few ulps. fp32: the q.k products of a [G, D] x [D, 1] and a [G, D] x
  // [D, n] product may round differently (one fp32 ulp of a logit of size ~sqrt(D)).
  const double tol = std::is_same_v<T, double> ? 1e-12 : 1e-5;
  for (Eigen::Index t = 0; t < want_out.rows(); ++t) {
    const double rel = m3::test::rel_l2(got_out.row(t), want_out.row(t));
    ASSERT_LE(rel, tol) << "query " << t << " at position " << pos[static_cast<std::size_t>(t)];
  }
}

const Shape kShapes[] = {
    {1, 1, 2, 4, 16, 8, 16, 4, 1, 0},     // one key
    {5, 37, 2, 4, 16, 8, 16, 4, 1, 0},    // a partial last block
    {7, 300, 2, 4, 16, 8, 16, 4, 1, 1},   // an init block too
    {3, 1000, 1, 8, 32, 16, 64, 6, 1, 0}, // one group of 8 heads
    {4, 2049, 4, 2, 16, 8, 128, 5, 2, 1}, // M3's block size, two local blocks
};

}  // namespace

TEST(MsaAttentionCp, EqualsTheWholeCacheSelectionAndOutput_f64) {
  auto g = m3::test::test_rng();
  for (const Shape& s : kShapes)
    for (int R : {1, 2, 3, 5})
      for (bool decode : {true, false}) {
        SCOPED_TRACE("N " + std::to_string(s.N) + ", R " + std::to_string(R) + (decode ? ", decode" : ""));
        run<double>(s, R, decode, false, -1, g);
      }
}

TEST(MsaAttentionCp, EqualsTheWholeCacheSelectionAndOutput_f32) {
  auto g = m3::test::test_rng();
  for (const Shape& s : kShapes)
    for (int R : {2, 4}) run<float>(s, R, false, false, -1, g);
}

// Integer-valued index vectors: equal block maxima everywhere, so the cross-shard merge decides
// by block id; and a NaN block, which must lose to every finite score in its shard and the merge.
TEST(MsaAttentionCp, TiesAcrossShardsAndNaNBlocks) {
  auto g = m3::test::test_rng();
  for (const Shape& s : kShapes) {
    if (s.N < 2 * s.BLK) continue;
    for (int R : {2, 3, 5}) {
      run<double>(s, R, false, true, -1, g);
      run<double>(s, R, true, true, 1, g);
      run<double>(s, R, false, false, 0, g);
    }
  }
}

TEST(MsaAttentionCp, RejectsBadShardsAndShapes) {
  auto g = m3::test::test_rng();
  const AttnDims ad{8, 2, 16};
  const MsaDims md{2, 8, 16, 4, 1, 0};  // Hi, Di, BLK, K_blk, local_blocks, init_blocks
  const Mat<double> q = m3::test::randn<double>(1, 8 * 16, g), iq = m3::test::randn<double>(1, 16, g);
  const Mat<double> k = m3::test::randn<double>(100, 32, g), v = m3::test::randn<double>(100, 32, g);
  const Mat<double> ik = m3::test::randn<double>(100, 8, g);
  const std::vector<std::int64_t> pos = {99};
  MatI sel;
  Mat<double> out;
  auto call = [&](std::vector<std::int64_t> shards, const MsaDims& m = {}) {
    m3::ref::msa_attention_cp<double>(q, iq, k, v, ik, pos, shards, m.Hi ? m : md, ad, sel, out);
  };
  auto message = [&](std::vector<std::int64_t> shards) -> std::string {
    try {
      call(std::move(shards));
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "(no error)";
  };
  EXPECT_NE(message({0, 40, 100}).find("not a multiple of BLK = 16"), std::string::npos);
  EXPECT_NE(message({0, 64, 32, 100}).find("must not decrease"), std::string::npos);
  EXPECT_NE(message({0, 64, 96}).find("from 0 to N = 100"), std::string::npos);
  EXPECT_NE(message({0}).find("R+1 >= 2"), std::string::npos);
  MsaDims three = md;
  three.Hi = 3;
  EXPECT_THROW(call({0, 100}, three), std::invalid_argument);
  const std::vector<std::int64_t> late = {100};
  EXPECT_THROW(m3::ref::msa_attention_cp<double>(q, iq, k, v, ik, late, std::vector<std::int64_t>{0, 100}, md, ad, sel,
                                                 out),
               std::out_of_range);
  EXPECT_NO_THROW(call({0, 64, 64, 100}));  // an empty shard is fine
}
