// MTP drafts against the reference's; see mtp_compare.h.
#include "compare/mtp_compare.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <set>
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

// draft_router fits the drafts: one entry a draft; with ties, each owner module's MoE layers x E
// logits and x K experts.
void check_router_fit(const MtpStats& st, const MtpRouterTies& ties, const char* who) {
  if (!ties.enabled() && st.draft_router.empty()) return;
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument(fmt::format("compare_mtp_runs: the {} run's draft_router does not match its drafts: {}",
                                            who, why));
  };
  if (ties.enabled() && ties.bias.empty()) fail("router ties without modules (bias is empty)");
  if (st.draft_router.size() != st.drafts.size())
    fail(fmt::format("{} rounds, {} rounds of drafts", st.draft_router.size(), st.drafts.size()));
  for (std::size_t i = 0; i < st.drafts.size(); ++i) {
    if (st.draft_router[i].size() != st.drafts[i].size())
      fail(fmt::format("round {} has {} router rows for {} drafts", i, st.draft_router[i].size(), st.drafts[i].size()));
    for (std::size_t j = 0; j < st.drafts[i].size(); ++j) {
      const MtpStats::Router& r = st.draft_router[i][j];
      if (r.logits.rows() != r.experts.rows())
        fail(fmt::format("round {} draft {}: {} layers of logits, {} of experts", i, j, r.logits.rows(), r.experts.rows()));
      if (!ties.enabled()) continue;
      const auto& b = ties.bias[j % ties.bias.size()];
      if (r.logits.rows() != static_cast<Eigen::Index>(b.size()))
        fail(fmt::format("round {} draft {}: {} MoE layers, its module has {}", i, j, r.logits.rows(), b.size()));
      for (std::size_t l = 0; l < b.size(); ++l)
        if (r.logits.cols() != b[l].size() || r.experts.cols() != ties.K)
          fail(fmt::format("round {} draft {} layer {}: [{}] logits and [{}] experts, expected E = {} and K = {}", i, j, l,
                           r.logits.cols(), r.experts.cols(), b[l].size(), ties.K));
    }
  }
}

std::set<std::int32_t> expert_set(const MatI& experts, Eigen::Index layer) {
  std::set<std::int32_t> s;
  for (Eigen::Index c = 0; c < experts.cols(); ++c) s.insert(experts(layer, c));
  return s;
}

// A flip of one MoE layer's expert set between two runs' rows: the experts chosen by one run only,
// and whether they nearly tie by each run's biased scores (their spread <= rtol x the row's largest
// |score|).
struct ExpertFlip {
  int draft = -1, layer = -1;       // where (-1: no flip)
  std::vector<std::int32_t> only_test, only_ref;
  double spread_test = 0, spread_ref = 0, scale_test = 0, scale_ref = 0;
  bool near_tie = false;
};

ExpertFlip judge_flip(const MtpStats::Router& t, const MtpStats::Router& r, Eigen::Index l, const Vec<float>& bias,
                      const MtpRouterTies& ties) {
  ExpertFlip f;
  f.layer = static_cast<int>(l);
  const std::set<std::int32_t> st = expert_set(t.experts, l), sr = expert_set(r.experts, l);
  std::set_difference(st.begin(), st.end(), sr.begin(), sr.end(), std::back_inserter(f.only_test));
  std::set_difference(sr.begin(), sr.end(), st.begin(), st.end(), std::back_inserter(f.only_ref));
  const auto E = static_cast<std::int32_t>(bias.size());
  // A duplicate (a set smaller than K) or an id out of range is a defect, never a tie.
  bool valid = static_cast<int>(st.size()) == ties.K && static_cast<int>(sr.size()) == ties.K;
  for (const auto* ids : {&f.only_test, &f.only_ref})
    for (std::int32_t e : *ids) valid = valid && e >= 0 && e < E;
  auto spread = [&](const MatF& logits, double& scale) {
    double lo = std::numeric_limits<double>::infinity(), hi = -lo;
    scale = 0;
    auto score = [&](Eigen::Index e) {
      return 1.0 / (1.0 + std::exp(-static_cast<double>(logits(l, e)))) + (ties.use_bias ? bias(e) : 0.0);
    };
    for (Eigen::Index e = 0; e < logits.cols(); ++e)
      if (const double s = score(e); std::isfinite(s)) scale = std::max(scale, std::abs(s));
    for (const auto* ids : {&f.only_test, &f.only_ref})
      for (std::int32_t e : *ids) {
        const double s = score(e);
        if (!std::isfinite(s)) return std::numeric_limits<double>::infinity();
        lo = std::min(lo, s), hi = std::max(hi, s);
      }
    return hi - lo;
  };
  if (!valid) return f;
  f.spread_test = spread(t.logits, f.scale_test);
  f.spread_ref = spread(r.logits, f.scale_ref);
  f.near_tie = f.spread_test <= ties.rtol * f.scale_test || f.spread_ref <= ties.rtol * f.scale_ref;
  return f;
}

