// Greedy decoding with MTP drafts (spec §7): the modules propose k tokens, the main model checks
// them in one forward and keeps the longest prefix it agrees with, plus its own next token. The
// output is the main model's greedy sequence whatever the drafts are (a draft only saves main
// forwards when it is right); acceptance measures the modules.
//
//   m3::Model main(cfg, w, p);
//   m3::Model mtp0(m3::mtp_module_config(cfg), m3::generate_mtp_module(cfg, 0, seed, w), p);
//   m3::Model* mods[] = {&mtp0};
//   m3::MtpStats st;
//   auto toks = m3::generate_mtp(main, mods, prompt, 64, 2, &st);   // == generate_greedy's tokens
//
// The schedule (our choice where spec §7 says only "module i for draft step i, mod count"):
// with n tokens in the main cache, x_n its greedy next token and h_p the main model's hidden state
// at position p AFTER its final norm (what vLLM's speculative decoding hands an MTP module: the
// target model's forward output; not verified against M3's own code), and a module's hidden state
// the residual stream after its layer (before its final norm, as vLLM's DeepSeek MTP layer returns),
//   draft step 0 at position n-1 takes (x_n, h_{n-1});
//   draft step j >= 1 at position n-1+j takes (d_j, the hidden state draft step j-1 returned);
//   draft step j's token d_{j+1} is the greedy choice of module j mod count.
// Every module processes every step's input, so each module's cache is contiguous in positions;
// after the check, the module caches are cut back to the checked history and fed (x_{p+1}, h_p) for
// the newly accepted positions, so drafts always start from the main model's own hidden states.
#pragma once

#include "reference/model.h"

#include <cstdint>
#include <span>
#include <vector>

namespace m3 {

struct MtpStats {
  // Input: also record the decisions below (draft_router, feed_router, draft logits rows), which
  // compare/mtp_compare.h reads. Off by default: it traces every forward (a device engine copies
  // each traced tensor back) and keeps per draft a [1, V] logits row and per position the main
  // model's block scores, far more than a run's counters need at M3's vocabulary and context.
  bool record_decisions = false;
  int rounds = 0;               // draft-and-check rounds (= main forwards after the prefill)
  std::int64_t drafted = 0;     // draft tokens proposed
  std::int64_t accepted = 0;    // draft tokens the main model agreed with
  std::vector<std::int64_t> accepted_at;  // [k]: rounds whose draft j was accepted (j = 0..k-1)
  std::vector<std::vector<std::int32_t>> drafts;  // per drafting round, its draft tokens d_1..d_kk
  // Per drafting round, each draft's margin in its module's logits row: (best - second best) /
  // max(1, |best|), the relative gap a near-tie test compares with a tolerance (compare/mtp_compare.h).
  std::vector<std::vector<double>> draft_margins;
  // With record_decisions, per drafting round, per draft: what the router of its owner module (module j mod count) decided
  // on the draft's row (the last row of that module's forward), one row per MoE layer of the module
  // in layer order, from its forward's trace (blk.{l}.router_logits, blk.{l}.experts). A draft's
  // logits follow from the experts its row chose: where a router's K-th and (K+1)-th scores nearly
  // tie, two engines may choose other experts and then draft other tokens with clear logit margins
  // (compare/mtp_compare.h's expert rule reads these).
  // With them, the row's MSA block selections (blk.{l}.block_scores, blk.{l}.selection; head-major
  // as traced: MSA layer s's heads at rows s*Hi .. s*Hi+Hi-1): a block chosen at a near-tie of the
  // index scores moves the row's attention by a whole block, as a flipped expert moves its MoE output.
  struct Router {
    MatF logits;        // [L_moe, E] router logits (before the sigmoid and the bias)
    MatI experts;       // [L_moe, K_e] the experts chosen
    MatF block_scores;  // [L_msa*Hi, NB] the MSA index scores of the row (-inf past its block)
    MatI selection;     // [L_msa*Hi, K_blk] the blocks chosen (-1 padded)
    // [1, V] the owner module's logits on the draft's row (the draft is their argmax): the near-tie
    // rule measures the engines' logit noise on them (compare/mtp_compare.h).
    MatF draft_logits;
  };
  std::vector<std::vector<Router>> draft_router;
  // With record_decisions, per drafting round, per position p of its feed (fed .. n-1: the positions whose (x_{p+1}, h_p)
  // the modules take at draft step 0, the round's module input), the MAIN model's decisions on row p
  // in the forward whose h_p was kept (prefill or a check): a main-model flip there moves h_p, and
  // with it every draft of the round, by far more than rounding (compare/mtp_compare.h's main rule).
  std::vector<std::vector<Router>> feed_router;
};

// Prefill `prompt` on `main`, then produce `steps` tokens with k >= 1 drafts a round from
// `modules` (each a model of mtp_module_config(main.config()) with MTP input weights, one
// precision with main). Returns the tokens, identical to generate_greedy(main, prompt, steps)
// up to ties the batched check may break differently in the last bit. Throws std::invalid_argument
// for no modules, a module that is not an MTP module's model, k < 1 or steps < 0.
std::vector<std::int32_t> generate_mtp(Model& main, std::span<Model* const> modules,
                                       std::span<const std::int32_t> prompt, int steps, int k,
                                       MtpStats* stats = nullptr);

}  // namespace m3
