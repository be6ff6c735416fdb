// The two checkpoint layouts of spec Appendix A as tables of "slots": one slot per checkpoint
// tensor, with its name, its shape from the config, and the pieces of ModelWeights<float> its
// elements go to (a fused HF tensor such as experts.gate_up_proj [E, 2I, H] feeds 2E matrices).
// The loader and the writer (checkpoint.cpp) both walk these tables, so a name or a fusion order
// exists in one place only.
#pragma once

#include "reference/config.h"
#include "reference/vision.h"
#include "reference/weights.h"

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace m3 {

// OFFICIAL: spec A.1 (per-expert w1/w3/w2, block_sparse_moe.*, self_attn.index_*);
// HF: spec A.2 (fused gate_up_proj, mlp.experts.{gate_up,down}_proj, self_attn.indexer.*).
enum class Layout { OFFICIAL, HF };
std::string_view layout_name(Layout l);  // "official" | "hf"
// Parses "official" | "hf"; throws std::invalid_argument naming the accepted spellings.
Layout parse_layout(std::string_view s);

// Where a layout's names start: body tensors under `prefix` ("model.", "language_model.model.",
// "model.language_model."), the LM head under its own full name.
struct LayoutNames {
  Layout layout = Layout::OFFICIAL;
  std::string prefix = "model.";
  std::string lm_head = "lm_head.weight";
};

// Elements [offset, offset + count) of a checkpoint tensor (row-major) are dst[0, count).
struct TensorPiece {
  float* dst = nullptr;
  std::int64_t offset = 0;
  std::int64_t count = 0;
};

struct TensorSlot {
  std::string name;                  // full checkpoint name
  std::vector<std::int64_t> shape;   // what the config implies
  std::vector<TensorPiece> pieces;   // cover [0, numel) in order; empty for a names-only table
  bool optional = false;             // e_score_correction_bias when use_routing_bias is false
  bool router = false;               // router weight / bias: fp32 in real checkpoints, kept F32 on save
  // Also accepted on load: the same elements in the same row-major order under another shape (the
  // Conv3d patch embedding flattened to 2-D); empty for none. Saving writes `shape`.
  std::vector<std::int64_t> alt_shape;
};

// Every tensor of cfg allocated (not initialized) with its shape and layer types set.
ModelWeights<float> allocate_weights(const ModelConfig& cfg);

// The slot table of a layout, in model order (embedding, layers, final norm, LM head). With `w`
// the pieces point into it, and w's shapes are checked against cfg first (std::invalid_argument
// naming the tensor, expected and found shape); with nullptr only names and shapes are filled.
std::vector<TensorSlot> layout_slots(const ModelConfig& cfg, const LayoutNames& names, ModelWeights<float>* w);

// MTP module i of cfg (spec §7), names mtp.layers.{i}.*: enorm, hnorm, eh_proj, the decoder layer
// (MSA + MoE, named as a main layer of the layout under that prefix), final_layernorm. The module's
// embedding and LM head are the main model's, so they are not in the table. With `w` (a model of
// mtp_module_config(cfg) with mtp_in: generate_mtp_module, allocate_mtp_module) the pieces point
// into it. Throws std::invalid_argument for i outside [0, num_mtp_modules) or weights of another kind.
std::vector<TensorSlot> mtp_slots(const ModelConfig& cfg, int i, const LayoutNames& names, ModelWeights<float>* w);
ModelWeights<float> allocate_mtp_module(const ModelConfig& cfg);

// The vision tower and projector of vc (spec §8), under the names generate_vision_weights draws
// them by (reference/vision.h): visual.patch_embed.proj.weight (Conv3d [Hv, C, tp, p, p]; the
// flattened [Hv, C*tp*p*p] is its alt_shape), visual.pre_layrnorm.*, visual.blocks.{l}.*,
// multi_modal_projector.linear_{1,2}.*, patch_merge_mlp.linear_{1,2}.*. The same names in both
// layouts: spec Appendix A gives only the text backbone's. With `w` (allocate_vision_weights(vc)
// or generated weights of vc) the pieces point into it, its shapes checked against vc first
// (std::invalid_argument naming the tensor).
std::vector<TensorSlot> vision_slots(const VisionConfig& vc, VisionWeights<float>* w);
VisionWeights<float> allocate_vision_weights(const VisionConfig& vc);
// Roots of the vision names: a tensor under one of them makes the loader read the tower.
inline constexpr const char* kVisionRoots[] = {"visual.", "multi_modal_projector.", "patch_merge_mlp."};

}  // namespace m3
