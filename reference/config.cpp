// ModelConfig presets, config.json loading (both spellings of spec Appendix A) and validation.
#include "reference/config.h"
#include "reference/config_json.h"  // ConfigFields: the typed field readers

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>

namespace m3 {

using nlohmann::json;

std::string_view attn_type_name(AttnType t) {
  return t == AttnType::DENSE ? "full_attention" : "minimax_m3_sparse";
}
std::string_view mlp_type_name(MlpType t) { return t == MlpType::DENSE ? "dense" : "sparse"; }

int ModelConfig::num_layers_of(AttnType t) const {
  int n = 0;
  for (auto x : layer_types) n += x == t;
  return n;
}
int ModelConfig::num_layers_of(MlpType t) const {
  int n = 0;
  for (auto x : mlp_layer_types) n += x == t;
  return n;
}

void ModelConfig::validate() const {
  std::vector<std::string> errs;
  auto rule = [&](bool ok, std::string_view field, std::string_view what, auto value) {
    if (!ok) errs.push_back(fmt::format("{}: {} (got {})", field, what, value));
  };
  rule(hidden_size > 0, "hidden_size", "must be > 0", hidden_size);
  rule(num_hidden_layers > 0, "num_hidden_layers", "must be > 0", num_hidden_layers);
  rule(num_attention_heads > 0, "num_attention_heads", "must be > 0", num_attention_heads);
  rule(num_key_value_heads > 0, "num_key_value_heads", "must be > 0", num_key_value_heads);
  if (num_attention_heads > 0 && num_key_value_heads > 0)
    rule(num_attention_heads % num_key_value_heads == 0, "num_attention_heads",
         fmt::format("must be divisible by num_key_value_heads = {}", num_key_value_heads),
         num_attention_heads);
  rule(head_dim > 0, "head_dim", "must be > 0", head_dim);
  rule(vocab_size > 0, "vocab_size", "must be > 0", vocab_size);
  rule(rms_norm_eps > 0, "rms_norm_eps", "must be > 0", rms_norm_eps);
  rule(rope_theta > 1, "rope_theta", "must be > 1", rope_theta);
  rule(rotary_dim >= 0 && rotary_dim % 2 == 0, "rotary_dim", "must be even and >= 0", rotary_dim);
  rule(rotary_dim <= head_dim, "rotary_dim", fmt::format("must be <= head_dim = {}", head_dim),
       rotary_dim);
  rule(max_position_embeddings > 0, "max_position_embeddings", "must be > 0",
       max_position_embeddings);
  rule(bos_token_id < vocab_size, "bos_token_id", fmt::format("must be < vocab_size = {}", vocab_size),
       bos_token_id);
  rule(eos_token_id < vocab_size, "eos_token_id", fmt::format("must be < vocab_size = {}", vocab_size),
       eos_token_id);
  rule(!tie_word_embeddings, "tie_word_embeddings", "must be false (M3's LM head is untied)",
       tie_word_embeddings);
  rule(swiglu_limit > 0, "swiglu_limit", "must be > 0", swiglu_limit);
  rule(swiglu_alpha > 0, "swiglu_alpha", "must be > 0", swiglu_alpha);
  rule(static_cast<int>(layer_types.size()) == num_hidden_layers, "layer_types",
       fmt::format("must have num_hidden_layers = {} entries", num_hidden_layers), layer_types.size());
  rule(static_cast<int>(mlp_layer_types.size()) == num_hidden_layers, "mlp_layer_types",
       fmt::format("must have num_hidden_layers = {} entries", num_hidden_layers),
       mlp_layer_types.size());
  if (num_layers_of(AttnType::MSA) > 0) {
    rule(index_n_heads == num_key_value_heads, "index_n_heads",
         fmt::format("must equal num_key_value_heads = {} (one selection per GQA group)",
                     num_key_value_heads),
         index_n_heads);
    rule(index_head_dim > 0, "index_head_dim", "must be > 0", index_head_dim);
    rule(rotary_dim <= index_head_dim, "rotary_dim",
         fmt::format("must be <= index_head_dim = {} (the index branch shares the main RoPE)",
                     index_head_dim),
         rotary_dim);
    rule(index_block_size > 0, "index_block_size", "must be > 0", index_block_size);
    rule(index_local_blocks >= 1, "index_local_blocks",
         "must be >= 1 (the query's own block is always attended)", index_local_blocks);
    rule(index_init_blocks >= 0, "index_init_blocks", "must be >= 0", index_init_blocks);
    rule(index_topk_blocks >= index_local_blocks + index_init_blocks, "index_topk_blocks",
         fmt::format("must be >= index_local_blocks + index_init_blocks = {}",
                     index_local_blocks + index_init_blocks),
         index_topk_blocks);
  }
  if (num_layers_of(MlpType::DENSE) > 0)
    rule(dense_intermediate_size > 0, "dense_intermediate_size", "must be > 0 (dense MLP layers exist)",
         dense_intermediate_size);
  if (num_layers_of(MlpType::MOE) > 0) {
    rule(num_local_experts > 0, "num_local_experts", "must be > 0 (MoE layers exist)", num_local_experts);
    rule(num_experts_per_tok >= 1 && num_experts_per_tok <= num_local_experts, "num_experts_per_tok",
         fmt::format("must be in [1, num_local_experts = {}]", num_local_experts), num_experts_per_tok);
    rule(intermediate_size > 0, "intermediate_size", "must be > 0 (MoE layers exist)", intermediate_size);
    rule(n_shared_experts >= 0, "n_shared_experts", "must be >= 0", n_shared_experts);
    rule(n_shared_experts == 0 || shared_intermediate_size > 0, "shared_intermediate_size",
         "must be > 0 when n_shared_experts > 0", shared_intermediate_size);
    rule(routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0", routed_scaling_factor);
  }
  if (!errs.empty()) {
    std::string msg = fmt::format("invalid config '{}':", name);
    for (auto& e : errs) msg += "\n  " + e;
    throw ConfigError(msg);
  }
}

// ---------------------------------------------------------------------------------------------
// Presets (DESIGN §2)

namespace {

void set_layer_types(ModelConfig& c, int dense_layers) {
  c.layer_types.assign(c.num_hidden_layers, AttnType::MSA);
  c.mlp_layer_types.assign(c.num_hidden_layers, MlpType::MOE);
  for (int l = 0; l < dense_layers && l < c.num_hidden_layers; ++l) {
    c.layer_types[l] = AttnType::DENSE;
    c.mlp_layer_types[l] = MlpType::DENSE;
  }
}

ModelConfig m3_config() {
  ModelConfig c;
  c.name = "m3";
  c.hidden_size = 6144;
  c.num_hidden_layers = 60;
  c.num_attention_heads = 64;
  c.num_key_value_heads = 4;
  c.head_dim = 128;
  c.vocab_size = 200064;
  c.rotary_dim = 64;
  c.max_position_embeddings = 1048576;  // spec §1.1: shipped config (the HF default is 524288)
  c.dense_intermediate_size = 12288;
  c.intermediate_size = 3072;
  c.shared_intermediate_size = 3072;
  c.num_local_experts = 128;
  c.num_experts_per_tok = 4;
  c.index_n_heads = 4;
  c.index_head_dim = 128;
  c.index_block_size = 128;
  c.index_topk_blocks = 16;
  c.num_mtp_modules = 7;
  set_layer_types(c, 3);
  return c;
}

}  // namespace

const std::vector<std::string>& preset_names() {
  static const std::vector<std::string> names{"m3", "m3-layer", "small", "tiny"};
  return names;
}

ModelConfig preset(std::string_view name) {
  ModelConfig c = m3_config();
  if (name == "m3") {
  } else if (name == "m3-layer") {
    // One MSA + MoE layer at real dimensions: the unit of the cost study.
    c.name = "m3-layer";
    c.num_hidden_layers = 1;
    c.num_mtp_modules = 0;
    set_layer_types(c, 0);
  } else if (name == "small") {
    // Real head geometry (D 128, Di 128, BLK 128, top-16, GQA group 16) at small width.
    c.name = "small";
    c.hidden_size = 512;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 2;
    c.index_n_heads = 2;
    c.vocab_size = 4096;
    c.bos_token_id = 1;
    c.eos_token_id = 2;
    c.max_position_embeddings = 65536;
    c.dense_intermediate_size = 1024;
    c.intermediate_size = 256;
    c.shared_intermediate_size = 256;
    c.num_local_experts = 16;
    c.num_experts_per_tok = 4;
    c.num_mtp_modules = 1;  // one MTP module (spec §7), for the draft-and-check path
    set_layer_types(c, 1);
  } else if (name == "tiny") {
    // Tiny everything; BLK 16 and top-4 so that selection matters past 64 tokens.
    c.name = "tiny";
    c.hidden_size = 64;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 16;
    c.rotary_dim = 8;
    c.index_n_heads = 2;
    c.index_head_dim = 16;
    c.index_block_size = 16;
    c.index_topk_blocks = 4;
    c.vocab_size = 512;
    c.bos_token_id = 1;
    c.eos_token_id = 2;
    c.max_position_embeddings = 4096;
    c.dense_intermediate_size = 128;
    c.intermediate_size = 32;
    c.shared_intermediate_size = 32;
    c.num_local_experts = 8;
    c.num_experts_per_tok = 2;
    c.num_mtp_modules = 1;  // one MTP module (spec §7), for the draft-and-check path
    set_layer_types(c, 1);
  } else {
    std::string known;
    for (auto& n : preset_names()) known += (known.empty() ? "" : ", ") + n;
    throw ConfigError(fmt::format("unknown preset '{}': expected one of {}", name, known));
  }
  c.validate();
  return c;
}

ModelConfig mtp_module_config(const ModelConfig& cfg) {
  ModelConfig c = cfg;
  c.name = cfg.name + "-mtp";
  c.num_hidden_layers = 1;
  c.num_mtp_modules = 0;
  set_layer_types(c, 0);  // MSA + MoE
  c.validate();
  return c;
}

// ---------------------------------------------------------------------------------------------
// config.json

namespace {

template <class E>
std::vector<E> parse_type_list(const detail::ConfigFields& r, std::string_view key,
                               std::initializer_list<std::pair<std::string_view, E>> names) {
  const json* v = r.find(key);
  if (!v->is_array()) r.fail(key, "must be an array of strings");
  std::vector<E> out;
  for (const auto& e : *v) {
    bool ok = false;
    if (e.is_string())
      for (auto& [n, t] : names)
        if (e.get<std::string>() == n) { out.push_back(t); ok = true; }
    if (!ok) {
      std::string accepted;
      for (auto& [n, t] : names) accepted += fmt::format("{}'{}'", accepted.empty() ? "" : " or ", n);
      r.fail(key, fmt::format("entry {} must be {}, got {}", out.size(), accepted, e.dump()));
    }
  }
  return out;
}

// Official per-layer frequency lists: [0,0,0,1,...] with 1 = sparse/MoE.
template <class E>
std::vector<E> parse_freq_list(const detail::ConfigFields& r, std::string_view key, E zero, E one) {
  const json* v = r.find(key);
  if (!v->is_array()) r.fail(key, "must be an array of 0/1");
  std::vector<E> out;
  for (const auto& e : *v) {
    if (!(e.is_number_integer() || e.is_boolean()) || (e.is_number_integer() && e.get<int>() != 0 && e.get<int>() != 1))
      r.fail(key, fmt::format("entry {} must be 0 or 1, got {}", out.size(), e.dump()));
    out.push_back((e.is_boolean() ? e.get<bool>() : e.get<int>() == 1) ? one : zero);
  }
  return out;
}

}  // namespace

ModelConfig parse_config_json(std::string_view text, std::string_view origin) {
  json root;
  try {
    root = json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    throw ConfigError(fmt::format("{}: not valid JSON: {}", origin, e.what()));
  }
  if (!root.is_object()) throw ConfigError(fmt::format("{}: top level must be a JSON object", origin));
  const json& j = root.contains("text_config") && root["text_config"].is_object() ? root["text_config"] : root;
  detail::ConfigFields r{&j, std::string(origin)};

  ModelConfig c;
  c.name = std::string(origin);
  if (const auto it = root.find("name"); it != root.end() && it->is_string()) c.name = it->get<std::string>();
  r.require("hidden_size", c.hidden_size);
  r.require("num_hidden_layers", c.num_hidden_layers);
  r.require("num_attention_heads", c.num_attention_heads);
  r.require("num_key_value_heads", c.num_key_value_heads);
  r.require("vocab_size", c.vocab_size);
  if (!r.get("head_dim", c.head_dim) && c.num_attention_heads > 0)
    c.head_dim = c.hidden_size / c.num_attention_heads;
  r.get("rms_norm_eps", c.rms_norm_eps);
  r.get("max_position_embeddings", c.max_position_embeddings);
  r.get("bos_token_id", c.bos_token_id);
  r.get("eos_token_id", c.eos_token_id);
  r.get("tie_word_embeddings", c.tie_word_embeddings);
  r.get("use_qk_norm", c.use_qk_norm);
  r.get("swiglu_alpha", c.swiglu_alpha);
  r.get("swiglu_limit", c.swiglu_limit);
  r.get("swiglu_beta", c.swiglu_beta);

  // RoPE: flat `rope_parameters` object or official top-level fields.
  double partial = 0.5;  // spec §1.1: partial_rotary_factor 0.5 when the file does not say
  const json* rp = r.find("rope_parameters");
  if (rp && !rp->is_object()) r.fail("rope_parameters", "must be an object");
  const detail::ConfigFields rope{rp ? rp : &j, rp ? fmt::format("{}: rope_parameters", origin) : r.where};
  if (!rope.get("rope_theta", c.rope_theta)) r.get("rope_theta", c.rope_theta);
  if (!rope.get("partial_rotary_factor", partial)) r.get("partial_rotary_factor", partial);
  if (!r.get("rotary_dim", c.rotary_dim)) c.rotary_dim = static_cast<int>(partial * c.head_dim);

  r.get("dense_intermediate_size", c.dense_intermediate_size);
  r.get("intermediate_size", c.intermediate_size);
  r.get("n_shared_experts", c.n_shared_experts);
  if (!r.get("shared_intermediate_size", c.shared_intermediate_size))
    c.shared_intermediate_size = c.intermediate_size * c.n_shared_experts;
  r.get("num_local_experts", c.num_local_experts);
  r.get("num_experts_per_tok", c.num_experts_per_tok);
  r.get("routed_scaling_factor", c.routed_scaling_factor);
  r.get("use_routing_bias", c.use_routing_bias);
  r.get("norm_topk_prob", c.norm_topk_prob);
  if (!r.get("num_mtp_modules", c.num_mtp_modules)) r.get("num_nextn_predict_layers", c.num_mtp_modules);

  // MSA fields: official nested object or flat index_* fields.
  if (const json* sa = r.find("sparse_attention_config")) {
    if (!sa->is_object()) r.fail("sparse_attention_config", "must be an object");
    detail::ConfigFields s{sa, fmt::format("{}: sparse_attention_config", origin)};
    s.get("sparse_num_index_heads", c.index_n_heads);
    s.get("sparse_index_dim", c.index_head_dim);
    s.get("sparse_block_size", c.index_block_size);
    s.get("sparse_topk_blocks", c.index_topk_blocks);
    s.get("sparse_local_block", c.index_local_blocks);
    s.get("sparse_init_block", c.index_init_blocks);
    if (s.find("sparse_attention_freq"))
      c.layer_types = parse_freq_list(s, "sparse_attention_freq", AttnType::DENSE, AttnType::MSA);
    if (const json* st = s.find("sparse_score_type")) {
      if (!st->is_string() || st->get<std::string>() != "max")
        s.fail("sparse_score_type", fmt::format("must be \"max\" (the only type M3 uses), got {}", st->dump()));
    }
  }
  r.get("index_n_heads", c.index_n_heads);
  r.get("index_head_dim", c.index_head_dim);
  r.get("index_block_size", c.index_block_size);
  r.get("index_topk_blocks", c.index_topk_blocks);
  r.get("index_local_blocks", c.index_local_blocks);
  r.get("index_init_blocks", c.index_init_blocks);

  if (r.find("layer_types"))
    c.layer_types = parse_type_list<AttnType>(
        r, "layer_types", {{"full_attention", AttnType::DENSE}, {"minimax_m3_sparse", AttnType::MSA}});
  if (r.find("mlp_layer_types"))
    c.mlp_layer_types =
        parse_type_list<MlpType>(r, "mlp_layer_types", {{"dense", MlpType::DENSE}, {"sparse", MlpType::MOE}});
  else if (r.find("moe_layer_freq"))
    c.mlp_layer_types = parse_freq_list(r, "moe_layer_freq", MlpType::DENSE, MlpType::MOE);
  if (c.layer_types.empty()) r.fail("layer_types", "is missing (nor sparse_attention_config.sparse_attention_freq)");
  if (c.mlp_layer_types.empty()) r.fail("mlp_layer_types", "is missing (nor moe_layer_freq)");
  if (c.max_position_embeddings == 0) r.fail("max_position_embeddings", "is required but missing");

  c.validate();
  return c;
}

ModelConfig load_config_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw ConfigError(fmt::format("cannot open config file '{}'", path));
  std::stringstream ss;
  ss << f.rdbuf();
  return parse_config_json(ss.str(), path);
}

ModelConfig resolve_config(std::string_view s) {
  bool is_path = s.find('/') != std::string_view::npos ||
                 (s.size() > 5 && s.substr(s.size() - 5) == ".json");
  return is_path ? load_config_file(std::string(s)) : preset(s);
}

std::string ModelConfig::to_json(int indent) const {
  json j;
  j["model_type"] = "minimax_m3_vl_text";
  j["name"] = name;
  j["hidden_size"] = hidden_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["vocab_size"] = vocab_size;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_parameters"] = {{"rope_theta", rope_theta},
                          {"partial_rotary_factor", static_cast<double>(rotary_dim) / head_dim}};
  j["rotary_dim"] = rotary_dim;
  j["max_position_embeddings"] = max_position_embeddings;
  j["bos_token_id"] = bos_token_id;
  j["eos_token_id"] = eos_token_id;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["use_qk_norm"] = use_qk_norm;
  j["swiglu_alpha"] = swiglu_alpha;
  j["swiglu_limit"] = swiglu_limit;
  j["swiglu_beta"] = swiglu_beta;
  j["dense_intermediate_size"] = dense_intermediate_size;
  j["intermediate_size"] = intermediate_size;
  j["shared_intermediate_size"] = shared_intermediate_size;
  j["n_shared_experts"] = n_shared_experts;
  j["num_local_experts"] = num_local_experts;
  j["num_experts_per_tok"] = num_experts_per_tok;
  j["routed_scaling_factor"] = routed_scaling_factor;
  j["use_routing_bias"] = use_routing_bias;
  j["norm_topk_prob"] = norm_topk_prob;
  j["index_n_heads"] = index_n_heads;
  j["index_head_dim"] = index_head_dim;
  j["index_block_size"] = index_block_size;
  j["index_topk_blocks"] = index_topk_blocks;
  j["index_local_blocks"] = index_local_blocks;
  j["index_init_blocks"] = index_init_blocks;
  j["num_mtp_modules"] = num_mtp_modules;
  json lt = json::array(), mt = json::array();
  for (auto t : layer_types) lt.push_back(std::string(attn_type_name(t)));
  for (auto t : mlp_layer_types) mt.push_back(std::string(mlp_type_name(t)));
  j["layer_types"] = lt;
  j["mlp_layer_types"] = mt;
  return j.dump(indent);
}

}  // namespace m3
