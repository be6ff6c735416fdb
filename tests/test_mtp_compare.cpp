// compare_mtp_runs (compare/mtp_compare.h): another run's MTP drafts against the reference's, round
// by round, from the runs' tokens and stats. Engines here are reference models (the rule is
// engine-agnostic): a run against itself agrees round for round (and, with a zero-LM-head main
// model whose every draft is accepted, so does the reference's check of its drafts); a damaged
// draft fails unless a module near-tie explains it; runs whose tokens part compare only the rounds
// before; stats that do not fit their tokens are refused. With planted weights (most drafts right)
// the criterion holds on nonzero counts, a damaged draft path fails it, and the planted acceptance
// gate refuses seeded modules' ~0.
#include "compare/mtp_compare.h"
#include "compare/tolerance.h"
#include "reference/model.h"
#include "reference/mtp.h"
#include "reference/weights.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <vector>

namespace {

struct MtpRun {
  std::vector<std::int32_t> tokens;
  m3::MtpStats st;
};

// generate_mtp on the tiny preset with one seeded module (zero_head: main and module LM heads 0).
MtpRun run_tiny(std::uint64_t seed, bool zero_head, const std::vector<std::int32_t>& prompt, int steps, int k) {
  m3::ModelConfig cfg = m3::preset("tiny");
  cfg.num_mtp_modules = 1;
  auto w = m3::generate_weights(cfg, seed);
  if (zero_head) w.lm_head.setZero();
  const auto mw = m3::generate_mtp_module(cfg, 0, seed, w);
  m3::Model main(cfg, w, m3::Precision::FP32), mod(m3::mtp_module_config(cfg), mw, m3::Precision::FP32);
  m3::Model* mods[] = {&mod};
  MtpRun r;
  r.tokens = m3::generate_mtp(main, mods, prompt, steps, k, &r.st);
  return r;
}

constexpr double kTie = m3::cmp::kBf16.tie_rtol;

// Margins of every draft set to m (the zero-LM-head model's are all 0: every logit ties).
void set_margins(m3::MtpStats& st, double m) {
  for (auto& r : st.draft_margins) std::fill(r.begin(), r.end(), m);
}

}  // namespace

TEST(MtpCompare, ARunAgainstItselfAgreesRoundForRound) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const std::uint64_t seed = g();
  const auto prompt = m3::test::random_tokens(19, 512, g);
  const MtpRun a = run_tiny(seed, false, prompt, 17, 3);
  const auto c = m3::cmp::compare_mtp_runs(a.tokens, a.st, a.tokens, a.st, kTie);
  EXPECT_TRUE(c.pass()) << (c.failures.empty() ? "" : c.failures[0]);
  EXPECT_EQ(c.tokens_agree, 17);
  EXPECT_EQ(c.rounds_compared, a.st.rounds);
  EXPECT_EQ(c.drafts_equal, c.rounds_compared);
  EXPECT_EQ(c.accepted_ref, c.accepted_by_ref);
}

TEST(MtpCompare, EveryDraftAcceptedIsAcceptedByTheReferenceToo) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const auto prompt = m3::test::random_tokens(23, 512, g);
  const MtpRun ref = run_tiny(g(), true, prompt, 21, 4);  // every draft is token 0, and accepted
  ASSERT_EQ(ref.st.accepted, ref.st.drafted);
  const auto c = m3::cmp::compare_mtp_runs(ref.tokens, ref.st, ref.tokens, ref.st, kTie);
  EXPECT_TRUE(c.pass());
  EXPECT_EQ(c.rounds_compared, ref.st.rounds);
  EXPECT_GT(c.accepted_ref, 0);
  EXPECT_EQ(c.accepted_by_ref, c.accepted_ref);
}

