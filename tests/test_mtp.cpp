// An MTP module of the reference (spec §7) as a one-layer model with an MTP input:
//   x = eh_proj([enorm(Embed(next token)) ; hnorm(h_prev)])  (embedding zeroed at position 0),
//   one MSA + MoE layer, the module's final norm, the shared LM head.
// Checked against the same layer run as a plain one-layer model whose "embedding table" holds the
// x rows computed here from the ops (so the module's input path and its sharing of the layer path
// are what is tested), decode = prefill, position 0 ignoring its token, the main model's hidden
// states as h_prev, weights deterministic and distinct per module, bad requests refused; then
// draft-and-check decoding (generate_mtp), seeded and with planted weights that make drafts right.
#include "reference/model.h"
#include "reference/mtp.h"
#include "reference/ops/embedding.h"
#include "reference/ops/linear.h"
#include "reference/ops/rms_norm.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace {

using m3::MatD;
using m3::test::random_tokens;

struct TinyMtp {
  m3::ModelConfig cfg = m3::preset("tiny");
  m3::ModelWeights<float> main;
  m3::ModelWeights<float> mod;  // module 1 of 2
  explicit TinyMtp(std::uint64_t seed) {
    cfg.num_mtp_modules = 2;
    main = m3::generate_weights(cfg, seed);
    mod = m3::generate_mtp_module(cfg, 1, seed, main);
  }
};

// 70 tokens: past K_blk * BLK = 64, so the module's MSA layer really selects.
constexpr int kLen = 70;

}  // namespace

TEST(Mtp, ModuleEqualsItsLayerFedTheOpsInput) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  TinyMtp t(g());
  const m3::ModelConfig mc = m3::mtp_module_config(t.cfg);
  ASSERT_EQ(mc.num_hidden_layers, 1);
  ASSERT_EQ(mc.layer_types[0], m3::AttnType::MSA);
  ASSERT_EQ(mc.mlp_layer_types[0], m3::MlpType::MOE);
  const auto next = random_tokens(kLen, t.cfg.vocab_size, g);
  const MatD h_prev = m3::test::randn<double>(kLen, t.cfg.hidden_size, g);  // [T, H]

  m3::Model module(mc, t.mod, m3::Precision::FP64);
  m3::Sequence s = module.new_sequence();
  m3::Sequence* seqs[] = {&s};
  std::span<const std::int32_t> toks[] = {next};
  const MatD* hin[] = {&h_prev};
  std::vector<MatD> hidden;
  const MatD got = module.forward(seqs, toks, {}, hin, &hidden)[0];  // [T, V]

  // The same input from the ops, in fp64.
  const double eps = t.cfg.rms_norm_eps;
  const auto& mi = *t.mod.mtp_in;
  m3::MatD e, en, hn, x;  // [T, H]
  m3::ref::embedding(m3::MatD(t.main.embed_tokens.cast<double>()), next, e);
  e.row(0).setZero();  // position 0
  m3::ref::rms_norm(e, m3::Vec<double>(mi.enorm.cast<double>()), eps, en);
  m3::ref::rms_norm(h_prev, m3::Vec<double>(mi.hnorm.cast<double>()), eps, hn);
  m3::MatD cat(kLen, 2 * t.cfg.hidden_size);  // [T, 2H]
  cat << en, hn;
  m3::ref::linear(cat, m3::MatD(mi.eh_proj.cast<double>()), x);
  std::map<std::string, MatD> tr;
  m3::Sequence s2 = module.new_sequence();
  m3::Sequence* seqs2[] = {&s2};
  module.forward(seqs2, toks, [&](int, const std::string& n, const m3::TraceView& v) {
    MatD m(v.rows, v.cols);
    for (std::int64_t r = 0; r < v.rows; ++r)
      for (std::int64_t c = 0; c < v.cols; ++c) m(r, c) = v.at(r, c);
    tr[n] = m;
  }, hin, nullptr);
  ASSERT_TRUE(tr.count("mtp.x") && tr.count("mtp.enorm") && tr.count("mtp.hnorm") && tr.count("blk.0.out"));
  EXPECT_LE((tr["mtp.x"] - x).cwiseAbs().maxCoeff(), 1e-12 * x.cwiseAbs().maxCoeff()) << "eh_proj input";
  EXPECT_EQ(tr["mtp.enorm"].row(0).cwiseAbs().maxCoeff(), 0.0) << "position 0's embedding must be zeroed";
  ASSERT_EQ(hidden.size(), 1u);
  EXPECT_EQ((hidden[0] - tr["blk.0.out"]).cwiseAbs().maxCoeff(), 0.0) << "hidden_out is the last layer's output";
  EXPECT_EQ(got.rows(), kLen);
  EXPECT_EQ(got.cols(), t.cfg.vocab_size);

  // The layer path is the plain model's: a one-layer model with the module's layer, norm and head
  // and no MTP input, whose embedding row i is x_i, fed tokens 0..T-1. Its table is fp32
  // (ModelWeights<float>), so it sees x rounded to fp32 (2^-24 relative): the outputs agree to that
  // rounding carried through one layer (1e-4 of the largest value leaves a wide margin; an input
  // path that differed would be off by O(1)).
  m3::ModelConfig pc = mc;
  pc.vocab_size = kLen;
  m3::ModelWeights<float> pw;
  pw.embed_tokens = x.cast<float>();
  pw.layers = t.mod.layers;
  pw.norm = t.mod.norm;
  pw.lm_head = t.mod.lm_head.topRows(kLen);
  m3::Model plain(pc, pw, m3::Precision::FP64);
  std::vector<std::int32_t> ids(kLen);
  for (int i = 0; i < kLen; ++i) ids[static_cast<std::size_t>(i)] = i;
  m3::Sequence ps = plain.new_sequence();
  std::vector<MatD> phidden;
  m3::Sequence* pseqs[] = {&ps};
  std::span<const std::int32_t> ptoks[] = {ids};
  plain.forward(pseqs, ptoks, {}, {}, &phidden);
  EXPECT_LE((hidden[0] - phidden[0]).cwiseAbs().maxCoeff(), 1e-4 * phidden[0].cwiseAbs().maxCoeff());
}

