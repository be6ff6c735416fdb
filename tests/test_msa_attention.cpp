// Tests of msa_attention (reference/ops/msa_attention.h): block-sparse attention against a plain
// fp64 restricted softmax on random selections with awkward sizes; the MSA pipeline
// (msa_index -> msa_select -> msa_attention) against dense attention where the spec says they are
// equal (budget covering every visible block; every position below K_blk*BLK) and where they must
// differ (blocks omitted); the exact qk/pv MAC counts of M3's selection; the selection's slot order
// and -1 placement not mattering; bad input.
// Run: build/<dir>/tests/test_msa_attention  (M3_TEST_SEED=<n> reproduces a failing draw)
#include "reference/ops/msa_attention.h"

#include "reference/ops/attention_dense.h"
#include "reference/ops/msa_index.h"
#include "reference/ops/msa_select.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using m3::AttnCounter;
using m3::AttnDims;
using m3::Mat;
using m3::MatD;
using m3::MatI;
using m3::MsaDims;
using m3::test::poison;
using m3::test::randn;
using m3::test::rel_l2;

// fp64 vs fp64 naive: same keys, fp64 softmax on both sides, sums differ only in order (~1e-16
// relative per term). fp32 vs fp64 naive: only the D-term q.k dot products run in fp32 (6e-8 unit
// roundoff, |z| of order 1-10 here) plus the final rounding of the output; 1e-5 leaves a wide
// margin.
template <class T>
constexpr double kTol = sizeof(T) == 8 ? 1e-12 : 1e-5;
// MSA vs dense attention on the same keys (fp32): both take the same fp32 q.k dot products (the
// same Eigen GEMM shape over the same key ranges, or a different summation order at worst: ~1e-7
// relative on z), an fp64 softmax, and differ only in how P.V is accumulated (dense: fp32 GEMM of
// P rounded to fp32, ~sqrt(n) * 6e-8 for the n <= 301 keys here, measured <= 4.1e-7 over 400
// seeds at n = 301; MSA: fp64) and in the output's rounding to fp32. 1e-6 bounds that with room;
// a wrong key set is off by ~1e-1.
constexpr double kDenseTolF32 = 1e-6;

AttnDims attn_dims(int hq, int hkv, int d) { return AttnDims{hq, hkv, d}; }

MsaDims msa_dims(int hi, int di, int blk, int k_blk) {
  MsaDims d;
  d.Hi = hi;
  d.Di = di;
  d.BLK = blk;
  d.K_blk = k_blk;
  d.local_blocks = 1;  // M3
  d.init_blocks = 0;
  return d;
}

std::vector<std::int64_t> iota_positions(std::int64_t n) {
  std::vector<std::int64_t> pos(static_cast<std::size_t>(n));
  std::iota(pos.begin(), pos.end(), 0);
  return pos;
}

// out_h(t) = sum_{j in K} softmax_j(q_h . k_g(j) / sqrt(D)) v_g(j), in fp64 plain loops, with
// K = { j <= p_t : floor(j/blk) in the valid ids of sel row g*T+t } (every j <= p_t when sel is
// null: dense causal attention). keys (optional) gains |K| * G per (t, g) summed: heads x keys.
template <class T>
MatD naive_attention(const Mat<T>& q, const Mat<T>& k, const Mat<T>& v,
                     const std::vector<std::int64_t>& pos, const MatI* sel, int blk,
                     const AttnDims& d, std::uint64_t* keys = nullptr) {
  const std::int64_t n_tok = q.rows();
  const int G = d.Hq / d.Hkv;
  MatD out = MatD::Zero(n_tok, d.Hq * d.D);  // [T, Hq*D]
  for (std::int64_t t = 0; t < n_tok; ++t)
    for (int h = 0; h < d.Hq; ++h) {
      const int g = h / G;
      std::set<std::int64_t> blocks;
      if (sel)
        for (Eigen::Index s = 0; s < sel->cols(); ++s)
          if ((*sel)(g * n_tok + t, s) >= 0) blocks.insert((*sel)(g * n_tok + t, s));
      std::vector<std::int64_t> js;
      for (std::int64_t j = 0; j <= pos[t]; ++j)
        if (!sel || blocks.count(j / blk)) js.push_back(j);
      std::vector<double> z;
      double z_max = -std::numeric_limits<double>::infinity();
      for (std::int64_t j : js) {
        double dot = 0;
        for (int c = 0; c < d.D; ++c)
          dot += static_cast<double>(q(t, h * d.D + c)) * static_cast<double>(k(j, g * d.D + c));
        z.push_back(dot / std::sqrt(static_cast<double>(d.D)));
        z_max = std::max(z_max, z.back());
      }
      double sum = 0;
      for (double& x : z) sum += (x = std::exp(x - z_max));
      for (std::size_t a = 0; a < js.size(); ++a)
        for (int c = 0; c < d.D; ++c)
          out(t, h * d.D + c) += z[a] / sum * static_cast<double>(v(js[a], g * d.D + c));
      if (keys) *keys += js.size();
    }
  return out;
}

