// Tests of the analytic cost model (reference/cost.h): the published and derived M3 numbers
// (spec §5, DESIGN §5), the exact reading's closed forms against a brute-force simulation of the
// selection rule (msa_select.h), monotonicity and the 32x ceiling, the KV-cache size (spec §3.7),
// linear-layer FLOPs (spec §1.3), dense-only configs and bad input.
#include "reference/config.h"
#include "reference/cost.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using m3::AttnKeys;
using m3::AttnType;
using m3::CostReading;
using m3::ModelConfig;

constexpr std::int64_t kMillion = std::int64_t{1} << 20;  // the 1M context of the claims

// Ratios quoted to 3-4 significant digits in the spec; 5e-4 relative covers the last digit.
constexpr double kQuoted = 5e-4;
// Ratios that are exact rationals (computed here in double from the same integers): only the
// rounding of a handful of double operations separates them.
constexpr double kExact = 1e-12;

void expect_rel(double got, double want, double rel) {
  EXPECT_NEAR(got, want, rel * std::abs(want)) << "got " << got << ", want " << want;
}

// Brute force for the query at position p, written from the selection rule of msa_select.h, not
// from cost.cpp's formula: build a selection (forced blocks, then the highest non-forced blocks;
// which ones are chosen does not change the counts), then count the causally visible keys of
// every selected block. Small vectors, no per-key loop: the m3 case runs all 2^20 positions.
AttnKeys brute_at(const ModelConfig& c, AttnType t, std::int64_t p) {
  AttnKeys k;
  k.queries = 1;
  k.visible = static_cast<std::uint64_t>(p + 1);
  if (t == AttnType::DENSE) {
    k.attended = k.visible;
    return k;
  }
  k.scored = k.visible;  // msa_index scores every visible key, the partial block included
  const std::int64_t blk = c.index_block_size, L = p / blk;
  std::vector<std::int64_t> sel;
  auto has = [&sel](std::int64_t b) { return std::find(sel.begin(), sel.end(), b) != sel.end(); };
  if (L + 1 <= c.index_topk_blocks) {
    for (std::int64_t b = 0; b <= L; ++b) sel.push_back(b);
  } else {
    for (std::int64_t b = 0; b < c.index_init_blocks && b <= L; ++b) sel.push_back(b);
    for (std::int64_t b = std::max<std::int64_t>(0, L - c.index_local_blocks + 1); b <= L; ++b)
      if (!has(b)) sel.push_back(b);
    const auto forced = static_cast<std::int64_t>(sel.size());
    k.select_candidates = static_cast<std::uint64_t>(c.index_n_heads * (L + 1 - forced));
    for (std::int64_t b = L; b >= 0 && static_cast<int>(sel.size()) < c.index_topk_blocks; --b)
      if (!has(b)) sel.push_back(b);
  }
  for (std::int64_t b : sel)  // keys j of block b with j <= p
    k.attended += static_cast<std::uint64_t>(std::clamp<std::int64_t>(p - b * blk + 1, 0, blk));
  return k;
}

AttnKeys brute_range(const ModelConfig& c, AttnType t, std::int64_t p0, std::int64_t T) {
  AttnKeys sum;
  for (std::int64_t p = p0; p < p0 + T; ++p) sum += brute_at(c, t, p);
  return sum;
}

void expect_keys_eq(const AttnKeys& got, const AttnKeys& want) {
  EXPECT_EQ(got.queries, want.queries);
  EXPECT_EQ(got.visible, want.visible);
  EXPECT_EQ(got.scored, want.scored);
  EXPECT_EQ(got.attended, want.attended);
  EXPECT_EQ(got.select_candidates, want.select_candidates);
}

// A hand-made geometry where init and local blocks are both in play.
ModelConfig forced_blocks_config() {
  ModelConfig c = m3::preset("tiny");
  c.name = "tiny-init2-local2";
  c.index_block_size = 8;
  c.index_topk_blocks = 5;
  c.index_init_blocks = 2;
  c.index_local_blocks = 2;
  return c;
}

// --- the M3 numbers of spec §5 ---

