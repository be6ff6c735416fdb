// The reference forward pass as a whole: decode equals prefill, chunked and batched runs equal
// single runs, repeats are bit-identical, the trace has every DESIGN §1 name, the precisions agree
// as far as they should, and bad requests fail before any cache changes.
#include "reference/model.h"
#include "reference/ops/msa_index.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>

namespace {

using m3::MatD;
using m3::test::random_tokens;

struct Tiny {
  m3::ModelConfig cfg = m3::preset("tiny");
  m3::ModelWeights<float> w;
  explicit Tiny(std::uint64_t seed) : w(m3::generate_weights(cfg, seed)) {}
};

// Decode steps past K_blk*BLK = 64 tokens, where MSA really selects: 90 tokens in all.
constexpr int kLen = 90;

}  // namespace

TEST(Model_f32, DecodeEqualsPrefill) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  Tiny t(g());
  m3::Model model(t.cfg, t.w, m3::Precision::FP32);
  auto tokens = random_tokens(kLen, t.cfg.vocab_size, g);

  auto full_seq = model.new_sequence();
  MatD full = model.prefill(full_seq, tokens);  // [kLen, V]

  auto seq = model.new_sequence();
  const int p0 = 5;  // a short prefill, then one token at a time
  MatD stepwise(kLen, t.cfg.vocab_size);
  stepwise.topRows(p0) = model.prefill(seq, std::span(tokens).first(p0));
  for (int i = p0; i < kLen; ++i) stepwise.row(i) = model.decode(seq, tokens[i]).row(0);
  EXPECT_EQ(seq.length(), kLen);
  ASSERT_GT(full.norm(), 0.0);
  // Same arithmetic, different GEMM blocking of the projections (T rows vs 1 row): fp32
  // reassociation noise ~1e-7 relative, amplified by 4 layers; 1e-5 is the bound.
  EXPECT_LE(m3::test::rel_l2(stepwise, full), 1e-5);
}

TEST(Model_f64, ChunkedPrefillEqualsOneShot) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  Tiny t(g());
  m3::Model model(t.cfg, t.w, m3::Precision::FP64);
  auto tokens = random_tokens(kLen, t.cfg.vocab_size, g);
  auto s1 = model.new_sequence();
  MatD full = model.prefill(s1, tokens);
  auto s2 = model.new_sequence();
  MatD a = model.prefill(s2, std::span(tokens).first(33));  // chunk edge inside a block (BLK 16)
  MatD b = model.prefill(s2, std::span(tokens).subspan(33));
  MatD both(kLen, full.cols());
  both << a, b;
  // fp64: reassociation noise ~1e-16 per op; 1e-12 leaves four decades.
  EXPECT_LE(m3::test::rel_l2(both, full), 1e-12);
}

TEST(Model_f32, BatchOfDifferentLengthsEqualsSeparateRuns) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  Tiny t(g());
  m3::Model model(t.cfg, t.w, m3::Precision::FP32);
  std::vector<std::vector<std::int32_t>> prompts{random_tokens(1, 512, g), random_tokens(70, 512, g),
                                                 random_tokens(17, 512, g)};
  std::vector<m3::Sequence> seqs;
  std::vector<m3::Sequence*> ptrs;
  std::vector<std::span<const std::int32_t>> spans;
  for (std::size_t i = 0; i < prompts.size(); ++i) seqs.push_back(model.new_sequence());
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    ptrs.push_back(&seqs[i]);
    spans.emplace_back(prompts[i]);
  }
  auto batched = model.forward(ptrs, spans);
  // Then one decode step for all three at once (lengths 1, 70, 17 -> positions differ).
  std::vector<std::int32_t> next{3, 4, 5};
  std::vector<std::span<const std::int32_t>> one{std::span(&next[0], 1), std::span(&next[1], 1),
                                                  std::span(&next[2], 1)};
  auto step = model.forward(ptrs, one);
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    auto s = model.new_sequence();
    MatD alone = model.prefill(s, prompts[i]);
    MatD alone_step = model.decode(s, next[i]);
    EXPECT_LE(m3::test::rel_l2(batched[i], alone), 1e-5) << "sequence " << i;
    EXPECT_LE(m3::test::rel_l2(step[i], alone_step), 1e-5) << "sequence " << i;
  }
}