// A random selection in msa_select's layout: per (group, query) min(K_blk, L+1) distinct blocks
// of 0..L in random order (the local block not necessarily among them), then -1.
MatI random_selection(const std::vector<std::int64_t>& pos, int hkv, int k_blk, int blk,
                      std::mt19937_64& g) {
  const auto n_tok = static_cast<Eigen::Index>(pos.size());
  MatI sel = MatI::Constant(hkv * n_tok, k_blk, -1);  // [Hkv*T, K_blk]
  for (int grp = 0; grp < hkv; ++grp)
    for (Eigen::Index t = 0; t < n_tok; ++t) {
      std::vector<int> ids(static_cast<std::size_t>(pos[t] / blk + 1));
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), g);
      const int n_valid = std::min<int>(k_blk, int(ids.size()));
      for (int s = 0; s < n_valid; ++s) sel(grp * n_tok + t, s) = ids[s];
    }
  return sel;
}

template <class T>
struct Qkv {
  Mat<T> q, k, v;  // [T, Hq*D], [N, Hkv*D], [N, Hkv*D]
};

template <class T>
Qkv<T> random_qkv(Eigen::Index n_tok, Eigen::Index n, const AttnDims& d, std::mt19937_64& g,
                  double q_scale = 1.0) {
  return {randn<T>(n_tok, d.Hq * d.D, g, q_scale), randn<T>(n, d.Hkv * d.D, g),
          randn<T>(n, d.Hkv * d.D, g)};
}

// Runs the op with poisoned output and checks it is fully written and finite.
template <class T>
Mat<T> run_op(const Qkv<T>& x, const std::vector<std::int64_t>& pos, const MatI& sel, int blk,
              const AttnDims& d, AttnCounter* c = nullptr) {
  Mat<T> out(x.q.rows(), x.q.cols());
  poison(out);
  m3::ref::msa_attention<T>(x.q, x.k, x.v, pos, sel, blk, d, out, c);
  EXPECT_EQ(out.rows(), x.q.rows());
  EXPECT_EQ(out.cols(), x.q.cols());
  EXPECT_TRUE(out.allFinite());
  return out;
}

// The op against the naive restricted softmax on random selections: prefill of n tokens and one
// decode query at n-1, for the awkward lengths of the block size and budget.
template <class T>
void run_random_selection(int hq, int hkv, int D, int blk, int k_blk, double q_scale = 1.0) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const AttnDims d = attn_dims(hq, hkv, D);
  for (std::int64_t n : {std::int64_t{1}, std::int64_t{blk - 1}, std::int64_t{blk + 1},
                         std::int64_t{k_blk} * blk, std::int64_t{k_blk} * blk + 1,
                         std::int64_t{3} * k_blk * blk + 5}) {
    if (n < 1) continue;
    for (bool decode : {false, true}) {
      SCOPED_TRACE("n = " + std::to_string(n) + (decode ? " decode" : " prefill"));
      const std::vector<std::int64_t> pos = decode ? std::vector<std::int64_t>{n - 1}
                                                   : iota_positions(n);
      const auto x = random_qkv<T>(std::int64_t(pos.size()), n, d, g, q_scale);
      const MatI sel = random_selection(pos, hkv, k_blk, blk, g);
      std::uint64_t keys = 0;
      const MatD ref = naive_attention(x.q, x.k, x.v, pos, &sel, blk, d, &keys);
      ASSERT_GT(x.q.norm(), 0);
      ASSERT_GT(ref.norm(), 0);
      AttnCounter c;
      const Mat<T> out = run_op(x, pos, sel, blk, d, &c);
      EXPECT_LE(rel_l2(out, ref), kTol<T>);
      EXPECT_EQ(c.qk_macs, keys * std::uint64_t(D));
      EXPECT_EQ(c.pv_macs, keys * std::uint64_t(D));
      EXPECT_EQ(c.index_macs + c.select_candidates, 0u);
    }
  }
}

