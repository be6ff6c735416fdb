// Tests of msa_index (reference/ops/msa_index.h): block-max index scores against a plain-loop fp64
// formula on fresh random inputs, awkward lengths (partial local block, one token, block edges,
// key chunks crossed), causal masking inside the local block, the exact index_macs count, shape
// checks.
// Run: build/<dir>/tests/test_msa_index  (M3_TEST_SEED=<n> reproduces a failing draw)
#include "reference/ops/msa_index.h"

#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

namespace {

using m3::AttnCounter;
using m3::Mat;
using m3::MatD;
using m3::MsaDims;
using m3::test::poison;
using m3::test::randn;
using m3::test::rel_l2;

// fp64 vs fp64 naive: Di-term dot products differing only in summation order (~1e-16 relative),
// the max then picks the same key. fp32 vs fp64 naive: Di <= 128 terms at 6e-8 unit roundoff
// stay far below 1e-5; where two keys of a block are within that rounding the max may pick the
// other one, whose value differs by the same rounding.
template <class T>
constexpr double kTol = sizeof(T) == 8 ? 1e-12 : 1e-5;

MsaDims msa_dims(int hi, int di, int blk) {
  MsaDims d;
  d.Hi = hi;
  d.Di = di;
  d.BLK = blk;
  d.K_blk = 4;  // unused by msa_index
  return d;
}

// S_i(t, b) = max_{j in block b, j <= p_t} sum_d qI_i(t)[d] kI(j)[d] in fp64; -inf past block L.
template <class T>
MatD naive_index(const Mat<T>& q, const Mat<T>& k, const std::vector<std::int64_t>& pos,
                 const MsaDims& d) {
  const std::int64_t n_tok = static_cast<std::int64_t>(pos.size());
  const std::int64_t p_max = *std::max_element(pos.begin(), pos.end());
  const std::int64_t nb = p_max / d.BLK + 1;
  MatD s(d.Hi * n_tok, nb);  // [Hi*T, NB]
  for (std::int64_t t = 0; t < n_tok; ++t)
    for (int i = 0; i < d.Hi; ++i)
      for (std::int64_t b = 0; b < nb; ++b) {
        double best = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = b * d.BLK; j < (b + 1) * d.BLK && j <= pos[t]; ++j) {
          double dot = 0;
          for (int c = 0; c < d.Di; ++c)
            dot += static_cast<double>(q(t, i * d.Di + c)) * static_cast<double>(k(j, c));
          best = std::max(best, dot);
        }
        s(i * n_tok + t, b) = best;
      }
  return s;
}

// Runs the op on the given inputs and checks it against the naive formula: same shape, -inf
// exactly past each query's block, every visible entry finite and within kTol<T>, exact MACs.
template <class T>
void check_against_naive(const Mat<T>& q, const Mat<T>& k, const std::vector<std::int64_t>& pos,
                         const MsaDims& d) {
  ASSERT_GT(q.norm(), 0);
  ASSERT_GT(k.norm(), 0);
  const MatD ref = naive_index(q, k, pos, d);
  const std::int64_t n_tok = static_cast<std::int64_t>(pos.size());
  Mat<T> scores(ref.rows(), ref.cols());
  poison(scores);
  AttnCounter c;
  m3::ref::msa_index<T>(q, k, pos, d, scores, &c);
  ASSERT_EQ(scores.rows(), ref.rows());
  ASSERT_EQ(scores.cols(), ref.cols());

  // Compare the visible entries as two flat vectors; the invisible ones must be exactly -inf.
  std::vector<double> got, want;
  for (std::int64_t t = 0; t < n_tok; ++t)
    for (int i = 0; i < d.Hi; ++i)
      for (Eigen::Index b = 0; b < ref.cols(); ++b) {
        const double s = static_cast<double>(scores(i * n_tok + t, b));
        if (b <= pos[t] / d.BLK) {
          ASSERT_TRUE(std::isfinite(s)) << "t " << t << " head " << i << " block " << b;
          got.push_back(s);
          want.push_back(ref(i * n_tok + t, b));
        } else {
          ASSERT_EQ(s, -std::numeric_limits<double>::infinity())
              << "t " << t << " head " << i << " block " << b;
        }
      }
  const Eigen::Map<const Eigen::VectorXd> g(got.data(), static_cast<Eigen::Index>(got.size()));
  const Eigen::Map<const Eigen::VectorXd> w(want.data(), static_cast<Eigen::Index>(want.size()));
  ASSERT_GT(w.norm(), 0);
  EXPECT_LE(rel_l2(g, w), kTol<T>);

  std::uint64_t macs = 0;
  for (std::int64_t p : pos) macs += static_cast<std::uint64_t>(d.Hi) * d.Di * (p + 1);
  EXPECT_EQ(c.index_macs, macs);
  EXPECT_EQ(c.qk_macs + c.pv_macs + c.select_candidates, 0u);
}

