// MTP drafts against the reference's; see mtp_compare.h.
#include "compare/mtp_compare.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

namespace m3::cmp {
namespace {

// Round starts e_r and acceptances a_r of one run, from its tokens (the prefix rule of the header),
// checked against the run's own totals.
struct Rounds {
  std::vector<int> start, accepted;
};

int prefix_match(const std::vector<std::int32_t>& drafts, const std::vector<std::int32_t>& tokens, int from) {
  int a = 0;
  while (a < static_cast<int>(drafts.size()) && from + a < static_cast<int>(tokens.size()) &&
         drafts[static_cast<std::size_t>(a)] == tokens[static_cast<std::size_t>(from + a)])
    ++a;
  return a;
}

Rounds rounds_of(const std::vector<std::int32_t>& tokens, const MtpStats& st, const char* who) {
  Rounds r;
  int e = 0;
  std::int64_t total = 0;
  for (const auto& d : st.drafts) {
    if (e >= static_cast<int>(tokens.size()))
      throw std::invalid_argument(fmt::format("compare_mtp_runs: the {} run has a drafting round starting at output {} "
                                              "past its {} tokens",
                                              who, e, tokens.size()));
    const int a = prefix_match(d, tokens, e + 1);
    r.start.push_back(e);
    r.accepted.push_back(a);
    total += a;
    e += 1 + a;
  }
  // The last round may accept drafts past `steps` (they are cut from the tokens), so the total
  // reconstructed from the tokens can only fall short of the run's own count, never exceed it.
  if (total > st.accepted)
    throw std::invalid_argument(fmt::format("compare_mtp_runs: the {} run's tokens imply {} accepted drafts, its stats "
                                            "say {}",
                                            who, total, st.accepted));
  return r;
}

}  // namespace

MtpComparison compare_mtp_runs(const std::vector<std::int32_t>& ref_tokens, const MtpStats& ref,
                               const std::vector<std::int32_t>& test_tokens, const MtpStats& test) {
  MtpComparison c;
  c.steps = static_cast<int>(std::min(ref_tokens.size(), test_tokens.size()));
  while (c.tokens_agree < c.steps && ref_tokens[static_cast<std::size_t>(c.tokens_agree)] ==
                                         test_tokens[static_cast<std::size_t>(c.tokens_agree)])
    ++c.tokens_agree;
  const Rounds rr = rounds_of(ref_tokens, ref, "reference"), rt = rounds_of(test_tokens, test, "test");
  c.rounds_ref = static_cast<int>(rr.start.size());
  c.rounds_test = static_cast<int>(rt.start.size());
  // Both runs draft from the same state while their histories agree: the same round starts.
  const std::size_t n = std::min(rr.start.size(), rt.start.size());
  for (std::size_t i = 0; i < n; ++i) {
    if (rr.start[i] != rt.start[i] || rt.start[i] >= c.tokens_agree) break;
    ++c.rounds_compared;
    c.drafts_equal += test.drafts[i] == ref.drafts[i];
    c.accepted_by_ref += prefix_match(test.drafts[i], ref_tokens, rt.start[i] + 1);
    c.accepted_ref += rr.accepted[i];
  }
  if (c.rounds_compared == 0)
    c.failures.push_back(fmt::format("no drafting round to compare (tokens agree on {} of {}; {} / {} rounds)",
                                     c.tokens_agree, c.steps, c.rounds_ref, c.rounds_test));
  if (c.accepted_by_ref != c.accepted_ref)
    c.failures.push_back(fmt::format("the reference's check accepts {} of the test engine's drafts but {} of its own, "
                                     "over the {} rounds both runs drafted from the same history ({} with identical "
                                     "drafts)",
                                     c.accepted_by_ref, c.accepted_ref, c.rounds_compared, c.drafts_equal));
  return c;
}

}  // namespace m3::cmp