TEST(MsaAttention_f32, RandomSelection_Mha1_D8_Blk4) { run_random_selection<float>(1, 1, 8, 4, 3); }
TEST(MsaAttention_f64, RandomSelection_Mha1_D8_Blk4) {
  run_random_selection<double>(1, 1, 8, 4, 3);
}
TEST(MsaAttention_f32, RandomSelection_Gqa4x2_D16_Blk8) {
  run_random_selection<float>(4, 2, 16, 8, 2);
}
TEST(MsaAttention_f64, RandomSelection_Gqa4x2_D16_Blk8) {
  run_random_selection<double>(4, 2, 16, 8, 2);
}
TEST(MsaAttention_f32, RandomSelection_Gqa6x3_OddD7_Blk5) {
  run_random_selection<float>(6, 3, 7, 5, 4);
}
TEST(MsaAttention_f64, RandomSelection_Gqa6x3_OddD7_Blk5) {
  run_random_selection<double>(6, 3, 7, 5, 4);
}
TEST(MsaAttention_f64, RandomSelection_Blk1_D1) { run_random_selection<double>(2, 1, 1, 1, 3); }
// Logits of order +-100: the fp64 max subtraction must keep the softmax finite and exact.
TEST(MsaAttention_f64, RandomSelection_LargeLogits) {
  run_random_selection<double>(4, 2, 16, 8, 2, 40.0);
}

// The MSA pipeline of one layer: index scores, selection, sparse attention (M3 rule: local 1,
// init 0). Index heads = KV groups.
template <class T>
Mat<T> run_pipeline(const Qkv<T>& x, const Mat<T>& idx_q, const Mat<T>& idx_k,
                    const std::vector<std::int64_t>& pos, const MsaDims& md, const AttnDims& d,
                    MatI& sel, AttnCounter* c = nullptr) {
  Mat<T> scores;
  m3::ref::msa_index<T>(idx_q, idx_k, pos, md, scores, c);
  m3::ref::msa_select<T>(scores, pos, md, sel, c);
  return run_op(x, pos, sel, md.BLK, d, c);
}

template <class T>
Mat<T> run_dense(const Qkv<T>& x, const std::vector<std::int64_t>& pos, const AttnDims& d) {
  Mat<T> out(x.q.rows(), x.q.cols());
  poison(out);
  m3::ref::attention_dense<T>(x.q, x.k, x.v, pos, d, out);
  EXPECT_TRUE(out.allFinite());
  return out;
}

// Every row of sel holds exactly the visible blocks 0..L.
void expect_all_visible_selected(const MatI& sel, const std::vector<std::int64_t>& pos, int hkv,
                                 int blk) {
  const auto n_tok = static_cast<Eigen::Index>(pos.size());
  for (int grp = 0; grp < hkv; ++grp)
    for (Eigen::Index t = 0; t < n_tok; ++t) {
      std::set<int> ids;
      for (Eigen::Index s = 0; s < sel.cols(); ++s)
        if (sel(grp * n_tok + t, s) >= 0) ids.insert(sel(grp * n_tok + t, s));
      ASSERT_EQ(std::int64_t(ids.size()), pos[t] / blk + 1) << "group " << grp << " t " << t;
    }
}

