// Weights: the seeded generator is deterministic to the bit, pinned against golden values so a
// change of compiler or machine that alters a bit fails here; scales keep activations O(1).
#include "reference/rng.h"
#include "reference/weights.h"

#include <gtest/gtest.h>

#include <cmath>
#include <set>

TEST(CounterRng, NormalMomentsAndBounds) {
  m3::CounterRng r(123, "moments");
  const int n = 200000;
  double s = 0, s2 = 0, mx = 0;
  for (int i = 0; i < n; ++i) {
    double x = r.normal(i);
    s += x;
    s2 += x * x;
    mx = std::max(mx, std::abs(x));
  }
  // 200k samples: the standard error of the mean is 1/sqrt(n) = 0.0022; 5 sigma bounds.
  EXPECT_NEAR(s / n, 0.0, 0.012);
  EXPECT_NEAR(s2 / n, 1.0, 0.02);
  EXPECT_LE(mx, 6.0);   // Irwin-Hall support
  EXPECT_GT(mx, 3.5);   // but real tails: P(|x| > 3.5) ~ 5e-4, so ~90 of 200k samples exceed it
}

TEST(CounterRng, PinnedBits) {
  // Golden values: any platform that generates other bits breaks reproducibility of every
  // seeded model. (SplitMix64 reference value for state 0 is 0xe220a8397b1dcdaf.)
  EXPECT_EQ(m3::splitmix64(0), 0xe220a8397b1dcdafull);
  m3::CounterRng r(7, "model.embed_tokens.weight");
  const double a = r.normal(0), b = r.normal(12345);
  m3::CounterRng r2(7, "model.embed_tokens.weight");
  EXPECT_EQ(a, r2.normal(0));
  EXPECT_EQ(b, r2.normal(12345));
  m3::CounterRng r3(8, "model.embed_tokens.weight");
  EXPECT_NE(a, r3.normal(0));
}

TEST(Weights, SameSeedSameBitsAnyOrder) {
  auto cfg = m3::preset("tiny");
  auto w1 = m3::generate_weights(cfg, 42);
  auto w2 = m3::generate_weights(cfg, 42);
  auto w3 = m3::generate_weights(cfg, 43);
  EXPECT_TRUE((w1.embed_tokens.array() == w2.embed_tokens.array()).all());
  EXPECT_FALSE((w1.embed_tokens.array() == w3.embed_tokens.array()).all());
  // A layer generated alone equals the same layer inside the whole model.
  auto l2 = m3::generate_layer(cfg, 2, 42);
  EXPECT_TRUE((l2.attn.index_q_proj.array() == w1.layers[2].attn.index_q_proj.array()).all());
  EXPECT_TRUE((l2.experts[3].down.array() == w1.layers[2].experts[3].down.array()).all());
}

TEST(Weights, EveryTensorNamedOnceWithSpecShapes) {
  auto cfg = m3::preset("tiny");
  auto w = m3::generate_weights(cfg, 1);
  std::set<std::string> names;
  std::uint64_t params = 0;
  m3::for_each_tensor(w, [&](const std::string& n, float* data, std::int64_t r, std::int64_t c) {
    EXPECT_TRUE(names.insert(n).second) << "duplicate " << n;
    params += static_cast<std::uint64_t>(r * c);
    double ss = 0;
    for (std::int64_t i = 0; i < r * c; ++i) ss += double(data[i]) * data[i];
    EXPECT_GT(ss, 0.0) << n << " is all zero";
  });
  EXPECT_EQ(params, m3::weights_param_count(cfg));
  EXPECT_TRUE(names.count("model.layers.1.self_attn.index_k_proj.weight"));
  EXPECT_TRUE(names.count("model.layers.3.block_sparse_moe.experts.7.w2.weight"));
  EXPECT_TRUE(names.count("model.layers.0.mlp.gate_proj.weight"));
  EXPECT_FALSE(names.count("model.layers.0.self_attn.index_k_proj.weight"));  // dense layer
  EXPECT_TRUE(names.count("lm_head.weight"));
}

TEST(Weights, M3ParameterCountMatchesSpecBudget) {
  // spec §1.3: 426.2B text parameters (no MTP, no vision).
  const double p = double(m3::weights_param_count(m3::preset("m3")));
  EXPECT_NEAR(p / 1e9, 426.2, 0.1);
}

TEST(Weights, WholeM3IsRefusedWithTheNeed) {
  try {
    m3::generate_weights(m3::preset("m3"), 0);
    FAIL();
  } catch (const m3::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("GiB"), std::string::npos) << e.what();
  }
}

TEST(Weights, Bf16ConversionRoundsAllButRouter) {
  auto cfg = m3::preset("tiny");
  auto w = m3::generate_weights(cfg, 3);
  auto b = m3::convert_weights<float>(w, m3::Precision::BF16);
  auto is_bf16 = [](const auto& m) {
    for (Eigen::Index i = 0; i < m.size(); ++i)
      if (m3::round_bf16(m.data()[i]) != m.data()[i]) return false;
    return true;
  };
  EXPECT_TRUE(is_bf16(b.layers[1].attn.q_proj));
  EXPECT_TRUE(is_bf16(b.layers[1].experts[0].gate));
  EXPECT_FALSE(is_bf16(b.layers[1].router));  // fp32 router, as the checkpoint and GPU keep it
  EXPECT_TRUE((b.layers[1].router.array() == w.layers[1].router.array()).all());
}

TEST(Bf16, RoundingMatchesRneRule) {
  EXPECT_EQ(m3::round_bf16(1.0f), 1.0f);
  // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to even -> 1.
  EXPECT_EQ(m3::round_bf16(1.0f + 0x1p-8f), 1.0f);
  // 1 + 3*2^-8 is halfway between 1+2^-7 and 1+2^-6: ties to even -> 1 + 2^-6.
  EXPECT_EQ(m3::round_bf16(1.0f + 3 * 0x1p-8f), 1.0f + 0x1p-6f);
  EXPECT_TRUE(std::isnan(m3::round_bf16(std::nanf(""))));
  EXPECT_EQ(m3::round_bf16(INFINITY), INFINITY);
  EXPECT_EQ(m3::round_bf16(3.4e38f), INFINITY);  // past bf16's max 3.39e38
}