TEST(Model_f32, RepeatsAreBitIdentical) {
  auto g = m3::test::test_rng();
  Tiny t(g());
  auto tokens = random_tokens(kLen, t.cfg.vocab_size, g);
  MatD out[2];
  for (auto& o : out) {
    m3::Model model(t.cfg, m3::generate_weights(t.cfg, 99), m3::Precision::FP32);
    auto s = model.new_sequence();
    o = model.prefill(s, tokens);
  }
  EXPECT_TRUE((out[0].array() == out[1].array()).all());
}

TEST(Model_f32, TraceHasEveryNameWithShapes) {
  Tiny t(7);
  m3::Model model(t.cfg, t.w, m3::Precision::FP32);
  std::map<std::string, std::pair<std::int64_t, std::int64_t>> seen;
  auto s = model.new_sequence();
  const int T = 70;
  std::vector<std::int32_t> tokens(T, 9);
  model.prefill(s, tokens, [&](int seq, const std::string& name, const m3::TraceView& v) {
    EXPECT_EQ(seq, 0);
    EXPECT_TRUE(seen.emplace(name, std::make_pair(v.rows, v.cols)).second) << "twice: " << name;
  });
  const auto& c = t.cfg;
  const int NB = (T - 1) / c.index_block_size + 1;
  std::map<std::string, std::pair<std::int64_t, std::int64_t>> want{
      {"blk.0.attn_norm", {T, c.hidden_size}},
      {"blk.0.q", {T, c.num_attention_heads * c.head_dim}},
      {"blk.0.k", {T, c.num_key_value_heads * c.head_dim}},
      {"blk.0.v", {T, c.num_key_value_heads * c.head_dim}},
      {"blk.0.attn_out", {T, c.num_attention_heads * c.head_dim}},
      {"blk.0.ffn_norm", {T, c.hidden_size}},
      {"blk.0.mlp_out", {T, c.hidden_size}},
      {"blk.0.out", {T, c.hidden_size}},
      {"blk.1.idx_q", {T, c.index_n_heads * c.index_head_dim}},
      {"blk.1.idx_k", {T, c.index_head_dim}},
      {"blk.1.block_scores", {c.index_n_heads * T, NB}},
      {"blk.1.selection", {c.index_n_heads * T, c.index_topk_blocks}},
      {"blk.1.router_logits", {T, c.num_local_experts}},
      {"blk.1.experts", {T, c.num_experts_per_tok}},
      {"blk.1.expert_weights", {T, c.num_experts_per_tok}},
      {"blk.3.moe_out", {T, c.hidden_size}},
      {"logits", {T, c.vocab_size}},
  };
  for (auto& [n, shape] : want) {
    ASSERT_TRUE(seen.count(n)) << "missing " << n;
    EXPECT_EQ(seen[n], shape) << n;
  }
  EXPECT_FALSE(seen.count("blk.0.selection"));  // dense layer
}

TEST(Model, PrecisionsAgreeAsFarAsTheyShould) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  Tiny t(g());
  auto tokens = random_tokens(kLen, t.cfg.vocab_size, g);
  std::map<m3::Precision, MatD> out;
  for (auto p : {m3::Precision::FP64, m3::Precision::FP32, m3::Precision::BF16}) {
    m3::Model model(t.cfg, t.w, p);
    auto s = model.new_sequence();
    out[p] = model.prefill(s, tokens);
  }
  const double e32 = m3::test::rel_l2(out[m3::Precision::FP32], out[m3::Precision::FP64]);
  const double e16 = m3::test::rel_l2(out[m3::Precision::BF16], out[m3::Precision::FP64]);
  // Measured over 200 seeds (2026-11-28): fp32 at most 2.8e-7 (bound 1e-5); bf16 median 4.7e-2,
  // p99 0.109, max 0.117 — rounding at every op boundary of a random-weight model, plus MSA block
  // and expert choices that flip under bf16 and move whole rows. 0.25 leaves 2x over the worst seen
  // while still catching an emulation that diverges; the lower bound catches one that never rounds.
  std::printf("rel-L2 vs fp64: fp32 %.3g, bf16 %.3g\n", e32, e16);
  EXPECT_LE(e32, 1e-5);
  EXPECT_GT(e16, 1e-4);  // the emulation really rounds
  EXPECT_LE(e16, 0.25);
  EXPECT_LT(e32, e16);
}

