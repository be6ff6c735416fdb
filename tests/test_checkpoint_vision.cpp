// Checkpoints with the vision tower and projector (issue 7, spec §8): save + load round trips of the
// tiny and small towers (bit-identical weights and config, both layouts, single file and shards),
// the names being generate_vision_weights' own, the Conv3d weight as 5-D or flattened, BF16; a
// partial tower, a wrong shape, a wrong vision_config field, a block past the config each refused
// naming the culprit; fields the file does not give taken from vision_preset("m3") with a warning;
// a checkpoint without vision tensors loading as before.
#include "datasets/checkpoint.h"

#include "reference/rng.h"
#include "tests/test_checkpoint_util.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <tuple>

namespace {

namespace fs = std::filesystem;
using m3::Dtype;
using m3::Layout;
using namespace m3::test;  // TempDir, edit_tensors, same_bits, load_error, ... (test_checkpoint_util.h)
using nlohmann::json;

struct Model {
  m3::ModelConfig cfg;
  m3::ModelWeights<float> w;
  m3::CheckpointVision vision;
};
// A preset's text model and its seeded tower (as `m3h export --vision` writes them).
const Model& model(const std::string& preset) {
  static std::map<std::string, Model> cache;
  auto it = cache.find(preset);
  if (it == cache.end()) {
    Model m;
    m.cfg = m3::preset(preset);
    m.w = m3::generate_weights(m.cfg, 5);
    const m3::VisionConfig vc = m3::vision_preset(preset);
    m.vision = {vc, m3::vision_weights_cast<float>(m3::generate_vision_weights(vc, 5))};
    it = cache.emplace(preset, std::move(m)).first;
  }
  return it->second;
}

void save(const TempDir& d, const std::string& preset, Layout layout = Layout::OFFICIAL, Dtype dtype = Dtype::F32,
          int shards = 1) {
  const Model& m = model(preset);
  m3::save_checkpoint(d.str(), m.cfg, m.w, layout, dtype, shards, {}, &m.vision);
}

// Every vision tensor by checkpoint name, as flat copies.
FlatTensors flatten(const m3::CheckpointVision& v) {
  auto w = v.weights;
  FlatTensors out;
  for (const auto& s : m3::vision_slots(v.config, &w))
    for (const auto& p : s.pieces) out[s.name].insert(out[s.name].end(), p.dst, p.dst + p.count);
  return out;
}
// Every field of a vision config, so that equality means the whole config.
std::string fields(const m3::VisionConfig& v) {
  return m3::vision_config_json(v) + " name=" + v.name + " image_token_id=" + std::to_string(v.image_token_id);
}

// config.json edited in place.
void edit_config(const TempDir& d, const std::function<void(json&)>& fn) {
  json j = json::parse(std::ifstream(d.file("config.json")));
  fn(j);
  std::ofstream(d.file("config.json"), std::ios::trunc) << j.dump(2);
}
void drop_tensors(std::vector<RawTensor>& ts, const std::function<bool(const std::string&)>& drop) {
  ts.erase(std::remove_if(ts.begin(), ts.end(), [&](const RawTensor& t) { return drop(t.name); }), ts.end());
}

void round_trip(const std::string& preset, Layout layout, int shards) {
  TempDir d;
  save(d, preset, layout, Dtype::F32, shards);
  const m3::Checkpoint ck = m3::load_checkpoint(d.str());
  const Model& m = model(preset);
  ASSERT_TRUE(ck.vision.has_value());
  EXPECT_EQ(fields(ck.vision->config), fields(m.vision.config));
  EXPECT_TRUE(ck.warnings.empty()) << ck.warnings[0];
  EXPECT_TRUE(ck.ignored_tensors.empty()) << ck.ignored_tensors[0];
  EXPECT_TRUE(ck.unknown_tensors.empty()) << ck.unknown_tensors[0];
  const auto a = flatten(m.vision), b = flatten(*ck.vision);
  // patch embed + pre-LN (3), projector and merger (4 + 4), 12 a block
  ASSERT_EQ(a.size(), static_cast<std::size_t>(11 + 12 * m.vision.config.layers));
  ASSERT_EQ(b.size(), a.size());
  for (const auto& [name, v] : a) EXPECT_TRUE(same_bits(v, b.at(name))) << name;
  EXPECT_TRUE(ck.weights.lm_head == m.w.lm_head);  // the text model beside it is untouched
  // The features the loaded tower gives are the saved tower's, and not all zero.
  const m3::VisionConfig& vc = m.vision.config;
  const int px = vc.patch * vc.merge * 2;
  const m3::MatD img = m3::synthetic_image(vc, px, px, 1);
  const m3::MatD fa = m3::vision_forward(vc, m3::vision_weights_cast<double>(m.vision.weights), img, px, px);
  const m3::MatD fb = m3::vision_forward(ck.vision->config, m3::vision_weights_cast<double>(ck.vision->weights), img, px, px);
  ASSERT_GT(fa.norm(), 0.0);
  EXPECT_TRUE((fa.array() == fb.array()).all());
}

}  // namespace

