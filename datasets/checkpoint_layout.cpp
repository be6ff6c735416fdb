// Slot tables of the official and HF checkpoint layouts (checkpoint_layout.h, spec Appendix A).
#include "datasets/checkpoint_layout.h"

#include <fmt/format.h>

#include <stdexcept>

namespace m3 {

std::string_view layout_name(Layout l) { return l == Layout::OFFICIAL ? "official" : "hf"; }

Layout parse_layout(std::string_view s) {
  if (s == "official") return Layout::OFFICIAL;
  if (s == "hf") return Layout::HF;
  throw std::invalid_argument(fmt::format("unknown checkpoint layout '{}': expected 'official' or 'hf'", s));
}

ModelWeights<float> allocate_weights(const ModelConfig& c) {
  const int H = c.hidden_size, D = c.head_dim, Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;
  auto mlp = [&](int I) { return ref::MlpWeights<float>{MatF(I, H), MatF(I, H), MatF(H, I)}; };
  ModelWeights<float> w;
  w.embed_tokens.resize(c.vocab_size, H);
  w.layers.resize(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    auto& L = w.layers[l];
    L.attn_type = c.layer_types[l];
    L.mlp_type = c.mlp_layer_types[l];
    L.input_layernorm.resize(H);
    L.post_attention_layernorm.resize(H);
    L.attn.q_proj.resize(Hq * D, H);
    L.attn.k_proj.resize(Hkv * D, H);
    L.attn.v_proj.resize(Hkv * D, H);
    L.attn.o_proj.resize(H, Hq * D);
    L.attn.q_norm.resize(D);
    L.attn.k_norm.resize(D);
    if (L.attn_type == AttnType::MSA) {
      L.attn.index_q_proj.resize(c.index_n_heads * c.index_head_dim, H);
      L.attn.index_k_proj.resize(c.index_head_dim, H);
      L.attn.index_q_norm.resize(c.index_head_dim);
      L.attn.index_k_norm.resize(c.index_head_dim);
    }
    if (L.mlp_type == MlpType::DENSE) {
      L.mlp = mlp(c.dense_intermediate_size);
    } else {
      L.router.resize(c.num_local_experts, H);
      L.router_bias.resize(c.num_local_experts);
      for (int e = 0; e < c.num_local_experts; ++e) L.experts.push_back(mlp(c.intermediate_size));
      if (c.n_shared_experts > 0) L.shared = mlp(c.shared_intermediate_size);
    }
  }
  w.norm.resize(H);
  w.lm_head.resize(c.vocab_size, H);
  return w;
}

namespace {

using Shape = std::vector<std::int64_t>;

// Builds the table; `bind` is false for a names-only table (no weights).
class Slots {
 public:
  explicit Slots(bool bind) : bind_(bind) {}
  std::vector<TensorSlot> out;

  // One matrix (rows x cols) or vector (cols == 0) stored as one tensor.
  template <class M>
  void one(const std::string& name, M* m, std::int64_t rows, std::int64_t cols, bool optional = false,
           bool router = false) {
    const Shape shape = cols ? Shape{rows, cols} : Shape{rows};
    TensorSlot s{name, shape, {}, optional, router, {}};
    if (bind_) s.pieces.push_back({data(name, m, rows, cols ? cols : 1), 0, rows * (cols ? cols : 1)});
    out.push_back(std::move(s));
  }
  // [2I, H] = gate rows, then up rows (spec A.2: not interleaved).
  void gate_up(const std::string& name, ref::MlpWeights<float>* m, std::int64_t I, std::int64_t H) {
    TensorSlot s{name, {2 * I, H}, {}, false, false, {}};
    if (bind_) {
      s.pieces.push_back({data(name + " (gate rows)", &m->gate, I, H), 0, I * H});
      s.pieces.push_back({data(name + " (up rows)", &m->up, I, H), I * H, I * H});
    }
    out.push_back(std::move(s));
  }
  // Experts fused along a leading E axis: [E, 2I, H] (gate, then up, per expert) or [E, H, I].
  void experts(const std::string& name, std::vector<ref::MlpWeights<float>>* ex, bool is_gate_up, std::int64_t E,
               std::int64_t I, std::int64_t H) {
    TensorSlot s{name, is_gate_up ? Shape{E, 2 * I, H} : Shape{E, H, I}, {}, false, false, {}};
    if (bind_) {
      if (static_cast<std::int64_t>(ex->size()) != E)
        throw std::invalid_argument(fmt::format("weights for '{}': {} experts, expected num_local_experts = {}", name,
                                                ex->size(), E));
      for (std::int64_t e = 0; e < E; ++e) {
        auto& m = (*ex)[static_cast<std::size_t>(e)];
        const std::string who = fmt::format("{} (expert {})", name, e);
        if (is_gate_up) {
          s.pieces.push_back({data(who, &m.gate, I, H), e * 2 * I * H, I * H});
          s.pieces.push_back({data(who, &m.up, I, H), e * 2 * I * H + I * H, I * H});
        } else {
          s.pieces.push_back({data(who, &m.down, H, I), e * H * I, H * I});
        }
      }
    }
    out.push_back(std::move(s));
  }