TEST(Mtp, DecodeEqualsPrefillAndPositionZeroIgnoresItsToken) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  TinyMtp t(g());
  m3::Model module(m3::mtp_module_config(t.cfg), t.mod, m3::Precision::FP64);
  const auto next = random_tokens(kLen, t.cfg.vocab_size, g);
  const MatD h_prev = m3::test::randn<double>(kLen, t.cfg.hidden_size, g);
  auto run = [&](std::span<const std::int32_t> tok, const MatD& h, m3::Sequence& s) {
    m3::Sequence* seqs[] = {&s};
    std::span<const std::int32_t> toks[] = {tok};
    const MatD* hin[] = {&h};
    return module.forward(seqs, toks, {}, hin, nullptr)[0];
  };
  m3::Sequence whole = module.new_sequence();
  const MatD all = run(next, h_prev, whole);
  m3::Sequence step = module.new_sequence();
  MatD rows(kLen, t.cfg.vocab_size);
  for (int i = 0; i < kLen; ++i) {
    const MatD hi = h_prev.row(i);
    rows.row(i) = run(std::span<const std::int32_t>(&next[static_cast<std::size_t>(i)], 1), hi, step).row(0);
  }
  EXPECT_LE((all - rows).cwiseAbs().maxCoeff(), 1e-9 * all.cwiseAbs().maxCoeff());
  // Position 0's token does not matter (its embedding is zeroed); position 1's does.
  auto other = next;
  other[0] = (next[0] + 1) % t.cfg.vocab_size;
  other[1] = (next[1] + 1) % t.cfg.vocab_size;
  m3::Sequence s3 = module.new_sequence();
  const MatD alt = run(other, h_prev, s3);
  EXPECT_EQ((alt.row(0) - all.row(0)).cwiseAbs().maxCoeff(), 0.0);
  EXPECT_GT((alt.row(1) - all.row(1)).cwiseAbs().maxCoeff(), 0.0);
}