TEST(MtpCompare, ADamagedDraftFailsUnlessANearTieExplainsIt) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const auto prompt = m3::test::random_tokens(23, 512, g);
  MtpRun ref = run_tiny(g(), true, prompt, 21, 4);
  ASSERT_GE(ref.st.rounds, 3);
  set_margins(ref.st, 0.5);  // clear choices everywhere
  MtpRun test = ref;
  const std::size_t r = static_cast<std::size_t>(g() % ref.st.drafts.size()), j = 0;  // a round's first draft
  test.st.drafts[r][j] = 7;  // not the main model's token: the reference would reject it and what follows
  auto c = m3::cmp::compare_mtp_runs(ref.tokens, ref.st, test.tokens, test.st, kTie);
  EXPECT_FALSE(c.pass());
  EXPECT_EQ(c.drafts_equal, c.rounds_compared - 1);
  EXPECT_EQ(c.rounds_near_tie, 0);
  // The same difference where the test engine's module saw a tie: counted, not failed.
  test.st.draft_margins[r][j] = kTie / 2;
  c = m3::cmp::compare_mtp_runs(ref.tokens, ref.st, test.tokens, test.st, kTie);
  EXPECT_TRUE(c.pass()) << (c.failures.empty() ? "" : c.failures[0]);
  EXPECT_EQ(c.rounds_near_tie, 1);
  // A later draft of a round differing, past an equal first one, fails as well.
  test = ref;
  test.st.drafts[0][2] = 11;  // round 0 drafts all 4 (21 tokens to go)
  c = m3::cmp::compare_mtp_runs(ref.tokens, ref.st, test.tokens, test.st, kTie);
  EXPECT_FALSE(c.pass());
}

TEST(MtpCompare, OnlyRoundsBeforeTheTokensPartAreCompared) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const auto prompt = m3::test::random_tokens(23, 512, g);
  MtpRun ref = run_tiny(g(), true, prompt, 21, 4);  // rounds start at outputs 0, 5, 10, 15
  set_margins(ref.st, 0.5);
  MtpRun test = ref;
  test.tokens[12] = 9;  // the runs part at output 12: rounds starting at 0, 5 and 10 compare
  test.st.drafts[2] = {0, 9, 0, 0};  // round 2 (start 10) drafted the test run's own token 12
  const auto c = m3::cmp::compare_mtp_runs(ref.tokens, ref.st, test.tokens, test.st, kTie);
  EXPECT_EQ(c.tokens_agree, 12);
  EXPECT_EQ(c.rounds_compared, 3);
  EXPECT_EQ(c.drafts_equal, 2);
  EXPECT_FALSE(c.pass()) << "round 2's second draft differs with a clear margin";
}

TEST(MtpCompare, StatsThatDoNotFitTheirTokensAreRefused) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const auto prompt = m3::test::random_tokens(23, 512, g);
  const MtpRun ref = run_tiny(g(), true, prompt, 21, 4);
  MtpRun bad = ref;
  bad.st.accepted -= 3;  // fewer than its tokens show
  EXPECT_THROW(m3::cmp::compare_mtp_runs(ref.tokens, ref.st, bad.tokens, bad.st, kTie), std::invalid_argument);
  MtpRun extra = ref;
  extra.st.drafts.insert(extra.st.drafts.end(), 30, std::vector<std::int32_t>{0, 0, 0, 0});  // rounds past the tokens
  extra.st.accepted += 120;
  extra.st.draft_margins.insert(extra.st.draft_margins.end(), 30, std::vector<double>(4, 0.5));
  EXPECT_THROW(m3::cmp::compare_mtp_runs(ref.tokens, ref.st, extra.tokens, extra.st, kTie), std::invalid_argument);
  MtpRun no_margins = ref;
  no_margins.st.draft_margins.pop_back();
  EXPECT_THROW(m3::cmp::compare_mtp_runs(ref.tokens, ref.st, no_margins.tokens, no_margins.st, kTie), std::invalid_argument);
}