// MSA = dense when the budget K_blk covers every visible block (spec §3.4): the pipeline selects
// all of them, so the union is every key j <= p. Checked against attention_dense (the op) and
// against the naive dense loop.
template <class T>
void run_dense_equivalence(int hq, int hkv, int D, int blk, std::int64_t n, bool decode) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const AttnDims d = attn_dims(hq, hkv, D);
  const MsaDims md = msa_dims(hkv, 8, blk, int((n - 1) / blk + 1) + 1);  // K_blk >= NB
  const std::vector<std::int64_t> pos = decode ? std::vector<std::int64_t>{n - 1}
                                               : iota_positions(n);
  const auto n_tok = std::int64_t(pos.size());
  const auto x = random_qkv<T>(n_tok, n, d, g);
  MatI sel;
  const Mat<T> msa = run_pipeline(x, randn<T>(n_tok, hkv * 8, g), randn<T>(n, 8, g), pos, md, d,
                                  sel);
  expect_all_visible_selected(sel, pos, hkv, blk);
  const Mat<T> dense = run_dense(x, pos, d);
  const MatD naive = naive_attention(x.q, x.k, x.v, pos, nullptr, blk, d);
  ASSERT_GT(naive.norm(), 0);
  EXPECT_LE(rel_l2(msa, dense), sizeof(T) == 8 ? kTol<T> : kDenseTolF32);
  EXPECT_LE(rel_l2(msa, naive), kTol<T>);
}

TEST(MsaAttention_f32, Pipeline_BudgetCoversAll_EqualsDense_Prefill) {
  run_dense_equivalence<float>(6, 3, 16, 8, 77, false);
}
TEST(MsaAttention_f64, Pipeline_BudgetCoversAll_EqualsDense_Prefill) {
  run_dense_equivalence<double>(6, 3, 16, 8, 77, false);
}
TEST(MsaAttention_f32, Pipeline_BudgetCoversAll_EqualsDense_Decode) {
  run_dense_equivalence<float>(8, 2, 32, 16, 301, true);
}
TEST(MsaAttention_f64, Pipeline_BudgetCoversAll_EqualsDense_OddD) {
  run_dense_equivalence<double>(4, 4, 9, 4, 23, false);
}

// Below K_blk*BLK tokens MSA is exactly dense (spec §3.4): every p < K_blk*BLK has L+1 <= K_blk.
// M3's budget shape (K_blk 4 < NB never reached), prefill of exactly K_blk*BLK tokens.
template <class T>
void run_below_budget() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const AttnDims d = attn_dims(6, 2, 16);
  const MsaDims md = msa_dims(2, 8, 16, 4);
  for (std::int64_t n : {std::int64_t{1}, std::int64_t{15}, std::int64_t{17}, std::int64_t{64}}) {
    SCOPED_TRACE("n = " + std::to_string(n));
    const auto pos = iota_positions(n);
    const auto x = random_qkv<T>(n, n, d, g);
    MatI sel;
    const Mat<T> msa = run_pipeline(x, randn<T>(n, 2 * 8, g), randn<T>(n, 8, g), pos, md, d, sel);
    expect_all_visible_selected(sel, pos, 2, 16);
    const Mat<T> dense = run_dense(x, pos, d);
    ASSERT_GT(dense.norm(), 0);
    EXPECT_LE(rel_l2(msa, dense), sizeof(T) == 8 ? kTol<T> : kDenseTolF32);
  }
}

TEST(MsaAttention_f32, Pipeline_BelowBudgetTimesBlk_EqualsDense) { run_below_budget<float>(); }
TEST(MsaAttention_f64, Pipeline_BelowBudgetTimesBlk_EqualsDense) { run_below_budget<double>(); }

// Past K_blk*BLK the pipeline drops blocks: the output must move away from dense (the equality
// tests above are not vacuous) and still equal the naive softmax restricted to the selection.
template <class T>
void run_omitted_blocks() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const AttnDims d = attn_dims(4, 2, 16);
  const MsaDims md = msa_dims(2, 8, 8, 2);  // 16 keys at most per query
  const std::int64_t n = 100;
  const auto pos = iota_positions(n);
  const auto x = random_qkv<T>(n, n, d, g);
  MatI sel;
  const Mat<T> msa = run_pipeline(x, randn<T>(n, 2 * 8, g), randn<T>(n, 8, g), pos, md, d, sel);
  const Mat<T> dense = run_dense(x, pos, d);
  const MatD naive = naive_attention(x.q, x.k, x.v, pos, &sel, md.BLK, d);
  ASSERT_GT(naive.norm(), 0);
  // Attention over 16 of ~50 keys on average moves the output by tens of percent; 1e-2 is far
  // above any rounding and far below the real gap.
  EXPECT_GT(rel_l2(msa, dense), 1e-2);
  EXPECT_LE(rel_l2(msa, naive), kTol<T>);
  // The rows p < K_blk*BLK still equal dense (the first 16 tokens).
  EXPECT_LE(rel_l2(msa.topRows(16), dense.topRows(16)), sizeof(T) == 8 ? kTol<T> : kDenseTolF32);
}