TEST(Model, BadRequestsFailBeforeCachesChange) {
  Tiny t(5);
  m3::Model model(t.cfg, t.w, m3::Precision::FP32);
  auto s = model.new_sequence();
  std::vector<std::int32_t> ok{1, 2, 3};
  model.prefill(s, ok);
  std::vector<std::int32_t> bad{1, 512, 3};
  try {
    model.prefill(s, bad);
    FAIL();
  } catch (const std::out_of_range& e) {
    EXPECT_NE(std::string(e.what()).find("token 512"), std::string::npos) << e.what();
  }
  EXPECT_EQ(s.length(), 3);
  std::vector<std::int32_t> neg{-1};
  EXPECT_THROW(model.prefill(s, neg), std::out_of_range);
  std::vector<std::int32_t> too_long(t.cfg.max_position_embeddings, 1);
  try {
    model.prefill(s, too_long);
    FAIL();
  } catch (const std::out_of_range& e) {
    EXPECT_NE(std::string(e.what()).find("max_position_embeddings"), std::string::npos) << e.what();
  }
  EXPECT_EQ(s.length(), 3);
  // A sequence of another model is refused.
  m3::Model other(t.cfg, t.w, m3::Precision::FP32);
  auto s2 = other.new_sequence();
  EXPECT_THROW(model.prefill(s2, ok), std::invalid_argument);
  // Weights that do not fit the config are refused with the tensor named.
  auto w = t.w;
  w.layers[2].attn.q_proj.resize(3, 3);
  try {
    m3::Model m(t.cfg, w, m3::Precision::FP32);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("q_proj"), std::string::npos) << e.what();
  }
}

TEST(Model, GreedyTieRuleAndGeneration) {
  MatD l(1, 4);
  l << 1.0, 3.0, 3.0, std::nan("");
  EXPECT_EQ(m3::greedy_token(l, 0), 1);
  Tiny t(11);
  m3::Model model(t.cfg, t.w, m3::Precision::FP32);
  std::vector<std::int32_t> prompt(40, 7);
  MatD logits;
  auto gen = m3::generate_greedy(model, prompt, 8, &logits);
  ASSERT_EQ(gen.size(), 8u);
  EXPECT_EQ(logits.rows(), 48);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(gen[i], m3::greedy_token(logits, 39 + i));
}

// E4M3 rounding (the fp8 index-K cache's): its edges, written out by hand from the format
// (1-4-3, bias 7, max 448, subnormal step 2^-9), ties to even, saturation, signs and NaN.
TEST(RoundE4m3, FormatEdges) {
  EXPECT_EQ(m3::round_e4m3(448.f), 448.f);
  EXPECT_EQ(m3::round_e4m3(464.f), 448.f);   // halfway to 480 (not a value: S.1111.111 is NaN)
  EXPECT_EQ(m3::round_e4m3(1e6f), 448.f);    // saturates
  EXPECT_EQ(m3::round_e4m3(-INFINITY), -448.f);
  EXPECT_EQ(m3::round_e4m3(440.f), 448.f);   // step 32 in [256, 448]
  EXPECT_EQ(m3::round_e4m3(1.0625f), 1.f);   // tie between 1 and 1.125: even mantissa
  EXPECT_EQ(m3::round_e4m3(1.1875f), 1.25f); // tie between 1.125 and 1.25: even mantissa
  EXPECT_EQ(m3::round_e4m3(1.07f), 1.125f);
  EXPECT_EQ(m3::round_e4m3(0x1p-6f), 0x1p-6f);         // smallest normal
  EXPECT_EQ(m3::round_e4m3(0x1.1p-6f), 0x1p-6f);       // 2^-6 + 2^-10: below half a step of 2^-9
  EXPECT_EQ(m3::round_e4m3(0x1p-9f), 0x1p-9f);         // smallest subnormal
  EXPECT_EQ(m3::round_e4m3(0x1p-10f), 0.f);            // tie between 0 and 2^-9: even
  EXPECT_EQ(m3::round_e4m3(0x1.8p-10f), 0x1p-9f);      // 0.75 of a step
  EXPECT_EQ(m3::round_e4m3(3 * 0x1p-10f), 0x1p-8f);    // 1.5 steps: tie, even (2 steps)
  EXPECT_EQ(m3::round_e4m3(-2.6f), -2.5f);
  EXPECT_TRUE(std::signbit(m3::round_e4m3(-1e-4f)));
  EXPECT_TRUE(std::isnan(m3::round_e4m3(NAN)));
  // Every value of a fine grid lands on a representable value within half a step.
  for (float x = 0x1p-12f; x < 448.f; x *= 1.0137f) {
    const float r = m3::round_e4m3(x);
    int e = 0;
    std::frexp(x, &e);
    const float step = std::ldexp(1.f, std::max(e - 4, -9));
    EXPECT_LE(std::fabs(r - x), 0.5f * step) << x;
    EXPECT_EQ(r, std::ldexp(std::nearbyint(std::ldexp(r, -std::max(e - 4, -9))), std::max(e - 4, -9))) << x;
  }
}

