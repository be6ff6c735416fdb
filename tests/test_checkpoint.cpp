// Checkpoints: save + load round trips in both layouts (spec Appendix A), single file and shards,
// F32 bit-exact with bit-identical logits, BF16 / F16 equal to their roundings, fp8 block scales;
// every content error (missing tensor, shape, dtype, NaN, index, config) with a message that names
// the culprit; unknown / ignored tensors; the inspect summary.
#include "datasets/checkpoint.h"

#include "reference/model.h"
#include "tests/test_checkpoint_util.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <random>

namespace {

namespace fs = std::filesystem;
using m3::Dtype;
using m3::Layout;
using namespace m3::test;  // TempDir, edit_tensors, same_bits, load_error, ... (test_checkpoint_util.h)
using Bytes = std::vector<std::uint8_t>;

const m3::ModelConfig& tiny() {
  static const m3::ModelConfig c = m3::preset("tiny");
  return c;
}
const m3::ModelWeights<float>& tiny_weights() {
  static const m3::ModelWeights<float> w = m3::generate_weights(tiny(), 11);
  return w;
}

// Every tensor by official name, as flat copies.
FlatTensors flatten(m3::ModelWeights<float> w) {
  FlatTensors out;
  m3::for_each_tensor(w, [&](const std::string& n, float* d, std::int64_t r, std::int64_t c) {
    out[n].assign(d, d + r * c);
  });
  return out;
}

bool is_router(const std::string& name) {
  return name.find("block_sparse_moe.gate.weight") != std::string::npos ||
         name.find("e_score_correction_bias") != std::string::npos;
}

RawTensor& find(std::vector<RawTensor>& ts, const std::string& name) {
  for (auto& t : ts)
    if (t.name == name) return t;
  throw std::runtime_error("test: no tensor " + name);
}
void set_f32(RawTensor& t, std::size_t i, float v) { std::memcpy(t.bytes.data() + 4 * i, &v, 4); }

m3::MatD logits_of(const m3::ModelWeights<float>& w) {
  m3::Model model(tiny(), w, m3::Precision::FP32);
  std::vector<std::int32_t> tokens(70);  // 70 > 4 blocks of 16: MSA selection is active
  for (int i = 0; i < 70; ++i) tokens[i] = (i * 131 + 7) % tiny().vocab_size;
  auto seq = model.new_sequence();
  return model.prefill(seq, tokens);
}

void round_trip(Layout layout, int shards) {
  TempDir d;
  m3::save_checkpoint(d.str(), tiny(), tiny_weights(), layout, Dtype::F32, shards);
  EXPECT_EQ(fs::exists(d.file(m3::kIndexFileName)), shards > 1);
  EXPECT_EQ(fs::exists(d.file(m3::kSingleFileName)), shards == 1);
  const m3::Checkpoint ck = m3::load_checkpoint(d.str());
  EXPECT_EQ(ck.names.layout, layout);
  EXPECT_EQ(ck.names.prefix, "model.");
  EXPECT_EQ(ck.files.size(), static_cast<std::size_t>(shards));
  EXPECT_TRUE(ck.unknown_tensors.empty());
  EXPECT_TRUE(ck.ignored_tensors.empty());
  EXPECT_EQ(ck.config.to_json(), tiny().to_json());
  const auto a = flatten(tiny_weights()), b = flatten(ck.weights);
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, v] : a) EXPECT_TRUE(same_bits(v, b.at(name))) << name;
  const m3::MatD la = logits_of(tiny_weights()), lb = logits_of(ck.weights);
  ASSERT_GT(la.norm(), 0.0);
  EXPECT_TRUE((la.array() == lb.array()).all()) << "logits differ after reload";
}