TEST(CheckpointVision_f32, RoundTrip_Tiny_Official_Single) { round_trip("tiny", Layout::OFFICIAL, 1); }
TEST(CheckpointVision_f32, RoundTrip_Tiny_Hf_Shards3) { round_trip("tiny", Layout::HF, 3); }
TEST(CheckpointVision_f32, RoundTrip_Small_Hf_Single) { round_trip("small", Layout::HF, 1); }
TEST(CheckpointVision_f32, RoundTrip_Small_Official_Shards2) { round_trip("small", Layout::OFFICIAL, 2); }

// The table's names are the generator's: every tensor saved under name n is the CounterRng stream
// of n (up to the generator's scale and the LayerNorm weights' shift of 1), so a name swapped in
// vision_slots (ln1 for ln2, fc1 for fc2) fails here although the round trip would still pass.
TEST(CheckpointVision, SlotNamesAreTheGeneratorStreams) {
  const Model& m = model("tiny");
  const auto t = flatten(m.vision);
  for (const auto& [name, v] : t) {
    const bool ln_weight = name.find("layer_norm") != std::string::npos || name.find("layrnorm") != std::string::npos;
    const double shift = ln_weight && name.ends_with(".weight") ? 1.0 : 0.0;
    const m3::CounterRng rng(5, name);
    double dot = 0, nv = 0, nr = 0;
    for (std::size_t i = 0; i < v.size(); ++i) {
      const double x = v[i] - shift, r = rng.normal(i);
      dot += x * r, nv += x * x, nr += r * r;
    }
    ASSERT_GT(nv, 0.0) << name;
    // fp32 rounding of values O(0.1..1) leaves the cosine at 1 - O(1e-13); an unrelated stream of
    // >= 32 elements would give |cos| ~ 0.2.
    EXPECT_GT(dot / std::sqrt(nv * nr), 1 - 1e-9) << name;
  }
}

TEST(CheckpointVision, ConfigJsonHoldsTheBlock) {
  TempDir d;
  save(d, "tiny", Layout::HF);
  const json j = json::parse(std::ifstream(d.file("config.json")));
  EXPECT_EQ(j["vision_config"]["hidden_size"], 32);
  EXPECT_EQ(j["vision_config"]["temporal_patch_size"], 2);
  EXPECT_EQ(j["vision_config"]["out_hidden_size"], 64);
  EXPECT_EQ(j["image_token_id"], 500);
  EXPECT_EQ(m3::load_config_file(d.file("config.json")).to_json(), model("tiny").cfg.to_json());
  const std::string s = m3::describe_checkpoint(d.str());
  EXPECT_HAS(s, "vision        'tiny-vision': Hv 32, 2 blocks");
  EXPECT_HAS(s, "loadable");
}

// Saved as torch's Conv3d weight [Hv, C, tp, p, p]; the flattened [Hv, C*tp*p*p] loads the same.
TEST(CheckpointVision, Conv3dWeight5dAndFlattened) {
  TempDir d;
  save(d, "tiny");
  {
    m3::SafetensorsReader r(d.file(m3::kSingleFileName));
    EXPECT_EQ(r.header().find("visual.patch_embed.proj.weight")->shape, (std::vector<std::int64_t>{32, 3, 2, 4, 4}));
  }
  const auto five = flatten(*m3::load_checkpoint(d.str()).vision);
  edit_tensors(d, [](std::vector<RawTensor>& ts) {
    for (auto& t : ts)
      if (t.name == "visual.patch_embed.proj.weight") t.shape = {32, 96};
  });
  const auto two = flatten(*m3::load_checkpoint(d.str()).vision);
  EXPECT_TRUE(same_bits(five.at("visual.patch_embed.proj.weight"), two.at("visual.patch_embed.proj.weight")));
  EXPECT_TRUE(same_bits(two.at("visual.patch_embed.proj.weight"),
                        flatten(model("tiny").vision).at("visual.patch_embed.proj.weight")));
}

TEST(CheckpointVision_bf16, ReloadEqualsRoundBf16) {
  TempDir d;
  save(d, "tiny", Layout::HF, Dtype::BF16, 2);
  const auto a = flatten(model("tiny").vision), b = flatten(*m3::load_checkpoint(d.str()).vision);
  const int rounded = expect_reloaded_rounded(a, b, [](float x) { return m3::round_bf16(x); });
  EXPECT_GT(rounded, 20);  // not vacuous: rounding changed nearly every tensor
}