 private:
  template <class M>
  static float* data(const std::string& name, M* m, std::int64_t rows, std::int64_t cols) {
    if (m->rows() != rows || m->cols() != cols)
      throw std::invalid_argument(fmt::format("weights for '{}' are [{}, {}], expected [{}, {}] from the config", name,
                                              m->rows(), m->cols(), rows, cols));
    return m->data();
  }
  bool bind_;
};

// The tensors of one decoder layer named under prefix p (a main layer or an MTP module's).
void layer_slots(Slots& s, const ModelConfig& c, const std::string& p, LayerWeights<float>& L, AttnType attn,
                 MlpType mlp, bool hf, bool bound, int l) {
  const std::int64_t H = c.hidden_size, D = c.head_dim, Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;
  const std::int64_t E = c.num_local_experts, I = c.intermediate_size, Is = c.shared_intermediate_size;
  const std::int64_t Id = c.dense_intermediate_size, Hi = c.index_n_heads, Di = c.index_head_dim;
  s.one(p + "input_layernorm.weight", &L.input_layernorm, H, 0);
  s.one(p + "post_attention_layernorm.weight", &L.post_attention_layernorm, H, 0);
  s.one(p + "self_attn.q_proj.weight", &L.attn.q_proj, Hq * D, H);
  s.one(p + "self_attn.k_proj.weight", &L.attn.k_proj, Hkv * D, H);
  s.one(p + "self_attn.v_proj.weight", &L.attn.v_proj, Hkv * D, H);
  s.one(p + "self_attn.o_proj.weight", &L.attn.o_proj, H, Hq * D);
  s.one(p + "self_attn.q_norm.weight", &L.attn.q_norm, D, 0);
  s.one(p + "self_attn.k_norm.weight", &L.attn.k_norm, D, 0);
  if (attn == AttnType::MSA) {
    const std::string a = p + (hf ? "self_attn.indexer." : "self_attn.index_");
    s.one(a + "q_proj.weight", &L.attn.index_q_proj, Hi * Di, H);
    s.one(a + "k_proj.weight", &L.attn.index_k_proj, Di, H);
    s.one(a + "q_norm.weight", &L.attn.index_q_norm, Di, 0);
    s.one(a + "k_norm.weight", &L.attn.index_k_norm, Di, 0);
  }
  // A SwiGLU MLP under prefix q: HF fuses gate and up (spec A.2), the official layout does not.
  auto mlp_slots = [&](const std::string& q, ref::MlpWeights<float>* w, std::int64_t inter) {
    if (hf) {
      s.gate_up(q + "gate_up_proj.weight", w, inter, H);
    } else {
      s.one(q + "gate_proj.weight", &w->gate, inter, H);
      s.one(q + "up_proj.weight", &w->up, inter, H);
    }
    s.one(q + "down_proj.weight", &w->down, H, inter);
  };
  if (mlp == MlpType::DENSE) {
    mlp_slots(p + "mlp.", &L.mlp, Id);
    return;
  }
  const std::string m = p + (hf ? "mlp." : "block_sparse_moe.");
  s.one(m + "gate.weight", &L.router, E, H, false, true);
  s.one(m + (hf ? "gate.e_score_correction_bias" : "e_score_correction_bias"), &L.router_bias, E, 0,
        !c.use_routing_bias, true);
  if (hf) {
    s.experts(m + "experts.gate_up_proj", &L.experts, true, E, I, H);
    s.experts(m + "experts.down_proj", &L.experts, false, E, I, H);
  } else {
    if (bound && static_cast<std::int64_t>(L.experts.size()) != E)
      throw std::invalid_argument(
          fmt::format("weights of layer {} have {} experts, expected num_local_experts = {}", l, L.experts.size(), E));
    for (std::int64_t e = 0; e < E; ++e) {
      ref::MlpWeights<float>* x = bound ? &L.experts[static_cast<std::size_t>(e)] : &L.shared;
      const std::string q = fmt::format("{}experts.{}.", m, e);
      s.one(q + "w1.weight", &x->gate, I, H);
      s.one(q + "w3.weight", &x->up, I, H);
      s.one(q + "w2.weight", &x->down, H, I);
    }
  }
  if (c.n_shared_experts > 0) mlp_slots(m + "shared_experts.", &L.shared, Is);
}

}  // namespace

std::vector<TensorSlot> layout_slots(const ModelConfig& c, const LayoutNames& nm, ModelWeights<float>* w) {
  c.validate();
  const std::int64_t H = c.hidden_size;
  const bool hf = nm.layout == Layout::HF;
  if (w && static_cast<int>(w->layers.size()) != c.num_hidden_layers)
    throw std::invalid_argument(
        fmt::format("weights have {} layers, expected num_hidden_layers = {}", w->layers.size(), c.num_hidden_layers));
  ModelWeights<float> none;  // stands in for `w` in a names-only table; never dereferenced for data
  none.layers.resize(static_cast<std::size_t>(c.num_hidden_layers));
  ModelWeights<float>& W = w ? *w : none;
  Slots s(w != nullptr);

  s.one(nm.prefix + "embed_tokens.weight", &W.embed_tokens, c.vocab_size, H);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    auto& L = W.layers[static_cast<std::size_t>(l)];
    if (w && (L.attn_type != c.layer_types[l] || L.mlp_type != c.mlp_layer_types[l]))
      throw std::invalid_argument(fmt::format("weights of layer {} have other layer types than the config", l));
    layer_slots(s, c, fmt::format("{}layers.{}.", nm.prefix, l), L, c.layer_types[l], c.mlp_layer_types[l], hf,
                w != nullptr, l);
  }
  s.one(nm.prefix + "norm.weight", &W.norm, H, 0);
  s.one(nm.lm_head, &W.lm_head, c.vocab_size, H);
  return std::move(s.out);
}

