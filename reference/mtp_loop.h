// The MTP draft-and-check schedule of generate_mtp (reference/mtp.h documents it), written once for
// any engine whose model and sequence types offer what m3::Model and m3::Sequence do:
//   ModelT::new_sequence(), ModelT::config(), ModelT::final_norm(MatD [T, H]) -> MatD [T, H],
//   ModelT::forward(span<SeqT*>, span<span<const int32>>, TraceFn, span<const MatD*> h_in,
//                   std::vector<MatD>* hidden_out) -> std::vector<MatD> logits,
//   SeqT::truncate(n).
// m3::generate_mtp (the reference) and m3::gpu::generate_mtp (gpu/mtp.h) validate their arguments
// and call it, so both engines draft and check on the same schedule.
#pragma once

#include "reference/model.h"
#include "reference/mtp.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace m3::detail {

// One forward of one sequence with optional previous hidden states; returns logits [T, V] and
// sets hidden [T, H] (the residual stream after the last layer).
template <class ModelT, class SeqT>
MatD mtp_step(ModelT& m, SeqT& s, std::span<const std::int32_t> tokens, const MatD* h_in, MatD& hidden,
              const TraceFn& trace = {}) {
  SeqT* seqs[] = {&s};
  std::span<const std::int32_t> toks[] = {tokens};
  const MatD* hin[] = {h_in};
  std::vector<MatD> hid;
  MatD logits = h_in ? m.forward(seqs, toks, trace, hin, &hid)[0] : m.forward(seqs, toks, trace, {}, &hid)[0];
  hidden = std::move(hid[0]);
  return logits;
}

// A trace callback keeping sequence 0's decisions (blk.{l}.router_logits, .experts, .block_scores,
// .selection), appended in layer (= trace) order: of its last row into out[0] (last_only: a draft's
// row; out holds one record), or of every row t into out[t] (out is grown to the forward's T rows).
// Hi: index heads (block_scores and selection rows are head-major, [Hi*T, .]).
inline TraceFn mtp_choice_recorder(std::vector<MtpStats::Router>& out, int Hi, bool last_only) {
  return [&out, Hi, last_only](int seq, const std::string& name, const TraceView& v) {
    if (seq != 0 || v.rows < 1 || name.rfind("blk.", 0) != 0) return;
    const bool lg = name.ends_with(".router_logits"), ex = name.ends_with(".experts");
    const bool sc = name.ends_with(".block_scores"), se = name.ends_with(".selection");
    if (!lg && !ex && !sc && !se) return;
    const int heads = sc || se ? Hi : 1;
    const std::int64_t T = v.rows / heads;
    auto append = [&](auto& m, std::int64_t r, auto cast) {
      const Eigen::Index n = m.rows();
      m.conservativeResize(n + 1, v.cols);
      for (std::int64_t c = 0; c < v.cols; ++c) m(n, c) = cast(v.at(r, c));
    };
    const auto f32 = [](double x) { return static_cast<float>(x); };
    const auto i32 = [](double x) { return static_cast<std::int32_t>(std::llround(x)); };
    if (!last_only && static_cast<std::int64_t>(out.size()) < T) out.resize(static_cast<std::size_t>(T));
    for (std::int64_t t = last_only ? T - 1 : 0; t < T; ++t) {
      MtpStats::Router& o = out[last_only ? 0 : static_cast<std::size_t>(t)];
      for (int h = 0; h < heads; ++h) {
        const std::int64_t r = h * T + t;
        if (lg) append(o.logits, r, f32);
        else if (ex) append(o.experts, r, i32);
        else if (sc) append(o.block_scores, r, f32);
        else append(o.selection, r, i32);
      }
    }
  };
}

// (best - second best) / max(1, |best|) of logits row r: how close the greedy choice is to a tie.
inline double mtp_top2_margin(const MatD& logits, Eigen::Index r) {
  double b1 = -std::numeric_limits<double>::infinity(), b2 = b1;
  for (Eigen::Index v = 0; v < logits.cols(); ++v) {
    const double x = logits(r, v);
    if (x > b1) b2 = b1, b1 = x;
    else if (x > b2) b2 = x;
  }
  return (b1 - b2) / std::max(1.0, std::abs(b1));
}

inline void mtp_append_rows(MatD& m, const MatD& rows) {
  const Eigen::Index n = m.rows();
  m.conservativeResize(n + rows.rows(), rows.cols());
  m.bottomRows(rows.rows()) = rows;
}