TEST(Cost_m3, Decode_Paper_1M) {
  const auto c = m3::preset("m3");
  const auto m = m3::model_cost(c, CostReading::DECODE, kMillion);
  // 32 / (1 + 32*2048/2^20) = 512/17
  expect_rel(m.msa_layer.flops_ratio(), 512.0 / 17.0, kExact);
  expect_rel(m.msa_layer.flops_ratio(), 30.1176, kQuoted);
  // per sparse layer: GQA 4*64*128*2^20, MSA 2*4*128*2^20 + 4*64*128*2048 (spec §5)
  EXPECT_DOUBLE_EQ(m.msa_layer.dense_flops, 34359738368.0);
  EXPECT_DOUBLE_EQ(m.msa_layer.actual_flops(), 1140850688.0);
  expect_rel(m.msa_layer.dense_flops / 1e9, 34.36, kQuoted);
  expect_rel(m.msa_layer.actual_flops() / 1e9, 1.141, kQuoted);
  expect_rel(m.msa_layer.index_flops / 1e9, 1.074, kQuoted);
  expect_rel(m.msa_layer.main_flops / 1e6, 67.1, kQuoted);
  // whole model: 60 dense-equivalent layers vs 3 dense + 57 MSA
  EXPECT_EQ(m.dense_layers, 3);
  EXPECT_EQ(m.msa_layers, 57);
  EXPECT_DOUBLE_EQ(m.attention.dense_flops, 60 * 34359738368.0);
  EXPECT_DOUBLE_EQ(m.attention.actual_flops(), 3 * 34359738368.0 + 57 * 1140850688.0);
  expect_rel(m.attention.dense_flops / 1e9, 2061.6, kQuoted);
  expect_rel(m.attention.actual_flops() / 1e9, 168.1, kQuoted);
  expect_rel(m.attention.flops_ratio(), 12.26, kQuoted);
  // the dense layers stay dense
  EXPECT_DOUBLE_EQ(m.dense_layer.flops_ratio(), 1.0);
  EXPECT_DOUBLE_EQ(m.dense_layer.index_flops, 0.0);
}

TEST(Cost_m3, CausalAvg_Paper_1M) {
  const auto c = m3::preset("m3");
  const double r = m3::attn_cost(c, AttnType::MSA, CostReading::CAUSAL_AVG, kMillion).flops_ratio();
  expect_rel(r, 32.0 / (1.0 + 2.0 * 32 * 2048 / kMillion), kExact);  // = 256/9
  expect_rel(r, 28.444, kQuoted);
  // spec §5 table: reading (a) at n = 2^19 is reading (b) at N = 2^20
  const double a = m3::attn_cost(c, AttnType::MSA, CostReading::DECODE, kMillion / 2).flops_ratio();
  expect_rel(r, a, kExact);
}

TEST(Cost_m3, CausalExact_1M) {
  const auto c = m3::preset("m3");
  const AttnKeys k = m3::attn_keys_range(c, AttnType::MSA, 0, kMillion);
  // Independent integers: sum_p (p+1) = N(N+1)/2; attended: p < 2048 all p+1 keys, then
  // 15 full blocks + p%128+1 (N - 2048 is a multiple of 128 here).
  const std::uint64_t n = kMillion, w = 2048, rest = n - w;
  EXPECT_EQ(k.visible, n * (n + 1) / 2);
  EXPECT_EQ(k.attended, w * (w + 1) / 2 + rest * 1921 + (rest / 128) * (128 * 127 / 2));
  const double r = m3::attn_cost(c, AttnType::MSA, CostReading::CAUSAL_EXACT, kMillion).flops_ratio();
  const double want = 32768.0 * static_cast<double>(k.visible) /
                      (1024.0 * static_cast<double>(k.scored) + 32768.0 * static_cast<double>(k.attended));
  expect_rel(r, want, kExact);
  expect_rel(r, 28.5457, kQuoted);
  // and the brute force over all 2^20 positions (16 blocks each: a fraction of a second)
  expect_keys_eq(k, brute_range(c, AttnType::MSA, 0, kMillion));
}