// A tiny checkpoint in `d`, single file.
void save_tiny(const TempDir& d, Layout layout = Layout::OFFICIAL, Dtype dtype = Dtype::F32, int shards = 1) {
  m3::save_checkpoint(d.str(), tiny(), tiny_weights(), layout, dtype, shards);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Round trips

TEST(CheckpointLayout, OfficialNamesAreTheWeightsVisitorNames) {
  auto w = tiny_weights();
  const auto slots = m3::layout_slots(tiny(), {}, &w);
  std::size_t i = 0;
  m3::for_each_tensor(w, [&](const std::string& n, float* data, std::int64_t r, std::int64_t c) {
    ASSERT_LT(i, slots.size());
    EXPECT_EQ(slots[i].name, n);
    const std::vector<std::int64_t> want = c == 1 ? std::vector<std::int64_t>{r} : std::vector<std::int64_t>{r, c};
    EXPECT_EQ(slots[i].shape, want) << n;
    ASSERT_EQ(slots[i].pieces.size(), 1u) << n;
    EXPECT_EQ(slots[i].pieces[0].dst, data) << n;
    ++i;
  });
  EXPECT_EQ(i, slots.size());
}

TEST(CheckpointLayout, Names) {
  EXPECT_EQ(m3::parse_layout("hf"), Layout::HF);
  EXPECT_EQ(m3::layout_name(m3::parse_layout("official")), "official");
  EXPECT_THROW(m3::parse_layout("HF"), std::invalid_argument);
}

TEST(Checkpoint_f32, RoundTrip_Official_Single) { round_trip(Layout::OFFICIAL, 1); }
TEST(Checkpoint_f32, RoundTrip_Official_Shards3) { round_trip(Layout::OFFICIAL, 3); }
TEST(Checkpoint_f32, RoundTrip_Hf_Single) { round_trip(Layout::HF, 1); }
TEST(Checkpoint_f32, RoundTrip_Hf_Shards3) { round_trip(Layout::HF, 3); }

TEST(Checkpoint_f32, HfLayoutFusesGateUpAndExperts) {
  TempDir d;
  save_tiny(d, Layout::HF);
  m3::SafetensorsReader r(d.file(m3::kSingleFileName));
  const auto& L1 = tiny_weights().layers[1];
  const auto gu = r.read_mat(r.tensor("model.layers.1.mlp.experts.gate_up_proj"));  // [E, 2I*H] as a matrix
  const int I = tiny().intermediate_size, H = tiny().hidden_size;
  EXPECT_EQ(r.tensor("model.layers.1.mlp.experts.gate_up_proj").shape, (std::vector<std::int64_t>{8, 2 * I, H}));
  EXPECT_EQ(gu(5, 0), L1.experts[5].gate(0, 0));                 // expert 5: gate rows first
  EXPECT_EQ(gu(5, I * H + 3), L1.experts[5].up(0, 3));           // then up rows
  const auto dn = r.read_mat(r.tensor("model.layers.1.mlp.experts.down_proj"));
  EXPECT_EQ(dn(2, 7 * I + 1), L1.experts[2].down(7, 1));         // [E, H, I]
  const auto g0 = r.read_mat(r.tensor("model.layers.0.mlp.gate_up_proj.weight"));
  EXPECT_EQ(g0(tiny().dense_intermediate_size, 4), tiny_weights().layers[0].mlp.up(0, 4));
  EXPECT_NE(r.header().find("model.layers.1.self_attn.indexer.q_proj.weight"), nullptr);
}

TEST(Checkpoint_f32, OfficialConfigUsesNestedSpelling) {
  TempDir d;
  save_tiny(d, Layout::OFFICIAL);
  std::ifstream f(d.file("config.json"));
  const auto j = nlohmann::json::parse(f);
  EXPECT_TRUE(j.contains("sparse_attention_config"));
  EXPECT_TRUE(j.contains("moe_layer_freq"));
  EXPECT_FALSE(j.contains("layer_types"));  // else the flat field would be what the parser reads
  EXPECT_FALSE(j.contains("index_topk_blocks"));
  EXPECT_EQ(j["sparse_attention_config"]["sparse_attention_freq"], nlohmann::json({0, 1, 1, 1}));
  EXPECT_EQ(j["architectures"], nlohmann::json::array({"MiniMaxM3SparseForCausalLM"}));
  EXPECT_EQ(m3::load_config_file(d.file("config.json")).to_json(), tiny().to_json());
}

TEST(Checkpoint_bf16, ReloadEqualsRoundBf16RouterStaysF32) {
  TempDir d;
  save_tiny(d, Layout::HF, Dtype::BF16, 2);
  const auto a = flatten(tiny_weights()), b = flatten(m3::load_checkpoint(d.str()).weights);
  const int rounded = expect_reloaded_rounded(a, b, [](float x) { return m3::round_bf16(x); }, is_router);
  EXPECT_GT(rounded, 20);  // not vacuous: rounding changed nearly every tensor
}

TEST(Checkpoint_f16, ReloadEqualsF16Rounding) {
  TempDir d;
  save_tiny(d, Layout::OFFICIAL, Dtype::F16);
  const auto a = flatten(tiny_weights()), b = flatten(m3::load_checkpoint(d.str()).weights);
  // The converter itself is tested against hand values in test_safetensors.
  const int rounded =
      expect_reloaded_rounded(a, b, [](float x) { return m3::f16_bits_to_float(m3::float_to_f16_bits(x)); }, is_router);
  EXPECT_GT(rounded, 20);
}

// fp8 E4M3 with 128x128 block scales: value = decode(code) * scale of its block, exactly.
TEST(Checkpoint_fp8, BlockScaledWeights_Official2d_Hf3d) {
  std::mt19937_64 g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  auto code = [&] {
    std::uint8_t c;
    do c = static_cast<std::uint8_t>(g()); while ((c & 0x7F) == 0x7F);  // not NaN
    return c;
  };
  std::uniform_real_distribution<float> sc(0.001f, 0.1f);
  for (Layout layout : {Layout::OFFICIAL, Layout::HF}) {
    TempDir d;
    save_tiny(d, layout);
    // Official: the embedding [512, 64] = 4 x 1 blocks. HF: experts [8, 64, 64] = 8 x 1 x 1 blocks.
    const std::string name =
        layout == Layout::OFFICIAL ? "model.embed_tokens.weight" : "model.layers.1.mlp.experts.gate_up_proj";
    std::vector<std::int64_t> shape, sshape;
    Bytes codes;
    std::vector<float> scales;
    edit_tensors(d, [&](std::vector<RawTensor>& ts) {
      RawTensor& t = find(ts, name);
      shape = t.shape;
      sshape = layout == Layout::OFFICIAL ? std::vector<std::int64_t>{4, 1} : std::vector<std::int64_t>{8, 1, 1};
      codes.resize(t.bytes.size() / 4);
      for (auto& c : codes) c = code();
      scales.resize(static_cast<std::size_t>(sshape[0]));
      for (auto& s : scales) s = sc(g);
      t = {name, Dtype::F8_E4M3, shape, codes};
      Bytes sb(scales.size() * 4);
      std::memcpy(sb.data(), scales.data(), sb.size());
      ts.push_back({name + "_scale_inv", Dtype::F32, sshape, sb});
    });
    const m3::Checkpoint ck = m3::load_checkpoint(d.str());
    ASSERT_EQ(ck.fp8_tensors, std::vector<std::string>{name});
    EXPECT_TRUE(ck.unknown_tensors.empty());  // the scale is used, not unknown
    const std::int64_t R = shape[shape.size() - 2], C = shape.back();
    auto want = [&](std::int64_t flat) {
      const std::int64_t lead = flat / (R * C), r = (flat / C) % R;
      const float s = layout == Layout::OFFICIAL ? scales[static_cast<std::size_t>(r / 128)]
                                                 : scales[static_cast<std::size_t>(lead)];
      return m3::f8_e4m3_to_float(codes[static_cast<std::size_t>(flat)]) * s;
    };
    if (layout == Layout::OFFICIAL) {
      for (std::int64_t i = 0; i < ck.weights.embed_tokens.size(); ++i)
        ASSERT_EQ(ck.weights.embed_tokens.data()[i], want(i)) << i;
    } else {
      const std::int64_t I = tiny().intermediate_size;
      for (std::int64_t e = 0; e < 8; ++e)
        for (std::int64_t i = 0; i < I * C; ++i) {
          ASSERT_EQ(ck.weights.layers[1].experts[e].gate.data()[i], want(e * R * C + i));
          ASSERT_EQ(ck.weights.layers[1].experts[e].up.data()[i], want(e * R * C + I * C + i));
        }
    }
  }
}

TEST(Checkpoint, OtherPrefixesAreDetected) {
  for (auto [layout, prefix, lm] : {std::tuple{Layout::OFFICIAL, "language_model.model.", "language_model.lm_head.weight"},
                                    std::tuple{Layout::HF, "model.language_model.", "lm_head.weight"}}) {
    TempDir d;
    save_tiny(d, layout);
    edit_tensors(d, [&](std::vector<RawTensor>& ts) {
      for (auto& t : ts)
        t.name = t.name == "lm_head.weight" ? std::string(lm) : std::string(prefix) + t.name.substr(6);  // drop "model."
    });
    const auto ck = m3::load_checkpoint(d.str());
    EXPECT_EQ(ck.names.layout, layout);
    EXPECT_EQ(ck.names.prefix, prefix);
    EXPECT_EQ(ck.names.lm_head, lm);
    EXPECT_TRUE(same_bits(flatten(ck.weights).at("lm_head.weight"), flatten(tiny_weights()).at("lm_head.weight")));
  }
}

TEST(Checkpoint, UnknownAndIgnoredTensorsAreListed) {
  TempDir d;
  save_tiny(d);
  edit_tensors(d, [](std::vector<RawTensor>& ts) {
    ts.push_back({"mtp.layers.1.eh_proj.weight", Dtype::F32, {2}, Bytes(8)});  // past tiny's one module
    ts.push_back({"vision_tower.blocks.0.attn.qkv.weight", Dtype::BF16, {2}, Bytes(4)});
    ts.push_back({"model.layers.0.self_attn.rotary.inv_freq", Dtype::F32, {1}, Bytes(4)});
    ts.push_back({"model.layers.0.mlp.gate_proj.weight_scale_inv", Dtype::F32, {1}, Bytes(4)});  // weight is F32
  });
  const auto ck = m3::load_checkpoint(d.str());
  EXPECT_EQ(ck.ignored_tensors,
            (std::vector<std::string>{"mtp.layers.1.eh_proj.weight", "vision_tower.blocks.0.attn.qkv.weight"}));
  EXPECT_EQ(ck.unknown_tensors, (std::vector<std::string>{"model.layers.0.mlp.gate_proj.weight_scale_inv",
                                                          "model.layers.0.self_attn.rotary.inv_freq"}));
  const std::string s = m3::describe_checkpoint(d.str());
  EXPECT_HAS(s, "unknown       2");
  EXPECT_HAS(s, "ignored       2");
  EXPECT_HAS(s, "loadable");
}

TEST(Checkpoint, RoutingBiasOptionalWithoutRoutingBias) {
  TempDir d;
  m3::ModelConfig cfg = tiny();
  cfg.use_routing_bias = false;
  auto w = m3::generate_weights(cfg, 3);
  m3::save_checkpoint(d.str(), cfg, w, Layout::OFFICIAL, Dtype::F32);
  edit_tensors(d, [](std::vector<RawTensor>& ts) {
    std::erase_if(ts, [](const RawTensor& t) { return t.name.find("e_score_correction_bias") != std::string::npos; });
  });
  const auto ck = m3::load_checkpoint(d.str());
  EXPECT_TRUE((ck.weights.layers[1].router_bias.array() == 0.0f).all());
}

TEST(Checkpoint, ResaveSwitchesEntryFile) {
  TempDir d;
  save_tiny(d, Layout::OFFICIAL, Dtype::F32, 3);
  save_tiny(d, Layout::HF, Dtype::F32, 1);  // removes the index: the directory stays unambiguous
  EXPECT_EQ(m3::load_checkpoint(d.str()).names.layout, Layout::HF);
  save_tiny(d, Layout::OFFICIAL, Dtype::F32, 2);
  EXPECT_FALSE(fs::exists(d.file(m3::kSingleFileName)));
  EXPECT_EQ(m3::load_checkpoint(d.str()).names.layout, Layout::OFFICIAL);
}

TEST(Checkpoint, SaveRejectsBadArguments) {
  TempDir d;
  EXPECT_THROW(m3::save_checkpoint(d.str(), tiny(), tiny_weights(), Layout::HF, Dtype::F8_E4M3), std::invalid_argument);
  EXPECT_THROW(m3::save_checkpoint(d.str(), tiny(), tiny_weights(), Layout::HF, Dtype::F32, 0), std::invalid_argument);
  EXPECT_THROW(m3::save_checkpoint(d.str(), tiny(), tiny_weights(), Layout::HF, Dtype::F32, 100000),
               std::invalid_argument);
  auto w = tiny_weights();
  w.layers[2].attn.k_proj.resize(3, 3);
  try {
    m3::save_checkpoint(d.str(), tiny(), w, Layout::OFFICIAL, Dtype::F32);
    ADD_FAILURE() << "saved weights of the wrong shape";
  } catch (const std::invalid_argument& e) {
    EXPECT_HAS(std::string(e.what()), "model.layers.2.self_attn.k_proj.weight");
  }
}

// ---------------------------------------------------------------------------------------------
// Content errors: each message names the culprit.

TEST(CheckpointBad, MissingTensor) {
  TempDir d;
  save_tiny(d);
  edit_tensors(d, [](auto& ts) { std::erase_if(ts, [](auto& t) { return t.name == "model.layers.2.self_attn.q_proj.weight"; }); });
  const auto m = load_error<m3::CheckpointError>(d.str());
  EXPECT_HAS(m, "1 required tensor is missing, first 'model.layers.2.self_attn.q_proj.weight'");
  EXPECT_HAS(m, "official layout");
  EXPECT_HAS(m3::describe_checkpoint(d.str()), "MISSING       1");
}

TEST(CheckpointBad, MissingSeveralTensorsCounted) {
  TempDir d;
  save_tiny(d, Layout::HF);
  edit_tensors(d, [](auto& ts) { std::erase_if(ts, [](auto& t) { return t.name.find("layers.3.") != std::string::npos; }); });
  const auto m = load_error<m3::CheckpointError>(d.str());
  EXPECT_HAS(m, "required tensors are missing, first 'model.layers.3.input_layernorm.weight'");
  EXPECT_HAS(m, "hf layout");
}

TEST(CheckpointBad, WrongShapeVsConfig) {
  TempDir d;
  save_tiny(d);
  edit_tensors(d, [](auto& ts) { find(ts, "model.layers.1.self_attn.q_norm.weight").shape = {2, 8}; });
  const auto m = load_error<m3::CheckpointError>(d.str());
  EXPECT_HAS(m, "tensor 'model.layers.1.self_attn.q_norm.weight'");
  EXPECT_HAS(m, "has shape [2, 8], expected [16]");
}

TEST(CheckpointBad, NanInWeightNamesTensorAndIndex) {
  TempDir d;
  save_tiny(d);
  const std::string n = "model.layers.1.block_sparse_moe.experts.3.w2.weight";  // [H 64, I 32]
  edit_tensors(d, [&](auto& ts) { set_f32(find(ts, n), 5 * 32 + 7, std::numeric_limits<float>::quiet_NaN()); });
  const auto m = load_error<m3::CheckpointError>(d.str());
  EXPECT_HAS(m, "tensor '" + n + "'");
  EXPECT_HAS(m, "nan at index [5, 7]");
}

TEST(CheckpointBad, InfInFusedHfExpertNamesIndex) {
  TempDir d;
  save_tiny(d, Layout::HF, Dtype::BF16);
  const std::string n = "model.layers.2.mlp.experts.down_proj";  // [E 8, H 64, I 32] bf16
  edit_tensors(d, [&](auto& ts) {
    const std::uint16_t inf = 0x7F80;
    std::memcpy(find(ts, n).bytes.data() + 2 * (6 * 64 * 32 + 9 * 32 + 4), &inf, 2);
  });
  const auto m = load_error<m3::CheckpointError>(d.str());
  EXPECT_HAS(m, "tensor '" + n + "'");
  EXPECT_HAS(m, "inf at index [6, 9, 4]");
}

TEST(CheckpointBad, DtypeNotAccepted) {
  TempDir d;
  save_tiny(d);
  edit_tensors(d, [](auto& ts) { find(ts, "model.norm.weight").dtype = Dtype::I32; });
  const auto m = load_error<m3::CheckpointError>(d.str());
  EXPECT_HAS(m, "tensor 'model.norm.weight'");
  EXPECT_HAS(m, "dtype I32, expected F32, BF16, F16");
}

TEST(CheckpointBad, Fp8WithoutOrWithWrongScale) {
  TempDir d;
  save_tiny(d);
  const std::string n = "model.layers.0.mlp.down_proj.weight";  // [64, 128]: 1 x 1 blocks
  edit_tensors(d, [&](auto& ts) {
    auto& t = find(ts, n);
    t = {n, Dtype::F8_E4M3, t.shape, Bytes(t.bytes.size() / 4, 0x38)};
  });
  auto m = load_error<m3::CheckpointError>(d.str());
  EXPECT_HAS(m, "tensor '" + n + "'");
  EXPECT_HAS(m, "no block-scale tensor '" + n + "_scale_inv'");
  edit_tensors(d, [&](auto& ts) { ts.push_back({n + "_scale_inv", Dtype::F32, {2, 1}, Bytes(8)}); });
  m = load_error<m3::CheckpointError>(d.str());
  EXPECT_HAS(m, "scale tensor '" + n + "_scale_inv' is F32 [2, 1], expected F32, BF16 or F16 of shape [1, 1]");
}

TEST(CheckpointBad, MissingShardFile) {
  TempDir d;
  save_tiny(d, Layout::OFFICIAL, Dtype::F32, 3);
  fs::remove(d.file("model-00002-of-00003.safetensors"));
  const auto m = load_error<m3::CheckpointError>(d.str());
  EXPECT_HAS(m, "shard 'model-00002-of-00003.safetensors', which does not exist");
}

TEST(CheckpointBad, IndexNamesTensorAbsentFromItsShard) {
  TempDir d;
  save_tiny(d, Layout::HF, Dtype::F32, 3);
  nlohmann::json j = nlohmann::json::parse(std::ifstream(d.file(m3::kIndexFileName)));
  j["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors";  // it lives in shard 3
  std::ofstream(d.file(m3::kIndexFileName)) << j.dump();
  const auto m = load_error<m3::CheckpointError>(d.str());
  EXPECT_HAS(m, "maps tensor 'lm_head.weight' to shard 'model-00001-of-00003.safetensors', but that shard has no such");
}

TEST(CheckpointBad, IndexInvalid) {
  TempDir d;
  save_tiny(d, Layout::HF, Dtype::F32, 2);
  std::ofstream(d.file(m3::kIndexFileName)) << "{\"weight_map\": [";
  EXPECT_HAS(load_error<m3::CheckpointError>(d.str()), "model.safetensors.index.json' is not valid JSON");
  std::ofstream(d.file(m3::kIndexFileName)) << R"({"weight_map": {"lm_head.weight": "../../etc/passwd"}})";
  EXPECT_HAS(load_error<m3::CheckpointError>(d.str()), "expected a plain file name");
  std::ofstream(d.file(m3::kIndexFileName)) << R"({"metadata": {}})";
  EXPECT_HAS(load_error<m3::CheckpointError>(d.str()), "'weight_map' object");
}

TEST(CheckpointBad, MalformedShardNamesTheFile) {
  TempDir d;
  save_tiny(d, Layout::OFFICIAL, Dtype::F32, 3);
  fs::resize_file(d.file("model-00003-of-00003.safetensors"), 100);  // cut inside the header
  const auto m = load_error<m3::SafetensorsError>(d.str());
  EXPECT_HAS(m, "model-00003-of-00003.safetensors");
  EXPECT_HAS(m, "runs past the end of the file");
}

TEST(CheckpointBad, ConfigInvalidOrMissing) {
  TempDir d;
  save_tiny(d);
  std::ofstream(d.file("config.json")) << "{\"hidden_size\": 64,";
  auto m = load_error<m3::ConfigError>(d.str());
  EXPECT_HAS(m, "config.json");
  EXPECT_HAS(m, "not valid JSON");
  fs::remove(d.file("config.json"));
  m = load_error<m3::ConfigError>(d.str());
  EXPECT_HAS(m, "cannot open config file");
}

TEST(CheckpointBad, ConfigDisagreesWithTensors) {
  TempDir d;
  save_tiny(d);
  m3::ModelConfig other = tiny();
  other.hidden_size = 96;  // every H-sized tensor now has the wrong shape
  std::ofstream(d.file("config.json")) << m3::checkpoint_config_json(other, Layout::OFFICIAL);
  const auto m = load_error<m3::CheckpointError>(d.str());
  EXPECT_HAS(m, "tensor 'model.embed_tokens.weight'");
  EXPECT_HAS(m, "has shape [512, 64], expected [512, 96]");
}

TEST(CheckpointBad, DirectoryProblems) {
  TempDir d;
  EXPECT_HAS(load_error<m3::CheckpointError>(d.file("nope")), "is not a directory");
  std::ofstream(d.file("config.json")) << m3::checkpoint_config_json(tiny(), Layout::HF);
  EXPECT_HAS(load_error<m3::CheckpointError>(d.str()), "holds neither model.safetensors nor");
  save_tiny(d, Layout::HF, Dtype::F32, 2);
  fs::copy_file(d.file("model-00001-of-00002.safetensors"), d.file(m3::kSingleFileName));
  EXPECT_HAS(load_error<m3::CheckpointError>(d.str()), "ambiguous");
}

TEST(Checkpoint, DescribeSummarizes) {
  TempDir d;
  save_tiny(d, Layout::HF, Dtype::BF16, 2);
  const std::string s = m3::describe_checkpoint(d.str());
  EXPECT_HAS(s, "layout        hf (prefix 'model.'");
  EXPECT_HAS(s, "files         2:");
  EXPECT_HAS(s, "dtype BF16");
  EXPECT_HAS(s, "dtype F32");  // the router
  EXPECT_HAS(s, "'tiny': H 64, 4 layers (3 MSA, 3 MoE)");
  EXPECT_HAS(s, std::to_string(m3::weights_param_count(tiny())) + " in the files, " +
                    std::to_string(m3::weights_param_count(tiny())) + " implied by the config");
  const std::string f = m3::describe_safetensors(d.file("model-00001-of-00002.safetensors"));
  EXPECT_HAS(f, "metadata      format = pt");
}

// MTP modules (spec §7) travel with the checkpoint: module 0 written under mtp.layers.0.* in both
// layouts comes back bit for bit, with the main model's embedding and LM head; a module with one
// tensor missing is refused naming it.
TEST(Checkpoint, MtpModulesRoundTrip) {
  const m3::ModelConfig cfg = tiny();
  ASSERT_GE(cfg.num_mtp_modules, 1);
  const auto w = tiny_weights();
  const std::vector<m3::ModelWeights<float>> mods{m3::generate_mtp_module(cfg, 0, 11, w)};
  for (Layout layout : {Layout::OFFICIAL, Layout::HF}) {
    TempDir d;
    m3::save_checkpoint(d.str(), cfg, w, layout, Dtype::F32, 2, mods);
    const auto ck = m3::load_checkpoint(d.str());
    ASSERT_EQ(ck.mtp.size(), 1u);
    const auto& m = ck.mtp[0];
    EXPECT_TRUE(m.mtp_in->eh_proj == mods[0].mtp_in->eh_proj);
    EXPECT_TRUE(m.mtp_in->enorm == mods[0].mtp_in->enorm);
    EXPECT_TRUE(m.norm == mods[0].norm);
    EXPECT_TRUE(m.layers[0].attn.index_q_proj == mods[0].layers[0].attn.index_q_proj);
    EXPECT_TRUE(m.layers[0].experts[3].down == mods[0].layers[0].experts[3].down);
    EXPECT_TRUE(m.layers[0].shared.up == mods[0].layers[0].shared.up);
    EXPECT_TRUE(m.embed_tokens == w.embed_tokens);
    EXPECT_TRUE(ck.ignored_tensors.empty()) << ck.ignored_tensors[0];
    EXPECT_HAS(m3::describe_checkpoint(d.str()), "mtp modules   1 of num_mtp_modules = 1");
    m3::Model run(m3::mtp_module_config(cfg), m, m3::Precision::FP32);  // a usable module
    EXPECT_TRUE(run.takes_hidden_states());
  }
  TempDir d;
  m3::save_checkpoint(d.str(), cfg, w, Layout::OFFICIAL, Dtype::F32, 1, mods);
  edit_tensors(d, [](std::vector<RawTensor>& ts) {
    ts.erase(std::remove_if(ts.begin(), ts.end(), [](const RawTensor& t) { return t.name == "mtp.layers.0.hnorm.weight"; }),
             ts.end());
  });
  try {
    m3::load_checkpoint(d.str());
    ADD_FAILURE() << "a half MTP module was accepted";
  } catch (const m3::CheckpointError& e) {
    EXPECT_HAS(std::string(e.what()), "mtp.layers.0.hnorm.weight");
  }
  EXPECT_THROW(m3::save_checkpoint(d.str(), cfg, w, Layout::OFFICIAL, Dtype::F32, 1,
                                   std::vector<m3::ModelWeights<float>>{mods[0], mods[0]}),
               std::invalid_argument);  // more modules than num_mtp_modules
}