TEST(Mtp, TakesTheMainModelsHiddenStatesInEveryPrecision) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  TinyMtp t(g());
  const auto prompt = random_tokens(kLen + 1, t.cfg.vocab_size, g);
  std::vector<MatD> logits;
  for (m3::Precision p : {m3::Precision::FP64, m3::Precision::FP32, m3::Precision::BF16}) {
    m3::Model main(t.cfg, t.main, p);
    m3::Sequence ms = main.new_sequence();
    m3::Sequence* mseqs[] = {&ms};
    const std::span<const std::int32_t> head(prompt.data(), kLen);
    std::span<const std::int32_t> mtoks[] = {head};
    std::vector<MatD> hidden;
    main.forward(mseqs, mtoks, {}, {}, &hidden);
    ASSERT_EQ(hidden.size(), 1u);
    ASSERT_EQ(hidden[0].rows(), kLen);
    // Module input at position p: token p+1 with the main model's hidden state at p.
    m3::Model module(m3::mtp_module_config(t.cfg), t.mod, p);
    m3::Sequence s = module.new_sequence();
    m3::Sequence* seqs[] = {&s};
    const std::span<const std::int32_t> shifted(prompt.data() + 1, kLen);
    std::span<const std::int32_t> toks[] = {shifted};
    const MatD* hin[] = {&hidden[0]};
    logits.push_back(module.forward(seqs, toks, {}, hin, nullptr)[0]);
    ASSERT_TRUE(logits.back().allFinite());
  }
  // Against fp64, row by row (a selection or expert choice that flips at a near-tie moves a whole
  // row, in the main model or the module, so the median row is the measure of rounding): fp32 to
  // 1e-5, bf16 to 4e-2 (about 4e-3 per bf16 op through the main model's layers and the module's;
  // measured 4e-7 and 8e-3 to 1.9e-2 over 15 seeds).
  auto median_row_err = [&](const MatD& a) {
    std::vector<double> e;
    for (Eigen::Index r = 0; r < a.rows(); ++r) e.push_back((a.row(r) - logits[0].row(r)).norm() / logits[0].row(r).norm());
    std::nth_element(e.begin(), e.begin() + static_cast<std::ptrdiff_t>(e.size() / 2), e.end());
    return e[e.size() / 2];
  };
  EXPECT_LE(median_row_err(logits[1]), 1e-5);
  EXPECT_LE(median_row_err(logits[2]), 4e-2);
  EXPECT_GT(median_row_err(logits[2]), 0.0) << "bf16 should round somewhere";
}

TEST(Mtp, WeightsAreDeterministicAndDistinctPerModule) {
  auto g = m3::test::test_rng();
  const std::uint64_t seed = g();
  SCOPED_TRACE(m3::test::seed_note());
  TinyMtp t(seed);
  const auto again = m3::generate_mtp_module(t.cfg, 1, seed, t.main);
  const auto other = m3::generate_mtp_module(t.cfg, 0, seed, t.main);
  EXPECT_EQ(again.mtp_in->eh_proj, t.mod.mtp_in->eh_proj);
  EXPECT_EQ(again.layers[0].attn.q_proj, t.mod.layers[0].attn.q_proj);
  EXPECT_NE(other.mtp_in->eh_proj, t.mod.mtp_in->eh_proj);
  EXPECT_NE(other.layers[0].attn.q_proj, t.mod.layers[0].attn.q_proj);
  // Not the main model's layers either (other name streams), and the head and embedding shared.
  EXPECT_NE(t.mod.layers[0].attn.q_proj, t.main.layers[1].attn.q_proj);
  EXPECT_EQ(t.mod.embed_tokens, t.main.embed_tokens);
  EXPECT_EQ(t.mod.lm_head, t.main.lm_head);
}

TEST(Mtp, BadRequestsAreRefused) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  TinyMtp t(g());
  EXPECT_THROW(m3::generate_mtp_module(t.cfg, 2, 1, t.main), std::out_of_range);
  EXPECT_THROW(m3::generate_mtp_module(t.cfg, -1, 1, t.main), std::out_of_range);
  m3::ModelConfig none = t.cfg;
  none.num_mtp_modules = 0;
  EXPECT_THROW(m3::generate_mtp_module(none, 0, 1, t.main), std::out_of_range);
  m3::Model module(m3::mtp_module_config(t.cfg), t.mod, m3::Precision::FP32);
  m3::Model main(t.cfg, t.main, m3::Precision::FP32);
  const std::vector<std::int32_t> tok{3, 4, 5};
  const MatD h = MatD::Zero(3, t.cfg.hidden_size), bad = MatD::Zero(2, t.cfg.hidden_size);
  m3::Sequence s = module.new_sequence();
  EXPECT_THROW(module.prefill(s, tok), std::invalid_argument);  // no hidden states
  m3::Sequence* seqs[] = {&s};
  std::span<const std::int32_t> toks[] = {tok};
  const MatD* wrong[] = {&bad};
  EXPECT_THROW(module.forward(seqs, toks, {}, wrong, nullptr), std::invalid_argument);
  EXPECT_EQ(s.length(), 0) << "a refused request must not touch the cache";
  m3::Sequence ms = main.new_sequence();
  m3::Sequence* mseqs[] = {&ms};
  const MatD* right[] = {&h};
  EXPECT_THROW(main.forward(mseqs, toks, {}, right, nullptr), std::invalid_argument);  // main takes none
}

