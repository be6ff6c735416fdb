// MTP drafts against the reference's; see mtp_compare.h.
#include "compare/mtp_compare.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>
#include <string>

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
  bool margins_fit = st.draft_margins.size() == st.drafts.size();
  for (std::size_t i = 0; margins_fit && i < st.drafts.size(); ++i) margins_fit = st.draft_margins[i].size() == st.drafts[i].size();
  if (!margins_fit)
    throw std::invalid_argument(fmt::format("compare_mtp_runs: the {} run's draft_margins do not match its drafts "
                                            "(one margin a draft)",
                                            who));
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
                               const std::vector<std::int32_t>& test_tokens, const MtpStats& test, double tie_rtol,
                               double min_acceptance) {
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
    const auto& dt = test.drafts[i];
    const auto& dr = ref.drafts[i];
    std::size_t j = 0;
    while (j < dt.size() && j < dr.size() && dt[j] == dr[j]) ++j;
    if (j == dt.size() && j == dr.size()) {
      ++c.drafts_equal;
      c.drafts_compared += static_cast<std::int64_t>(dt.size());
      c.accepted_by_ref += prefix_match(dt, ref_tokens, rt.start[i] + 1);
      c.accepted_ref += rr.accepted[i];
      continue;
    }
    if (j < dt.size() && j < dr.size() &&
        std::min(test.draft_margins[i][j], ref.draft_margins[i][j]) <= tie_rtol) {
      ++c.rounds_near_tie;
      continue;
    }
    c.failures.push_back(fmt::format(
        "round {} (output {}): draft {} is {} on the test engine and {} on the reference, margins {:.2e} / {:.2e} "
        "(near-tie <= {:.1e}){}",
        i, rt.start[i], j, j < dt.size() ? std::to_string(dt[j]) : std::string("none"),
        j < dr.size() ? std::to_string(dr[j]) : std::string("none"), j < dt.size() ? test.draft_margins[i][j] : 0.0,
        j < dr.size() ? ref.draft_margins[i][j] : 0.0, tie_rtol,
        dt.size() != dr.size() ? fmt::format(" ({} vs {} drafts)", dt.size(), dr.size()) : std::string()));
  }
  if (c.rounds_compared == 0)
    c.failures.push_back(fmt::format("no drafting round to compare (tokens agree on {} of {}; {} / {} rounds)",
                                     c.tokens_agree, c.steps, c.rounds_ref, c.rounds_test));
  if (c.accepted_by_ref != c.accepted_ref)  // cannot happen when the equal rounds are equal; kept as the criterion
    c.failures.push_back(fmt::format("the reference's check accepts {} of the test engine's drafts but {} of its own "
                                     "over the {} rounds with equal drafts",
                                     c.accepted_by_ref, c.accepted_ref, c.drafts_equal));
  if (min_acceptance > 0 && !(c.drafts_compared > 0 && c.accepted_ref >= min_acceptance * c.drafts_compared))
    c.failures.push_back(fmt::format("the reference's check accepts {} of its own {} drafts in the equal rounds, expected "
                                     "at least {:.0f}% (planted weights): an acceptance equality at ~0 is vacuous",
                                     c.accepted_ref, c.drafts_compared, 100 * min_acceptance));
  return c;
}

}  // namespace m3::cmp