ModelWeights<float> allocate_mtp_module(const ModelConfig& cfg) {
  ModelWeights<float> w = allocate_weights(mtp_module_config(cfg));
  const int H = cfg.hidden_size;
  MtpInputWeights<float> in;
  in.enorm.resize(H);
  in.hnorm.resize(H);
  in.eh_proj.resize(H, 2 * H);
  w.mtp_in = std::move(in);
  return w;
}

std::vector<TensorSlot> mtp_slots(const ModelConfig& cfg, int i, const LayoutNames& nm, ModelWeights<float>* w) {
  if (i < 0 || i >= cfg.num_mtp_modules)
    throw std::invalid_argument(fmt::format("mtp_slots: module {} outside [0, {}) (num_mtp_modules of '{}')", i,
                                            cfg.num_mtp_modules, cfg.name));
  if (w && (w->layers.size() != 1 || !w->mtp_in))
    throw std::invalid_argument(fmt::format("mtp_slots: module {}'s weights are not an MTP module's (one layer and "
                                            "mtp_in, as generate_mtp_module or allocate_mtp_module make them)", i));
  const ModelConfig mc = mtp_module_config(cfg);
  const std::int64_t H = cfg.hidden_size;
  ModelWeights<float> none;  // names-only: never dereferenced for data
  none.layers.resize(1);
  none.mtp_in.emplace();
  ModelWeights<float>& W = w ? *w : none;
  auto& L = W.layers[0];
  if (w && (L.attn_type != AttnType::MSA || L.mlp_type != MlpType::MOE))
    throw std::invalid_argument(fmt::format("mtp_slots: module {}'s layer is not MSA + MoE", i));
  Slots s(w != nullptr);
  const std::string p = fmt::format("mtp.layers.{}.", i);
  s.one(p + "enorm.weight", &W.mtp_in->enorm, H, 0);
  s.one(p + "hnorm.weight", &W.mtp_in->hnorm, H, 0);
  s.one(p + "eh_proj.weight", &W.mtp_in->eh_proj, H, 2 * H);
  layer_slots(s, mc, p, L, AttnType::MSA, MlpType::MOE, nm.layout == Layout::HF, w != nullptr, 0);
  s.one(p + "final_layernorm.weight", &W.norm, H, 0);
  return std::move(s.out);
}

