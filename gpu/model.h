// The GPU forward pass of the text model (spec §2.1), twin of m3::Model (reference/model.h):
// prefill and step-by-step decode over paged KV and index-K caches, batches of sequences of
// different lengths, and a trace of every intermediate under the same DESIGN §1 names, delivered
// through the reference's own TraceFn / TraceView types (host copies, bf16 widened to fp32), so
// that one comparison code path reads both engines.
//
//   m3::gpu::Model model(cfg, m3::generate_weights(cfg, seed));
//   m3::gpu::Sequence seq = model.new_sequence();
//   m3::MatD logits = model.prefill(seq, tokens);          // [T, V]
//   m3::MatD next = model.decode(seq, greedy(logits));     // [1, V]
//
// Numerics (DESIGN §3): bf16 weights, activations and caches; fp32 accumulation, softmax and
// router (its weights stay fp32, as in the checkpoint); fp32 logits. Projections of a layer run as
// one cuBLAS GEMM against the stacked [q; k; v; idx_q; idx_k] weights over all tokens of all
// sequences; attention runs per sequence over its own pages (a decode step of several sequences is
// one batched launch per kernel).
//
// Caches: every layer's K, V (and on MSA layers index-K, bf16 or fp8 E4M3) live in pages of
// kPageRows = 128 tokens drawn from one pool planned up front (max_batch sequences at
// max_context tokens); a sequence owns a list of page ids, the same ids in every layer; pages
// return to the pool when the Sequence is destroyed. Memory is planned before any allocation
// (plan()), and a plan that does not fit the device fails with needed vs free bytes.
//
// The GPU path includes reference/config.h, weights.h (the weights it uploads) and model.h (the
// trace vocabulary): data types only; it never calls a reference op.
#pragma once

