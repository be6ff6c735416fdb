// Seeded weight generation, precision conversion and the checkpoint-name visitor (weights.h).
#include "reference/weights.h"

#include "reference/rng.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <thread>
#include <vector>

namespace m3 {

namespace {

std::string layer_prefix(int l) { return fmt::format("model.layers.{}.", l); }

// Fills m with scale * normal(seed, name, i), i the row-major element index.
// The generator is counter-based (element i depends on seed, name and i alone), so large tensors are
// filled by several threads over fixed ranges with the same bits as one thread: m3-layer's 9.9e9
// weights take minutes on one core.
template <class M>
void fill(M& m, std::uint64_t seed, const std::string& name, double scale) {
  const CounterRng rng(seed, name);
  float* const d = m.data();
  const auto n = static_cast<std::int64_t>(m.size());
  auto range = [&](std::int64_t lo, std::int64_t hi) {
    for (std::int64_t i = lo; i < hi; ++i) d[i] = static_cast<float>(scale * rng.normal(static_cast<std::uint64_t>(i)));
  };
  constexpr std::int64_t kPerThread = std::int64_t{1} << 22;  // below ~4M elements a thread costs more than it saves
  const auto threads = std::min<std::int64_t>(std::max(1u, std::thread::hardware_concurrency()), n / kPerThread);
  if (threads <= 1) return range(0, n);
  std::vector<std::jthread> pool;
  pool.reserve(static_cast<std::size_t>(threads));
  for (std::int64_t t = 0; t < threads; ++t) pool.emplace_back(range, n * t / threads, n * (t + 1) / threads);
}

MatF gen_mat(std::int64_t rows, std::int64_t cols, std::uint64_t seed, const std::string& name,
             double scale) {
  MatF m(rows, cols);
  fill(m, seed, name, scale);
  return m;
}
Vec<float> gen_vec(std::int64_t n, std::uint64_t seed, const std::string& name, double scale) {
  Vec<float> v(n);
  fill(v, seed, name, scale);
  return v;
}

// Norm weights w sit around the (1 + w) identity; 0.1 makes them matter without dominating.
constexpr double kNormScale = 0.1;
// Router bias: small against the O(0.2) spread of sigmoid scores, so it shifts some choices only.
constexpr double kBiasScale = 0.05;

ref::MlpWeights<float> gen_mlp(const std::string& p, const std::string& g, const std::string& u,
                               const std::string& d, int H, int I, std::uint64_t seed, double out_scale) {
  ref::MlpWeights<float> m;
  m.gate = gen_mat(I, H, seed, p + g, 1.0 / std::sqrt(H));
  m.up = gen_mat(I, H, seed, p + u, 1.0 / std::sqrt(H));
  m.down = gen_mat(H, I, seed, p + d, out_scale / std::sqrt(I));
  return m;
}

}  // namespace

std::uint64_t weights_param_count(const ModelConfig& c) {
  const std::uint64_t H = c.hidden_size, D = c.head_dim, Hq = c.num_attention_heads,
                      Hkv = c.num_key_value_heads, V = c.vocab_size;
  std::uint64_t n = 2 * V * H + H;  // embedding, LM head, final norm
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    n += 2 * H + (Hq * D) * H * 2 + 2 * (Hkv * D) * H + 2 * D;
    if (c.layer_types[l] == AttnType::MSA)
      n += std::uint64_t(c.index_n_heads) * c.index_head_dim * H + std::uint64_t(c.index_head_dim) * H +
           2 * std::uint64_t(c.index_head_dim);
    if (c.mlp_layer_types[l] == MlpType::DENSE) {
      n += 3 * H * c.dense_intermediate_size;
    } else {
      n += std::uint64_t(c.num_local_experts) * (H + 1);
      n += std::uint64_t(c.num_local_experts) * 3 * H * c.intermediate_size;
      n += std::uint64_t(c.n_shared_experts > 0) * 3 * H * c.shared_intermediate_size;
    }
  }
  return n;
}

