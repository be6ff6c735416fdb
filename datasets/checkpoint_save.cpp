// Checkpoint writing (checkpoint.h): config.json in the layout's spelling, then one safetensors
// file or n shards plus the index, walking the same slot table the loader reads.
#include "datasets/checkpoint.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

namespace m3 {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json official_config(const ModelConfig& cfg) {
  // The official spelling (spec A.2, last paragraph): MSA fields nested in sparse_attention_config,
  // per-layer 0/1 lists, top-level rope fields. Flat fields that would override them are dropped,
  // so a reload really reads the nested spelling.
  json j = json::parse(cfg.to_json());
  for (const char* k : {"layer_types", "mlp_layer_types", "index_n_heads", "index_head_dim", "index_block_size",
                        "index_topk_blocks", "index_local_blocks", "index_init_blocks", "rope_parameters"})
    j.erase(k);
  j["model_type"] = "minimax_m3";
  j["architectures"] = {"MiniMaxM3SparseForCausalLM"};
  j["rope_theta"] = cfg.rope_theta;
  j["partial_rotary_factor"] = static_cast<double>(cfg.rotary_dim) / cfg.head_dim;
  json sparse_freq = json::array(), moe_freq = json::array();
  for (auto t : cfg.layer_types) sparse_freq.push_back(t == AttnType::MSA ? 1 : 0);
  for (auto t : cfg.mlp_layer_types) moe_freq.push_back(t == MlpType::MOE ? 1 : 0);
  j["sparse_attention_config"] = {
      {"use_sparse_attention", cfg.num_layers_of(AttnType::MSA) > 0},
      {"sparse_num_index_heads", cfg.index_n_heads},
      {"sparse_index_dim", cfg.index_head_dim},
      {"sparse_block_size", cfg.index_block_size},
      {"sparse_topk_blocks", cfg.index_topk_blocks},
      {"sparse_local_block", cfg.index_local_blocks},
      {"sparse_init_block", cfg.index_init_blocks},
      {"sparse_score_type", "max"},
      {"sparse_attention_freq", sparse_freq},
      {"sparse_disable_index_value", sparse_freq},  // selection-only indexer on every sparse layer
  };
  j["moe_layer_freq"] = moe_freq;
  return j;
}

}  // namespace

std::string checkpoint_config_json(const ModelConfig& cfg, Layout layout, const VisionConfig* vision) {
  if (layout == Layout::HF && !vision) return cfg.to_json();
  json j = layout == Layout::HF ? json::parse(cfg.to_json()) : official_config(cfg);
  if (vision) {
    j["vision_config"] = json::parse(vision_config_json(*vision));
    j["image_token_id"] = vision->image_token_id;
  }
  return j.dump(2);
}

