// config.json's vision_config block <-> VisionConfig (checkpoint_vision.h: the field names and
// where each comes from).
#include "datasets/checkpoint_vision.h"

#include "reference/config_json.h"  // ConfigFieldsOrPreset: the field readers of config.json

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <set>

namespace m3 {

using nlohmann::json;

namespace {

// The fields parse_vision_config reads inside vision_config; any other key is reported, not used.
const std::set<std::string>& known_fields() {
  static const std::set<std::string> k{"hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                                       "intermediate_size", "num_channels", "patch_size", "temporal_patch_size",
                                       "spatial_merge_size", "rope_theta", "rope_dims_per_axis", "layer_norm_eps",
                                       "max_image_size", "hidden_act", "out_hidden_size", "model_type"};
  return k;
}

}  // namespace

VisionConfigRead parse_vision_config(std::string_view text_json, const ModelConfig& text, std::string_view origin) {
  json root;
  try {
    root = json::parse(text_json.begin(), text_json.end());
  } catch (const json::parse_error& e) {
    throw ConfigError(fmt::format("{}: not valid JSON: {}", origin, e.what()));
  }
  const json* block = nullptr;
  if (root.is_object() && root.contains("vision_config") && !root["vision_config"].is_null()) {
    block = &root["vision_config"];
    if (!block->is_object()) throw ConfigError(fmt::format("{}: field 'vision_config' must be an object", origin));
  }
  VisionConfigRead out;
  VisionConfig& v = out.config;
  v = vision_preset("m3");  // spec §8's values for what the file does not say
  v.name = text.name + "-vision";
  v.text_hidden = text.hidden_size;
  detail::ConfigFieldsOrPreset r{{block, fmt::format("{}: vision_config", origin)}, {}};
  r.get_int("hidden_size", v.hidden);
  r.get_int("num_hidden_layers", v.layers, 0);
  const bool has_heads = r.get_int("num_attention_heads", v.heads);
  if (!r.get_int("head_dim", v.head_dim) && block && has_heads) {
    r.absent.pop_back();  // derived, not defaulted
    v.head_dim = v.hidden / v.heads;
  }
  r.get_int("intermediate_size", v.mlp);
  r.get_int("num_channels", v.channels);
  r.get_int("patch_size", v.patch);
  r.get_int("temporal_patch_size", v.temporal_patch);
  r.get_int("spatial_merge_size", v.merge);
  r.get_pos("rope_theta", v.rope_theta);
  r.get_int("rope_dims_per_axis", v.rope_dims, 0);
  r.get_pos("layer_norm_eps", v.ln_eps);
  r.get_int("max_image_size", v.max_image);
  if (const json* act = r.find("hidden_act"); act && (!act->is_string() || act->get<std::string>() != "gelu"))
    r.fail("hidden_act", fmt::format("= {}, expected \"gelu\" (the exact erf GELU of spec §8; a tanh or quick GELU "
                                     "would give other features)", act->dump()));
  int out_hidden = text.hidden_size;
  if (r.get_int("out_hidden_size", out_hidden) && out_hidden != text.hidden_size)
    r.fail("out_hidden_size", fmt::format("= {}, expected the text model's hidden_size = {} (the projector feeds it)",
                                          out_hidden, text.hidden_size));
  r.absent.erase(std::remove(r.absent.begin(), r.absent.end(), "out_hidden_size"), r.absent.end());  // implied

  // The rules of VisionConfig::validate, in the file's field names.
  if (v.hidden != v.heads * v.head_dim)
    r.fail("hidden_size", fmt::format("= {}, expected num_attention_heads * head_dim = {} * {}", v.hidden, v.heads,
                                      v.head_dim));
  if (v.rope_dims % 2 != 0 || 3 * v.rope_dims > v.head_dim)
    r.fail("rope_dims_per_axis", fmt::format("= {}, expected even and 3 * rope_dims_per_axis <= head_dim = {} (3 axes "
                                             "t, h, w)", v.rope_dims, v.head_dim));
  if (v.max_image < v.patch * v.merge)
    r.fail("max_image_size", fmt::format("= {}, expected >= patch_size * spatial_merge_size = {}", v.max_image,
                                         v.patch * v.merge));

  // The placeholder id sits beside vision_config, at the top level (Qwen2-VL's place).
  detail::ConfigFieldsOrPreset top{{root.is_object() ? &root : nullptr, std::string(origin)}, {}};
  if (top.get_int("image_token_id", v.image_token_id, 0) && v.image_token_id >= text.vocab_size)
    top.fail("image_token_id", fmt::format("= {}, expected < vocab_size = {}", v.image_token_id, text.vocab_size));
  if (!top.absent.empty() && v.image_token_id >= text.vocab_size)
    top.fail("image_token_id", fmt::format("is missing and the default {} (spec §8) is outside vocab_size = {}",
                                           v.image_token_id, text.vocab_size));
  v.validate();

  if (!block) {
    out.warnings.push_back(fmt::format("{}: no vision_config block: every vision field is vision_preset(\"m3\")'s "
                                       "(spec §8), the text hidden_size {} excepted", origin, text.hidden_size));
  } else if (!r.absent.empty()) {
    out.warnings.push_back(fmt::format("{}: vision_config gives no {}: taken from vision_preset(\"m3\") (spec §8)",
                                       origin, fmt::join(r.absent, ", ")));
  }
  if (!top.absent.empty())
    out.warnings.push_back(
        fmt::format("{}: no top-level image_token_id: {} (spec §8's placeholder)", origin, v.image_token_id));
  if (block)
    for (const auto& [k, val] : block->items())
      if (!known_fields().count(k)) out.warnings.push_back(fmt::format("{}: vision_config field '{}' is not read", origin, k));
  return out;
}

std::string vision_config_json(const VisionConfig& vc) {
  vc.validate();
  const json j = {
      {"model_type", "minimax_m3_vision"},
      {"hidden_size", vc.hidden},
      {"num_hidden_layers", vc.layers},
      {"num_attention_heads", vc.heads},
      {"head_dim", vc.head_dim},
      {"intermediate_size", vc.mlp},
      {"num_channels", vc.channels},
      {"patch_size", vc.patch},
      {"temporal_patch_size", vc.temporal_patch},
      {"spatial_merge_size", vc.merge},
      {"rope_theta", vc.rope_theta},
      {"rope_dims_per_axis", vc.rope_dims},
      {"layer_norm_eps", vc.ln_eps},
      {"max_image_size", vc.max_image},
      {"hidden_act", "gelu"},
      {"out_hidden_size", vc.text_hidden},
  };
  return j.dump();
}

}  // namespace m3