// ---------------------------------------------------------------------------------------------
// Refusals, each naming the culprit

TEST(CheckpointVisionBad, PartialTowerNamesFirstMissing) {
  TempDir d;
  save(d, "tiny");
  edit_tensors(d, [](std::vector<RawTensor>& ts) {
    drop_tensors(ts, [](const std::string& n) { return n == "visual.blocks.1.mlp.fc2.bias"; });
  });
  const std::string e = load_error<m3::CheckpointError>(d.str());
  EXPECT_HAS(e, "vision tower is partial: 1 of its 35 tensors missing, first 'visual.blocks.1.mlp.fc2.bias'");
  EXPECT_HAS(m3::describe_checkpoint(d.str()), "NOT loadable");
  // Only a projector left: the tower's first tensor is named.
  edit_tensors(d, [](std::vector<RawTensor>& ts) {
    drop_tensors(ts, [](const std::string& n) { return n.rfind("visual.", 0) == 0 || n.rfind("patch_merge_mlp.", 0) == 0; });
  });
  EXPECT_HAS(load_error<m3::CheckpointError>(d.str()), "first 'visual.patch_embed.proj.weight'");
}

TEST(CheckpointVisionBad, WrongShapeNamesTensorAndBothShapes) {
  TempDir d;
  save(d, "tiny");
  edit_tensors(d, [](std::vector<RawTensor>& ts) {
    for (auto& t : ts)
      if (t.name == "visual.patch_embed.proj.weight") t.shape = {32, 2, 3, 4, 4};  // tp and C swapped
  });
  const std::string e = load_error<m3::CheckpointError>(d.str());
  EXPECT_HAS(e, "tensor 'visual.patch_embed.proj.weight' in 'model.safetensors' has shape [32, 2, 3, 4, 4], expected "
                "[32, 3, 2, 4, 4] or [32, 96] from the vision config 'tiny-vision'");
  TempDir d2;
  save(d2, "tiny");
  edit_config(d2, [](json& j) { j["vision_config"]["intermediate_size"] = 48; });
  EXPECT_HAS(load_error<m3::CheckpointError>(d2.str()),
             "tensor 'visual.blocks.0.mlp.fc1.weight' in 'model.safetensors' has shape [64, 32], expected [48, 32]");
}

TEST(CheckpointVisionBad, WrongConfigFieldNamed) {
  const std::vector<std::tuple<std::string, json, std::string>> cases{
      {"num_attention_heads", 4, "field 'hidden_size' = 32, expected num_attention_heads * head_dim = 4 * 16"},
      {"patch_size", "4", "field 'patch_size' must be an integer, found \"4\""},
      {"num_channels", 0, "field 'num_channels' = 0, expected an integer >= 1"},
      {"hidden_act", "quick_gelu", "field 'hidden_act' = \"quick_gelu\", expected \"gelu\""},
      {"out_hidden_size", 63, "field 'out_hidden_size' = 63, expected the text model's hidden_size = 64"},
      {"rope_dims_per_axis", 6, "field 'rope_dims_per_axis' = 6, expected even and 3 * rope_dims_per_axis <= head_dim"},
      {"layer_norm_eps", -1, "field 'layer_norm_eps' = -1, expected > 0"},
  };
  for (const auto& [field, value, want] : cases) {
    TempDir d;
    save(d, "tiny");
    edit_config(d, [&](json& j) { j["vision_config"][field] = value; });
    const std::string e = load_error<m3::ConfigError>(d.str());
    EXPECT_HAS(e, "config.json: vision_config: " + want);
    EXPECT_HAS(m3::describe_checkpoint(d.str()), "VISION CONFIG");
  }
  TempDir d;
  save(d, "tiny");
  edit_config(d, [](json& j) { j["image_token_id"] = 512; });
  EXPECT_HAS(load_error<m3::ConfigError>(d.str()), "field 'image_token_id' = 512, expected < vocab_size = 512");
  edit_config(d, [](json& j) { j["vision_config"] = 3; });
  EXPECT_HAS(load_error<m3::ConfigError>(d.str()), "field 'vision_config' must be an object");
}

TEST(CheckpointVisionBad, BlockPastTheConfig) {
  TempDir d;
  save(d, "tiny");
  edit_config(d, [](json& j) { j["vision_config"]["num_hidden_layers"] = 1; });
  EXPECT_HAS(load_error<m3::CheckpointError>(d.str()),
             "is a vision block past vision_config.num_hidden_layers = 1 (12 such tensors)");
}