TEST(MsaAttention_f32, Pipeline_OmittedBlocks_DiffersFromDense) { run_omitted_blocks<float>(); }
TEST(MsaAttention_f64, Pipeline_OmittedBlocks_DiffersFromDense) { run_omitted_blocks<double>(); }

// M3-style selection (local 1, init 0) attends min(p+1, (K_blk-1)*BLK + p%BLK + 1) keys per
// query: (K_blk-1) full past blocks plus the causal part of the local block. The counts must
// match that formula exactly (the analytic cost model relies on it).
template <class T>
void run_counter(int blk, int k_blk, std::int64_t n) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const AttnDims d = attn_dims(6, 3, 8);
  const MsaDims md = msa_dims(3, 4, blk, k_blk);
  std::vector<std::int64_t> pos = iota_positions(n);
  std::uniform_int_distribution<std::int64_t> pick(0, n - 1);
  for (int extra = 0; extra < 5; ++extra) pos.push_back(pick(g));  // repeated positions too
  const auto n_tok = std::int64_t(pos.size());
  const auto x = random_qkv<T>(n_tok, n, d, g);
  MatI sel;
  AttnCounter c;
  run_pipeline(x, randn<T>(n_tok, 3 * 4, g), randn<T>(n, 4, g), pos, md, d, sel, &c);
  std::uint64_t want = 0, index = 0;
  for (std::int64_t p : pos) {
    const std::int64_t keys =
        std::min<std::int64_t>(p + 1, std::int64_t(k_blk - 1) * blk + p % blk + 1);
    want += std::uint64_t(d.Hq) * d.D * std::uint64_t(keys);
    index += std::uint64_t(md.Hi) * md.Di * std::uint64_t(p + 1);
  }
  EXPECT_EQ(c.qk_macs, want);
  EXPECT_EQ(c.pv_macs, want);
  EXPECT_EQ(c.index_macs, index);
}

TEST(MsaAttention_f32, Counter_M3Selection_Blk8_Topk3) { run_counter<float>(8, 3, 101); }
TEST(MsaAttention_f64, Counter_M3Selection_Blk5_Topk4) { run_counter<double>(5, 4, 64); }
TEST(MsaAttention_f32, Counter_M3Selection_Blk1_Topk1) { run_counter<float>(1, 1, 20); }

// Blocks are visited in ascending id whatever the slot order, and -1 may sit anywhere (accepted):
// shuffling a row and spreading -1 through it gives a bitwise identical output.
TEST(MsaAttention_f32, SlotOrderAndPaddingDoNotMatter) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const AttnDims d = attn_dims(4, 2, 8);
  const int blk = 4, k_blk = 3;
  const auto pos = iota_positions(30);
  const auto x = random_qkv<float>(30, 30, d, g);
  const MatI sel = random_selection(pos, 2, k_blk, blk, g);
  MatI wide = MatI::Constant(sel.rows(), 2 * k_blk, -1);  // [Hkv*T, 2*K_blk]
  for (Eigen::Index r = 0; r < sel.rows(); ++r) {
    std::vector<int> row(sel.row(r).data(), sel.row(r).data() + k_blk);
    row.insert(row.end(), k_blk, -1);
    std::shuffle(row.begin(), row.end(), g);
    for (int s = 0; s < 2 * k_blk; ++s) wide(r, s) = row[s];
  }
  const Mat<float> a = run_op(x, pos, sel, blk, d);
  const Mat<float> b = run_op(x, pos, wide, blk, d);
  ASSERT_GT(a.norm(), 0);
  EXPECT_TRUE(a == b);
}