// Draft-and-check decoding gives the main model's greedy tokens whatever the drafts, and its
// accounting adds up: every round yields its accepted drafts plus the main model's own token.
TEST(Mtp, DraftAndCheckKeepsTheGreedyTokens) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  TinyMtp t(g());
  const auto prompt = random_tokens(40, t.cfg.vocab_size, g);  // decode runs past 64: MSA selects
  constexpr int kSteps = 40;
  m3::Model main(t.cfg, t.main, m3::Precision::FP64);
  const auto want = m3::generate_greedy(main, prompt, kSteps);
  const m3::ModelConfig mc = m3::mtp_module_config(t.cfg);
  m3::Model m0(mc, m3::generate_mtp_module(t.cfg, 0, 7, t.main), m3::Precision::FP64);
  m3::Model m1(mc, t.mod, m3::Precision::FP64);
  for (int count : {1, 2})
    for (int k : {1, 2, 5}) {
      SCOPED_TRACE("modules " + std::to_string(count) + ", k " + std::to_string(k));
      m3::Model* mods[] = {&m0, &m1};
      m3::MtpStats st;
      const auto got = m3::generate_mtp(main, std::span<m3::Model* const>(mods, count), prompt, kSteps, k, &st);
      EXPECT_EQ(got, want);
      EXPECT_LE(st.accepted, st.drafted);
      // Every round follows one main-model token; the output ends with such a token (1 + rounds +
      // accepted), or with the last round's drafts when all of them were accepted and they filled it
      // (rounds + accepted: that round drafted exactly what remained). The second is rare with seeded
      // modules (an fp64 draft is right by chance) and once failed the first identity alone
      // (M3_TEST_SEED=11504517264666386324: 41 vs 40).
      const bool ends_with_drafts = st.rounds + st.accepted == kSteps;
      if (ends_with_drafts) {
        ASSERT_FALSE(st.drafts.empty());
        const auto& last = st.drafts.back();
        EXPECT_TRUE(std::equal(last.begin(), last.end(), got.end() - static_cast<std::ptrdiff_t>(last.size())))
            << "the output ends with the last round's drafts, all accepted";
      } else {
        EXPECT_EQ(1 + st.rounds + st.accepted, kSteps) << "a round yields its accepted drafts + one token";
      }
      EXPECT_LE(st.rounds, kSteps - 1);
      ASSERT_EQ(st.accepted_at.size(), static_cast<std::size_t>(k));
      for (int j = 0; j + 1 < k; ++j) EXPECT_GE(st.accepted_at[j], st.accepted_at[j + 1]) << "draft j+1 needs draft j";
      std::int64_t sum = 0;
      for (auto v : st.accepted_at) sum += v;
      EXPECT_EQ(sum, st.accepted);
    }
}

// A main model whose LM head is zero gives all-zero logits, so its greedy token is always 0 (ties
// go to the lowest id), and so are the drafts of a module sharing that head: every draft is
// accepted, and each round must then yield k drafts plus the main model's token.
TEST(Mtp, AcceptedDraftsSaveMainForwards) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  TinyMtp t(g());
  t.main.lm_head.setZero();
  const auto mw = m3::generate_mtp_module(t.cfg, 0, 3, t.main);
  m3::Model main(t.cfg, t.main, m3::Precision::FP32);
  m3::Model mod(m3::mtp_module_config(t.cfg), mw, m3::Precision::FP32);
  const auto prompt = random_tokens(20, t.cfg.vocab_size, g);
  constexpr int kSteps = 30, kDraft = 3;
  m3::Model* mods[] = {&mod};
  m3::MtpStats st;
  const auto got = m3::generate_mtp(main, mods, prompt, kSteps, kDraft, &st);
  EXPECT_EQ(got, std::vector<std::int32_t>(kSteps, 0));
  EXPECT_EQ(got, m3::generate_greedy(main, prompt, kSteps));
  EXPECT_EQ(st.accepted, st.drafted) << "every draft is the main model's own token";
  // The first token comes from the prefill; each round then yields kDraft + 1 tokens (the last
  // round fewer drafts, as only the tokens still wanted are drafted): ceil(29 / 4) = 8 rounds.
  EXPECT_EQ(st.rounds, (kSteps - 1 + kDraft) / (kDraft + 1));
  EXPECT_EQ(st.accepted, kSteps - 1 - (st.rounds - 1));
}

