// MTP drafts of an engine under test against the reference's (issue 7: "acceptance of the GPU's
// drafts by the reference's verify step equals the reference's own"), from the two runs' outputs
// alone (generate_mtp's tokens and MtpStats), so that it is engine-agnostic and testable on the CPU.
//
// A draft-and-check round r of a run emits its pending token at output index e_r and then the
// drafts its main model accepted; since those are the main model's greedy tokens, round r accepted
// a_r = the longest prefix of drafts[r] equal to tokens[e_r + 1 ...], and e_{r+1} = e_r + 1 + a_r.
// The reference's verify step accepts the test engine's round-r drafts as the same prefix rule
// against the REFERENCE's tokens, which is meaningful while both runs share their history: rounds
// whose start lies inside the tokens both runs agree on (the common prefix), and at the same output
// index in both. Each such round is gated on its own (sums could cancel between rounds):
//   its drafts equal the reference's round r, token for token; or
//   they first differ at a draft whose module logits were a near-tie in either run (margin, MtpStats::
//   draft_margins, <= tie_rtol), or, where both runs recorded the draft's logits row (MtpStats::
//   Router::draft_logits, record_decisions) and the rows agree within rel-L2 0.1 (mtp_compare.cpp
//   kDraftRowRelL2: twice the largest difference of correct engine pairs), the reference's two
//   candidates are within 4 x the two-logit gap noise measured between the rows (the main model's
//   greedy rule, model_compare_detail.h argmax_near_tie): the module's choice between two
//   equal-scoring tokens may go either way, so the round is counted (rounds_near_tie) and its
//   acceptance not compared; or
//   (with MtpRouterTies) they first differ at draft j after an expert flip at a near-tie: at the
//   first draft i <= j of the round where the two engines' owner modules chose other expert sets
//   (MtpStats::draft_router), the experts in one set and not the other score within ties.rtol of
//   each other by either engine's biased scores sigmoid(logit) + bias, relative to the row's
//   largest |score| (DESIGN 4's flip rule; the main model's, model_compare.cpp check_index), or
//   within 4 sqrt(2) x the engines' noise measured on the row itself (the standard deviation of
//   their router logits' differences over the row's other experts, times the flipped experts'
//   sigmoid slope; for a block selection, of the block scores' differences over the other blocks
//   of every head of that MSA layer) where that noise is at most 5% of the row's scale
//   (mtp_compare.cpp kFlipNoiseMargin, kScoreNoiseMax: fp32 vs bf16 flips beyond the fixed rtol). A
//   flipped expert set moves that row's logits and hidden state by far more than rounding (and the
//   hidden state feeds draft i + 1), so drafts then part with clear logit margins. Counted apart
//   (rounds_expert_tie). Drafts that part while every owner row up to j chose the same experts,
//   or after a flip with a clear score gap, fail: a real defect is not explained by a tie that did
//   not decide anything.
//   The same rule covers every discrete decision the round's drafts follow from, taken in causal
//   order, the first one that differs deciding: the MAIN model's decisions on the round's feed rows
//   (MtpStats::feed_router: positions fed .. n-1 whose h_p the modules take this round; per position
//   ascending, per layer its MSA block selection then its experts), then each draft row's module
//   decisions (draft 0 .. j; selection then experts). A block selection flips at a near-tie when the
//   blocks chosen by one run only score within ties.rtol x the row's largest finite |score| by either
//   run's block scores, or within the measured noise as above. Counted as rounds_main_tie,
//   rounds_selection_tie, rounds_expert_tie. What follows the first flip is its consequence and is
//   not judged (DESIGN 4). Main-model flips at positions before the feed reach the round through
//   attention and through the modules' caches
//   (which hold every h_p): such a flip explains nothing by itself, but a block flip (with any gap)
//   over a block holding an earlier position whose main-model row flipped first at a near-tie (or
//   was such a consequence itself), at a layer before the block's (a module row: any layer), is
//   that flip's consequence, since a block's index score follows the keys the flip moved (counted
//   as rounds_main_tie; needs ties.BLK). And where no decision of the round differs but the
//   main model's first differing decision on an earlier position (before the round's feed rows)
//   was a near-tie, the round's rows carry that flip through attention: the logit noise rule then
//   holds for rows up to 0.3 apart (mtp_compare.cpp kDraftRowRelL2AfterFlip; counted as
//   rounds_main_tie).
// What drafts cannot show: a module defect whose effect on the draft rows is within the engines'
// rounding. Measured (tiny seeded, 30 seeds, per run the median over rounds of draft 0's row
// rel-L2 against the bf16 reference): bf16 on weights nudged by 2^-12 0.013 (0.008-0.014 typical),
// the fp32 engine 0.021; the module's o_proj scaled by 1.05 / 1.10 0.019 / 0.029, its MLP down
// projection by 1.05 / 1.10 0.024 / 0.042: inside the spread of correct pairs, so no gate on the
// rows' size separates them, and the drafts such a defect changes part at near-ties. Such defects
// are the tensor-level gates' to find (tests/gpu/test_mtp.cpp checks one module forward's input
// path and logits against the bf16 reference and fp64 under DESIGN 4's gate); a wrong input path,
// weight or head moves the rows by 0.3-1.5 and fails here.
// Then the reference's check accepts exactly as many of the test engine's drafts as of its own in
// every equal round (implied by the equality; counted as accepted_by_ref / accepted_ref). At least
// one round must be compared. Seeded (untrained) modules are right by chance only, so acceptance is
// ~0 and the drafts' identity carries the check: a wrong module input path changes the drafts.
// Planted weights (reference/weights.h plant_successor) make drafts right, and min_acceptance then
// asks that the reference's check accept at least that fraction of its own drafts in the equal
// rounds, so that "accepted as often as the reference's own" is not met as 0 = 0.
#pragma once

