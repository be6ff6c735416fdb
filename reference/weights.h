// Model weights for every layer type (spec §1, Appendix A.1 names), filled by the seeded counter
// generator of rng.h or (later) by a checkpoint importer.
//
// Tensor i of name N holds  scale(N) * normal(seed, N, i)  in row-major order: the same bits on
// every machine, and any one tensor can be regenerated alone. Scales keep activations O(1) through
// many layers: projections 1/sqrt(fan_in); output projections (o_proj, down) also 1/sqrt(2 L) so the
// residual stream does not grow with depth; norm weights w ~ 0.1 N(0,1) around the (1 + w) identity.
#pragma once

#include "reference/config.h"
#include "reference/ops/moe_experts.h"
#include "reference/tensor.h"

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace m3 {

template <class T>
struct AttentionWeights {
  Mat<T> q_proj;  // [Hq*D, H]
  Mat<T> k_proj;  // [Hkv*D, H]
  Mat<T> v_proj;  // [Hkv*D, H]
  Mat<T> o_proj;  // [H, Hq*D]
  Vec<T> q_norm;  // [D]
  Vec<T> k_norm;  // [D]
  // MSA layers only (empty on dense-attention layers)
  Mat<T> index_q_proj;  // [Hi*Di, H]
  Mat<T> index_k_proj;  // [Di, H]
  Vec<T> index_q_norm;  // [Di]
  Vec<T> index_k_norm;  // [Di]
};

template <class T>
struct LayerWeights {
  AttnType attn_type = AttnType::DENSE;
  MlpType mlp_type = MlpType::DENSE;
  Vec<T> input_layernorm;           // [H]
  Vec<T> post_attention_layernorm;  // [H]
  AttentionWeights<T> attn;
  ref::MlpWeights<T> mlp;                  // dense-MLP layers: gate, up [I_d, H], down [H, I_d]
  Mat<T> router;                           // MoE layers: [E, H] (fp32 in the checkpoint)
  Vec<T> router_bias;                      // [E] e_score_correction_bias
  std::vector<ref::MlpWeights<T>> experts; // [E] x {gate, up [I, H], down [H, I]}
  ref::MlpWeights<T> shared;               // gate, up [I_s, H], down [H, I_s]
};

// The input of an MTP module (spec §7): x = eh_proj([enorm(Embed(next token)) ; hnorm(h_prev)]),
// the embedding half first; the embedding is zeroed at position 0.
template <class T>
struct MtpInputWeights {
  Vec<T> enorm;    // [H] Gemma RMSNorm of the next token's embedding
  Vec<T> hnorm;    // [H] Gemma RMSNorm of the previous hidden state
  Mat<T> eh_proj;  // [H, 2H]
};

template <class T>
struct ModelWeights {
  Mat<T> embed_tokens;  // [V, H]
  std::vector<LayerWeights<T>> layers;
  Vec<T> norm;          // [H] final norm
  Mat<T> lm_head;       // [V, H]
  // Set on an MTP module's one-layer model only (generate_mtp_module): its forward starts from
  // eh_proj of the next token's embedding and the previous hidden state instead of the embedding.
  std::optional<MtpInputWeights<T>> mtp_in;
};

// Parameters the config implies (text backbone, no MTP / vision).
std::uint64_t weights_param_count(const ModelConfig& cfg);

// Generates every tensor. Throws ConfigError when the weights would need more than `max_bytes`
// (in fp32), naming the need: the `m3` preset is for cost models, never instantiated whole.
ModelWeights<float> generate_weights(const ModelConfig& cfg, std::uint64_t seed,
                                     std::uint64_t max_bytes = std::uint64_t{8} << 30);

// One layer alone (the same bits it has inside generate_weights); `with_experts` = false skips the
// routed experts (attention-only work at real dimensions, where 128 experts need 29 GB).
LayerWeights<float> generate_layer(const ModelConfig& cfg, int layer, std::uint64_t seed,
                                   bool with_experts = true);

// MTP module i of cfg (0 <= i < cfg.num_mtp_modules) as the weights of a mtp_module_config(cfg)
// model: its layer, enorm, hnorm, eh_proj and final norm generated under the names
// mtp.layers.{i}.* (the decoder layer's tensors as a main layer's; final_layernorm.weight: our
// reading of spec §7, not yet checked against a released checkpoint), the embedding and LM head
// copied from `main` (shared with the main model). Throws std::out_of_range for i out of range,
// std::invalid_argument when main's shapes are not cfg's.
ModelWeights<float> generate_mtp_module(const ModelConfig& cfg, int i, std::uint64_t seed,
                                        const ModelWeights<float>& main);

// Planted weights: a main model whose greedy next token is the successor of its input token
// (t -> t+1 mod V) and MTP modules that draft that successor, so drafts are accepted at a high
// rate. Seeded modules were never trained and accept ~0 drafts on every engine, which leaves
// "the reference's check accepts the GPU's drafts as often as its own" at a vacuous 0 = 0
// (m3h compare --mtp K --mtp-weights planted uses these). The construction, on seeded weights:
//   - every decoder layer's output projections (o_proj, the MLP's, every expert's and the shared
//     expert's down projection) times kPlantedOutScale: the residual stream stays close to the
//     token's embedding, while attention, MSA selection and the MoE still run on real values and
//     still move it (so a wrong kernel can still change a token);
//   - lm_head row v = embed_tokens row (v-1) mod V, over sqrt(H): logit v is the (final-normed)
//     state's dot with the embedding of v-1, which for random N(0,1) embeddings is ~sqrt(H) for
//     the input token itself against cross terms ~N(0,1) (a max over V of ~sqrt(2 ln V)): the
//     argmax is the input token's successor (tiny: 8 against ~3.5, small: 22.6 against ~4.1);
//   - an MTP module's eh_proj = [I | kPlantedOutScale * seeded]: x is the next token's normed
//     embedding (the embedding half comes first, spec §7) plus a little of the previous hidden
//     state (so that path is live), its layer shrunk as the main model's, and the shared head then
//     predicts (next token)+1: the token after the main model's next one, the right draft.
// The final norm and the enorm / hnorm weights stay seeded: their (1 + w) factors only perturb the
// dot products by ~10% (kNormScale). Acceptance measured on tiny and small: tests/test_mtp.cpp.
// kPlantedOutScale: a tenth of the seeded scale moves the residual stream by ~10% of the embedding
// (rel-L2 0.107 tiny, 0.090 small after all layers), far from the successor margin (drafts and
// greedy tokens measured right 100% of the time at 0.1 and at 0.3; tiny unshrunk still 94%) and
// yet ~40x bf16's rounding of the stream (2^-8 / sqrt(3) = 2.3e-3), so the layers still matter in
// the bf16 paths; at 1e-2 a branch (~3.5e-3 of the stream) would move an element by under one ulp.
inline constexpr double kPlantedOutScale = 0.1;
// In place on generate_weights' output; the embedding is kept.
void plant_successor(ModelWeights<float>& main);
// In place on generate_mtp_module's output for a main model that plant_successor made (its shared
// lm_head is checked: std::invalid_argument otherwise, or when w is not an MTP module's weights).
void plant_successor_module(ModelWeights<float>& module);

// Converts to the storage of a precision: FP64 widens exactly; BF16 rounds every tensor to bf16
// except the router and its bias, which the checkpoint and the GPU path keep in fp32.
template <class To>
ModelWeights<To> convert_weights(const ModelWeights<float>& w, Precision p);
template <class To>
LayerWeights<To> convert_layer(const LayerWeights<float>& w, Precision p);

// Visits every tensor under its official checkpoint name (spec Appendix A.1, prefix "model."),
// as a row-major view of rows x cols (vectors are rows x 1).
using TensorVisitor = std::function<void(const std::string& name, float* data, std::int64_t rows,
                                         std::int64_t cols)>;
void for_each_tensor(ModelWeights<float>& w, const TensorVisitor& fn);

}  // namespace m3