TEST(Mtp, GenerateRefusesBadArguments) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  TinyMtp t(g());
  m3::Model main(t.cfg, t.main, m3::Precision::FP32);
  m3::Model mod(m3::mtp_module_config(t.cfg), t.mod, m3::Precision::FP32);
  m3::Model mod64(m3::mtp_module_config(t.cfg), t.mod, m3::Precision::FP64);
  const std::vector<std::int32_t> prompt{5, 6, 7};
  m3::Model* ok[] = {&mod};
  m3::Model* not_mtp[] = {&main};
  m3::Model* other_precision[] = {&mod64};
  EXPECT_THROW(m3::generate_mtp(main, {}, prompt, 4, 2), std::invalid_argument);
  EXPECT_THROW(m3::generate_mtp(main, not_mtp, prompt, 4, 2), std::invalid_argument);
  EXPECT_THROW(m3::generate_mtp(main, other_precision, prompt, 4, 2), std::invalid_argument);
  EXPECT_THROW(m3::generate_mtp(main, ok, prompt, 4, 0), std::invalid_argument);
  EXPECT_THROW(m3::generate_mtp(main, ok, prompt, -1, 2), std::invalid_argument);
  EXPECT_TRUE(m3::generate_mtp(main, ok, prompt, 0, 2).empty());
}