// The first draft 0..j of round i (then the first MoE layer) where the runs' owner rows chose other
// expert sets.
ExpertFlip first_flip(const MtpStats& test, const MtpStats& ref, std::size_t i, std::size_t j,
                      const MtpRouterTies& ties) {
  for (std::size_t d = 0; d <= j; ++d) {
    const MtpStats::Router &t = test.draft_router[i][d], &r = ref.draft_router[i][d];
    const auto& bias = ties.bias[d % ties.bias.size()];
    for (Eigen::Index l = 0; l < t.experts.rows(); ++l)
      if (expert_set(t.experts, l) != expert_set(r.experts, l)) {
        ExpertFlip f = judge_flip(t, r, l, bias[static_cast<std::size_t>(l)], ties);
        f.draft = static_cast<int>(d);
        return f;
      }
  }
  return {};
}

std::string flip_note(const ExpertFlip& f, const MtpRouterTies& ties) {
  if (f.draft < 0) return "; the owner modules chose the same experts on every draft row up to it";
  return fmt::format("; experts first differ at draft {} layer {}: test only {}, reference only {}, score spread "
                     "{:.2e} / {:.2e} of row scale {:.3g} / {:.3g} (expert near-tie <= {:.1e} x scale)",
                     f.draft, f.layer, fmt::join(f.only_test, ","), fmt::join(f.only_ref, ","), f.spread_test,
                     f.spread_ref, f.scale_test, f.scale_ref, ties.rtol);
}

}  // namespace

MtpRouterTies mtp_router_ties(const ModelConfig& cfg, std::span<const ModelWeights<float>> modules) {
  MtpRouterTies t;
  t.K = cfg.num_experts_per_tok;
  t.use_bias = cfg.use_routing_bias;
  for (const auto& m : modules) {
    if (!m.mtp_in)
      throw std::invalid_argument("mtp_router_ties: weights without mtp_in are not an MTP module's (generate_mtp_module)");
    auto& layers = t.bias.emplace_back();
    for (const auto& L : m.layers)
      if (L.mlp_type == MlpType::MOE) {
        if (L.router_bias.size() != cfg.num_local_experts)
          throw std::invalid_argument(fmt::format("mtp_router_ties: a router bias of {} experts, the config has {}",
                                                  L.router_bias.size(), cfg.num_local_experts));
        layers.push_back(L.router_bias);
      }
  }
  return t;
}

MtpComparison compare_mtp_runs(const std::vector<std::int32_t>& ref_tokens, const MtpStats& ref,
                               const std::vector<std::int32_t>& test_tokens, const MtpStats& test, double tie_rtol,
                               double min_acceptance, const MtpRouterTies& router) {
  MtpComparison c;
  c.steps = static_cast<int>(std::min(ref_tokens.size(), test_tokens.size()));
  while (c.tokens_agree < c.steps && ref_tokens[static_cast<std::size_t>(c.tokens_agree)] ==
                                         test_tokens[static_cast<std::size_t>(c.tokens_agree)])
    ++c.tokens_agree;
  const Rounds rr = rounds_of(ref_tokens, ref, "reference"), rt = rounds_of(test_tokens, test, "test");
  check_router_fit(ref, router, "reference");
  check_router_fit(test, router, "test");
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
    ExpertFlip flip;
    if (router.enabled() && j < dt.size() && j < dr.size()) {
      flip = first_flip(test, ref, i, j, router);
      if (flip.near_tie) {
        ++c.rounds_expert_tie;
        continue;
      }
    }
    c.failures.push_back(fmt::format(
        "round {} (output {}): draft {} is {} on the test engine and {} on the reference, margins {:.2e} / {:.2e} "
        "(near-tie <= {:.1e}){}{}",
        i, rt.start[i], j, j < dt.size() ? std::to_string(dt[j]) : std::string("none"),
        j < dr.size() ? std::to_string(dr[j]) : std::string("none"), j < dt.size() ? test.draft_margins[i][j] : 0.0,
        j < dr.size() ? ref.draft_margins[i][j] : 0.0, tie_rtol,
        dt.size() != dr.size() ? fmt::format(" ({} vs {} drafts)", dt.size(), dr.size()) : std::string(),
        router.enabled() && j < dt.size() && j < dr.size() ? flip_note(flip, router) : std::string()));
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