#include "gpu/runtime/memory_plan.h"
#include "reference/config.h"
#include "reference/model.h"
#include "reference/weights.h"

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace m3::gpu {

struct ModelOptions {
  int max_batch = 4;               // sequences alive at once (the page pool holds this many full ones)
  std::int64_t max_context = 0;    // tokens a sequence may hold; 0 = min(max_position_embeddings, 16384)
  std::int64_t max_tokens = 4096;  // tokens one forward call carries (activation buffers); prefill() chunks longer prompts
  bool fp8_index_cache = false;    // index-K cache in fp8 E4M3 (half the decode index read)
  // Each forward call returns and traces only each sequence's last logits row ([1, V]), and
  // prefill() its prompt's last row: long prompts at a real vocabulary, where [T, V] does not fit
  // on the host (32K x 200064 in fp64 is 51 GB). The LM head still runs on every row.
  bool last_logits_only = false;
  int device = 0;
};

// Wall time of the last forward call on the GPU (CUDA events around the whole call).
struct ForwardTiming {
  double ms = 0;
  std::int64_t tokens = 0;
};

class Model;

// One sequence's pages and length. Made by Model::new_sequence; movable; returns its pages to the
// model's pool when destroyed (the model must outlive its sequences).
class Sequence {
 public:
  Sequence();
  ~Sequence();
  Sequence(Sequence&&) noexcept;
  Sequence& operator=(Sequence&&) noexcept;
  std::int64_t length() const;
  // As m3::Sequence::truncate: forget positions n .. length()-1 (0 <= n <= length(), else
  // std::out_of_range); pages past the first ceil(n/128) return to the pool.
  void truncate(std::int64_t n);

 private:
  friend class Model;
  struct State;
  std::unique_ptr<State> s_;
};

class Model {
 public:
  // Validates cfg and the weights against it, plans memory (throws GpuError when it cannot fit),
  // uploads the weights. Throws std::invalid_argument for configurations the GPU kernels do not
  // cover (the message names the field and the supported values).
  Model(ModelConfig cfg, const ModelWeights<float>& weights, ModelOptions opt = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const;
  const ModelOptions& options() const;
  const MemoryPlan& plan() const;

  Sequence new_sequence();

  // As m3::Model::forward: appends tokens[s] to seqs[s] and returns each sequence's logits
  // [T_s, V] (fp32 values widened). Validates every sequence, token id, position and the page
  // pool before touching a cache. At most options().max_tokens tokens in all.
  // Repeatable bit for bit for the same calls, but not batch-invariant: a row's bits may depend on
  // the other rows of its call (an expert GEMM's size, an attention split plan, whether the MSA
  // selection and attention fuse), so a prompt taken in one call and in two may differ in the last
  // bits, and through a later near-tie (a routing or selection flip) by more (test_mtp saw 0.01 in
  // the logits of a 150-token call against a 100-token one, 2026-11-30). Compare such runs within
  // the tolerance policy, not bit for bit.
  std::vector<MatD> forward(std::span<Sequence* const> seqs,
                            std::span<const std::span<const std::int32_t>> tokens, const TraceFn& trace = {});
  // As m3::Model::forward with MTP inputs and outputs:
  //   h_in: an MTP module's model (weights with mtp_in) needs, per sequence, the previous hidden
  //         states [T_s, H]; x = eh_proj([enorm(Embed(token), zeroed at position 0) ; hnorm(h_in)])
  //         replaces the embedding gather (traced as mtp.enorm, mtp.hnorm, mtp.x). Rounded to bf16.
  //   hidden_out (optional): per sequence, the residual stream after the last layer [T_s, H].
  // Throws std::invalid_argument for h_in given to a model without MTP input, missing or of the
  // wrong shape for one with it, or holding NaN / Inf.
  std::vector<MatD> forward(std::span<Sequence* const> seqs, std::span<const std::span<const std::int32_t>> tokens,
                            const TraceFn& trace, std::span<const MatD* const> h_in, std::vector<MatD>* hidden_out);
  // Whether this is an MTP module's model (its forward takes h_in).
  bool takes_hidden_states() const;
  // This model's final norm applied to hidden states h [T, H] (hidden_out rows) on the GPU, bf16
  // in and out (widened): the h_prev the MTP modules take from the main model.
  MatD final_norm(const MatD& h) const;

  // One sequence; prompts longer than max_tokens run in chunks of max_tokens (the trace then
  // receives each name once per chunk, rows in order).
  MatD prefill(Sequence& seq, std::span<const std::int32_t> tokens, const TraceFn& trace = {});
  MatD decode(Sequence& seq, std::int32_t token, const TraceFn& trace = {});
  // As m3::Model::prefill_embeds: one sequence from input rows x [T, H] (rounded to bf16 as the
  // embedding table is) instead of the embedding gather, e.g. image features placed before a
  // prompt (reference/vision.h). T <= max_tokens (no chunking); `tokens` are validated as in forward.
  MatD prefill_embeds(Sequence& seq, std::span<const std::int32_t> tokens, const MatD& x, const TraceFn& trace = {});

  const ForwardTiming& last_timing() const;

 private:
  std::vector<MatD> forward_impl(std::span<Sequence* const> seqs, std::span<const std::span<const std::int32_t>> tokens,
                                 const TraceFn& trace, const MatD* x_in, std::span<const MatD* const> h_in = {},
                                 std::vector<MatD>* hidden_out = nullptr);
  struct Impl;
  std::unique_ptr<Impl> p_;
  // The checks forward() makes of sequence s appending `tokens` (who names the caller in the
  // messages); returns the cache pages it needs beyond those it holds.
  std::int64_t check_append(const Sequence* seq, std::span<const std::int32_t> tokens, int s, const char* who) const;
};

// Prefill `prompt`, then `steps` greedy decode steps (m3::greedy_token's tie rule). As
// m3::generate_greedy: returns the generated tokens, optionally all logits rows.
std::vector<std::int32_t> generate_greedy(Model& model, std::span<const std::int32_t> prompt, int steps,
                                          MatD* logits_out = nullptr, const TraceFn& trace = {});

}  // namespace m3::gpu