// The schedule of mtp.h, step by step against direct forwards: round 0's first draft is module 0
// on positions 0..n-1 fed (x_{p+1}, final_norm(h_p)) with x_n the main model's greedy token; its
// second draft is module (1 mod count) one position on, fed (d_1, the first step's hidden state).
// draft_router holds each draft's owner row of its router: the last row of that module's traced
// router_logits and experts.
TEST(Mtp, DraftsFollowTheDocumentedSchedule) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  TinyMtp t(g());
  const auto prompt = random_tokens(30, t.cfg.vocab_size, g);
  const auto n = static_cast<Eigen::Index>(prompt.size());
  m3::Model main(t.cfg, t.main, m3::Precision::FP64);
  const m3::ModelConfig mc = m3::mtp_module_config(t.cfg);
  m3::Model m0(mc, m3::generate_mtp_module(t.cfg, 0, 5, t.main), m3::Precision::FP64);
  m3::Model m1(mc, t.mod, m3::Precision::FP64);
  m3::Model* mods[] = {&m0, &m1};
  m3::MtpStats plain;  // counters only: no decision is recorded unless asked for
  const auto plain_tokens = m3::generate_mtp(main, mods, prompt, 6, 2, &plain);
  EXPECT_TRUE(plain.draft_router.empty() && plain.feed_router.empty());
  m3::MtpStats st;
  st.record_decisions = true;
  EXPECT_EQ(m3::generate_mtp(main, mods, prompt, 6, 2, &st), plain_tokens) << "recording changes nothing";
  EXPECT_EQ(st.drafts, plain.drafts);
  ASSERT_FALSE(st.drafts.empty());
  ASSERT_EQ(st.drafts[0].size(), 2u);

  m3::Sequence ms = main.new_sequence();
  m3::Sequence* mseqs[] = {&ms};
  std::span<const std::int32_t> mt[] = {prompt};
  std::vector<MatD> hid;
  const MatD lg = main.forward(mseqs, mt, {}, {}, &hid)[0];
  const std::int32_t xn = m3::greedy_token(lg, n - 1);
  std::vector<std::int32_t> feed(prompt.begin() + 1, prompt.end());
  feed.push_back(xn);
  const MatD h0 = main.final_norm(hid[0]);  // [n, H]
  std::map<std::string, MatD> tr;  // the last forward's router trace
  const m3::TraceFn keep = [&](int, const std::string& name, const m3::TraceView& v) {
    if (name != "blk.0.router_logits" && name != "blk.0.experts") return;
    MatD m(v.rows, v.cols);
    for (std::int64_t r = 0; r < v.rows; ++r)
      for (std::int64_t c = 0; c < v.cols; ++c) m(r, c) = v.at(r, c);
    tr[name] = m;
  };
  auto run = [&](m3::Model& m, m3::Sequence& s, std::span<const std::int32_t> tok, const MatD& h, MatD& hout) {
    m3::Sequence* seqs[] = {&s};
    std::span<const std::int32_t> toks[] = {tok};
    const MatD* hin[] = {&h};
    std::vector<MatD> ho;
    MatD l = m.forward(seqs, toks, keep, hin, &ho)[0];
    hout = ho[0];
    return l;
  };
  ASSERT_EQ(st.draft_router.size(), st.drafts.size());
  ASSERT_EQ(st.draft_router[0].size(), 2u);
  auto expect_router = [&](const m3::MtpStats::Router& r, const char* which) {
    SCOPED_TRACE(which);
    ASSERT_EQ(r.logits.rows(), 1);  // one MoE layer
    ASSERT_EQ(r.experts.rows(), 1);
    const MatD& lg = tr.at("blk.0.router_logits");
    const MatD& ex = tr.at("blk.0.experts");
    ASSERT_EQ(r.logits.cols(), t.cfg.num_local_experts);
    ASSERT_EQ(r.experts.cols(), t.cfg.num_experts_per_tok);
    for (Eigen::Index e = 0; e < lg.cols(); ++e) EXPECT_EQ(r.logits(0, e), static_cast<float>(lg(lg.rows() - 1, e)));
    for (Eigen::Index k = 0; k < ex.cols(); ++k) EXPECT_EQ(r.experts(0, k), ex(ex.rows() - 1, k));
  };
  // Every module is fed every step (mtp.h); the owner of step j is module j mod 2.
  m3::Sequence s0 = m0.new_sequence(), s1 = m1.new_sequence();
  MatD h_a, h_b;
  const MatD l0 = run(m0, s0, feed, h0, h_a);
  expect_router(st.draft_router[0][0], "draft 0: module 0's last row");
  run(m1, s1, feed, h0, h_b);
  const std::int32_t d1 = m3::greedy_token(l0, n - 1);
  EXPECT_EQ(st.drafts[0][0], d1);
  const MatD hprev = h_a.bottomRows(1);
  MatD unused;
  const MatD l1 = run(m1, s1, std::span<const std::int32_t>(&d1, 1), hprev, unused);
  EXPECT_EQ(st.drafts[0][1], m3::greedy_token(l1, 0));
  expect_router(st.draft_router[0][1], "draft 1: module 1's row");
}

