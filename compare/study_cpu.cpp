// CPU decode study (study_cpu.h). The ops read keys 0..p only, so one set of caches of the largest
// context serves every point: the query's position alone sets the context.
#include "compare/study_cpu.h"

#include "reference/ops/attention_dense.h"
#include "reference/ops/msa_attention.h"
#include "reference/ops/msa_index.h"
#include "reference/ops/msa_select.h"
#include "reference/rng.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <stdexcept>
#include <vector>

namespace m3::study {

double CpuDecodePoint::flops_ratio_counted() const {
  const double dense = static_cast<double>(dense_counted.qk_macs + dense_counted.pv_macs);
  const double msa = static_cast<double>(msa_counted.qk_macs + msa_counted.pv_macs + msa_counted.index_macs);
  return dense / msa;
}

struct CpuDecodeStudy::Impl {
  ModelConfig cfg;
  std::int64_t max_context = 0;
  MatF k, v, ik;  // [max_context, Hkv*D], [max_context, Hkv*D], [max_context, Di]
  MatF q, iq;     // [1, Hq*D], [1, Hi*Di]
};

namespace {

void fill(MatF& m, std::mt19937_64& g) {
  std::normal_distribution<float> nd(0.f, 1.f);  // synthetic caches: any random data will do
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = nd(g);
}

template <class F>
double median_ms(F&& f, int min_reps, double budget_ms, int* reps) {
  std::vector<double> t;
  double total = 0;
  while (static_cast<int>(t.size()) < min_reps && (t.empty() || total < budget_ms)) {
    const auto a = std::chrono::steady_clock::now();
    f();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count();
    t.push_back(ms);
    total += ms;
  }
  std::sort(t.begin(), t.end());
  *reps = static_cast<int>(t.size());
  return t[t.size() / 2];
}

bool same(const AttnCounter& a, const AttnCounter& b) {
  return a.qk_macs == b.qk_macs && a.pv_macs == b.pv_macs && a.index_macs == b.index_macs &&
         a.select_candidates == b.select_candidates;
}

}  // namespace

CpuDecodeStudy::CpuDecodeStudy(const ModelConfig& cfg, std::int64_t max_context, std::uint64_t seed)
    : p_(std::make_unique<Impl>()) {
  cfg.validate();
  if (max_context < 1) throw std::invalid_argument(fmt::format("cpu study: max context {} < 1", max_context));
  if (cfg.index_block_size <= 0) throw std::invalid_argument("cpu study: the config has no MSA index branch");
  p_->cfg = cfg;
  p_->max_context = max_context;
  const int Hq = cfg.num_attention_heads, Hkv = cfg.num_key_value_heads, D = cfg.head_dim;
  const int Hi = cfg.index_n_heads, Di = cfg.index_head_dim;
  std::mt19937_64 g(seed);
  p_->k.resize(max_context, static_cast<Eigen::Index>(Hkv) * D);
  p_->v.resize(max_context, static_cast<Eigen::Index>(Hkv) * D);
  p_->ik.resize(max_context, Di);
  p_->q.resize(1, static_cast<Eigen::Index>(Hq) * D);
  p_->iq.resize(1, static_cast<Eigen::Index>(Hi) * Di);
  for (MatF* m : {&p_->k, &p_->v, &p_->ik, &p_->q, &p_->iq}) fill(*m, g);
}
CpuDecodeStudy::~CpuDecodeStudy() = default;

CpuDecodePoint CpuDecodeStudy::measure(std::int64_t n, int min_reps, double budget_ms) const {
  const Impl& P = *p_;
  if (n < 1 || n > P.max_context)
    throw std::invalid_argument(fmt::format("cpu study: context {} outside [1, {}]", n, P.max_context));
  const ModelConfig& c = P.cfg;
  const std::vector<std::int64_t> pos = {n - 1};
  CpuDecodePoint r;
  r.context = n;
  MatF out;     // [1, Hq*D]
  MatF scores;  // [Hi, NB]
  MatI sel;     // [Hi, K_blk]
  int reps = 0;
  r.dense_ms = median_ms([&] { ref::attention_dense(P.q, P.k, P.v, pos, c.attn_dims(), out); }, min_reps, budget_ms, &reps);
  r.reps = reps;
  r.index_ms = median_ms([&] { ref::msa_index(P.iq, P.ik, pos, c.msa_dims(), scores); }, min_reps, budget_ms, &reps);
  r.select_ms = median_ms([&] { ref::msa_select(scores, pos, c.msa_dims(), sel); }, min_reps, budget_ms, &reps);
  r.sparse_ms = median_ms([&] { ref::msa_attention(P.q, P.k, P.v, pos, sel, c.index_block_size, c.attn_dims(), out); },
                          min_reps, budget_ms, &reps);
  r.msa_ms = r.index_ms + r.select_ms + r.sparse_ms;
  // Counted work, one more run of each with the counters on.
  ref::attention_dense(P.q, P.k, P.v, pos, c.attn_dims(), out, &r.dense_counted);
  ref::msa_index(P.iq, P.ik, pos, c.msa_dims(), scores, &r.msa_counted);
  ref::msa_select(scores, pos, c.msa_dims(), sel, &r.msa_counted);
  ref::msa_attention(P.q, P.k, P.v, pos, sel, c.index_block_size, c.attn_dims(), out, &r.msa_counted);
  r.dense_analytic = attn_cost_at(c, AttnType::DENSE, n - 1);
  r.msa_analytic = attn_cost_at(c, AttnType::MSA, n - 1);
  r.counts_match = same(r.dense_counted, attn_counter(c, AttnType::DENSE, attn_keys_at(c, AttnType::DENSE, n - 1))) &&
                   same(r.msa_counted, attn_counter(c, AttnType::MSA, attn_keys_at(c, AttnType::MSA, n - 1)));
  return r;
}

}  // namespace m3::study
