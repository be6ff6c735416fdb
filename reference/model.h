// The reference forward pass of the text model (spec §2.1): prefill and step-by-step decode over
// KV and index-K caches, batches of sequences of different lengths, a trace of every intermediate
// under its DESIGN §1 name, in the three precisions of DESIGN §3.
//
//   m3::Model model(cfg, m3::generate_weights(cfg, seed), m3::Precision::FP32);
//   m3::Sequence seq = model.new_sequence();
//   m3::MatD logits = model.prefill(seq, tokens);          // [T, V]
//   m3::MatD next = model.decode(seq, greedy(logits));     // [1, V]
#pragma once

#include "reference/config.h"
#include "reference/dims.h"
#include "reference/tensor.h"
#include "reference/weights.h"

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace m3 {

// A view of one traced tensor: rows x cols, row-major with `row_stride` elements between rows.
struct TraceView {
  enum class DType { F32, F64, I32 };
  DType dtype = DType::F32;
  const void* data = nullptr;
  std::int64_t rows = 0, cols = 0, row_stride = 0;
  double at(std::int64_t r, std::int64_t c) const;  // any dtype, widened to double
};

// Called once per traced tensor per sequence, in forward order. Names (DESIGN §1):
//   blk.{l}.attn_norm [T, H]    blk.{l}.q [T, Hq*D]    blk.{l}.k, blk.{l}.v [T, Hkv*D]
//   (q and k after QK-norm + RoPE, as cached)
//   MSA layers: blk.{l}.idx_q [T, Hi*Di], blk.{l}.idx_k [T, Di] (after norm + RoPE),
//               blk.{l}.block_scores [Hi*T, NB] (-inf past a query's block),
//               blk.{l}.selection [Hi*T, K_blk] int32 (-1 padded)
//   blk.{l}.attn_out [T, Hq*D] (before o_proj)   blk.{l}.ffn_norm [T, H]
//   dense-MLP layers: blk.{l}.mlp_out [T, H]
//   MoE layers: blk.{l}.router_logits [T, E], blk.{l}.experts [T, K_e] int32,
//               blk.{l}.expert_weights [T, K_e], blk.{l}.moe_out [T, H]
//   blk.{l}.out [T, H] (the residual stream after the layer)     logits [T, V]
// `seq` is the index of the sequence within the forward call.
using TraceFn = std::function<void(int seq, const std::string& name, const TraceView& t)>;

// Attention work the reference executed, kept apart for dense and MSA layers.
struct ForwardStats {
  AttnCounter dense;  // dense-attention layers
  AttnCounter msa;    // MSA layers
};

class Model;

// One sequence's caches (KV for every layer, index-K for MSA layers) and its length. Created by
// Model::new_sequence, movable, tied to the model (and precision) that made it.
class Sequence {
 public:
  Sequence();
  ~Sequence();
  Sequence(Sequence&&) noexcept;
  Sequence& operator=(Sequence&&) noexcept;
  std::int64_t length() const;  // tokens already in the caches = position of the next token
  // Forgets the tokens past the first n (rejected draft tokens); std::out_of_range unless
  // 0 <= n <= length().
  void truncate(std::int64_t n);

 private:
  friend class Model;
  struct State;
  std::unique_ptr<State> s_;
};

// Storage options the GPU path has and the bf16-emulating reference can mirror.
struct ReferenceOptions {
  // The index-K cache in fp8 E4M3 (gpu::ModelOptions::fp8_index_cache): each cached index key is
  // rounded with round_e4m3 as it enters the cache (the traced idx_k stays bf16). BF16 only.
  bool fp8_index_cache = false;
};

class Model {
 public:
  // Validates cfg and the weights' shapes against it; converts weights to the precision's storage.
  // Throws std::invalid_argument for opt.fp8_index_cache outside BF16 (the fp32 and fp64 modes
  // are the exact model).
  Model(ModelConfig cfg, const ModelWeights<float>& weights, Precision precision, ReferenceOptions opt = {});
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;

  const ModelConfig& config() const;
  Precision precision() const;
  // True for an MTP module's model (weights with mtp_in): forward needs previous hidden states.
  bool takes_hidden_states() const;
  // The final norm of this model applied to hidden states h [T, H] (hidden_out rows), in the
  // model's precision (bf16: the result rounded to bf16): what the LM head reads.
  MatD final_norm(const MatD& h) const;

  Sequence new_sequence() const;

  // Appends tokens[s] to seqs[s] for every s (lengths may differ, any may be 1) and returns each
  // sequence's logits [T_s, V] (fp64 storage whatever the precision; widening is exact).
  // Throws std::out_of_range for a token outside [0, V) or a position past
  // max_position_embeddings, before any cache is changed.
  std::vector<MatD> forward(std::span<Sequence* const> seqs,
                            std::span<const std::span<const std::int32_t>> tokens,
                            const TraceFn& trace = {});
  // The same, with
  //   h_in: an MTP module's model (weights with mtp_in, generate_mtp_module) needs, per sequence,
  //         the previous hidden states [T_s, H] (the main model's, or the previous draft step's), and
  //         tokens[s] are the NEXT tokens (position p takes token p+1); other models take none.
  //         Traces mtp.enorm, mtp.hnorm, mtp.x [T, H] before the layer.
  //   hidden_out (optional): per sequence, the residual stream after the last layer [T_s, H] (before
  //         the final norm): what an MTP module takes as h_prev.
  // Throws std::invalid_argument for h_in given to a model without MTP input, missing for one with
  // it, or of the wrong shape, before any cache is changed.
  std::vector<MatD> forward(std::span<Sequence* const> seqs,
                            std::span<const std::span<const std::int32_t>> tokens, const TraceFn& trace,
                            std::span<const MatD* const> h_in, std::vector<MatD>* hidden_out);

  MatD prefill(Sequence& seq, std::span<const std::int32_t> tokens, const TraceFn& trace = {});
  // A prefill from input rows x [T, H] instead of the token embeddings: a prompt with image features
  // placed at its image-placeholder tokens (vision.h place_image_features). `tokens` (the same T ids)
  // are validated as in forward. Not for an MTP module's model.
  MatD prefill_embeds(Sequence& seq, std::span<const std::int32_t> tokens, const MatD& x, const TraceFn& trace = {});
  MatD decode(Sequence& seq, std::int32_t token, const TraceFn& trace = {});

  // Attention work since construction or the last reset_stats().
  const ForwardStats& stats() const;
  void reset_stats();

 private:
  std::vector<MatD> forward_impl(std::span<Sequence* const> seqs, std::span<const std::span<const std::int32_t>> tokens,
                                 const TraceFn& trace, std::span<const MatD* const> h_in, std::vector<MatD>* hidden_out,
                                 std::span<const MatD* const> x_in);
  struct Impl;
  std::unique_ptr<Impl> p_;
};

// Index of the largest logit of row r; ties go to the lowest token id, NaN never wins.
std::int32_t greedy_token(const MatD& logits, Eigen::Index r);

// Prefill `prompt`, then `steps` greedy decode steps. Returns the generated tokens; `logits_out`
// (optional) receives the prefill logits followed by one row per decode step.
std::vector<std::int32_t> generate_greedy(Model& model, std::span<const std::int32_t> prompt, int steps,
                                          MatD* logits_out = nullptr, const TraceFn& trace = {});

}  // namespace m3
