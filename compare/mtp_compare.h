// MTP drafts of an engine under test against the reference's (issue 7: "acceptance of the GPU's
// drafts by the reference's verify step equals the reference's own"), from the two runs' outputs
// alone (generate_mtp's tokens and MtpStats), so that it is engine-agnostic and testable on the CPU.
//
// A draft-and-check round r of a run emits its pending token at output index e_r and then the
// drafts its main model accepted; since those are the main model's greedy tokens, round r accepted
// a_r = the longest prefix of drafts[r] equal to tokens[e_r + 1 ...], and e_{r+1} = e_r + 1 + a_r.
// The reference's verify step accepts the test engine's round-r drafts as the same prefix rule
// against the REFERENCE's tokens, which is meaningful while both runs share their history: rounds
// whose start lies inside the tokens both runs agree on (the common prefix). Over those rounds:
//   drafts_equal      rounds whose drafts are identical to the reference's round r
//   accepted_by_ref   sum of the reference-verified acceptance of the test engine's drafts
//   accepted_ref      sum of the reference's own acceptance in the same rounds
// The verdict asks accepted_by_ref == accepted_ref and at least one comparable round. A draft can
// differ legitimately when a module's two best logits are a near-tie; such a difference then also
// shows in the acceptance only when the reference's token sits exactly between them (not checked
// here: the per-round module logits are not kept).
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
  std::int64_t accepted_by_ref = 0;  // the reference's verify of the test engine's drafts
  std::int64_t accepted_ref = 0;     // the reference's own acceptance, same rounds
  std::vector<std::string> failures;
  bool pass() const { return failures.empty(); }
};

// Throws std::invalid_argument when a run's stats do not fit its tokens (a round starting past the
// tokens, or more accepted drafts than its stats say).
MtpComparison compare_mtp_runs(const std::vector<std::int32_t>& ref_tokens, const MtpStats& ref,
                               const std::vector<std::int32_t>& test_tokens, const MtpStats& test);

}  // namespace m3::cmp