// What the file does not say is spec §8's (vision_preset("m3")), and the loader says so.
TEST(CheckpointVision, MissingFieldsTakeTheM3PresetWithWarning) {
  TempDir d;
  save(d, "tiny");
  edit_config(d, [](json& j) {
    j["vision_config"].erase("rope_theta");
    j["vision_config"].erase("layer_norm_eps");
    j["vision_config"].erase("head_dim");  // derived: hidden_size / num_attention_heads, no warning
    j["vision_config"]["spatial_merge_size_v2"] = 2;
  });
  const m3::Checkpoint ck = m3::load_checkpoint(d.str());
  ASSERT_TRUE(ck.vision.has_value());
  EXPECT_EQ(fields(ck.vision->config), fields(model("tiny").vision.config));  // tiny's values are m3's there
  ASSERT_EQ(ck.warnings.size(), 2u);
  EXPECT_HAS(ck.warnings[0], "vision_config gives no rope_theta, layer_norm_eps: taken from vision_preset(\"m3\")");
  EXPECT_HAS(ck.warnings[1], "vision_config field 'spatial_merge_size_v2' is not read");
  EXPECT_HAS(m3::describe_checkpoint(d.str()), "warning       ");
  // The m3 placeholder id is outside tiny's vocabulary: refused, not wrapped around.
  edit_config(d, [](json& j) { j.erase("image_token_id"); });
  EXPECT_HAS(load_error<m3::ConfigError>(d.str()), "field 'image_token_id' is missing and the default 200025");
  // No block at all: every field m3's, so tiny's tensors do not fit, named by the first of them.
  edit_config(d, [](json& j) {
    j.erase("vision_config");
    j["image_token_id"] = 500;
  });
  EXPECT_HAS(load_error<m3::CheckpointError>(d.str()),
             "'visual.patch_embed.proj.weight' in 'model.safetensors' has shape [32, 3, 2, 4, 4], expected "
             "[1280, 3, 2, 14, 14]");
}

// No vision tensors: nothing changes. A vision_config block alone (a config shared with a
// vision checkpoint) is not read, and names outside our table stay ignored.
TEST(CheckpointVision, NoVisionTensorsLoadsAsBefore) {
  const Model& m = model("tiny");
  for (Layout layout : {Layout::OFFICIAL, Layout::HF}) {
    TempDir d;
    m3::save_checkpoint(d.str(), m.cfg, m.w, layout, Dtype::F32);
    std::stringstream text;
    text << std::ifstream(d.file("config.json")).rdbuf();
    EXPECT_EQ(text.str(), m3::checkpoint_config_json(m.cfg, layout) + "\n");
    EXPECT_EQ(text.str().find("vision"), std::string::npos);
    const m3::Checkpoint ck = m3::load_checkpoint(d.str());
    EXPECT_FALSE(ck.vision.has_value());
    EXPECT_TRUE(ck.warnings.empty());
    EXPECT_TRUE(ck.ignored_tensors.empty());
    EXPECT_EQ(m3::describe_checkpoint(d.str()).find("\nvision "), std::string::npos);
  }
  TempDir d;
  m3::save_checkpoint(d.str(), m.cfg, m.w, Layout::OFFICIAL, Dtype::F32);
  std::ofstream(d.file("config.json"), std::ios::trunc) << m3::checkpoint_config_json(m.cfg, Layout::OFFICIAL, &m.vision.config);
  edit_tensors(d, [](std::vector<RawTensor>& ts) {
    ts.push_back({"vision_tower.blocks.0.attn.qkv.weight", Dtype::F32, {1}, std::vector<std::uint8_t>(4)});
  });
  const m3::Checkpoint ck = m3::load_checkpoint(d.str());
  EXPECT_FALSE(ck.vision.has_value());
  EXPECT_TRUE(ck.warnings.empty());
  EXPECT_EQ(ck.ignored_tensors, std::vector<std::string>{"vision_tower.blocks.0.attn.qkv.weight"});
}

TEST(CheckpointVision, SaveRejectsATowerOfAnotherModel) {
  TempDir d;
  const Model& tiny = model("tiny");
  m3::CheckpointVision other{m3::vision_preset("small"), {}};
  other.weights = m3::allocate_vision_weights(other.config);
  EXPECT_THROW(m3::save_checkpoint(d.str(), tiny.cfg, tiny.w, Layout::OFFICIAL, Dtype::F32, 1, {}, &other),
               std::invalid_argument);  // text_hidden 512 for a model of hidden_size 64
  m3::CheckpointVision bad = tiny.vision;
  bad.weights.layers.pop_back();
  EXPECT_THROW(m3::save_checkpoint(d.str(), tiny.cfg, tiny.w, Layout::OFFICIAL, Dtype::F32, 1, {}, &bad),
               std::invalid_argument);  // a block short of its config
}