TEST(Cost_m3, DecodeExact_EqualsPaperAtBlockMultiples) {
  // At n = multiple of BLK the query's own block is full: (K_blk-1)*BLK + BLK = K_blk*BLK keys.
  const auto c = m3::preset("m3");
  for (std::int64_t n : {std::int64_t{4096}, std::int64_t{65536}, kMillion}) {
    const auto p = m3::attn_cost(c, AttnType::MSA, CostReading::DECODE, n);
    const auto e = m3::attn_cost(c, AttnType::MSA, CostReading::DECODE_EXACT, n);
    EXPECT_DOUBLE_EQ(p.actual_flops(), e.actual_flops()) << "n " << n;
  }
  // one key into a block: 15 full blocks + 1 key, fewer than the paper's 2048
  const auto e = m3::attn_cost(c, AttnType::MSA, CostReading::DECODE_EXACT, 4097);
  EXPECT_DOUBLE_EQ(e.main_flops, 4.0 * 64 * 128 * (15 * 128 + 1));
  EXPECT_DOUBLE_EQ(e.index_flops, 2.0 * 4 * 128 * 4097);
}

TEST(Cost_m3, DecodeBytes_1M) {
  const auto c = m3::preset("m3");
  const auto a = m3::attn_cost(c, AttnType::MSA, CostReading::DECODE, kMillion, 2.0);
  EXPECT_DOUBLE_EQ(a.dense_bytes, 2.0 * 4 * 128 * kMillion * 2);  // K+V of every key
  EXPECT_DOUBLE_EQ(a.index_bytes, 128.0 * kMillion * 2);          // index-K of every key
  EXPECT_DOUBLE_EQ(a.kv_bytes, 4.0 * 2 * 128 * 2048 * 2);         // each KV head its 2048 keys
  // bytes scale with the element size, FLOPs do not
  const auto b = m3::attn_cost(c, AttnType::MSA, CostReading::DECODE, kMillion, 1.0);
  EXPECT_DOUBLE_EQ(b.actual_bytes() * 2, a.actual_bytes());
  EXPECT_DOUBLE_EQ(b.actual_flops(), a.actual_flops());
}

TEST(Cost_m3, KvCacheBytesPerToken) {
  // spec §3.7: 60*2*4*128*2 (120 KiB) + 57*128*2 (14.25 KiB) = 137472 bytes = 134.25 KiB
  EXPECT_DOUBLE_EQ(m3::kv_cache_bytes_per_token(m3::preset("m3")), 137472.0);
  EXPECT_DOUBLE_EQ(m3::kv_cache_bytes_per_token(m3::preset("m3")), 120 * 1024 + 14.25 * 1024);
}

TEST(Cost_m3, LinearFlopsPerToken) {
  const auto c = m3::preset("m3");
  const auto m = m3::model_cost(c, CostReading::DECODE, kMillion);
  // spec §1.3: attention 60 x 106.95M, indexer 57 x 3.93M, dense MLP 3 x 226.5M, MoE active
  // 57 x (5 x 56.6M + 0.79M) parameters, one multiply-add (2 FLOPs) per parameter.
  expect_rel(m.linear.attn_proj, 2 * 60 * 106.95e6, kQuoted);
  expect_rel(m.linear.index_proj, 2 * 57 * 3.93e6, 2e-3);  // 3.93 is quoted to 3 digits
  expect_rel(m.linear.dense_mlp, 2 * 3 * 226.5e6, kQuoted);
  expect_rel(m.linear.experts + m.linear.shared, 2 * 57 * 5 * 3.0 * 6144 * 3072, kExact);
  expect_rel(m.linear.router, 2 * 57 * 6144.0 * 128, kExact);
  // ~23.5B active parameters excluding embeddings and LM head (spec §1.3)
  expect_rel(m.linear.total() / 2, 23.5e9, 2e-3);
  EXPECT_DOUBLE_EQ(m.lm_head_flops, 2.0 * 6144 * 200064);
  EXPECT_GT(m.attn_share_dense(), 0.0);
  EXPECT_LT(m.attn_share_actual(), m.attn_share_dense());
}

// --- exact reading: closed form == brute force ---

TEST(Cost_exact, ClosedFormEqualsBruteForce_Presets) {
  for (const char* name : {"tiny", "small", "m3"}) {
    const auto c = m3::preset(name);
    const std::int64_t blk = c.index_block_size, w = c.index_topk_blocks * blk;
    // 1 token, around a block, around the K_blk*BLK edge, not multiples of BLK, longer
    const std::vector<std::int64_t> lengths{1,         2,         blk - 1,   blk,
                                            blk + 1,   w - 1,     w,         w + 1,
                                            w + blk / 2 + 3, 3 * w + 7, 10 * w + blk - 1};
    for (AttnType t : {AttnType::DENSE, AttnType::MSA}) {
      for (std::int64_t n : lengths) {
        SCOPED_TRACE(testing::Message() << name << " type " << m3::attn_type_name(t) << " N " << n);
        expect_keys_eq(m3::attn_keys_range(c, t, 0, n), brute_range(c, t, 0, n));
        expect_keys_eq(m3::attn_keys_at(c, t, n - 1), brute_at(c, t, n - 1));
      }
    }
  }
}