// The loop of generate_mtp after its argument checks (modules non-empty, k >= 1, steps >= 0).
template <class ModelT>
std::vector<std::int32_t> mtp_loop(ModelT& main, std::span<ModelT* const> modules, std::span<const std::int32_t> prompt,
                                   int steps, int k, MtpStats* stats) {
  using SeqT = decltype(main.new_sequence());
  const ModelConfig& c = main.config();
  const int count = static_cast<int>(modules.size());
  MtpStats st;
  st.accepted_at.assign(static_cast<std::size_t>(k), 0);
  // Traces run only when the decisions are asked for, since a trace makes a device engine copy every
  // traced tensor back.
  const bool rec = stats && stats->record_decisions;
  st.record_decisions = rec;
  const int Hi = c.index_n_heads;
  std::vector<MtpStats::Router> main_rows;  // [n] the main model's decisions on each kept row (rec only)
  std::vector<MtpStats::Router> fresh;      // the last main forward's rows
  auto main_trace = [&]() -> TraceFn {
    fresh.clear();
    return rec ? mtp_choice_recorder(fresh, Hi, false) : TraceFn{};
  };
  auto keep_main_rows = [&](std::int64_t from, std::int64_t rows) {  // rows 0 .. rows-1 of fresh at from ..
    if (!rec) return;
    main_rows.resize(static_cast<std::size_t>(from));
    main_rows.insert(main_rows.end(), fresh.begin(), fresh.begin() + rows);
  };
  SeqT ms = main.new_sequence();
  MatD hm;  // [n, H] the main model's hidden states of every position in its cache
  MatD logits = mtp_step(main, ms, prompt, nullptr, hm, main_trace());
  keep_main_rows(0, static_cast<std::int64_t>(prompt.size()));
  std::vector<std::int32_t> hist(prompt.begin(), prompt.end());  // x_0 .. x_{n-1}: the main cache
  std::int32_t pending = greedy_token(logits, logits.rows() - 1);  // x_n
  std::vector<SeqT> seqs;
  for (ModelT* m : modules) seqs.push_back(m->new_sequence());
  std::int64_t fed = 0;  // the module caches hold positions [0, fed), each (x_{p+1}, h_p)

  std::vector<std::int32_t> out;
  if (steps == 0) {
    if (stats) *stats = std::move(st);
    return out;
  }
  for (;;) {
    out.push_back(pending);
    if (static_cast<int>(out.size()) >= steps) break;
    const auto n = static_cast<std::int64_t>(hist.size());
    const int remaining = steps - static_cast<int>(out.size());
    const int kk = static_cast<int>(std::min<std::int64_t>({k, remaining, c.max_position_embeddings - n - 1}));
    ++st.rounds;
    if (kk <= 0) {  // nothing left worth drafting: a plain decode step
      MatD h;
      const MatD lg = mtp_step(main, ms, std::span<const std::int32_t>(&pending, 1), nullptr, h, main_trace());
      keep_main_rows(n, 1);
      mtp_append_rows(hm, h);
      hist.push_back(pending);
      pending = greedy_token(lg, 0);
      continue;
    }
    // Draft step 0: the modules catch up on positions fed .. n-1 (x_{p+1}, h_p; x_n = pending).
    std::vector<std::int32_t> feed;
    for (std::int64_t p = fed; p < n; ++p) feed.push_back(p + 1 < n ? hist[static_cast<std::size_t>(p + 1)] : pending);
    const MatD hfeed = main.final_norm(hm.middleRows(fed, n - fed));  // [n - fed, H] after the final norm
    std::vector<std::int32_t> d;                    // d_1 .. d_kk
    std::vector<double> margins;                    // their top-2 margins (mtp_top2_margin)
    std::vector<MtpStats::Router> routers;          // their owner modules' router rows (rec only)
    MatD hprev;                                     // [1, H] the last draft step's hidden state
    for (int j = 0; j < kk; ++j) {
      const int owner = j % count;
      const std::int32_t tok_in = j == 0 ? pending : d.back();  // every module takes the same input
      const MatD h_in = hprev;
      std::int32_t next = -1;
      MatD h_next;
      for (int m = 0; m < count; ++m) {
        MatD h;
        // Only the owner's row decides the draft (a module is one layer: the others' attention and
        // MoE outputs reach neither their caches nor the next step).
        std::vector<MtpStats::Router> row;
        const TraceFn tf = m == owner && rec ? mtp_choice_recorder(row, Hi, true) : TraceFn{};
        if (m == owner && rec) row.resize(1);
        const MatD lg = j == 0 ? mtp_step(*modules[m], seqs[m], feed, &hfeed, h, tf)
                               : mtp_step(*modules[m], seqs[m], std::span<const std::int32_t>(&tok_in, 1), &h_in, h, tf);
        if (m == owner && rec) {
          row[0].draft_logits = lg.bottomRows(1).cast<float>();
          routers.push_back(std::move(row[0]));
        }
        if (m == owner) {
          next = greedy_token(lg, lg.rows() - 1);
          margins.push_back(mtp_top2_margin(lg, lg.rows() - 1));
          h_next = h.bottomRows(1);
        }
      }
      d.push_back(next);
      hprev = std::move(h_next);
    }
    if (rec) st.feed_router.emplace_back(main_rows.begin() + fed, main_rows.begin() + n);
    fed = n;
    // The check: x_n, d_1 .. d_kk at positions n .. n+kk in one main forward.
    std::vector<std::int32_t> check{pending};
    check.insert(check.end(), d.begin(), d.end());
    MatD h;
    const MatD lg = mtp_step(main, ms, check, nullptr, h, main_trace());  // [kk+1, V]
    int a = 0;
    while (a < kk && greedy_token(lg, a) == d[static_cast<std::size_t>(a)]) ++a;
    keep_main_rows(n, a + 1);
    st.drafted += kk;
    st.accepted += a;
    st.drafts.push_back(d);
    st.draft_margins.push_back(std::move(margins));
    if (rec) st.draft_router.push_back(std::move(routers));
    for (int j = 0; j < a; ++j) ++st.accepted_at[static_cast<std::size_t>(j)];
    // Keep x_n, d_1 .. d_a; forget the rest in the main cache and every draft entry in the modules.
    ms.truncate(n + a + 1);
    mtp_append_rows(hm, h.topRows(a + 1));
    for (SeqT& s : seqs) s.truncate(fed);
    hist.push_back(pending);
    bool done = false;
    for (int j = 0; j < a && !done; ++j) {
      hist.push_back(d[static_cast<std::size_t>(j)]);
      out.push_back(d[static_cast<std::size_t>(j)]);
      done = static_cast<int>(out.size()) >= steps;
    }
    if (done) break;
    pending = greedy_token(lg, a);
  }
  out.resize(static_cast<std::size_t>(steps));
  if (stats) *stats = std::move(st);
  return out;
}

}  // namespace m3::detail
