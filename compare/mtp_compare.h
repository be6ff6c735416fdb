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
//   draft_margins, <= tie_rtol): the module's choice between two equal-scoring tokens may go either
//   way, so the round is counted (rounds_near_tie) and its acceptance not compared.
// Then the reference's check accepts exactly as many of the test engine's drafts as of its own in
// every equal round (implied by the equality; counted as accepted_by_ref / accepted_ref). At least
// one round must be compared. Seeded (untrained) modules are right by chance only, so acceptance is
// ~0 and the drafts' identity carries the check: a wrong module input path changes the drafts.
// Planted weights (reference/weights.h plant_successor) make drafts right, and min_acceptance then
// asks that the reference's check accept at least that fraction of its own drafts in the equal
// rounds, so that "accepted as often as the reference's own" is not met as 0 = 0.
#pragma once

#include "reference/mtp.h"

#include <cstdint>
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

// Throws std::invalid_argument when a run's stats do not fit its tokens (a round starting past the
// tokens, more accepted drafts than its stats say, margins missing for its drafts).
// tie_rtol: compare/tolerance.h's kBf16.tie_rtol for bf16 engines (two ulps of the best logit).
// min_acceptance: 0 (seeded modules), or the least fraction accepted_ref / drafts_compared (planted).
MtpComparison compare_mtp_runs(const std::vector<std::int32_t>& ref_tokens, const MtpStats& ref,
                               const std::vector<std::int32_t>& test_tokens, const MtpStats& test, double tie_rtol,
                               double min_acceptance = 0.0);

}  // namespace m3::cmp