TEST(Cost_exact, ClosedFormEqualsBruteForce_InitAndLocalBlocks) {
  const auto c = forced_blocks_config();
  for (std::int64_t n = 1; n <= 300; ++n) {
    SCOPED_TRACE(testing::Message() << "N " << n);
    expect_keys_eq(m3::attn_keys_at(c, AttnType::MSA, n - 1), brute_at(c, AttnType::MSA, n - 1));
    expect_keys_eq(m3::attn_keys_range(c, AttnType::MSA, 0, n), brute_range(c, AttnType::MSA, 0, n));
  }
}

TEST(Cost_exact, PrefillChunks) {
  // Chunks starting anywhere: closed form == brute force, and chunks add up to the whole.
  for (const ModelConfig& c : {m3::preset("tiny"), m3::preset("small"), forced_blocks_config()}) {
    const std::int64_t blk = c.index_block_size, w = c.index_topk_blocks * blk;
    for (std::int64_t p0 : {std::int64_t{0}, std::int64_t{1}, blk - 1, w - 3, w, 5 * w + 11}) {
      for (std::int64_t T : {std::int64_t{0}, std::int64_t{1}, blk + 1, 2 * w + 5}) {
        SCOPED_TRACE(testing::Message() << c.name << " p0 " << p0 << " T " << T);
        const AttnKeys chunk = m3::attn_keys_range(c, AttnType::MSA, p0, T);
        expect_keys_eq(chunk, brute_range(c, AttnType::MSA, p0, T));
        AttnKeys whole = m3::attn_keys_range(c, AttnType::MSA, 0, p0);
        whole += chunk;
        expect_keys_eq(whole, m3::attn_keys_range(c, AttnType::MSA, 0, p0 + T));
      }
    }
  }
}

TEST(Cost_exact, CounterFromKeys) {
  const auto c = m3::preset("small");
  const AttnKeys k = m3::attn_keys_range(c, AttnType::MSA, 100, 3000);
  const m3::AttnCounter m = m3::attn_counter(c, AttnType::MSA, k);
  EXPECT_EQ(m.qk_macs, std::uint64_t{32} * 128 * k.attended);
  EXPECT_EQ(m.pv_macs, m.qk_macs);
  EXPECT_EQ(m.index_macs, std::uint64_t{2} * 128 * k.scored);
  EXPECT_EQ(m.select_candidates, k.select_candidates);
  EXPECT_GT(k.select_candidates, 0u);  // 3100 > 16*128 positions: selection happens
  const m3::AttnCounter d = m3::attn_counter(c, AttnType::DENSE, m3::attn_keys_range(c, AttnType::DENSE, 100, 3000));
  EXPECT_EQ(d.qk_macs, std::uint64_t{32} * 128 * k.visible);
  EXPECT_EQ(d.index_macs, 0u);
  EXPECT_EQ(d.select_candidates, 0u);
  // per-query exact cost == its FLOPs
  const auto a = m3::attn_cost_at(c, AttnType::MSA, 5000);
  const AttnKeys one = m3::attn_keys_at(c, AttnType::MSA, 5000);
  EXPECT_DOUBLE_EQ(a.main_flops, 4.0 * 32 * 128 * static_cast<double>(one.attended));
  EXPECT_DOUBLE_EQ(a.index_flops, 2.0 * 2 * 128 * static_cast<double>(one.scored));
}

TEST(Cost_exact, ShortContextIsDenseAttentionPlusIndex) {
  // Below K_blk*BLK every visible block is selected: main branch == dense attention (spec §3.4).
  const auto c = m3::preset("m3");
  for (std::int64_t n : {1, 127, 128, 129, 2047, 2048}) {
    const auto e = m3::attn_cost(c, AttnType::MSA, CostReading::DECODE_EXACT, n);
    EXPECT_DOUBLE_EQ(e.main_flops, e.dense_flops) << "n " << n;
    EXPECT_EQ(e.select_candidates, 0.0) << "n " << n;
  }
}