// Planted weights (weights.h plant_successor): the main model's greedy token is the successor of
// its input token and the module drafts the successor of the token it is given, so most drafts are
// accepted; decoding stays lossless (the main model's greedy tokens) in every precision. Tiny and
// small, fp32 and bf16 (the bf16 reference is the GPU's gate). The bound: a draft is wrong only
// where the main model's or the module's argmax misses the successor, which the planted margin
// (the token's own dot ~sqrt(H) against cross terms ~N(0, 1), weights.h) makes rare: all drafts
// accepted, fp32 and bf16, over 70 tiny seeds (prompts of 70 and 200 tokens) and 10 small ones.
// 90% leaves room for a seed with a few misses (each costs at most the k drafts of its round),
// while a broken input path or head accepts drafts by chance only (~1/V).
TEST(Mtp, PlantedWeightsDraftTheGreedyTokens) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  constexpr int kSteps = 24, kDraft = 3;
  for (const char* name : {"tiny", "small"}) {
    m3::ModelConfig cfg = m3::preset(name);
    cfg.num_mtp_modules = 1;
    auto w = m3::generate_weights(cfg, g());
    m3::plant_successor(w);
    auto mw = m3::generate_mtp_module(cfg, 0, g(), w);
    m3::plant_successor_module(mw);
    const auto prompt = random_tokens(70, cfg.vocab_size, g);  // past tiny's K_blk * BLK = 64
    for (m3::Precision p : {m3::Precision::FP32, m3::Precision::BF16}) {
      const std::string prec(m3::precision_name(p));
      SCOPED_TRACE(std::string(name) + " " + prec);
      m3::Model main(cfg, w, p), mod(m3::mtp_module_config(cfg), mw, p);
      const auto want = m3::generate_greedy(main, prompt, kSteps);
      int successors = 0;  // the planted main model: each token the one after the previous
      for (int i = 0; i < kSteps; ++i)
        successors += want[static_cast<std::size_t>(i)] ==
                      ((i == 0 ? prompt.back() : want[static_cast<std::size_t>(i - 1)]) + 1) % cfg.vocab_size;
      m3::Model* mods[] = {&mod};
      m3::MtpStats st;
      const auto got = m3::generate_mtp(main, mods, prompt, kSteps, kDraft, &st);
      std::printf("[planted %s %s] %d of %d greedy tokens successors; %lld of %lld drafts accepted in %d rounds\n", name,
                  prec.c_str(), successors, kSteps, static_cast<long long>(st.accepted),
                  static_cast<long long>(st.drafted), st.rounds);
      EXPECT_EQ(got, want) << "MTP decoding must give the greedy tokens";
      EXPECT_GE(successors, kSteps - 2) << "the planted main model is a successor machine";
      ASSERT_GT(st.drafted, 0);
      EXPECT_GE(static_cast<double>(st.accepted), 0.9 * static_cast<double>(st.drafted));
      // A round yields its pending token and its accepted drafts; the last pending token may be left
      // over (a round that ends on accepted drafts stops there).
      EXPECT_GE(st.rounds + st.accepted, kSteps - 1);
      EXPECT_LE(st.rounds + st.accepted, kSteps);
    }
  }
}

// The planted module's draft rests on its input path: with eh_proj's halves swapped (a module
// that reads [h' ; e] where spec §7 says [e ; h']) it drafts from the main model's previous state,
// the token before the right one, and its drafts are rejected; planting is refused out of order.
TEST(Mtp, PlantedModuleNeedsItsInputOrderAndAPlantedHead) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  TinyMtp t(g());
  EXPECT_THROW(m3::plant_successor_module(t.mod), std::invalid_argument) << "the head is not planted";
  EXPECT_THROW(m3::plant_successor(t.mod), std::invalid_argument) << "a module's weights";
  m3::plant_successor(t.main);
  EXPECT_THROW(m3::plant_successor_module(t.main), std::invalid_argument) << "not a module";
  const std::uint64_t seed = g();
  const auto seeded = m3::generate_mtp_module(t.cfg, 0, seed, t.main);
  auto mw = seeded;
  m3::plant_successor_module(mw);
  // Shrunk, not removed: the layer's branches still run on real values.
  EXPECT_EQ(mw.layers[0].attn.o_proj, seeded.layers[0].attn.o_proj * static_cast<float>(m3::kPlantedOutScale));
  EXPECT_EQ(mw.layers[0].experts[1].down, seeded.layers[0].experts[1].down * static_cast<float>(m3::kPlantedOutScale));
  auto swapped = mw;
  const Eigen::Index H = t.cfg.hidden_size;
  swapped.mtp_in->eh_proj.leftCols(H).swap(swapped.mtp_in->eh_proj.rightCols(H));
  const auto prompt = random_tokens(40, t.cfg.vocab_size, g);
  m3::Model main(t.cfg, t.main, m3::Precision::FP32);
  const m3::ModelConfig mc = m3::mtp_module_config(t.cfg);
  m3::Model good(mc, mw, m3::Precision::FP32), bad(mc, swapped, m3::Precision::FP32);
  m3::MtpStats sg, sb;
  m3::Model* goods[] = {&good};
  m3::Model* bads[] = {&bad};
  const auto tg = m3::generate_mtp(main, goods, prompt, 20, 3, &sg);
  const auto tb = m3::generate_mtp(main, bads, prompt, 20, 3, &sb);
  EXPECT_EQ(tg, tb) << "lossless whatever the drafts";
  EXPECT_GE(static_cast<double>(sg.accepted), 0.9 * static_cast<double>(sg.drafted));
  EXPECT_LE(sb.accepted, 2) << "swapped halves draft the token before the right one";
}