// The fp8 index-K option of the bf16 reference: the traced idx_k is unchanged, the block scores
// are exactly ref::msa_index of the traced idx_q against the E4M3-rounded keys, and the option is
// refused outside bf16.
TEST(Model, Fp8IndexCacheRoundsOnlyTheCachedKeys) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  Tiny t(g());
  const auto tokens = random_tokens(kLen, t.cfg.vocab_size, g);
  EXPECT_THROW(m3::Model(t.cfg, t.w, m3::Precision::FP32, m3::ReferenceOptions{true}), std::invalid_argument);
  std::map<std::string, m3::MatD> plain, fp8;
  auto keep = [](std::map<std::string, m3::MatD>& into) {
    return [&into](int, const std::string& name, const m3::TraceView& v) {
      m3::MatD m(v.rows, v.cols);
      for (std::int64_t r = 0; r < v.rows; ++r)
        for (std::int64_t c = 0; c < v.cols; ++c) m(r, c) = v.at(r, c);
      into[name] = m;
    };
  };
  for (bool f8 : {false, true}) {
    m3::Model model(t.cfg, t.w, m3::Precision::BF16, m3::ReferenceOptions{f8});
    auto s = model.new_sequence();
    model.prefill(s, tokens, keep(f8 ? fp8 : plain));
  }
  int l = 0;
  while (l < t.cfg.num_hidden_layers && t.cfg.layer_types[l] != m3::AttnType::MSA) ++l;
  ASSERT_LT(l, t.cfg.num_hidden_layers) << "tiny has no MSA layer";
  const std::string blk = "blk." + std::to_string(l) + ".";
  // Layers before the first MSA layer are identical, so its inputs are too.
  EXPECT_EQ(plain.at(blk + "idx_k"), fp8.at(blk + "idx_k"));
  EXPECT_EQ(plain.at(blk + "idx_q"), fp8.at(blk + "idx_q"));
  m3::Mat<float> iq = fp8.at(blk + "idx_q").cast<float>(), ik = fp8.at(blk + "idx_k").cast<float>();  // [T, Hi*Di], [T, Di]
  m3::round_e4m3_inplace(ik);
  std::vector<std::int64_t> pos(kLen);
  for (int i = 0; i < kLen; ++i) pos[i] = i;
  m3::Mat<float> want;  // [Hi*T, NB]
  m3::ref::msa_index(iq, ik, pos, t.cfg.msa_dims(), want);
  const m3::MatD& got = fp8.at(blk + "block_scores");
  ASSERT_EQ(got.rows(), want.rows());
  ASSERT_EQ(got.cols(), want.cols());
  EXPECT_EQ(got, want.cast<double>());
  EXPECT_NE(got, plain.at(blk + "block_scores"));  // E4M3 really changed the keys
}