VisionWeights<float> allocate_vision_weights(const VisionConfig& vc) {
  vc.validate();
  const int Hv = vc.hidden, H = vc.text_hidden, m2 = vc.merge * vc.merge;
  const int K = vc.channels * vc.temporal_patch * vc.patch * vc.patch;
  VisionWeights<float> w;
  w.patch_embed.resize(Hv, K);
  w.pre_ln_w.resize(Hv);
  w.pre_ln_b.resize(Hv);
  w.layers.resize(static_cast<std::size_t>(vc.layers));
  for (auto& L : w.layers) {
    L.ln1_w.resize(Hv), L.ln1_b.resize(Hv), L.ln2_w.resize(Hv), L.ln2_b.resize(Hv);
    L.qkv.resize(3 * Hv, Hv), L.qkv_b.resize(3 * Hv);
    L.out.resize(Hv, Hv), L.out_b.resize(Hv);
    L.fc1.resize(vc.mlp, Hv), L.fc1_b.resize(vc.mlp);
    L.fc2.resize(Hv, vc.mlp), L.fc2_b.resize(Hv);
  }
  w.proj1.resize(H, Hv), w.proj1_b.resize(H);
  w.proj2.resize(H, H), w.proj2_b.resize(H);
  w.merge1.resize(H, m2 * H), w.merge1_b.resize(H);
  w.merge2.resize(H, H), w.merge2_b.resize(H);
  return w;
}

std::vector<TensorSlot> vision_slots(const VisionConfig& vc, VisionWeights<float>* w) {
  vc.validate();
  if (w && static_cast<int>(w->layers.size()) != vc.layers)
    throw std::invalid_argument(fmt::format("vision weights have {} blocks, expected num_hidden_layers = {} of '{}'",
                                            w->layers.size(), vc.layers, vc.name));
  const std::int64_t Hv = vc.hidden, H = vc.text_hidden, I = vc.mlp, m2 = vc.merge * vc.merge;
  const std::int64_t C = vc.channels, tp = vc.temporal_patch, p = vc.patch;
  VisionWeights<float> none;  // names-only: never dereferenced for data
  none.layers.resize(static_cast<std::size_t>(vc.layers));
  VisionWeights<float>& W = w ? *w : none;
  Slots s(w != nullptr);
  s.one("visual.patch_embed.proj.weight", &W.patch_embed, Hv, C * tp * p * p);
  s.out.back().shape = {Hv, C, tp, p, p};  // torch's Conv3d weight, as HF checkpoints store it
  s.out.back().alt_shape = {Hv, C * tp * p * p};
  s.one("visual.pre_layrnorm.weight", &W.pre_ln_w, Hv, 0);
  s.one("visual.pre_layrnorm.bias", &W.pre_ln_b, Hv, 0);
  for (int l = 0; l < vc.layers; ++l) {
    auto& L = W.layers[static_cast<std::size_t>(l)];
    const std::string q = fmt::format("visual.blocks.{}.", l);
    s.one(q + "layer_norm1.weight", &L.ln1_w, Hv, 0);
    s.one(q + "layer_norm1.bias", &L.ln1_b, Hv, 0);
    s.one(q + "self_attn.qkv_proj.weight", &L.qkv, 3 * Hv, Hv);
    s.one(q + "self_attn.qkv_proj.bias", &L.qkv_b, 3 * Hv, 0);
    s.one(q + "self_attn.out_proj.weight", &L.out, Hv, Hv);
    s.one(q + "self_attn.out_proj.bias", &L.out_b, Hv, 0);
    s.one(q + "layer_norm2.weight", &L.ln2_w, Hv, 0);
    s.one(q + "layer_norm2.bias", &L.ln2_b, Hv, 0);
    s.one(q + "mlp.fc1.weight", &L.fc1, I, Hv);
    s.one(q + "mlp.fc1.bias", &L.fc1_b, I, 0);
    s.one(q + "mlp.fc2.weight", &L.fc2, Hv, I);
    s.one(q + "mlp.fc2.bias", &L.fc2_b, Hv, 0);
  }
  s.one("multi_modal_projector.linear_1.weight", &W.proj1, H, Hv);
  s.one("multi_modal_projector.linear_1.bias", &W.proj1_b, H, 0);
  s.one("multi_modal_projector.linear_2.weight", &W.proj2, H, H);
  s.one("multi_modal_projector.linear_2.bias", &W.proj2_b, H, 0);
  s.one("patch_merge_mlp.linear_1.weight", &W.merge1, H, m2 * H);
  s.one("patch_merge_mlp.linear_1.bias", &W.merge1_b, H, 0);
  s.one("patch_merge_mlp.linear_2.weight", &W.merge2, H, H);
  s.one("patch_merge_mlp.linear_2.bias", &W.merge2_b, H, 0);
  return std::move(s.out);
}

}  // namespace m3
