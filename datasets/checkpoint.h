// Whole checkpoints: a directory with config.json and model.safetensors, or shards listed in
// model.safetensors.index.json, in either layout of spec Appendix A (checkpoint_layout.h).
//
//   m3::Checkpoint ck = m3::load_checkpoint("ckpt/");
//   m3::Model model(ck.config, ck.weights, m3::Precision::FP32);
//   m3::save_checkpoint("out/", cfg, weights, m3::Layout::HF, m3::Dtype::BF16, /*shards=*/3);
//
// Loading checks everything before it reads tensor data: each file's header (safetensors.h), the
// index (every shard exists, every mapped tensor is in its shard), every required tensor present,
// shapes against the config, dtypes. Then it reads each tensor once, converts it to float and
// rejects NaN / Inf naming the tensor and the first bad element. MTP modules (spec §7) and the vision
// tower (spec §8, config.json's vision_config: checkpoint_vision.h) come along when the files hold them.
#pragma once

#include "datasets/checkpoint_layout.h"
#include "datasets/checkpoint_vision.h"
#include "datasets/safetensors.h"
#include "reference/config.h"
#include "reference/weights.h"

#include <cstdint>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace m3 {

// Well-formed files whose content does not make the model of the config: a missing tensor, a
// shape against the config, a dtype, a NaN, an index naming a missing shard or tensor, an
// ambiguous directory. Malformed files throw SafetensorsError; a bad config.json ConfigError.
struct CheckpointError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline constexpr const char* kSingleFileName = "model.safetensors";
inline constexpr const char* kIndexFileName = "model.safetensors.index.json";
// FP8 block scales: one scale per 128 x 128 block of the last two dims (the weight_block_size of
// DeepSeek-V3-style fp8 releases, the format M3's fp8 weights are announced in).
inline constexpr std::int64_t kFp8BlockSize = 128;

// The vision tower and projector of a checkpoint (spec §8): its config (config.json's vision_config,
// checkpoint_vision.h) and weights in fp32, as the text weights.
struct CheckpointVision {
  VisionConfig config;
  VisionWeights<float> weights;
};

struct Checkpoint {
  ModelConfig config;
  ModelWeights<float> weights;
  LayoutNames names;                 // layout, body prefix, LM head name found
  std::vector<std::string> files;    // the safetensors files read, in index order
  std::vector<std::string> unknown_tensors;  // not part of the text model: reported, not loaded
  // Known but not used: MTP past num_mtp_modules, vision tensors outside our names (vision_tower.*,
  // a post-norm, ...).
  std::vector<std::string> ignored_tensors;
  // MTP modules 0..k-1 found whole in the files (mtp_slots), as models of mtp_module_config(config)
  // with the main model's embedding and LM head; a module partly present is an error.
  std::vector<ModelWeights<float>> mtp;
  std::vector<std::string> fp8_tensors;      // loaded from F8_E4M3 with a _scale_inv tensor
  // The tower, when the files hold any tensor under visual. / multi_modal_projector. /
  // patch_merge_mlp. (then all of vision_slots' must be there: a partial tower is an error naming the
  // first missing tensor; blocks past the config's num_hidden_layers too).
  std::optional<CheckpointVision> vision;
  // What the loader assumed rather than read (vision_config fields taken from vision_preset("m3"),
  // fields it does not read), one line each; callers print them.
  std::vector<std::string> warnings;
};

// Throws ConfigError (config.json), SafetensorsError (a malformed file) or CheckpointError.
// Refuses configs whose fp32 weights exceed `max_bytes` before allocating (as generate_weights).
Checkpoint load_checkpoint(const std::string& dir, std::uint64_t max_bytes = std::uint64_t{8} << 30);

// Writes dir/config.json (the flat spelling for HF; the official nested sparse_attention_config +
// moe_layer_freq spelling for OFFICIAL) and model.safetensors, or `shards` files
// model-0000i-of-0000n.safetensors plus model.safetensors.index.json. Creates dir; removes the
// other entry file (index or single file) a previous save may have left, so the directory is never
// ambiguous. dtype: F32, BF16 or F16 (round to nearest even); the router and its bias stay F32 as
// in real checkpoints. Throws std::invalid_argument for weights that do not match cfg, a dtype or
// a shard count (1 <= shards <= tensors) it cannot write; SafetensorsError when a file cannot be
// written, std::filesystem::filesystem_error when the directory cannot be made.
// `mtp` (optional): MTP modules 0..k-1 (k <= num_mtp_modules) written under mtp.layers.{i}.*.
// `vision` (optional): the tower under vision_slots' names (the same in both layouts, in `dtype`),
// and config.json gets its vision_config block and image_token_id; std::invalid_argument when its
// text_hidden is not cfg.hidden_size, its image_token_id is outside the vocabulary or its weights
// are not of its config.
void save_checkpoint(const std::string& dir, const ModelConfig& cfg, const ModelWeights<float>& weights,
                     Layout layout, Dtype dtype, int shards = 1, std::span<const ModelWeights<float>> mtp = {},
                     const CheckpointVision* vision = nullptr);

// The config.json text save_checkpoint writes for a layout (both parse back to cfg), with the
// vision_config block and image_token_id of `vision` when given.
std::string checkpoint_config_json(const ModelConfig& cfg, Layout layout, const VisionConfig* vision = nullptr);

// `m3h inspect DIR`: config name and dims, files, layout and prefix, tensor count, parameters (in
// the files and as the config implies), dtype histogram, the vision tower and the loader's warnings,
// missing required tensors (it describes a broken checkpoint instead of refusing it), unknown and
// ignored tensors. Reads headers only.
std::string describe_checkpoint(const std::string& dir);

}  // namespace m3