namespace {

// A decoder layer of the given types under the name prefix p ("model.layers.{l}." or
// "mtp.layers.{i}."); out_scale multiplies the output projections.
LayerWeights<float> generate_layer_at(const ModelConfig& c, AttnType attn, MlpType mlp, const std::string& p,
                                      std::uint64_t seed, bool with_experts, double out_scale) {
  const int H = c.hidden_size, D = c.head_dim, Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;
  LayerWeights<float> w;
  w.attn_type = attn;
  w.mlp_type = mlp;
  w.input_layernorm = gen_vec(H, seed, p + "input_layernorm.weight", kNormScale);
  w.post_attention_layernorm = gen_vec(H, seed, p + "post_attention_layernorm.weight", kNormScale);
  auto& a = w.attn;
  a.q_proj = gen_mat(Hq * D, H, seed, p + "self_attn.q_proj.weight", 1.0 / std::sqrt(H));
  a.k_proj = gen_mat(Hkv * D, H, seed, p + "self_attn.k_proj.weight", 1.0 / std::sqrt(H));
  a.v_proj = gen_mat(Hkv * D, H, seed, p + "self_attn.v_proj.weight", 1.0 / std::sqrt(H));
  a.o_proj = gen_mat(H, Hq * D, seed, p + "self_attn.o_proj.weight", out_scale / std::sqrt(Hq * D));
  a.q_norm = gen_vec(D, seed, p + "self_attn.q_norm.weight", kNormScale);
  a.k_norm = gen_vec(D, seed, p + "self_attn.k_norm.weight", kNormScale);
  if (w.attn_type == AttnType::MSA) {
    const int Hi = c.index_n_heads, Di = c.index_head_dim;
    a.index_q_proj = gen_mat(Hi * Di, H, seed, p + "self_attn.index_q_proj.weight", 1.0 / std::sqrt(H));
    a.index_k_proj = gen_mat(Di, H, seed, p + "self_attn.index_k_proj.weight", 1.0 / std::sqrt(H));
    a.index_q_norm = gen_vec(Di, seed, p + "self_attn.index_q_norm.weight", kNormScale);
    a.index_k_norm = gen_vec(Di, seed, p + "self_attn.index_k_norm.weight", kNormScale);
  }
  if (w.mlp_type == MlpType::DENSE) {
    w.mlp = gen_mlp(p + "mlp.", "gate_proj.weight", "up_proj.weight", "down_proj.weight", H,
                    c.dense_intermediate_size, seed, out_scale);
  } else {
    const std::string m = p + "block_sparse_moe.";
    w.router = gen_mat(c.num_local_experts, H, seed, m + "gate.weight", 1.0 / std::sqrt(H));
    w.router_bias = gen_vec(c.num_local_experts, seed, m + "e_score_correction_bias", kBiasScale);
    if (!c.use_routing_bias) w.router_bias.setZero();
    if (with_experts) {
      w.experts.reserve(c.num_local_experts);
      for (int e = 0; e < c.num_local_experts; ++e)
        w.experts.push_back(gen_mlp(fmt::format("{}experts.{}.", m, e), "w1.weight", "w3.weight",
                                    "w2.weight", H, c.intermediate_size, seed, out_scale));
    }
    if (c.n_shared_experts > 0)
      w.shared = gen_mlp(m + "shared_experts.", "gate_proj.weight", "up_proj.weight", "down_proj.weight",
                         H, c.shared_intermediate_size, seed, out_scale);
  }
  return w;
}

}  // namespace

LayerWeights<float> generate_layer(const ModelConfig& c, int l, std::uint64_t seed, bool with_experts) {
  if (l < 0 || l >= c.num_hidden_layers)
    throw std::out_of_range(fmt::format("generate_layer: layer {} outside [0, {})", l, c.num_hidden_layers));
  // Output projections carry 1/sqrt(2 L): 2 L residual branches then add up to O(1) in total.
  return generate_layer_at(c, c.layer_types[l], c.mlp_layer_types[l], layer_prefix(l), seed, with_experts,
                           1.0 / std::sqrt(2.0 * c.num_hidden_layers));
}

ModelWeights<float> generate_mtp_module(const ModelConfig& cfg, int i, std::uint64_t seed,
                                        const ModelWeights<float>& main) {
  if (i < 0 || i >= cfg.num_mtp_modules)
    throw std::out_of_range(fmt::format("generate_mtp_module: module {} outside [0, {}) (num_mtp_modules of '{}')", i,
                                        cfg.num_mtp_modules, cfg.name));
  const int H = cfg.hidden_size, V = cfg.vocab_size;
  if (main.embed_tokens.rows() != V || main.embed_tokens.cols() != H || main.lm_head.rows() != V ||
      main.lm_head.cols() != H)
    throw std::invalid_argument(fmt::format(
        "generate_mtp_module: the main model's embed_tokens {}x{} and lm_head {}x{}, expected {}x{} ('{}')",
        main.embed_tokens.rows(), main.embed_tokens.cols(), main.lm_head.rows(), main.lm_head.cols(), V, H, cfg.name));
  const std::string p = fmt::format("mtp.layers.{}.", i);
  ModelWeights<float> w;
  w.embed_tokens = main.embed_tokens;
  w.lm_head = main.lm_head;
  // One residual pair: out_scale 1/sqrt(2), as a one-layer model's.
  w.layers.push_back(generate_layer_at(cfg, AttnType::MSA, MlpType::MOE, p, seed, true, 1.0 / std::sqrt(2.0)));
  w.norm = gen_vec(H, seed, p + "final_layernorm.weight", kNormScale);
  MtpInputWeights<float> m;
  m.enorm = gen_vec(H, seed, p + "enorm.weight", kNormScale);
  m.hnorm = gen_vec(H, seed, p + "hnorm.weight", kNormScale);
  m.eh_proj = gen_mat(H, 2 * H, seed, p + "eh_proj.weight", 1.0 / std::sqrt(2.0 * H));
  w.mtp_in = std::move(m);
  return w;
}

