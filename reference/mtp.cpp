// Greedy decoding with MTP drafts; see mtp.h for the schedule.
#include "reference/mtp.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

namespace m3 {
namespace {

// One forward of one sequence with optional previous hidden states; returns logits [T, V] and
// sets hidden [T, H].
MatD step(Model& m, Sequence& s, std::span<const std::int32_t> tokens, const MatD* h_in, MatD& hidden) {
  Sequence* seqs[] = {&s};
  std::span<const std::int32_t> toks[] = {tokens};
  const MatD* hin[] = {h_in};
  std::vector<MatD> hid;
  MatD logits = h_in ? m.forward(seqs, toks, {}, hin, &hid)[0] : m.forward(seqs, toks, {}, {}, &hid)[0];
  hidden = std::move(hid[0]);
  return logits;
}

void append_rows(MatD& m, const MatD& rows) {
  const Eigen::Index n = m.rows();
  m.conservativeResize(n + rows.rows(), rows.cols());
  m.bottomRows(rows.rows()) = rows;
}

}  // namespace

std::vector<std::int32_t> generate_mtp(Model& main, std::span<Model* const> modules,
                                       std::span<const std::int32_t> prompt, int steps, int k, MtpStats* stats) {
  const ModelConfig& c = main.config();
  if (modules.empty()) throw std::invalid_argument("generate_mtp: no MTP modules");
  if (k < 1) throw std::invalid_argument(fmt::format("generate_mtp: k = {} drafts a round, expected >= 1", k));
  if (steps < 0) throw std::invalid_argument(fmt::format("generate_mtp: steps = {}, expected >= 0", steps));
  for (std::size_t i = 0; i < modules.size(); ++i) {
    const Model* m = modules[i];
    if (!m || !m->takes_hidden_states() || m->config().hidden_size != c.hidden_size ||
        m->config().vocab_size != c.vocab_size || m->precision() != main.precision())
      throw std::invalid_argument(fmt::format(
          "generate_mtp: module {} is not an MTP module's model of this main model (mtp_module_config + "
          "generate_mtp_module, hidden_size {}, vocab {}, precision {})",
          i, c.hidden_size, c.vocab_size, precision_name(main.precision())));
  }
  const int count = static_cast<int>(modules.size());
  MtpStats st;
  st.accepted_at.assign(static_cast<std::size_t>(k), 0);

  Sequence ms = main.new_sequence();
  MatD hm;  // [n, H] the main model's hidden states of every position in its cache
  MatD logits = step(main, ms, prompt, nullptr, hm);
  std::vector<std::int32_t> hist(prompt.begin(), prompt.end());  // x_0 .. x_{n-1}: the main cache
  std::int32_t pending = greedy_token(logits, logits.rows() - 1);  // x_n
  std::vector<Sequence> seqs;
  for (Model* m : modules) seqs.push_back(m->new_sequence());
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
      const MatD lg = step(main, ms, std::span<const std::int32_t>(&pending, 1), nullptr, h);
      append_rows(hm, h);
      hist.push_back(pending);
      pending = greedy_token(lg, 0);
      continue;
    }
    // Draft step 0: the modules catch up on positions fed .. n-1 (x_{p+1}, h_p; x_n = pending).
    std::vector<std::int32_t> feed;
    for (std::int64_t p = fed; p < n; ++p) feed.push_back(p + 1 < n ? hist[static_cast<std::size_t>(p + 1)] : pending);
    const MatD hfeed = main.final_norm(hm.middleRows(fed, n - fed));  // [n - fed, H] after the final norm
    std::vector<std::int32_t> d;                    // d_1 .. d_kk
    MatD hprev;                                     // [1, H] the last draft step's hidden state
    for (int j = 0; j < kk; ++j) {
      const int owner = j % count;
      const std::int32_t tok_in = j == 0 ? pending : d.back();  // every module takes the same input
      const MatD h_in = hprev;
      std::int32_t next = -1;
      MatD h_next;
      for (int m = 0; m < count; ++m) {
        MatD h;
        const MatD lg = j == 0 ? step(*modules[m], seqs[m], feed, &hfeed, h)
                               : step(*modules[m], seqs[m], std::span<const std::int32_t>(&tok_in, 1), &h_in, h);
        if (m == owner) {
          next = greedy_token(lg, lg.rows() - 1);
          h_next = h.bottomRows(1);
        }
      }
      d.push_back(next);
      hprev = std::move(h_next);
    }
    fed = n;
    // The check: x_n, d_1 .. d_kk at positions n .. n+kk in one main forward.
    std::vector<std::int32_t> check{pending};
    check.insert(check.end(), d.begin(), d.end());
    MatD h;
    const MatD lg = step(main, ms, check, nullptr, h);  // [kk+1, V]
    int a = 0;
    while (a < kk && greedy_token(lg, a) == d[static_cast<std::size_t>(a)]) ++a;
    st.drafted += kk;
    st.accepted += a;
    st.drafts.push_back(d);
    for (int j = 0; j < a; ++j) ++st.accepted_at[static_cast<std::size_t>(j)];
    // Keep x_n, d_1 .. d_a; forget the rest in the main cache and every draft entry in the modules.
    ms.truncate(n + a + 1);
    append_rows(hm, h.topRows(a + 1));
    for (Sequence& s : seqs) s.truncate(fed);
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

}  // namespace m3