namespace {

// generate_mtp on planted tiny weights (weights.h plant_successor) in precision p; swap_halves
// damages the module's input path (eh_proj reads [h' ; e], not spec §7's [e ; h']).
MtpRun run_planted(std::uint64_t seed, m3::Precision p, bool swap_halves, const std::vector<std::int32_t>& prompt,
                   int steps, int k) {
  m3::ModelConfig cfg = m3::preset("tiny");
  cfg.num_mtp_modules = 1;
  auto w = m3::generate_weights(cfg, seed);
  m3::plant_successor(w);
  auto mw = m3::generate_mtp_module(cfg, 0, seed, w);
  m3::plant_successor_module(mw);
  if (swap_halves) mw.mtp_in->eh_proj.leftCols(cfg.hidden_size).swap(mw.mtp_in->eh_proj.rightCols(cfg.hidden_size));
  m3::Model main(cfg, w, p), mod(m3::mtp_module_config(cfg), mw, p);
  m3::Model* mods[] = {&mod};
  MtpRun r;
  r.tokens = m3::generate_mtp(main, mods, prompt, steps, k, &r.st);
  return r;
}

}  // namespace

// The criterion on nonzero counts: the bf16 reference stands in for the GPU (another
// engine that rounds at other points than the fp32 reference; both draft the planted successors),
// and the reference's check accepts its drafts exactly as often as its own, most of them.
TEST(MtpCompare, PlantedDraftsAreAcceptedAsOftenAsTheReferencesOwn) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const std::uint64_t seed = g();
  const auto prompt = m3::test::random_tokens(70, 512, g);
  const MtpRun ref = run_planted(seed, m3::Precision::FP32, false, prompt, 24, 3);
  const MtpRun test = run_planted(seed, m3::Precision::BF16, false, prompt, 24, 3);
  const auto c = m3::cmp::compare_mtp_runs(ref.tokens, ref.st, test.tokens, test.st, kTie, m3::cmp::kPlantedMinAcceptance);
  std::printf("[planted compare] %d rounds compared, %d equal; accepted by the reference: %lld of the test's and %lld of "
              "its own, of %lld drafts\n",
              c.rounds_compared, c.drafts_equal, static_cast<long long>(c.accepted_by_ref),
              static_cast<long long>(c.accepted_ref), static_cast<long long>(c.drafts_compared));
  EXPECT_TRUE(c.pass()) << (c.failures.empty() ? "" : c.failures[0]);
  EXPECT_EQ(c.tokens_agree, 24);
  EXPECT_EQ(c.drafts_equal, c.rounds_compared);
  EXPECT_GT(c.accepted_ref, 0);
  EXPECT_EQ(c.accepted_by_ref, c.accepted_ref);
  EXPECT_GE(static_cast<double>(c.accepted_ref), 0.9 * static_cast<double>(c.drafts_compared));  // test_mtp.cpp's bound
}

// A damaged draft path on the test engine (the module's input halves swapped: it drafts the token
// before the right one) fails the comparison; and seeded weights, whose acceptance is ~0, fail the
// planted gate: an acceptance equality at 0 = 0 is not taken for agreement there.
TEST(MtpCompare, PlantedDamagedDraftPathFailsAndSeededFailTheAcceptanceGate) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const std::uint64_t seed = g();
  const auto prompt = m3::test::random_tokens(70, 512, g);
  const MtpRun ref = run_planted(seed, m3::Precision::FP32, false, prompt, 24, 3);
  const MtpRun bad = run_planted(seed, m3::Precision::FP32, true, prompt, 24, 3);
  ASSERT_EQ(bad.tokens, ref.tokens) << "lossless whatever the drafts";
  auto c = m3::cmp::compare_mtp_runs(ref.tokens, ref.st, bad.tokens, bad.st, kTie, m3::cmp::kPlantedMinAcceptance);
  EXPECT_FALSE(c.pass());
  EXPECT_EQ(c.drafts_equal, 0) << "every round's drafts differ, with clear margins";
  EXPECT_EQ(c.rounds_near_tie, 0);
  const MtpRun seeded = run_tiny(seed, false, prompt, 24, 3);
  c = m3::cmp::compare_mtp_runs(seeded.tokens, seeded.st, seeded.tokens, seeded.st, kTie);
  EXPECT_TRUE(c.pass()) << "seeded drafts against themselves, no acceptance gate";
  c = m3::cmp::compare_mtp_runs(seeded.tokens, seeded.st, seeded.tokens, seeded.st, kTie, m3::cmp::kPlantedMinAcceptance);
  EXPECT_FALSE(c.pass()) << "seeded modules accept " << c.accepted_ref << " of " << c.drafts_compared << " drafts";
}