ModelWeights<float> generate_weights(const ModelConfig& c, std::uint64_t seed, std::uint64_t max_bytes) {
  c.validate();
  const std::uint64_t bytes = weights_param_count(c) * sizeof(float);
  if (bytes > max_bytes)
    throw ConfigError(fmt::format(
        "config '{}' needs {:.1f} GiB of fp32 weights, over the limit of {:.1f} GiB: generate single "
        "layers (generate_layer) or use a smaller preset",
        c.name, bytes / double(1ull << 30), max_bytes / double(1ull << 30)));
  ModelWeights<float> w;
  w.embed_tokens = gen_mat(c.vocab_size, c.hidden_size, seed, "model.embed_tokens.weight", 1.0);
  for (int l = 0; l < c.num_hidden_layers; ++l) w.layers.push_back(generate_layer(c, l, seed, true));
  w.norm = gen_vec(c.hidden_size, seed, "model.norm.weight", kNormScale);
  // LM head 1/sqrt(H) keeps logits O(1) over a normalized final state.
  w.lm_head = gen_mat(c.vocab_size, c.hidden_size, seed, "lm_head.weight", 1.0 / std::sqrt(c.hidden_size));
  return w;
}

namespace {

// The output projections of one decoder layer (residual branches) times s.
void shrink_branches(LayerWeights<float>& L, double s) {
  const auto f = static_cast<float>(s);
  L.attn.o_proj *= f;
  if (L.mlp.down.size()) L.mlp.down *= f;
  for (auto& e : L.experts) e.down *= f;
  if (L.shared.down.size()) L.shared.down *= f;
}

// Row v of the planted head: embedding row (v-1) mod V over sqrt(H) (weights.h says why).
MatF successor_head(const MatF& embed) {
  const Eigen::Index V = embed.rows();
  MatF head(V, embed.cols());  // [V, H]
  head.topRows(1) = embed.bottomRows(1);
  head.bottomRows(V - 1) = embed.topRows(V - 1);
  return head / std::sqrt(static_cast<float>(embed.cols()));
}

}  // namespace

void plant_successor(ModelWeights<float>& w) {
  if (w.mtp_in) throw std::invalid_argument("plant_successor: these are an MTP module's weights (plant_successor_module)");
  if (w.embed_tokens.rows() < 2 || w.lm_head.rows() != w.embed_tokens.rows() || w.lm_head.cols() != w.embed_tokens.cols())
    throw std::invalid_argument(fmt::format("plant_successor: embed_tokens {}x{} and lm_head {}x{}, expected both [V, H], V >= 2",
                                            w.embed_tokens.rows(), w.embed_tokens.cols(), w.lm_head.rows(), w.lm_head.cols()));
  for (auto& L : w.layers) shrink_branches(L, kPlantedOutScale);
  w.lm_head = successor_head(w.embed_tokens);
}

void plant_successor_module(ModelWeights<float>& w) {
  if (!w.mtp_in) throw std::invalid_argument("plant_successor_module: not an MTP module's weights (no eh_proj)");
  if (w.lm_head.rows() != w.embed_tokens.rows() || w.lm_head.cols() != w.embed_tokens.cols() ||
      w.lm_head != successor_head(w.embed_tokens))
    throw std::invalid_argument("plant_successor_module: the shared lm_head is not the planted one: plant_successor the main "
                                "model before generate_mtp_module");
  for (auto& L : w.layers) shrink_branches(L, kPlantedOutScale);
  MatF& p = w.mtp_in->eh_proj;  // [H, 2H]: [embedding half | hidden-state half]
  const Eigen::Index H = p.rows();
  p.leftCols(H).setIdentity();
  p.rightCols(H) *= static_cast<float>(kPlantedOutScale);
}

// ---------------------------------------------------------------------------------------------

namespace {

template <class To, class M>
auto convert(const M& m, bool to_bf16) {
  auto out = m.template cast<To>().eval();
  if (to_bf16) round_bf16_inplace(out);
  return out;
}

template <class To>
ref::MlpWeights<To> convert_mlp(const ref::MlpWeights<float>& m, bool b) {
  return {convert<To>(m.gate, b), convert<To>(m.up, b), convert<To>(m.down, b)};
}

}  // namespace

