// Model-level agreement (DESIGN §4), behind `m3h compare` and the GPU end-to-end tests: the same
// weights and prompt through three engines — the engine under test (the GPU), the bf16-emulating
// reference (the gate) and the fp64 reference (the truth) — then
//   per op and per layer (the prefill trace, DESIGN §1 names): rel-L2 and max abs error with its
//     coordinates against the bf16 reference, and both engines' rel-L2 against fp64;
//   index outputs (MSA selection, MoE experts): exact-match rate, Jaccard, near-tie rows;
//   end to end: logits rel-L2, top-1 agreement, KL(ref || test) of the next-token distribution, and
//     greedy decode: every engine is fed the bf16 reference's greedy tokens (teacher forcing, so the
//     logits rows stay comparable), and the test engine's own greedy choice at each step must equal
//     the reference's.
//
// The gate for a float tensor, deep inside a model where both engines' inputs already differ:
//   rel-L2(test, bf16 ref) <= kBf16.rel_l2                        (it matches the emulation), or
//   err(test vs fp64) <= kAttnErrFactor * err(bf16 ref vs fp64) + kAttnFloor
//                                              (it is no further from the truth than twice the emulation);
// non-finite values (the -inf of invisible blocks) must sit at the same places. An index row or a
// greedy / top-1 choice that differs passes only as a near-tie: the reference's deciding scores of
// the two choices are within the noise measured between the engines on that row (for logits: within
// 4 sigma of a two-logit gap's noise, sqrt(2) times the spread of the engines' per-logit difference
// over the row's other tokens; model_compare.cpp argmax_near_tie). Top-1 over all
// rows has one more way to pass, the 2x-truth rule applied to counts: the test engine's argmax
// differs from the fp64 truth's on at most kAttnErrFactor times as many rows as the bf16
// reference's does (a tiny model at 4K tokens flips a few rows beyond 4 sigma of the row noise
// when an MSA selection near-tie moves a whole row; 1 of 4096 on an H200, 2026-11-29). An index row
// (selection, experts) may also differ because its scores did: deep in a model the engines' inputs
// drift apart (tiny's 16-wide index heads: block scores differ by several percent at layer 3), so
// such a row passes when it is exactly what the op's rule (msa_select; the router's top-k) picks
// from the engine's own traced scores, which are themselves gated as floats. When MoE experts flip
// so (a token's whole row then moves legitimately), every token-row tensor from then on, logits,
// top-1 and greedy leave the token out, and at every MoE layer from then on its moe_out row is
// checked instead against the reference op re-run on the engine's own input with its experts and
// weights (rel-L2 <= kBf16.rel_l2 over those rows; non-finite values fail) (rows_rerun / rows_excluded /
// rows_flipped say how many). An accepted MSA selection flip is treated the same way: the token's
// attn_out row is re-run on the engine's q, k, v with its selection, and the token is left out from
// then on.
//
// The own-inputs rule: a flipped token contaminates other tokens. From the layer after its flip on,
// its keys, values and index key differ legitimately, and every later token attends them (and
// scores its block), so later tokens' attn_out and block_scores rows move too (33 of 303 tokens
// flipped behind an image on an H200 put blk.2-3 attn_out and blk.3 block_scores at 1.1-1.2x the
// 2x-truth bound, 2026-11-29). So a layer's attn_out [T, Hq*D] or block_scores [Hi*T, NB]
// that fails the gate above, where some compared row follows a token flipped at an earlier layer,
// is checked instead in whole: every row against the reference op re-run on the engine's own
// traced inputs (q, k, v and its selection; idx_q and idx_k, through an E4M3 cache where the engine
// has one), at the op's own tier of compare/tolerance.h (bf16 for attention, fp32 for scores;
// rel-L2, elementwise and non-finite places, as the sampled mode checks rows, model_sampled.h).
// rule "own-inputs" and rows_own_inputs say it applied; a failing re-run adds its lines and keeps
// the gate's. It never applies to a tensor without such a flip (a blanket fallback would forgive
// any drift of the inputs), nor at the flip's own layer (its keys are not changed there), nor where
// no compared row follows the first flip (causal attention: nothing earlier can see it), nor to a
// non-finite mismatch (its own failure line stays).
// Why it is sound: it certifies the op, not its inputs. A wrong attention or index kernel differs
// from the reference op on the same inputs and fails at the op's tier, which is tighter than the
// gate; the inputs are gated as their own tensors (q, k, v, idx_q, idx_k, the selection against
// the engine's own scores), so a defect upstream still fails upstream. What it forgives is exactly
// the difference the engine's inputs make, which in a run with flips is the contamination above.
// What stays unchecked is what the flip rule already leaves out: the flipped tokens' own rows of
// the inputs (their k, v, idx_k at later layers).
#pragma once

#include "compare/metrics.h"
#include "reference/config.h"
#include "reference/model.h"
#include "reference/tensor.h"
#include "reference/weights.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace m3::cmp {