// Passing an input as out (k, v or q) gives the same result as a separate output.
TEST(MsaAttention_f64, OutputAliasingAnInput) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const AttnDims d = attn_dims(4, 2, 8);
  const auto pos = iota_positions(13);
  const auto x = random_qkv<double>(13, 13, d, g);
  const MatI sel = random_selection(pos, 2, 2, 4, g);
  const Mat<double> want = run_op(x, pos, sel, 4, d);
  for (int which = 0; which < 3; ++which) {
    Qkv<double> y = x;
    Mat<double>& io = which == 0 ? y.q : which == 1 ? y.k : y.v;
    m3::ref::msa_attention<double>(y.q, y.k, y.v, pos, sel, 4, d, io);
    EXPECT_TRUE(io == want) << "out aliasing input " << which;
  }
}

TEST(MsaAttention_f32, BadInputThrows) {
  auto g = m3::test::test_rng();
  const AttnDims d = attn_dims(4, 2, 8);
  const int blk = 4;
  const std::vector<std::int64_t> pos = {3, 9};  // L = 0 and 2
  const auto x = random_qkv<float>(2, 10, d, g);
  MatI sel(4, 2);  // [Hkv*T, K_blk], rows (g0 t0), (g0 t1), (g1 t0), (g1 t1)
  sel << 0, -1, 2, 0, 0, -1, 1, -1;
  Mat<float> out;
  const auto call = [&](const Mat<float>& q, const Mat<float>& k, const Mat<float>& v,
                        const std::vector<std::int64_t>& p, const MatI& s, int b,
                        const AttnDims& dd) {
    m3::ref::msa_attention<float>(q, k, v, p, s, b, dd, out);
  };
  EXPECT_NO_THROW(call(x.q, x.k, x.v, pos, sel, blk, d));
  const Mat<float> k_bad = randn<float>(10, 15, g), k_short = randn<float>(9, 16, g);
  EXPECT_THROW(call(randn<float>(2, 31, g), x.k, x.v, pos, sel, blk, d), std::invalid_argument);
  EXPECT_THROW(call(x.q, k_bad, x.v, pos, sel, blk, d), std::invalid_argument);  // k cols
  EXPECT_THROW(call(x.q, x.k, k_bad, pos, sel, blk, d), std::invalid_argument);  // v cols
  EXPECT_THROW(call(x.q, x.k, k_short, pos, sel, blk, d), std::invalid_argument);  // v rows != N
  EXPECT_THROW(call(x.q, x.k, x.v, {3}, sel, blk, d), std::invalid_argument);  // q_pos size
  EXPECT_THROW(call(x.q, x.k, x.v, {3, 10}, sel, blk, d), std::out_of_range);  // q_pos >= N
  EXPECT_THROW(call(x.q, x.k, x.v, {-1, 9}, sel, blk, d), std::out_of_range);  // q_pos < 0
  EXPECT_THROW(call(x.q, x.k, x.v, pos, sel.topRows(2), blk, d), std::invalid_argument);
  EXPECT_THROW(call(x.q, x.k, x.v, pos, sel, 0, d), std::invalid_argument);  // blk = 0
  EXPECT_THROW(call(x.q, x.k, x.v, pos, sel, blk, attn_dims(4, 3, 8)), std::invalid_argument);
  EXPECT_THROW(call(x.q, x.k, x.v, pos, sel, blk, attn_dims(4, 2, 0)), std::invalid_argument);

  MatI bad = sel;
  bad(0, 0) = 1;  // past the local block L = 0 of p = 3
  EXPECT_THROW(call(x.q, x.k, x.v, pos, bad, blk, d), std::out_of_range);
  bad = sel;
  bad(1, 1) = -2;
  EXPECT_THROW(call(x.q, x.k, x.v, pos, bad, blk, d), std::out_of_range);
  bad = sel;
  bad(1, 1) = 2;  // block 2 twice
  EXPECT_THROW(call(x.q, x.k, x.v, pos, bad, blk, d), std::invalid_argument);
  bad = sel;
  bad(2, 0) = -1;  // a row with no block: the softmax would be over nothing
  EXPECT_THROW(call(x.q, x.k, x.v, pos, bad, blk, d), std::invalid_argument);
}

}  // namespace