// --- shape of the curves ---

TEST(Cost_paper, RatioIncreasesWithContextAndApproaches32) {
  const auto c = m3::preset("m3");
  const double limit = m3::msa_ratio_limit(c);
  EXPECT_DOUBLE_EQ(limit, 32.0);  // 4*Hq*D / (2*Hi*Di) = 4*64*128 / (2*4*128)
  for (CostReading r : {CostReading::DECODE, CostReading::DECODE_EXACT, CostReading::CAUSAL_AVG,
                        CostReading::CAUSAL_EXACT}) {
    SCOPED_TRACE(m3::cost_reading_name(r));
    double prev = 0;
    // powers of two (the exact decode reading wiggles with p % BLK between block edges)
    for (std::int64_t n = 4096; n <= (std::int64_t{1} << 30); n *= 2) {
      const double x = m3::attn_cost(c, AttnType::MSA, r, n).flops_ratio();
      EXPECT_GT(x, prev) << "n " << n;
      EXPECT_LT(x, limit) << "n " << n;
      prev = x;
    }
    // at 2^30 the fixed 2048-key main branch is ~6e-5 of the index branch's cost or less
    EXPECT_GT(prev, limit * (1 - 2e-4));
  }
}

TEST(Cost_paper, DenseOnlyConfigHasRatioOne) {
  ModelConfig c = m3::preset("tiny");
  c.name = "dense-only";
  c.layer_types.assign(c.num_hidden_layers, AttnType::DENSE);
  for (CostReading r : {CostReading::DECODE, CostReading::DECODE_EXACT, CostReading::CAUSAL_AVG,
                        CostReading::CAUSAL_EXACT}) {
    const auto m = m3::model_cost(c, r, 1000);
    EXPECT_EQ(m.msa_layers, 0);
    EXPECT_EQ(m.dense_layers, c.num_hidden_layers);
    EXPECT_DOUBLE_EQ(m.attention.flops_ratio(), 1.0);
    EXPECT_DOUBLE_EQ(m.attention.bytes_ratio(), 1.0);
    EXPECT_DOUBLE_EQ(m.attention.index_flops, 0.0);
    EXPECT_GT(m.attention.dense_flops, 0.0);
  }
  // and no index-K in the cache
  EXPECT_DOUBLE_EQ(m3::kv_cache_bytes_per_token(c), 4.0 * 2 * 2 * 16 * 2);
}

// --- bad input ---

TEST(Cost_bad, Arguments) {
  const auto c = m3::preset("tiny");
  EXPECT_THROW(m3::attn_cost(c, AttnType::MSA, CostReading::DECODE, 0), std::invalid_argument);
  EXPECT_THROW(m3::attn_keys_at(c, AttnType::MSA, -1), std::invalid_argument);
  EXPECT_THROW(m3::attn_keys_range(c, AttnType::MSA, -1, 4), std::invalid_argument);
  EXPECT_THROW(m3::attn_keys_range(c, AttnType::MSA, 0, -4), std::invalid_argument);
  EXPECT_THROW(m3::attn_keys_range(c, AttnType::MSA, 0, std::int64_t{1} << 33),
               std::invalid_argument);
  EXPECT_THROW(m3::attn_cost(c, AttnType::MSA, CostReading::DECODE, 10, 0.0),
               std::invalid_argument);
  EXPECT_THROW(m3::attn_cost_of(c, AttnType::MSA, AttnKeys{}), std::invalid_argument);
  EXPECT_THROW(m3::linear_flops_per_token(c, c.num_hidden_layers), std::out_of_range);

  ModelConfig no_local = c;
  no_local.index_local_blocks = 0;  // the attended count would depend on the data
  EXPECT_THROW(m3::attn_keys_at(no_local, AttnType::MSA, 100), std::invalid_argument);
  ModelConfig too_many_forced = c;
  too_many_forced.index_init_blocks = 4;  // 4 + 1 forced > K_blk = 4
  EXPECT_THROW(m3::attn_keys_at(too_many_forced, AttnType::MSA, 100), std::invalid_argument);
  ModelConfig short_types = c;
  short_types.layer_types.pop_back();
  EXPECT_THROW(m3::model_cost(short_types, CostReading::DECODE, 10), std::invalid_argument);
}

}  // namespace