#include "compare/tolerance.h"
#include "reference/mtp.h"
#include "reference/weights.h"

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace m3::cmp {

struct MtpComparison {
  int steps = 0;                  // tokens each run produced
  int tokens_agree = 0;           // length of the common prefix of the two token lists
  int rounds_ref = 0, rounds_test = 0;  // drafting rounds of each run
  int rounds_compared = 0;        // rounds starting inside the common prefix (in both runs)
  int drafts_equal = 0;           // of those, rounds with identical drafts
  int rounds_near_tie = 0;        // of those, rounds whose drafts part at a module near-tie
  int rounds_expert_tie = 0;      // of those, rounds whose drafts part after a module expert flip at a near-tie
  int rounds_selection_tie = 0;   // ... after a module MSA selection flip at a near-tie
  int rounds_main_tie = 0;        // ... after a main-model flip at a near-tie on a feed row (experts or blocks), or a
                                  // block flip over an earlier position's near-tie main-model flip
  int rounds_explained() const { return rounds_near_tie + rounds_expert_tie + rounds_selection_tie + rounds_main_tie; }
  std::int64_t drafts_compared = 0;  // drafts in the rounds with identical drafts
  std::int64_t accepted_by_ref = 0;  // the reference's verify of the test engine's drafts
  std::int64_t accepted_ref = 0;     // the reference's own acceptance, same rounds
  std::vector<std::string> failures;
  bool pass() const { return failures.empty(); }
};

// min_acceptance of m3h compare --mtp-weights planted: the planted modules' drafts are right unless
// a module's or the main model's argmax misses the successor token, which the planted margins make
// rare (reference/weights.h; the reference accepted all of its drafts, fp32 and bf16, over 70 tiny
// and 10 small seeds: 4080 drafts). 90% leaves room for a seed with a few misses (one costs at most
// the k drafts of its round), while a broken module input path or head (drafts right by chance
// only, ~1/V) sits at ~0.
inline constexpr double kPlantedMinAcceptance = 0.9;

// What the expert rule needs of the MTP modules' routers (both engines run the same weights).
// Default: no expert rule, draft_router is not read (the comparison of before the rule).
struct MtpRouterTies {
  // [module][MoE layer of the module, in layer order] -> e_score_correction_bias [E]; draft j's
  // owner is module j mod bias.size() (generate_mtp's schedule).
  std::vector<std::vector<Vec<float>>> bias;
  int K = 0;              // experts per token (K_e); 0 = no expert rule
  bool use_bias = true;   // cfg.use_routing_bias: the bias takes part in the choice
  // The main model's expert tie tolerance (model_compare.cpp check_index: max(kBf16.tie_rtol, 4 x
  // the router logits' noise between the engines)), at its floor: the noise of one row of E logits
  // is no measure, and the floor (two bf16 ulps of the row's largest score) already covers router
  // logits computed from bf16 activations in another summation order.
  double rtol = kBf16.tie_rtol;
  // The MSA rule (with K > 0; mtp_router_ties sets it): a module's draft row or a main-model feed row
  // whose block selection differs, at a head whose blocks chosen by one run only score within rtol x
  // the row's largest finite |score| by either run's block scores (model_compare's selection rule).
  // Decision order of one row: per layer, its selection (an MSA layer) before its experts (an MoE
  // layer): true = a selection, false = an expert choice. Empty module_order: the experts of each
  // module MoE layer only (draft_router's block_scores and selection are then not read).
  std::vector<bool> module_order, main_order;
  int Hi = 0, K_blk = 0;  // index heads, blocks a row selects
  int BLK = 0;            // positions a block holds (0: no consequence rule, below)
  // The main-model rule: the main model's MoE layers' biases (in layer order); empty: feed_router is
  // not read, and a main-model flip explains nothing.
  std::vector<Vec<float>> main_bias;
  bool enabled() const { return K > 0; }
  bool main_enabled() const { return enabled() && !main_bias.empty(); }
};

// The ties of modules made by generate_mtp_module with config mtp_module_config(cfg) (one MoE layer
// each today; every MoE layer is taken), their MSA selections, and with `main` (the main model's
// weights) the main model's feed rows too.
MtpRouterTies mtp_router_ties(const ModelConfig& cfg, std::span<const ModelWeights<float>> modules,
                              const ModelWeights<float>* main = nullptr);

// Throws std::invalid_argument when a run's stats do not fit its tokens (a round starting past the
// tokens, more accepted drafts than its stats say, margins missing for its drafts) or, with
// router ties, its draft_router does not fit its drafts (one entry a draft, L_moe x E logits and
// L_moe x K experts as the ties say; a draft_router present without router ties is checked too).
// tie_rtol: compare/tolerance.h's kBf16.tie_rtol for bf16 engines (two ulps of the best logit).
// min_acceptance: 0 (seeded modules), or the least fraction accepted_ref / drafts_compared (planted).
// router: the modules' routers for the expert rule (mtp_router_ties); default: no expert rule.
MtpComparison compare_mtp_runs(const std::vector<std::int32_t>& ref_tokens, const MtpStats& ref,
                               const std::vector<std::int32_t>& test_tokens, const MtpStats& test, double tie_rtol,
                               double min_acceptance = 0.0, const MtpRouterTies& router = {});

}  // namespace m3::cmp
