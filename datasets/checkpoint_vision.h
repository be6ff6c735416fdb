// The vision part of a checkpoint's config.json (issue 7): the `vision_config` block <-> VisionConfig.
// The tensors' names and shapes are in checkpoint_layout.h (vision_slots); loading and saving in
// checkpoint.h.
//
// Field names. Spec §8 gives the values of M3's tower but spells only one config field
// (temporal_patch_size); the others are ours, taken from the HF configs of the models the tower
// resembles, to confirm against a released M3 config.json:
//   vision_config.hidden_size          Hv             (CLIP)
//   vision_config.num_hidden_layers    layers         (CLIP)
//   vision_config.num_attention_heads  heads          (CLIP)
//   vision_config.head_dim             head_dim       (ours; hidden_size / num_attention_heads if absent)
//   vision_config.intermediate_size    mlp            (CLIP)
//   vision_config.num_channels         channels       (CLIP)
//   vision_config.patch_size           patch          (CLIP)
//   vision_config.temporal_patch_size  temporal_patch (spec §8, Qwen2-VL)
//   vision_config.spatial_merge_size   merge          (Qwen2-VL)
//   vision_config.rope_theta           rope_theta     (ours)
//   vision_config.rope_dims_per_axis   rope_dims      (ours: spec §8's "26 rotary dims per axis")
//   vision_config.layer_norm_eps       ln_eps         (CLIP)
//   vision_config.max_image_size       max_image      (ours: spec §8's "max image size 2016")
//   vision_config.hidden_act           "gelu" only    (CLIP; the exact erf GELU of reference/vision.h)
//   vision_config.out_hidden_size      text_hidden    (Qwen2.5-VL; must equal the text hidden_size)
//   image_token_id (top level)         image_token_id (Qwen2-VL; spec §8's placeholder 200025)
// A field the file does not give takes vision_preset("m3")'s value (spec §8) and the parse says so
// in a warning line; text_hidden is always the text model's hidden_size.
#pragma once

#include "reference/config.h"
#include "reference/vision.h"

#include <string>
#include <string_view>
#include <vector>

namespace m3 {

struct VisionConfigRead {
  VisionConfig config;                // named "<text config name>-vision"
  std::vector<std::string> warnings;  // fields taken from vision_preset("m3"), fields not read
};

// The vision config of config.json (its whole text; `origin` names the file in messages) for the
// text model `text`. Without a vision_config block every field is vision_preset("m3")'s (one
// warning says so). Throws ConfigError naming the file and the field (HF name) with what was
// expected: a wrong type, a value <= 0, hidden_size != num_attention_heads * head_dim, a
// rope_dims_per_axis that does not fit head_dim, out_hidden_size != the text hidden_size, an
// image_token_id outside the vocabulary, a hidden_act other than gelu.
VisionConfigRead parse_vision_config(std::string_view config_json, const ModelConfig& text, std::string_view origin);

// The vision_config block save_checkpoint writes (every field above, as JSON object text); with
// vc.image_token_id written at the top level beside it, parse_vision_config reads vc back whole
// and without a warning.
std::string vision_config_json(const VisionConfig& vc);

}  // namespace m3