std::vector<std::int64_t> prefill_positions(std::int64_t n) {
  std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
  std::iota(pos.begin(), pos.end(), 0);
  return pos;
}

// Prefill (positions 0..n-1) and a decode query at n-1, for the awkward lengths of a block size.
template <class T>
void run_lengths(int hi, int di, int blk, int k_blk) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const MsaDims d = msa_dims(hi, di, blk);
  for (std::int64_t n : {std::int64_t{1}, std::int64_t{blk - 1}, std::int64_t{blk},
                         std::int64_t{blk + 1}, std::int64_t{k_blk} * blk,
                         std::int64_t{k_blk} * blk + 1}) {
    if (n < 1) continue;
    SCOPED_TRACE("n = " + std::to_string(n));
    const Mat<T> k = randn<T>(n, di, g);
    const auto pos = prefill_positions(n);
    check_against_naive<T>(randn<T>(n, hi * di, g), k, pos, d);
    check_against_naive<T>(randn<T>(1, hi * di, g), k, {n - 1}, d);
  }
}

TEST(MsaIndex_f32, PrefillAndDecode_Hi4_Di32_Blk16) { run_lengths<float>(4, 32, 16, 4); }
TEST(MsaIndex_f64, PrefillAndDecode_Hi4_Di32_Blk16) { run_lengths<double>(4, 32, 16, 4); }
TEST(MsaIndex_f32, PrefillAndDecode_OddHi3_OddDi7_Blk5) { run_lengths<float>(3, 7, 5, 3); }
TEST(MsaIndex_f64, PrefillAndDecode_OddHi3_OddDi7_Blk5) { run_lengths<double>(3, 7, 5, 3); }
TEST(MsaIndex_f32, PrefillAndDecode_Hi1_Di1_Blk1) { run_lengths<float>(1, 1, 1, 4); }
TEST(MsaIndex_f64, PrefillAndDecode_Hi2_Di8_Blk1) { run_lengths<double>(2, 8, 1, 4); }

// Chunked prefill / MTP verify: unsorted, repeated positions inside a longer cache.
template <class T>
void run_random_positions() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const MsaDims d = msa_dims(3, 16, 8);
  const std::int64_t n = 203;  // not a multiple of BLK
  std::uniform_int_distribution<std::int64_t> pick(0, n - 1);
  std::vector<std::int64_t> pos(17);
  for (auto& p : pos) p = pick(g);
  pos[3] = pos[5];  // a repeated position must give identical rows
  check_against_naive<T>(randn<T>(17, 3 * 16, g), randn<T>(n, 16, g), pos, d);
}

TEST(MsaIndex_f32, RandomPositions_Hi3_Blk8) { run_random_positions<float>(); }
TEST(MsaIndex_f64, RandomPositions_Hi3_Blk8) { run_random_positions<double>(); }

// Keys past the query's position sit in the cache (a later token of the chunk, or a stale slot);
// they are made to dominate every dot product, so any leak into the partial local block shows.
template <class T>
void run_causal_local_block() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const int hi = 2, di = 8, blk = 16;
  const MsaDims d = msa_dims(hi, di, blk);
  const std::int64_t p = 2 * blk + 5, n = 4 * blk;  // local block 2 holds keys 32..37 of 32..47
  Mat<T> q = randn<T>(1, hi * di, g);
  q.block(0, di, 1, di) = T(0.5) * q.block(0, 0, 1, di);  // both heads point the same way
  Mat<T> k = randn<T>(n, di, g);
  // q_i . k_j gains >= 500 |q_0|^2 (~4000): far above any random dot product (~|q||k| ~ 8).
  for (std::int64_t j = p + 1; j < n; ++j) k.row(j) += T(1000) * q.block(0, 0, 1, di);
  check_against_naive<T>(q, k, {p}, d);
  Mat<T> scores;
  m3::ref::msa_index<T>(q, k, std::vector<std::int64_t>{p}, d, scores);
  ASSERT_EQ(scores.cols(), 3);
  for (int i = 0; i < hi; ++i) EXPECT_LT(scores(i, 2), T(100)) << "head " << i;
}

