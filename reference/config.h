// ModelConfig: every field of spec §1 (text backbone + MSA + MoE), the presets of DESIGN §2,
// loading from a checkpoint's config.json in either spelling (spec Appendix A), and validation
// whose errors name the field and the rule.
#pragma once

#include "reference/dims.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace m3 {

enum class AttnType { DENSE, MSA };  // "full_attention" | "minimax_m3_sparse"
enum class MlpType { DENSE, MOE };   // "dense" | "sparse"

struct ModelConfig {
  std::string name = "custom";

  // backbone
  int hidden_size = 0;                 // H
  int num_hidden_layers = 0;
  int num_attention_heads = 0;         // Hq
  int num_key_value_heads = 0;         // Hkv
  int head_dim = 0;                    // D
  int vocab_size = 0;                  // V
  double rms_norm_eps = 1e-6;
  double rope_theta = 5e6;
  int rotary_dim = 0;                  // R: first R of D channels rotated (NeoX split-half)
  std::int64_t max_position_embeddings = 0;
  int bos_token_id = 200034;
  int eos_token_id = 200020;
  bool tie_word_embeddings = false;    // M3: untied; tied configs are refused (not in the spec)
  bool use_qk_norm = true;             // per-head Gemma RMSNorm on q and k

  // SwiGLU-OAI (spec §2.4)
  double swiglu_alpha = 1.702;
  double swiglu_limit = 7.0;
  double swiglu_beta = 1.0;            // the +1 offset on the up half

  // MLP / MoE (spec §1, §4)
  int dense_intermediate_size = 0;     // I_d, dense-MLP layers
  int intermediate_size = 0;           // I, each routed expert
  int shared_intermediate_size = 0;    // shared expert width (n_shared * I in vLLM's reading)
  int n_shared_experts = 1;
  int num_local_experts = 0;           // E
  int num_experts_per_tok = 0;         // K_e
  double routed_scaling_factor = 2.0;
  bool use_routing_bias = true;        // e_score_correction_bias, for choice only
  bool norm_topk_prob = true;          // renormalize the chosen sigmoid scores to sum 1

  // MSA (spec §1.2, §3)
  int index_n_heads = 0;               // Hi, == Hkv
  int index_head_dim = 0;              // Di
  int index_block_size = 0;            // BLK
  int index_topk_blocks = 0;           // K_blk, local block included
  int index_local_blocks = 1;
  int index_init_blocks = 0;

  int num_mtp_modules = 0;             // MTP count (spec §7): mtp_module_config, generate_mtp_module

  std::vector<AttnType> layer_types;   // per layer
  std::vector<MlpType> mlp_layer_types;  // per layer

  // --- derived views ---
  AttnDims attn_dims() const { return {num_attention_heads, num_key_value_heads, head_dim}; }
  MsaDims msa_dims() const {
    return {index_n_heads, index_head_dim, index_block_size, index_topk_blocks,
            index_local_blocks, index_init_blocks};
  }
  int num_layers_of(AttnType t) const;
  int num_layers_of(MlpType t) const;

  // Throws ConfigError listing every violated rule, each as "field: rule (value)".
  void validate() const;
  // The config as a JSON object in the flat (transformers) spelling; load_config reads it back.
  std::string to_json(int indent = 2) const;
};

struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Names accepted by preset(): m3, m3-layer, small, tiny.
const std::vector<std::string>& preset_names();
// Throws ConfigError naming the known presets when `name` is not one.
ModelConfig preset(std::string_view name);

// The one-layer model an MTP module runs (spec §7): cfg's dimensions, one MSA + MoE decoder layer
// (forced, whatever cfg's layer types), no MTP of its own; named "<cfg.name>-mtp".
ModelConfig mtp_module_config(const ModelConfig& cfg);

// Parses a config.json text in either spelling: the official nested `sparse_attention_config` +
// `moe_layer_freq`, or the flat transformers fields (`layer_types`, `mlp_layer_types`, `index_*`),
// also when wrapped in a VL config's `text_config`. The result is validated.
ModelConfig parse_config_json(std::string_view json_text, std::string_view origin = "config.json");
ModelConfig load_config_file(const std::string& path);

// A preset name or a path to a config.json (anything containing '/' or ending in .json).
ModelConfig resolve_config(std::string_view preset_or_path);

std::string_view attn_type_name(AttnType t);
std::string_view mlp_type_name(MlpType t);

}  // namespace m3
