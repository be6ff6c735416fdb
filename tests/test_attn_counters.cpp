// The multiply-adds the reference actually executes in attention equal the analytic model's exact
// reading (reference/cost.h), for dense and MSA layers, through the whole model: prefill (one shot
// and chunked) and decode, at lengths around the block and top-k edges.
#include "reference/cost.h"
#include "reference/model.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

namespace {

// Analytic counters for one sequence growing from p0 to p0 + T tokens, summed over the layers of
// each attention type.
m3::ForwardStats expected(const m3::ModelConfig& c, std::int64_t p0, std::int64_t T) {
  m3::ForwardStats s;
  for (auto t : c.layer_types) {
    auto k = m3::attn_counter(c, t, m3::attn_keys_range(c, t, p0, T));
    (t == m3::AttnType::DENSE ? s.dense : s.msa) += k;
  }
  return s;
}

void expect_eq(const m3::AttnCounter& got, const m3::AttnCounter& want, const std::string& what) {
  EXPECT_EQ(got.qk_macs, want.qk_macs) << what;
  EXPECT_EQ(got.pv_macs, want.pv_macs) << what;
  EXPECT_EQ(got.index_macs, want.index_macs) << what;
  EXPECT_EQ(got.select_candidates, want.select_candidates) << what;
}

void check_config(const m3::ModelConfig& c, std::vector<int> lengths) {
  auto g = m3::test::test_rng();
  m3::Model model(c, m3::generate_weights(c, g()), m3::Precision::FP32);
  for (int T : lengths) {
    SCOPED_TRACE(c.name + " T=" + std::to_string(T));
    std::vector<std::int32_t> tokens(T);
    for (auto& x : tokens) x = static_cast<std::int32_t>(g() % c.vocab_size);
    // One-shot prefill.
    model.reset_stats();
    auto s = model.new_sequence();
    model.prefill(s, tokens);
    auto want = expected(c, 0, T);
    expect_eq(model.stats().dense, want.dense, "dense prefill");
    expect_eq(model.stats().msa, want.msa, "msa prefill");
    EXPECT_GT(model.stats().msa.index_macs, 0u);
    // Three decode steps past it.
    model.reset_stats();
    for (int i = 0; i < 3; ++i) model.decode(s, tokens[i % T]);
    want = expected(c, T, 3);
    expect_eq(model.stats().dense, want.dense, "dense decode");
    expect_eq(model.stats().msa, want.msa, "msa decode");
  }
}

}  // namespace

TEST(AttnCounters, TinyModelEqualsAnalyticExactly) {
  const auto c = m3::preset("tiny");
  const int blk = c.index_block_size, kb = c.index_topk_blocks * blk;  // 16, 64
  check_config(c, {1, blk - 1, blk + 1, kb - 1, kb, kb + 1, 3 * kb + 7});
}

TEST(AttnCounters, SmallModelEqualsAnalyticExactly) {
  auto c = m3::preset("small");
  c.num_hidden_layers = 2;  // one dense + one MSA layer keeps the test fast at 2K+ tokens
  c.layer_types.resize(2);
  c.mlp_layer_types.resize(2);
  const int kb = c.index_topk_blocks * c.index_block_size;  // 2048
  check_config(c, {129, kb + 1});
}

TEST(AttnCounters, PaperAndExactReadingsAgreeAtDecode) {
  // At a decode position p = n-1 the exact rule and the paper's min(n, K_blk*BLK) agree whenever
  // (n % BLK == 0) or n <= K_blk*BLK: the local block is then full or all blocks are visible.
  const auto c = m3::preset("m3");
  for (std::int64_t n : {1, 2048, 4096, 1 << 20}) {
    auto a = m3::attn_cost(c, m3::AttnType::MSA, m3::CostReading::DECODE, n);
    auto b = m3::attn_cost(c, m3::AttnType::MSA, m3::CostReading::DECODE_EXACT, n);
    EXPECT_DOUBLE_EQ(a.actual_flops(), b.actual_flops()) << n;
  }
}