TEST(MsaIndex_f32, Decode_PartialLocalBlockIsCausal) { run_causal_local_block<float>(); }
TEST(MsaIndex_f64, Decode_PartialLocalBlockIsCausal) { run_causal_local_block<double>(); }

// Contexts longer than the op's 4096-key chunk: block sizes that do not divide it (48), that
// exceed it (5000) and a power of two, so chunk edges fall on and off block edges.
template <class T>
void run_long_context(int blk) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const MsaDims d = msa_dims(2, 4, blk);
  const std::int64_t n = 10007;
  const std::vector<std::int64_t> pos = {n - 1, 4095, 4096, 8191, 8192, blk - 1, blk, 0};
  check_against_naive<T>(randn<T>(8, 2 * 4, g), randn<T>(n, 4, g), pos, d);
}

TEST(MsaIndex_f32, LongContext_CrossesKeyChunks_Blk48) { run_long_context<float>(48); }
TEST(MsaIndex_f64, LongContext_CrossesKeyChunks_Blk128) { run_long_context<double>(128); }
TEST(MsaIndex_f32, LongContext_BlockLargerThanChunk_Blk5000) { run_long_context<float>(5000); }

// A NaN dot product shows in its block's score (PropagateNaN), and only there.
TEST(MsaIndex_f32, NanKeyPoisonsOnlyItsBlock) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const MsaDims d = msa_dims(1, 4, 4);
  Mat<float> k = randn<float>(12, 4, g);
  k(5, 2) = std::numeric_limits<float>::quiet_NaN();  // block 1
  Mat<float> scores;
  m3::ref::msa_index<float>(randn<float>(1, 4, g), k, std::vector<std::int64_t>{11}, d, scores);
  EXPECT_TRUE(std::isfinite(scores(0, 0)));
  EXPECT_TRUE(std::isnan(scores(0, 1)));
  EXPECT_TRUE(std::isfinite(scores(0, 2)));
}

// Passing idx_q or idx_k as scores gives the same result as a separate output; no tokens give
// an empty score matrix.
TEST(MsaIndex_f64, OutputAliasingAnInput_ZeroTokens) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const MsaDims d = msa_dims(2, 4, 4);
  const Mat<double> q = randn<double>(3, 8, g), k = randn<double>(11, 4, g);
  const std::vector<std::int64_t> pos = {10, 2, 7};
  Mat<double> want;
  m3::ref::msa_index<double>(q, k, pos, d, want);
  Mat<double> q2 = q, k2 = k;
  m3::ref::msa_index<double>(q2, k, pos, d, q2);
  EXPECT_TRUE(q2 == want);
  m3::ref::msa_index<double>(q, k2, pos, d, k2);
  EXPECT_TRUE(k2 == want);
  Mat<double> s = want;
  m3::ref::msa_index<double>(Mat<double>(0, 8), k, std::vector<std::int64_t>{}, d, s);
  EXPECT_EQ(s.size(), 0);
}

TEST(MsaIndex_f32, BadInputThrows) {
  auto g = m3::test::test_rng();
  const MsaDims d = msa_dims(2, 8, 4);
  const Mat<float> q = randn<float>(3, 16, g), k = randn<float>(10, 8, g);
  const std::vector<std::int64_t> pos = {0, 5, 9};
  Mat<float> s;
  EXPECT_NO_THROW(m3::ref::msa_index<float>(q, k, pos, d, s));
  EXPECT_THROW(m3::ref::msa_index<float>(randn<float>(3, 15, g), k, pos, d, s),
               std::invalid_argument);  // idx_q cols != Hi*Di
  EXPECT_THROW(m3::ref::msa_index<float>(q, randn<float>(10, 16, g), pos, d, s),
               std::invalid_argument);  // idx_k cols != Di
  EXPECT_THROW(m3::ref::msa_index<float>(q, k, std::vector<std::int64_t>{0, 5}, d, s),
               std::invalid_argument);  // q_pos size != T
  EXPECT_THROW(m3::ref::msa_index<float>(q, k, std::vector<std::int64_t>{0, 5, 10}, d, s),
               std::out_of_range);  // q_pos == N
  EXPECT_THROW(m3::ref::msa_index<float>(q, k, std::vector<std::int64_t>{0, -1, 9}, d, s),
               std::out_of_range);  // q_pos < 0
  for (MsaDims bad : {msa_dims(2, 8, 0), msa_dims(0, 8, 4), msa_dims(2, 0, 4)})
    EXPECT_THROW(m3::ref::msa_index<float>(q, k, pos, bad, s), std::invalid_argument);
}

}  // namespace