template <class To>
LayerWeights<To> convert_layer(const LayerWeights<float>& w, Precision p) {
  const bool b = p == Precision::BF16;
  LayerWeights<To> o;
  o.attn_type = w.attn_type;
  o.mlp_type = w.mlp_type;
  o.input_layernorm = convert<To>(w.input_layernorm, b);
  o.post_attention_layernorm = convert<To>(w.post_attention_layernorm, b);
  const auto& a = w.attn;
  o.attn = {convert<To>(a.q_proj, b),       convert<To>(a.k_proj, b),       convert<To>(a.v_proj, b),
            convert<To>(a.o_proj, b),       convert<To>(a.q_norm, b),       convert<To>(a.k_norm, b),
            convert<To>(a.index_q_proj, b), convert<To>(a.index_k_proj, b), convert<To>(a.index_q_norm, b),
            convert<To>(a.index_k_norm, b)};
  o.mlp = convert_mlp<To>(w.mlp, b);
  // The router stays fp32 on the GPU path and in the checkpoint (spec §1.1 "router precision").
  o.router = convert<To>(w.router, false);
  o.router_bias = convert<To>(w.router_bias, false);
  for (const auto& e : w.experts) o.experts.push_back(convert_mlp<To>(e, b));
  o.shared = convert_mlp<To>(w.shared, b);
  return o;
}

template <class To>
ModelWeights<To> convert_weights(const ModelWeights<float>& w, Precision p) {
  const bool b = p == Precision::BF16;
  ModelWeights<To> o;
  o.embed_tokens = convert<To>(w.embed_tokens, b);
  for (const auto& l : w.layers) o.layers.push_back(convert_layer<To>(l, p));
  o.norm = convert<To>(w.norm, b);
  o.lm_head = convert<To>(w.lm_head, b);
  if (w.mtp_in)
    o.mtp_in = MtpInputWeights<To>{convert<To>(w.mtp_in->enorm, b), convert<To>(w.mtp_in->hnorm, b),
                                   convert<To>(w.mtp_in->eh_proj, b)};
  return o;
}

template LayerWeights<float> convert_layer<float>(const LayerWeights<float>&, Precision);
template LayerWeights<double> convert_layer<double>(const LayerWeights<float>&, Precision);
template ModelWeights<float> convert_weights<float>(const ModelWeights<float>&, Precision);
template ModelWeights<double> convert_weights<double>(const ModelWeights<float>&, Precision);

void for_each_tensor(ModelWeights<float>& w, const TensorVisitor& fn) {
  auto mat = [&](const std::string& n, MatF& m) { fn(n, m.data(), m.rows(), m.cols()); };
  auto vec = [&](const std::string& n, Vec<float>& v) { if (v.size()) fn(n, v.data(), v.size(), 1); };
  auto mlp = [&](const std::string& p, ref::MlpWeights<float>& m, const char* g, const char* u, const char* d) {
    if (m.gate.size() == 0) return;
    mat(p + g, m.gate);
    mat(p + u, m.up);
    mat(p + d, m.down);
  };
  mat("model.embed_tokens.weight", w.embed_tokens);
  for (std::size_t l = 0; l < w.layers.size(); ++l) {
    auto& L = w.layers[l];
    const std::string p = layer_prefix(static_cast<int>(l));
    vec(p + "input_layernorm.weight", L.input_layernorm);
    vec(p + "post_attention_layernorm.weight", L.post_attention_layernorm);
    mat(p + "self_attn.q_proj.weight", L.attn.q_proj);
    mat(p + "self_attn.k_proj.weight", L.attn.k_proj);
    mat(p + "self_attn.v_proj.weight", L.attn.v_proj);
    mat(p + "self_attn.o_proj.weight", L.attn.o_proj);
    vec(p + "self_attn.q_norm.weight", L.attn.q_norm);
    vec(p + "self_attn.k_norm.weight", L.attn.k_norm);
    if (L.attn_type == AttnType::MSA) {
      mat(p + "self_attn.index_q_proj.weight", L.attn.index_q_proj);
      mat(p + "self_attn.index_k_proj.weight", L.attn.index_k_proj);
      vec(p + "self_attn.index_q_norm.weight", L.attn.index_q_norm);
      vec(p + "self_attn.index_k_norm.weight", L.attn.index_k_norm);
    }
    if (L.mlp_type == MlpType::DENSE) {
      mlp(p + "mlp.", L.mlp, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
    } else {
      const std::string m = p + "block_sparse_moe.";
      mat(m + "gate.weight", L.router);
      vec(m + "e_score_correction_bias", L.router_bias);
      for (std::size_t e = 0; e < L.experts.size(); ++e)
        mlp(fmt::format("{}experts.{}.", m, e), L.experts[e], "w1.weight", "w3.weight", "w2.weight");
      mlp(m + "shared_experts.", L.shared, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
    }
  }
  vec("model.norm.weight", w.norm);
  mat("lm_head.weight", w.lm_head);
}

}  // namespace m3
