// Sampled-row checking (compare/model_sampled.h) on the CPU: the bf16 reference's own trace passes
// when checked against itself row by row from its own inputs (the checker mirrors the model op
// for op, as a GPU with bf16 weights runs it), and damage to any op at or
// feeding a sampled row is caught and named: a q row, a key row far before a sampled query (dense
// and MSA layers), block scores, a selection, an MoE row, the residual stream, a logits row.
#include "compare/model_sampled.h"
#include "reference/model.h"
#include "reference/weights.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>

namespace {

using m3::cmp::EngineRun;

constexpr int kT = 150;  // tiny: BLK 16, top-4: past K_blk*BLK = 64, 10 blocks

struct Runs {
  m3::ModelConfig cfg = m3::preset("tiny");
  m3::ModelWeights<float> w;
  std::vector<std::int32_t> prompt;
  EngineRun bf16;
  std::vector<std::int64_t> rows;
  Runs() {
    const std::uint64_t seed = m3::test::test_rng()();
    w = m3::generate_weights(cfg, seed);
    std::mt19937_64 g(seed);
    for (int i = 0; i < kT; ++i) prompt.push_back(static_cast<std::int32_t>(g() % cfg.vocab_size));
    bf16 = m3::cmp::run_reference(cfg, w, m3::Precision::BF16, prompt, 0, nullptr);
    rows = m3::cmp::sample_rows(cfg, kT, 5, seed);
  }
};

const m3::cmp::TensorCheck* find(const m3::cmp::SampledComparison& s, const std::string& name) {
  for (const auto& t : s.tensors)
    if (t.name == name) return &t;
  return nullptr;
}

std::string failures(const m3::cmp::SampledComparison& s) {
  std::string f;
  for (const auto& t : s.tensors)
    for (const auto& x : t.failures) f += t.name + ": " + x + "\n";
  return f;
}

TEST(SampledRows, RowsCoverTheEdgesAndStayInside) {
  const auto cfg = m3::preset("tiny");
  const auto r = m3::cmp::sample_rows(cfg, kT, 5, 7);
  for (std::int64_t x : {0, 1, 15, 16, 31, 63, 64, 65, kT / 2, kT - 2, kT - 1})
    EXPECT_TRUE(std::binary_search(r.begin(), r.end(), x)) << x;
  EXPECT_TRUE(std::is_sorted(r.begin(), r.end()));
  EXPECT_EQ(std::adjacent_find(r.begin(), r.end()), r.end());
  EXPECT_EQ(m3::cmp::sample_rows(cfg, kT, 5, 7), r);  // deterministic
  for (std::int64_t x : m3::cmp::sample_rows(cfg, 3, 9, 1)) EXPECT_LT(x, 3);
}

TEST(SampledRows, TheBf16ReferencePassesFromItsOwnInputs) {
  SCOPED_TRACE(m3::test::seed_note());
  Runs r;
  for (const EngineRun* e : {&r.bf16}) {
    SCOPED_TRACE(e->engine);
    const auto s = m3::cmp::check_sampled_rows(r.cfg, r.w, r.prompt, *e, r.rows);
    EXPECT_TRUE(s.pass()) << failures(s);
    // Every op of every layer and the logits were checked (tiny: layer 0 dense attention + dense MLP).
    for (const char* n : {"blk.0.attn_norm", "blk.0.q", "blk.0.k", "blk.0.v", "blk.0.attn_out", "blk.0.ffn_norm",
                          "blk.0.mlp_out", "blk.0.out", "blk.1.idx_q", "blk.1.idx_k", "blk.1.block_scores",
                          "blk.1.selection", "blk.1.router_logits", "blk.1.experts", "blk.1.moe_out", "blk.3.out",
                          "logits"})
      EXPECT_NE(find(s, n), nullptr) << n;
  }
  // The bf16 engine is the emulation itself: its rows match up to fp32 summation order, which the
  // re-run on 8 rows changes (other GEMM shapes, FMA where the build has it). A last-bit fp32
  // difference can flip one bf16 rounding of an output or an MLP intermediate: one flip moves a
  // tensor's rel-L2 by about 2^-8 / sqrt(elements), ~2e-4 at tiny's 8 x 64 (CI saw 5.4e-5 on
  // blk.1.moe_out at M3_TEST_SEED=3044506909104414071 under 1e-5). 1e-3 allows a few flips; a wrong
  // kernel is off by O(1e-2) or more (CatchesDamageAtOrFeedingASampledRow).
  const auto s = m3::cmp::check_sampled_rows(r.cfg, r.w, r.prompt, r.bf16, r.rows);
  for (const auto& t : s.tensors)
    if (!t.is_index) {
      EXPECT_LE(t.vs_ref.rel_l2, 1e-3) << t.name;
    }
}

TEST(SampledRows, CatchesDamageAtOrFeedingASampledRow) {
  SCOPED_TRACE(m3::test::seed_note());
  Runs r;
  const std::int64_t last = kT - 1, mid = kT / 2;
  auto expect_caught = [&](const char* what, const std::string& name, auto&& damage) {
    SCOPED_TRACE(what);
    EngineRun bad = r.bf16;
    damage(bad);
    const auto s = m3::cmp::check_sampled_rows(r.cfg, r.w, r.prompt, bad, r.rows);
    EXPECT_FALSE(s.pass());
    const auto* t = find(s, name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_FALSE(t->pass()) << name << " passed; failures: " << failures(s);
  };
  expect_caught("a q row", "blk.2.q", [&](EngineRun& e) { e.trace.at("blk.2.q").row(last) *= 1.5f; });
  // A key far before the sampled last query, in a dense layer: the last query attends it.
  expect_caught("a key row (dense)", "blk.0.attn_out", [&](EngineRun& e) { e.trace.at("blk.0.k").row(3).array() += 3.f; });
  // A value row in the first block of an MSA layer: not selected for late queries unless it is,
  // so damage the block of the last query itself (the local block is always selected).
  expect_caught("a value row (MSA, local block)", "blk.1.attn_out",
                [&](EngineRun& e) { e.trace.at("blk.1.v").row(last - 1).array() += 3.f; });
  expect_caught("block scores", "blk.1.block_scores",
                [&](EngineRun& e) { e.trace.at("blk.1.block_scores")(0 * kT + mid, 1) += 1.f; });
  expect_caught("a selection", "blk.2.selection", [&](EngineRun& e) {
    auto& s = e.trace.at("blk.2.selection");  // [Hi*T, K_blk]
    const Eigen::Index row = 1 * kT + last;
    std::swap(s(row, 0), s(row, s.cols() - 1));
    s(row, 0) = s(row, 0) < 0 ? 0.f : static_cast<float>((static_cast<int>(s(row, 0)) + 1) % 5);
  });
  expect_caught("an MoE row", "blk.3.moe_out", [&](EngineRun& e) { e.trace.at("blk.3.moe_out").row(mid) *= 2.f; });
  expect_caught("the residual stream", "blk.2.out", [&](EngineRun& e) { e.trace.at("blk.2.out").row(0).array() += 0.5f; });
  expect_caught("a logits row", "logits", [&](EngineRun& e) { e.logits.row(last).array() += 1.0; });
}

// An engine that returns only the prompt's last logits row (gpu::ModelOptions::last_logits_only) is
// checked on that row: as is, it passes; shifted, it fails.
TEST(SampledRows, LastLogitsRowOnly) {
  SCOPED_TRACE(m3::test::seed_note());
  Runs r;
  EngineRun last = r.bf16;
  last.logits = r.bf16.logits.bottomRows(1).eval();
  auto s = m3::cmp::check_sampled_rows(r.cfg, r.w, r.prompt, last, r.rows);
  ASSERT_NE(find(s, "logits"), nullptr);
  EXPECT_TRUE(s.pass()) << failures(s);
  last.logits.array() += 1.0;
  s = m3::cmp::check_sampled_rows(r.cfg, r.w, r.prompt, last, r.rows);
  EXPECT_FALSE(find(s, "logits")->pass());
}

// A prefill in chunks traces each chunk; the recorder stitches the head-major tensors (block
// scores, selection) back into the whole prompt's layout, so both checks see the same tensors as
// for a one-shot prefill (values within fp32 summation order).
TEST(SampledRows, ChunkedPrefillTracesStitchTogether) {
  SCOPED_TRACE(m3::test::seed_note());
  Runs r;
  // The stitching (each chunk's rows in place) is checked in fp64: there a chunk's row count moves
  // a GEMM's blocking (Eigen's kc / mc, and with -march=native its AVX-512 panels) by ~1e-16, where
  // in bf16 it can move a value across a rounding boundary that a near-tie expert or block choice
  // then amplifies (measured: bf16 chunked vs one-shot traces beyond 1e-4 at 16 of 500 seeds with
  // -march=native, 0 of 150 without).
  const auto chunked64 = m3::cmp::run_reference(r.cfg, r.w, m3::Precision::FP64, r.prompt, 0, nullptr, {}, 37);
  const auto whole64 = m3::cmp::run_reference(r.cfg, r.w, m3::Precision::FP64, r.prompt, 0, nullptr);
  for (const char* n : {"blk.1.block_scores", "blk.1.selection", "blk.2.q", "blk.3.moe_out"}) {
    SCOPED_TRACE(n);
    const auto& a = chunked64.trace.at(n);
    const auto& b = whole64.trace.at(n);
    ASSERT_EQ(a.rows(), b.rows());
    ASSERT_EQ(a.cols(), b.cols());
    const auto d = (a - b).cwiseAbs();
    EXPECT_TRUE((d.array() <= 1e-4f * (1.f + b.cwiseAbs().array()) || (a.array() == b.array())).all());
  }
  // The chunked bf16 engine passes the sampled-row check (each row from its own inputs).
  const auto chunked = m3::cmp::run_reference(r.cfg, r.w, m3::Precision::BF16, r.prompt, 0, nullptr, {}, 37);
  auto s = m3::cmp::check_sampled_rows(r.cfg, r.w, r.prompt, chunked, r.rows);
  EXPECT_TRUE(s.pass()) << failures(s);
}

// An engine with an fp8 index-K cache (the bf16 reference's ReferenceOptions mirror of it) passes
// when the check scores against E4M3-rounded keys, and fails its block scores when it does not.
TEST(SampledRows, Fp8IndexCache) {
  SCOPED_TRACE(m3::test::seed_note());
  Runs r;
  m3::ReferenceOptions o;
  o.fp8_index_cache = true;
  const auto fp8 = m3::cmp::run_reference(r.cfg, r.w, m3::Precision::BF16, r.prompt, 0, nullptr, o);
  const auto s = m3::cmp::check_sampled_rows(r.cfg, r.w, r.prompt, fp8, r.rows, /*fp8_index_cache=*/true);
  EXPECT_TRUE(s.pass()) << failures(s);
  const auto wrong = m3::cmp::check_sampled_rows(r.cfg, r.w, r.prompt, fp8, r.rows, /*fp8_index_cache=*/false);
  ASSERT_NE(find(wrong, "blk.1.block_scores"), nullptr);
  EXPECT_FALSE(find(wrong, "blk.1.block_scores")->pass());
}

TEST(SampledRows, RejectsRowsOutsideThePrompt) {
  Runs r;
  EXPECT_THROW(m3::cmp::check_sampled_rows(r.cfg, r.w, r.prompt, r.bf16, {0, kT}), std::invalid_argument);
  EXPECT_THROW(m3::cmp::check_sampled_rows(r.cfg, r.w, r.prompt, r.bf16, {-1}), std::invalid_argument);
}

}  // namespace