void save_checkpoint(const std::string& dir, const ModelConfig& cfg, const ModelWeights<float>& weights,
                     Layout layout, Dtype dtype, int shards, std::span<const ModelWeights<float>> mtp,
                     const CheckpointVision* vision) {
  if (dtype != Dtype::F32 && dtype != Dtype::BF16 && dtype != Dtype::F16)
    throw std::invalid_argument(
        fmt::format("save_checkpoint: dtype {} cannot be written, expected F32, BF16 or F16", dtype_name(dtype)));
  // The slot table only reads through its pointers when saving.
  auto& w = const_cast<ModelWeights<float>&>(weights);
  const LayoutNames names{layout, "model.", "lm_head.weight"};
  std::vector<TensorSlot> slots = layout_slots(cfg, names, &w);
  if (static_cast<int>(mtp.size()) > cfg.num_mtp_modules)
    throw std::invalid_argument(fmt::format("save_checkpoint: {} MTP modules, the config '{}' has num_mtp_modules = {}",
                                            mtp.size(), cfg.name, cfg.num_mtp_modules));
  for (std::size_t i = 0; i < mtp.size(); ++i)
    for (auto& slot : mtp_slots(cfg, static_cast<int>(i), names, const_cast<ModelWeights<float>*>(&mtp[i])))
      slots.push_back(std::move(slot));
  if (vision) {
    const VisionConfig& vc = vision->config;
    if (vc.text_hidden != cfg.hidden_size || vc.image_token_id < 0 || vc.image_token_id >= cfg.vocab_size)
      throw std::invalid_argument(fmt::format("save_checkpoint: vision config '{}' has text_hidden {} and "
                                              "image_token_id {}, expected the hidden_size {} of '{}' and an id "
                                              "below its vocab_size {}",
                                              vc.name, vc.text_hidden, vc.image_token_id, cfg.hidden_size, cfg.name,
                                              cfg.vocab_size));
    for (auto& slot : vision_slots(vc, const_cast<VisionWeights<float>*>(&vision->weights)))
      slots.push_back(std::move(slot));
  }
  if (shards < 1 || static_cast<std::size_t>(shards) > slots.size())
    throw std::invalid_argument(
        fmt::format("save_checkpoint: shards = {}, expected 1..{} (the number of tensors)", shards, slots.size()));

  auto dtype_of = [&](const TensorSlot& s) { return s.router ? Dtype::F32 : dtype; };
  std::vector<std::uint64_t> bytes;  // per slot, as stored
  std::uint64_t total = 0;
  for (const auto& s : slots) {
    std::uint64_t n = 1;
    for (auto d : s.shape) n *= static_cast<std::uint64_t>(d);
    bytes.push_back(n * static_cast<std::uint64_t>(dtype_size(dtype_of(s))));
    total += bytes.back();
  }

  fs::create_directories(dir);
  {
    std::ofstream f(fs::path(dir) / "config.json", std::ios::trunc);
    f << checkpoint_config_json(cfg, layout, vision ? &vision->config : nullptr) << "\n";
    if (!f) throw SafetensorsError(fmt::format("cannot write '{}/config.json'", dir));
  }

  // Shards in model order, cut at equal shares of the bytes; each shard gets at least one tensor.
  const std::size_t n_shards = static_cast<std::size_t>(shards);
  std::vector<SafetensorsWriter> writers(n_shards);
  std::vector<std::size_t> shard_of(slots.size());
  std::size_t k = 0;
  std::uint64_t placed = 0;  // bytes of the tensors already placed
  for (std::size_t i = 0; i < slots.size(); ++i) {
    const bool share_full = placed * n_shards >= (k + 1) * total;
    const bool must_move = slots.size() - i == n_shards - 1 - k;  // one tensor left per later shard
    if (k + 1 < n_shards && writers[k].size() > 0 && (share_full || must_move)) ++k;
    std::vector<std::span<const float>> parts;
    for (const auto& p : slots[i].pieces) parts.emplace_back(p.dst, static_cast<std::size_t>(p.count));
    writers[k].add(slots[i].name, dtype_of(slots[i]), slots[i].shape, std::move(parts));
    shard_of[i] = k;
    placed += bytes[i];
  }

  const fs::path single = fs::path(dir) / kSingleFileName, index = fs::path(dir) / kIndexFileName;
  if (shards == 1) {
    writers[0].set_metadata("format", "pt");
    writers[0].write(single.string());
    fs::remove(index);
    return;
  }
  std::vector<std::string> files;
  for (std::size_t q = 0; q < n_shards; ++q) {
    files.push_back(fmt::format("model-{:05d}-of-{:05d}.safetensors", q + 1, shards));
    writers[q].set_metadata("format", "pt");
    writers[q].write((fs::path(dir) / files.back()).string());
  }
  json map = json::object();
  for (std::size_t i = 0; i < slots.size(); ++i) map[slots[i].name] = files[shard_of[i]];
  std::ofstream f(index, std::ios::trunc);
  f << json{{"metadata", {{"total_size", total}}}, {"weight_map", map}}.dump(2) << "\n";
  if (!f) throw SafetensorsError(fmt::format("cannot write '{}'", index.string()));
  fs::remove(single);
}

}  // namespace m3
