// ModelConfig: presets match the spec, config.json of both spellings loads to the same config,
// and every broken rule is reported by field name.
#include "reference/config.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

using m3::AttnType;
using m3::ConfigError;
using m3::MlpType;
using m3::ModelConfig;

namespace {

// The official (nested) spelling of M3's text config, as spec §1 and Appendix A describe it.
std::string official_m3_json() {
  nlohmann::json j;
  j["hidden_size"] = 6144;
  j["num_hidden_layers"] = 60;
  j["num_attention_heads"] = 64;
  j["num_key_value_heads"] = 4;
  j["head_dim"] = 128;
  j["vocab_size"] = 200064;
  j["rms_norm_eps"] = 1e-6;
  j["rope_theta"] = 5000000;
  j["partial_rotary_factor"] = 0.5;
  j["max_position_embeddings"] = 1048576;
  j["intermediate_size"] = 3072;
  j["dense_intermediate_size"] = 12288;
  j["n_shared_experts"] = 1;
  j["num_local_experts"] = 128;
  j["num_experts_per_tok"] = 4;
  j["routed_scaling_factor"] = 2.0;
  j["num_mtp_modules"] = 7;
  std::vector<int> freq(60, 1);
  freq[0] = freq[1] = freq[2] = 0;
  j["moe_layer_freq"] = freq;
  j["sparse_attention_config"] = {{"use_sparse_attention", true}, {"sparse_num_index_heads", 4},
                                  {"sparse_index_dim", 128},      {"sparse_block_size", 128},
                                  {"sparse_topk_blocks", 16},     {"sparse_init_block", 0},
                                  {"sparse_local_block", 1},      {"sparse_score_type", "max"},
                                  {"sparse_attention_freq", freq}};
  nlohmann::json vl;  // wrapped as the VL checkpoint ships it
  vl["architectures"] = {"MiniMaxM3SparseForConditionalGeneration"};
  vl["text_config"] = j;
  return vl.dump();
}

void expect_same(const ModelConfig& a, const ModelConfig& b) {
  // to_json covers every field; names differ by design (origin of the config).
  auto ja = nlohmann::json::parse(a.to_json()), jb = nlohmann::json::parse(b.to_json());
  ja.erase("name");
  jb.erase("name");
  EXPECT_EQ(ja, jb);
}

std::string error_of(const std::string& text) {
  try {
    m3::parse_config_json(text, "test.json");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Config, M3PresetMatchesSpec) {
  ModelConfig c = m3::preset("m3");
  EXPECT_EQ(c.hidden_size, 6144);
  EXPECT_EQ(c.num_hidden_layers, 60);
  EXPECT_EQ(c.num_attention_heads / c.num_key_value_heads, 16);
  EXPECT_EQ(c.rotary_dim, 64);
  EXPECT_EQ(c.num_layers_of(AttnType::DENSE), 3);
  EXPECT_EQ(c.num_layers_of(AttnType::MSA), 57);
  EXPECT_EQ(c.num_layers_of(MlpType::MOE), 57);
  EXPECT_EQ(c.layer_types[2], AttnType::DENSE);
  EXPECT_EQ(c.layer_types[3], AttnType::MSA);
  EXPECT_EQ(c.index_topk_blocks * c.index_block_size, 2048);
  EXPECT_DOUBLE_EQ(c.rope_theta, 5e6);
}

TEST(Config, AllPresetsValidate) {
  for (const auto& n : m3::preset_names()) EXPECT_NO_THROW(m3::preset(n).validate()) << n;
  EXPECT_EQ(m3::preset("m3-layer").num_hidden_layers, 1);
  ModelConfig s = m3::preset("small");
  EXPECT_EQ(s.head_dim, 128);
  EXPECT_EQ(s.index_block_size, 128);
  EXPECT_EQ(s.index_topk_blocks, 16);
  EXPECT_EQ(s.num_attention_heads / s.num_key_value_heads, 16);
  ModelConfig t = m3::preset("tiny");
  EXPECT_EQ(t.index_block_size, 16);
  EXPECT_EQ(t.index_topk_blocks, 4);
}

TEST(Config, UnknownPresetNamesTheKnownOnes) {
  try {
    m3::preset("huge");
    FAIL() << "no error";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("tiny"), std::string::npos) << e.what();
  }
}

TEST(Config, OfficialSpellingLoadsAsM3) { expect_same(m3::parse_config_json(official_m3_json()), m3::preset("m3")); }

TEST(Config, FlatSpellingRoundTrips) {
  for (const auto& n : m3::preset_names()) {
    ModelConfig c = m3::preset(n);
    expect_same(m3::parse_config_json(c.to_json()), c);
  }
}

TEST(Config, ErrorsNameFieldAndRule) {
  auto j = nlohmann::json::parse(m3::preset("tiny").to_json());
  struct Case {
    const char* field;
    nlohmann::json value;
    const char* expect;
  } cases[] = {
      {"num_attention_heads", 5, "divisible by num_key_value_heads"},
      {"rotary_dim", 7, "rotary_dim: must be even"},
      {"rotary_dim", 32, "rotary_dim: must be <= head_dim"},
      {"index_n_heads", 1, "index_n_heads: must equal num_key_value_heads"},
      {"index_topk_blocks", 0, "index_topk_blocks: must be >="},
      {"index_block_size", 0, "index_block_size: must be > 0"},
      {"num_experts_per_tok", 9, "num_experts_per_tok: must be in [1, num_local_experts = 8]"},
      {"hidden_size", "big", "field 'hidden_size' must be an integer"},
      {"layer_types", nlohmann::json::array({"full_attention"}), "layer_types: must have num_hidden_layers = 4"},
      {"layer_types", nlohmann::json::array({"full_attention", "x", "y", "z"}), "entry 1 must be"},
      {"tie_word_embeddings", true, "tie_word_embeddings: must be false"},
  };
  for (const auto& c : cases) {
    auto k = j;
    k[c.field] = c.value;
    std::string err = error_of(k.dump());
    EXPECT_NE(err.find(c.expect), std::string::npos) << c.field << " -> '" << err << "'";
  }
  auto k = j;
  k.erase("hidden_size");
  EXPECT_NE(error_of(k.dump()).find("'hidden_size' is required"), std::string::npos);
  EXPECT_NE(error_of("{ not json").find("not valid JSON"), std::string::npos);
  EXPECT_NE(error_of("[1, 2]").find("must be a JSON object"), std::string::npos);
}

TEST(Config, SeveralErrorsAreAllReported) {
  ModelConfig c = m3::preset("tiny");
  c.hidden_size = 0;
  c.rotary_dim = 3;
  try {
    c.validate();
    FAIL();
  } catch (const ConfigError& e) {
    std::string s = e.what();
    EXPECT_NE(s.find("hidden_size"), std::string::npos);
    EXPECT_NE(s.find("rotary_dim"), std::string::npos);
  }
}

TEST(Config, MissingFileIsAClearError) {
  EXPECT_THROW(m3::load_config_file("/nonexistent/config.json"), ConfigError);
}