// One engine's run: the prefill trace of sequence 0 (ids stored as floats), logits of the prompt
// then one row per decode step, and the greedy choices it made (argmax of its own rows).
struct EngineRun {
  std::string engine;                  // "gpu", "ref-bf16", "ref-fp64", ...
  std::map<std::string, MatF> trace;   // name -> [rows, cols]
  std::vector<std::string> order;      // trace names in the order the forward emitted them
  MatD logits;                         // [T + K, V]
  std::vector<std::int32_t> fed;       // the K decode inputs it was given
  std::vector<std::int32_t> greedy;    // [K] its own argmax at rows T-1 .. T+K-2
  bool fp8_index_cache = false;        // it scored blocks against an E4M3 index-K cache (its traced
                                       // idx_k stays bf16): the own-inputs rule rounds the same way
  double prefill_ms = 0, decode_ms = 0;
};

struct TensorCheck {
  std::string name;
  int layer = -1;                 // -1: not a layer's (logits)
  bool is_index = false;
  FloatMetrics vs_ref;            // test vs bf16 reference
  double err_test = 0;            // rel-L2 test vs fp64
  double err_ref = 0;             // rel-L2 bf16 reference vs fp64
  double bound = 0;               // kAttnErrFactor * err_ref + kAttnFloor
  std::string rule;               // which rule passed: "emulation", "2x-truth", "own-inputs", or "" (failed)
  IndexMetrics ix;                // index outputs
  double tie_rtol = 0;            // the near-tie threshold used
  std::int64_t rows_own_scores = 0;  // differing rows that are exactly the choice of the op's rule
                                     // on the engine's own (gated) scores: its inputs drifted, the
                                     // selection itself is right
  std::int64_t rows_unexplained = 0; // differing rows neither a near-tie nor its own scores' choice
  std::int64_t rows_rerun = 0;       // moe_out: rows of flipped tokens checked against the reference
                                     // op re-run on the engine's input with its expert choice
  std::int64_t rows_excluded = 0;    // rows of tokens whose experts flipped at this or an earlier
                                     // layer, left out of this check
  std::int64_t rows_own_inputs = 0;  // attn_out / block_scores: rows checked against the reference op
                                     // re-run on the engine's own traced inputs (the own-inputs rule)
  std::vector<std::string> failures;
  bool pass() const { return failures.empty(); }
};

struct EndToEnd {
  std::int64_t rows = 0;                  // logits rows compared (T + K, less the flipped tokens)
  std::int64_t rows_flipped = 0;          // tokens left out: their experts flipped acceptably somewhere
  double logits_rel_l2 = 0;               // test vs bf16 reference
  double logits_err_test = 0, logits_err_ref = 0;  // each vs fp64
  double top1_agree = 0;                  // fraction of rows with the same argmax
  std::int64_t top1_differ = 0, top1_near_tie = 0;
  // Rows whose argmax differs from the fp64 truth's: the test engine's and the bf16 reference's.
  std::int64_t top1_truth_differ_test = 0, top1_truth_differ_ref = 0;
  double kl_mean = 0, kl_max = 0;         // KL(bf16 ref || test) per row, nats
  std::int64_t kl_max_row = 0;
  int decode_steps = 0;
  int greedy_agree = 0;                   // steps where the test engine's choice = the reference's
  int greedy_near_tie = 0;                // differing steps explained as near-ties
  int greedy_flipped = 0;                 // differing steps at a flipped token's row
  int first_divergence = -1;              // first differing step, -1 = none
  int truth_greedy_agree = 0;             // the fp64 reference's own choices vs the bf16 reference's
};

struct ModelComparison {
  std::vector<TensorCheck> tensors;  // forward order, layer by layer
  EndToEnd e2e;
  std::vector<std::string> failures;  // end-to-end failures (tensor failures are in tensors)
  bool pass() const;
};

// Compares `test` with the bf16 reference `ref` and the fp64 truth `truth` (all three made with the
// same weights, prompt of T tokens and decode inputs). `weights` supplies the router bias (the
// experts' deciding scores). Throws std::invalid_argument when the runs do not line up.
ModelComparison compare_runs(const ModelConfig& cfg, const ModelWeights<float>& weights, std::int64_t T,
                             const EngineRun& test, const EngineRun& ref, const EngineRun& truth);

// Runs the reference in precision p: prefill with the trace, then the decode steps, each fed
// `forced[i]` when given (else its own greedy choice). opt: the GPU storage options the bf16
// reference mirrors (the fp8 index-K cache), so that it stays the GPU's emulation.
EngineRun run_reference(const ModelConfig& cfg, const ModelWeights<float>& w, Precision p,
                        const std::vector<std::int32_t>& prompt, int steps,
                        const std::vector<std::int32_t>* forced, const ReferenceOptions& opt = {},
                        std::int64_t prefill_chunk = 0,  // > 0: the prompt in chunks of this many tokens
                        const MatD* input_rows = nullptr);  // [T, H] in place of the prompt's embeddings (an image)

#if M3_HAVE_GPU
struct GpuRunOptions {
  bool fp8_index_cache = false;
  bool last_logits_only = false;  // gpu::ModelOptions::last_logits_only (long prompts, real vocabularies)
  std::int64_t max_tokens = 16384;
  const MatD* input_rows = nullptr;  // [T, H] in place of the prompt's embeddings (gpu::Model::prefill_embeds)
};
// The same on the GPU model (m3::gpu::Model).
EngineRun run_gpu(const ModelConfig& cfg, const ModelWeights<float>& w, const std::vector<std::int32_t>& prompt,
                  int steps, const std::vector<std::int32_t>* forced, const GpuRunOptions& o = {});
#endif

}  // namespace m3::cmp
