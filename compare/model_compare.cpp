// Model-level agreement (model_compare.h): three runs, one table.
#include "compare/model_compare.h"
#include "compare/model_compare_detail.h"

#include "compare/tolerance.h"
#include "reference/model.h"
#include "reference/ops/attention_dense.h"
#include "reference/ops/moe_experts.h"
#include "reference/ops/msa_attention.h"
#include "reference/ops/msa_select.h"

#if M3_HAVE_GPU
#include "gpu/model.h"
#endif

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

namespace m3::cmp {

namespace detail {  // shared with model_sampled.cpp through model_compare_detail.h

// Near-tie margin over the noise measured between the engines: a choice may flip where the two
// candidates' scores are closer than a few times the typical difference of the scores themselves
// (4 sigma of a roughly normal difference: flips beyond it are not rounding).
constexpr double kNoiseMargin = 4.0;

std::string op_of(const std::string& name);

// A trace callback that keeps sequence 0's tensors as fp32 matrices (ids as exact small floats).
// A chunked prefill traces each chunk: token-row tensors are stacked in order; the head-major ones
// (block_scores, selection: [Hi*T_c, C] per chunk) are interleaved head by head so that the whole
// prompt's tensor is head-major [Hi*T, C] whatever the chunking, the narrower chunks' missing
// block-score columns (blocks past every query of the chunk) filled with -inf.
TraceFn recorder(EngineRun& run) {
  auto chunk = std::make_shared<std::int64_t>(0);  // tokens of the current forward call
  return [&run, chunk](int seq, const std::string& name, const TraceView& v) {
    if (seq != 0) return;
    if (name == "blk.0.attn_norm") *chunk = v.rows;  // every forward call's first trace
    MatF m(v.rows, v.cols);
    for (std::int64_t r = 0; r < v.rows; ++r)
      for (std::int64_t c = 0; c < v.cols; ++c) m(r, c) = static_cast<float>(v.at(r, c));
    auto it = run.trace.find(name);
    if (it == run.trace.end()) {
      run.order.push_back(name);
      run.trace.emplace(name, std::move(m));
      return;
    }
    MatF& a = it->second;
    const std::string op = op_of(name);
    const bool head_major = (op == "block_scores" || op == "selection") && *chunk > 0 && m.rows() % *chunk == 0 &&
                            m.rows() != *chunk;
    const float pad = op == "selection" ? -1.f : -std::numeric_limits<float>::infinity();
    const Eigen::Index cols = std::max(a.cols(), m.cols());
    if (!head_major) {  // token rows arrive in order
      MatF g = MatF::Constant(a.rows() + m.rows(), cols, pad);
      g.topLeftCorner(a.rows(), a.cols()) = a;
      g.bottomLeftCorner(m.rows(), m.cols()) = m;
      a = std::move(g);
      return;
    }
    const Eigen::Index H = m.rows() / *chunk, Tp = a.rows() / H, Tc = *chunk;
    MatF g = MatF::Constant(H * (Tp + Tc), cols, pad);  // [H*(Tp+Tc), C]
    for (Eigen::Index i = 0; i < H; ++i) {
      g.block(i * (Tp + Tc), 0, Tp, a.cols()) = a.middleRows(i * Tp, Tp);
      g.block(i * (Tp + Tc) + Tp, 0, Tc, m.cols()) = m.middleRows(i * Tc, Tc);
    }
    a = std::move(g);
  };
}

// Prefill + decode on any engine with the m3::Model interface.
// x_in (optional): the prompt's input rows [T, H] in place of its embeddings (prefill_embeds, one call).
template <class M>
EngineRun drive(M& model, const std::vector<std::int32_t>& prompt, int steps, const std::vector<std::int32_t>* forced,
                std::string engine, std::int64_t chunk = 0, const MatD* x_in = nullptr) {
  using clock = std::chrono::steady_clock;
  EngineRun run;
  run.engine = std::move(engine);
  auto seq = model.new_sequence();
  const auto t0 = clock::now();
  std::vector<MatD> rows;
  const auto rec = recorder(run);
  const std::span<const std::int32_t> all(prompt);
  const auto step = chunk > 0 ? static_cast<std::size_t>(chunk) : all.size();
  if (x_in)
    rows.push_back(model.prefill_embeds(seq, all, *x_in, rec));
  else
    for (std::size_t at = 0; at < all.size(); at += step)  // [T, V] in chunks (the engine may chunk further)
      rows.push_back(model.prefill(seq, all.subspan(at, std::min(step, all.size() - at)), rec));
  const auto t1 = clock::now();
  for (int i = 0; i < steps; ++i) {
    const MatD& last = rows.back();
    run.greedy.push_back(greedy_token(last, last.rows() - 1));
    run.fed.push_back(forced ? (*forced)[static_cast<std::size_t>(i)] : run.greedy.back());
    rows.push_back(model.decode(seq, run.fed.back()));
  }
  const auto t2 = clock::now();
  run.prefill_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
  run.decode_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
  Eigen::Index n = 0;
  for (const MatD& r : rows) n += r.rows();
  run.logits.resize(n, rows[0].cols());
  n = 0;
  for (const MatD& r : rows) {
    run.logits.middleRows(n, r.rows()) = r;
    n += r.rows();
  }
  return run;
}

std::vector<double> flat(const MatF& m) {
  return std::vector<double>(m.data(), m.data() + m.size());
}
std::vector<std::int64_t> flat_ids(const MatF& m) {
  std::vector<std::int64_t> v(static_cast<std::size_t>(m.size()));
  for (Eigen::Index i = 0; i < m.size(); ++i) v[static_cast<std::size_t>(i)] = std::llround(m.data()[i]);
  return v;
}

int layer_of(const std::string& name) {
  if (name.rfind("blk.", 0) != 0) return -1;
  return std::atoi(name.c_str() + 4);
}
std::string op_of(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

// rel-L2 of two matrices over their common leading columns (block scores of different widths).
MatF left(const MatF& m, Eigen::Index cols) { return m.leftCols(std::min(cols, m.cols())); }

bool add_nonfinite_failure(const FloatMetrics& m, std::vector<std::string>& failures) {
  if (m.unexpected_nan)
    failures.push_back(fmt::format("NaN at {} where the reference has {:.6g}", coord_str(m.first_nonfinite.at),
                                   m.first_nonfinite.want));
  else if (m.nonfinite_mismatches > 0)
    failures.push_back(fmt::format("{} non-finite values at other places than the reference's, first at {}",
                                   m.nonfinite_mismatches, coord_str(m.first_nonfinite.at)));
  else
    return false;
  return true;
}

TensorCheck check_float(const std::string& name, const MatF& test, const MatF& ref, const MatF& truth) {
  TensorCheck t;
  t.name = name;
  t.layer = layer_of(name);
  const Eigen::Index cols = std::min({test.cols(), ref.cols(), truth.cols()});
  const MatF a = left(test, cols), b = left(ref, cols), c = left(truth, cols);
  const auto fa = flat(a), fb = flat(b), fc = flat(c);
  t.vs_ref = compare_float(fa, fb, {a.rows(), a.cols()}, kBf16.atol, kBf16.rtol);
  t.err_test = rel_l2(fa, fc);
  t.err_ref = rel_l2(fb, fc);
  t.bound = kAttnErrFactor * t.err_ref + kAttnFloor;
  add_nonfinite_failure(t.vs_ref, t.failures);
  if (t.vs_ref.ref_norm == 0 && t.vs_ref.compared > 0) t.failures.push_back("the reference is all zero: a vacuous check");
  if (t.vs_ref.rel_l2 <= kBf16.rel_l2) t.rule = "emulation";
  else if (t.err_test <= t.bound) t.rule = "2x-truth";
  else
    t.failures.push_back(fmt::format("rel-L2 {:.3e} vs the bf16 reference > {:.0e}, and {:.3e} vs fp64 > {} x {:.3e} + {:.1e}",
                                     t.vs_ref.rel_l2, kBf16.rel_l2, t.err_test, kAttnErrFactor, t.err_ref, kAttnFloor));
  return t;
}

// Biased router scores sigmoid(logit) + bias: what decides the experts.
MatD expert_scores(const MatF& logits, const Vec<float>& bias, bool use_bias) {
  MatD s(logits.rows(), logits.cols());
  for (Eigen::Index r = 0; r < logits.rows(); ++r)
    for (Eigen::Index e = 0; e < logits.cols(); ++e)
      s(r, e) = 1.0 / (1.0 + std::exp(-static_cast<double>(logits(r, e)))) + (use_bias ? bias(e) : 0.0);
  return s;
}

// Top-K of sigmoid(logit) + bias per row with the router's tie rule (higher score, then lower
// id), in the router's arithmetic: the sigmoid in fp64 rounded to fp32, the bias added in fp32.
MatF router_choice(const MatF& logits, const Vec<float>& bias, bool use_bias, int K) {
  MatF out(logits.rows(), K);
  std::vector<std::pair<float, int>> s(static_cast<std::size_t>(logits.cols()));
  for (Eigen::Index r = 0; r < logits.rows(); ++r) {
    for (Eigen::Index e = 0; e < logits.cols(); ++e) {
      const float sig = static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(logits(r, e)))));
      float key = sig + (use_bias ? bias(e) : 0.f);
      if (std::isnan(key)) key = -std::numeric_limits<float>::infinity();
      s[static_cast<std::size_t>(e)] = {key, static_cast<int>(e)};
    }
    std::partial_sort(s.begin(), s.begin() + K, s.end(), [](const auto& x, const auto& y) {
      return x.first > y.first || (x.first == y.first && x.second < y.second);
    });
    for (int k = 0; k < K; ++k) out(r, k) = static_cast<float>(s[static_cast<std::size_t>(k)].second);
  }
  return out;
}

// `own`: what the op's rule picks from the engine's own scores (same shape as test).
TensorCheck check_index(const std::string& name, const MatF& test, const MatF& ref, const MatD& scores,
                        double noise_rel, const MatF& own) {
  TensorCheck t;
  t.name = name;
  t.layer = layer_of(name);
  t.is_index = true;
  if (test.rows() != ref.rows() || test.cols() != ref.cols() || own.rows() != test.rows() || own.cols() != test.cols()) {
    t.failures.push_back(fmt::format("shape [{}, {}], the reference's [{}, {}]", test.rows(), test.cols(), ref.rows(),
                                     ref.cols()));
    return t;
  }
  TieScores ties{scores, std::max(kBf16.tie_rtol, kNoiseMargin * noise_rel)};
  t.tie_rtol = ties.rtol;
  const auto a = flat_ids(test), b = flat_ids(ref);
  t.ix = compare_index(a, b, {test.rows(), test.cols()}, &ties);
  const std::size_t C = static_cast<std::size_t>(test.cols());
  for (Eigen::Index r = 0; r < test.rows(); ++r) {
    if (!t.ix.row_differs[static_cast<std::size_t>(r)]) continue;
    const std::span<const std::int64_t> ra(a.data() + r * C, C), rb(b.data() + r * C, C);
    if (near_tie_row(ra, rb, ties, r)) continue;
    if (test.row(r) == own.row(r)) ++t.rows_own_scores;
    else ++t.rows_unexplained;
  }
  if (t.rows_unexplained > 0)
    t.failures.push_back(fmt::format(
        "{} of {} rows differ from the reference beyond near-ties (tie rtol {:.2e}) and are not the rule's choice on "
        "the engine's own scores either; exact rows {:.4f}",
        t.rows_unexplained, t.ix.rows, ties.rtol,
        1.0 - static_cast<double>(t.ix.rows_differ) / std::max<std::int64_t>(1, t.ix.rows)));
  t.rule = t.ix.exact() ? "exact" : t.rows_unexplained == 0 ? (t.rows_own_scores ? "own-scores" : "near-tie") : "";
  return t;
}

// m without the rows r where drop[r] (rows past drop's end are kept).
template <class M>
M keep_rows(const M& m, const std::vector<char>& drop) {
  auto dropped = [&](Eigen::Index r) { return r < static_cast<Eigen::Index>(drop.size()) && drop[r]; };
  Eigen::Index n = 0;
  for (Eigen::Index r = 0; r < m.rows(); ++r) n += !dropped(r);
  M out(n, m.cols());
  n = 0;
  for (Eigen::Index r = 0; r < m.rows(); ++r)
    if (!dropped(r)) out.row(n++) = m.row(r);
  return out;
}

// The second run of DESIGN 4 for MoE rows whose experts the test engine chose differently (and
// acceptably): the reference's moe_experts on input rows x [T, H] (the engine's own) with the
// engine's experts and weights [T, K_e], in the bf16 emulation (bf16 weights, Rounding::BF16, the
// output rounded), for `rows`. Only the experts those rows use are converted, in ascending id: the
// reference's summation order. Returns [rows.size(), H]; a row with an id outside [0, E) is NaN.
MatF moe_rows_with_choice(const ModelConfig& cfg, const LayerWeights<float>& L, const MatF& x_in, const MatF& experts,
                          const MatF& weights, const std::vector<Eigen::Index>& rows) {
  const auto E = static_cast<std::int64_t>(L.experts.size());
  const Eigen::Index K = experts.cols(), H = x_in.cols(), n = static_cast<Eigen::Index>(rows.size());
  std::vector<std::int64_t> ids;
  for (Eigen::Index r : rows)
    for (Eigen::Index j = 0; j < K; ++j)
      if (const auto e = std::llround(experts(r, j)); e >= 0 && e < E) ids.push_back(e);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  auto bf16 = [](const ref::MlpWeights<float>& w) {
    ref::MlpWeights<float> c = w;
    round_bf16_inplace(c.gate), round_bf16_inplace(c.up), round_bf16_inplace(c.down);
    return c;
  };
  std::vector<ref::MlpWeights<float>> ew;
  for (auto e : ids) ew.push_back(bf16(L.experts[static_cast<std::size_t>(e)]));
  MatF x(n, H), w(n, K);  // [n, H], [n, K_e]
  MatI ix(n, K);          // [n, K_e] ids into ew
  std::vector<char> bad(static_cast<std::size_t>(n), 0);
  for (Eigen::Index i = 0; i < n; ++i) {
    x.row(i) = x_in.row(rows[static_cast<std::size_t>(i)]);
    w.row(i) = weights.row(rows[static_cast<std::size_t>(i)]);
    for (Eigen::Index j = 0; j < K; ++j) {
      const auto e = std::llround(experts(rows[static_cast<std::size_t>(i)], j));
      const auto it = std::lower_bound(ids.begin(), ids.end(), e);
      if (it == ids.end() || *it != e) bad[static_cast<std::size_t>(i)] = 1, ix(i, j) = 0;
      else ix(i, j) = static_cast<int>(it - ids.begin());
    }
  }
  MatF y;  // [n, H]
  if (!ew.empty())
    ref::moe_experts(x, ix, w, ew, bf16(L.shared), cfg.routed_scaling_factor,
                     ref::SwigluParams{cfg.swiglu_alpha, cfg.swiglu_limit, cfg.swiglu_beta}, y, ref::Rounding::BF16);
  else
    y = MatF::Zero(n, H);
  round_bf16_inplace(y);
  for (Eigen::Index i = 0; i < n; ++i)
    if (bad[static_cast<std::size_t>(i)] || ew.empty()) y.row(i).setConstant(std::numeric_limits<float>::quiet_NaN());
  return y;
}

// The output rounded to bf16 once is the emulation's rounding: a token whose selection flipped at
// an accepted near-tie is checked for the kernel, not for its choice. The NaN rows of a refused
// selection fail any check.
MatF attn_rows_with_selection(const ModelConfig& cfg, bool msa, const MatF& q, const MatF& k, const MatF& v,
                              const MatF* sel, std::int64_t T, const std::vector<Eigen::Index>& rows,
                              std::string* refused) {
  const auto n = static_cast<Eigen::Index>(rows.size());
  MatF qr(n, q.cols());  // [n, Hq*D]
  std::vector<std::int64_t> pos(rows.size());  // [n]
  for (Eigen::Index i = 0; i < n; ++i) {
    qr.row(i) = q.row(rows[static_cast<std::size_t>(i)]);
    pos[static_cast<std::size_t>(i)] = rows[static_cast<std::size_t>(i)];
  }
  MatF out;  // [n, Hq*D]
  try {
    if (msa) {
      const Eigen::Index Hi = cfg.index_n_heads;
      MatI s(Hi * n, sel->cols());  // [Hi*n, K_blk] head-major, the engine's rows
      for (Eigen::Index h = 0; h < Hi; ++h)
        for (Eigen::Index i = 0; i < n; ++i)
          s.row(h * n + i) = sel->row(h * T + rows[static_cast<std::size_t>(i)]).cast<int>();
      ref::msa_attention(qr, k, v, pos, s, cfg.index_block_size, cfg.attn_dims(), out);
    } else {
      ref::attention_dense(qr, k, v, pos, cfg.attn_dims(), out);
    }
  } catch (const std::exception& e) {
    out = MatF::Constant(n, q.cols(), std::numeric_limits<float>::quiet_NaN());
    if (refused) *refused = e.what();
  }
  round_bf16_inplace(out);
  return out;
}

// Whether a row still compared (its token not flipped itself) follows a token flipped at an earlier
// layer (`before`): attention is causal, so only such a row can see that token's changed keys,
// values and index key through the KV cache.
bool kv_contaminated(const std::vector<char>& before, const std::vector<char>& now, std::int64_t T) {
  const auto first = std::find(before.begin(), before.begin() + T, char{1}) - before.begin();
  for (auto t = first + 1; t < T; ++t)
    if (!now[static_cast<std::size_t>(t)]) return true;
  return false;
}

// The own-inputs rule (model_compare.h) on layer l's attn_out [T, Hq*D] or block_scores [Hi*T, NB]
// `got`: every row against the reference op re-run on the engine's own traced inputs, at the op's
// tier (the sampled mode's check, which the same kernels pass on an H200 at 4K-32K tokens:
// reports/gpu/compare_m3layer_32k_h200_2026-11-29.txt). Sets t.rows_own_inputs; returns the
// failure lines, none where the tensor is what the op makes of the engine's own inputs.
std::vector<std::string> own_inputs_failures(const ModelConfig& cfg, const EngineRun& test, int l, bool msa,
                                             const std::string& op, std::int64_t T, const MatF& got, TensorCheck& t) {
  auto traced = [&](const char* what, Eigen::Index rows) -> const MatF* {
    const auto it = test.trace.find(fmt::format("blk.{}.{}", l, what));
    return it == test.trace.end() || it->second.rows() != rows ? nullptr : &it->second;
  };
  std::vector<Eigen::Index> rows(static_cast<std::size_t>(T));  // [T] every prompt position
  std::iota(rows.begin(), rows.end(), Eigen::Index{0});
  MatF want;  // [T, Hq*D] or [Hi*T, NB]
  Tolerance tol;
  if (op == "block_scores") {
    const MatF *iq = traced("idx_q", T), *ik = traced("idx_k", T);
    if (!iq || !ik) return {"own inputs: the engine's idx_q or idx_k are not traced whole: its scores cannot be re-run"};
    want = index_scores_from(cfg, *iq, *ik, std::vector<std::int64_t>(rows.begin(), rows.end()), test.fp8_index_cache);
    tol = tolerance("msa_index", Precision::FP32);  // fp32 scores of bf16 operands: only the summation order differs
  } else {
    const MatF *q = traced("q", T), *k = traced("k", T), *v = traced("v", T);
    const MatF* sel = msa ? traced("selection", static_cast<Eigen::Index>(cfg.index_n_heads) * T) : nullptr;
    if (!q || !k || !v || (msa && !sel))
      return {"own inputs: the engine's q, k, v or selection are not traced whole: its attention cannot be re-run"};
    want = attn_rows_with_selection(cfg, msa, *q, *k, *v, sel, T, rows);
    tol = tolerance(msa ? "msa_attention" : "attention_dense", Precision::BF16);
  }
  t.rows_own_inputs = want.rows();
  FloatMetrics m;
  auto failures = op_tier_failures(got, want, tol, "against the reference op re-run on the engine's own inputs", m);
  for (auto& f : failures) f = fmt::format("own inputs ({} rows): {}", want.rows(), f);
  return failures;
}

// Softmax of a logits row in fp64 (max-subtracted).
std::vector<double> softmax_row(const MatD& m, Eigen::Index r) {
  std::vector<double> p(static_cast<std::size_t>(m.cols()));
  double mx = -std::numeric_limits<double>::infinity();
  for (Eigen::Index j = 0; j < m.cols(); ++j) mx = std::max(mx, m(r, j));
  double sum = 0;
  for (Eigen::Index j = 0; j < m.cols(); ++j) sum += p[static_cast<std::size_t>(j)] = std::exp(m(r, j) - mx);
  for (double& x : p) x /= sum;
  return p;
}

// A differing argmax is a near-tie when, in the reference's row, the two choices' logits are
// closer than kNoiseMargin times the noise of their difference between the engines. What decides
// is the gap of two logits, and the engines' per-logit differences d = test - ref are nearly
// independent with about the same spread sigma at every token, the top ones included, so a gap
// moves by sqrt(2) sigma (tiny, fp32 vs the bf16 emulation, 30400 rows of 400 draws: the change of
// the reference's top-2 gap has std 1.43 sigma, its two tokens' own d 1.02 and 1.01 sigma). sigma is
// the standard deviation of d over the row's other tokens: a defect in one of the two deciding
// logits must not widen its own allowance, and an offset of the whole row changes no argmax. (The
// RMS of d over the whole row set the margin at 2.8 sigma of the gap, beyond which 145 of those
// rows moved: one draw in about 3000 of a 6-step greedy decode then failed at a rounding near-tie
// of the bf16 reference, with the fp32 engine choosing as the fp64 truth does: M3_TEST_SEED=628380.)
double std_dev(const std::vector<double>& d) {
  if (d.size() < 2) return std::numeric_limits<double>::quiet_NaN();
  const double mean = std::accumulate(d.begin(), d.end(), 0.0) / static_cast<double>(d.size());
  double var = 0;
  for (double x : d) var += (x - mean) * (x - mean);
  return std::sqrt(var / static_cast<double>(d.size()));
}

bool argmax_near_tie(const MatD& test, const MatD& ref, Eigen::Index r, std::int32_t a_test, std::int32_t a_ref) {
  std::vector<double> d;  // [V - 2] the engines' differences at the other tokens
  d.reserve(static_cast<std::size_t>(ref.cols()));
  for (Eigen::Index j = 0; j < ref.cols(); ++j)
    if (j != a_test && j != a_ref) d.push_back(test(r, j) - ref(r, j));
  const double gap_noise = std::sqrt(2.0) * std_dev(d);  // NaN (never a near-tie): < 2 values or a non-finite d
  return ref(r, a_ref) - ref(r, a_test) <= kNoiseMargin * gap_noise;
}

}  // namespace detail

using namespace detail;

bool ModelComparison::pass() const {
  if (!failures.empty()) return false;
  return std::all_of(tensors.begin(), tensors.end(), [](const TensorCheck& t) { return t.pass(); });
}

EngineRun run_reference(const ModelConfig& cfg, const ModelWeights<float>& w, Precision p,
                        const std::vector<std::int32_t>& prompt, int steps, const std::vector<std::int32_t>* forced,
                        const ReferenceOptions& opt, std::int64_t prefill_chunk, const MatD* input_rows) {
  Model model(cfg, w, p, opt);
  EngineRun run = drive(model, prompt, steps, forced,
                        fmt::format("ref-{}{}", precision_name(p), opt.fp8_index_cache ? "-fp8idx" : ""), prefill_chunk,
                        input_rows);
  run.fp8_index_cache = opt.fp8_index_cache;
  return run;
}

#if M3_HAVE_GPU
EngineRun run_gpu(const ModelConfig& cfg, const ModelWeights<float>& w, const std::vector<std::int32_t>& prompt,
                  int steps, const std::vector<std::int32_t>* forced, const GpuRunOptions& o) {
  gpu::ModelOptions mo;
  mo.max_batch = 1;
  mo.max_context = static_cast<std::int64_t>(prompt.size()) + std::max(steps, 1);
  mo.max_tokens = std::min<std::int64_t>(static_cast<std::int64_t>(prompt.size()), o.max_tokens);
  mo.fp8_index_cache = o.fp8_index_cache;
  mo.last_logits_only = o.last_logits_only;
  gpu::Model model(cfg, w, mo);
  EngineRun run = drive(model, prompt, steps, forced, o.fp8_index_cache ? "gpu-fp8idx" : "gpu", 0, o.input_rows);
  run.fp8_index_cache = o.fp8_index_cache;
  return run;
}
#endif

ModelComparison compare_runs(const ModelConfig& cfg, const ModelWeights<float>& weights, std::int64_t T,
                             const EngineRun& test, const EngineRun& ref, const EngineRun& truth) {
  if (test.logits.rows() != ref.logits.rows() || truth.logits.rows() != ref.logits.rows() ||
      test.logits.cols() != ref.logits.cols())
    throw std::invalid_argument(fmt::format("compare_runs: logits of {}x{}, {}x{}, {}x{} do not line up",
                                            test.logits.rows(), test.logits.cols(), ref.logits.rows(),
                                            ref.logits.cols(), truth.logits.rows(), truth.logits.cols()));
  ModelComparison mc;
  // Per op and layer, in the reference's order.
  std::map<int, double> score_noise;  // layer -> rel-L2 of its block scores / router logits
  // Tokens whose MoE experts the engine chose differently from the reference, as an accepted index
  // difference (a near-tie, or the rule's choice on its own gated scores): that layer's moe_out
  // rows are checked against the reference re-run with the engine's choice, and every later
  // token-row tensor and the end-to-end metrics leave those tokens out (DESIGN 4: a choice flip
  // neither hides a kernel error nor fails the run by the divergence it legitimately causes).
  std::vector<char> flipped(static_cast<std::size_t>(ref.logits.rows()), 0);  // [T + K]
  std::vector<char> flipped_before = flipped;  // [T + K] those flipped at a layer before the current one
  int at_layer = -1;
  for (const std::string& name : ref.order) {
    if (const int l = layer_of(name); l > at_layer) at_layer = l, flipped_before = flipped;
    const auto it_t = test.trace.find(name), it_f = truth.trace.find(name);
    if (it_t == test.trace.end() || it_f == truth.trace.end()) {
      TensorCheck t;
      t.name = name;
      t.layer = layer_of(name);
      t.failures.push_back(fmt::format("missing from the {} trace", it_t == test.trace.end() ? test.engine : truth.engine));
      mc.tensors.push_back(std::move(t));
      continue;
    }
    const MatF& r = ref.trace.at(name);
    const std::string op = op_of(name);
    const int l = layer_of(name);
    const auto& L = weights.layers[static_cast<std::size_t>(l < 0 ? 0 : l)];
    if (op == "selection") {
      const std::string sn = fmt::format("blk.{}.block_scores", l);
      const MatF& sc = ref.trace.at(sn);
      MatF own = MatF::Constant(it_t->second.rows(), it_t->second.cols(), -2.f);  // [Hi*T, K_blk]
      if (const auto ts = test.trace.find(sn); ts != test.trace.end() && ts->second.rows() == sc.rows()) {
        std::vector<std::int64_t> pos(static_cast<std::size_t>(T));
        for (std::int64_t i = 0; i < T; ++i) pos[static_cast<std::size_t>(i)] = i;
        MatI sel;
        ref::msa_select(ts->second, pos, cfg.msa_dims(), sel);
        if (sel.rows() == own.rows() && sel.cols() == own.cols()) own = sel.cast<float>();
      }
      mc.tensors.push_back(check_index(name, it_t->second, r, sc.cast<double>(), score_noise[l], own));
      // An accepted selection flip (rows head-major: row i*T + t is token t's) changes that token's
      // attention output by a whole block: it is treated as an expert flip (below).
      const TensorCheck& sel_check = mc.tensors.back();
      if (sel_check.pass())
        for (std::size_t i = 0; i < sel_check.ix.row_differs.size(); ++i)
          if (sel_check.ix.row_differs[i] && i % static_cast<std::size_t>(T) < flipped.size())
            flipped[i % static_cast<std::size_t>(T)] = 1;
    } else if (op == "experts") {
      const std::string ln = fmt::format("blk.{}.router_logits", l);
      const MatF& lg = ref.trace.at(ln);
      MatF own = MatF::Constant(it_t->second.rows(), it_t->second.cols(), -2.f);  // [T, K_e]
      if (const auto tl = test.trace.find(ln); tl != test.trace.end() && tl->second.rows() == lg.rows())
        own = router_choice(tl->second, L.router_bias, cfg.use_routing_bias, cfg.num_experts_per_tok);
      mc.tensors.push_back(check_index(name, it_t->second, r, expert_scores(lg, L.router_bias, cfg.use_routing_bias),
                                       score_noise[l], own));
      const TensorCheck& ec = mc.tensors.back();
      if (ec.pass())
        for (std::size_t i = 0; i < ec.ix.row_differs.size() && i < flipped.size(); ++i)
          if (ec.ix.row_differs[i]) flipped[i] = 1;
    } else {
      if (it_t->second.rows() != r.rows()) {
        TensorCheck t;
        t.name = name;
        t.layer = l;
        t.failures.push_back(fmt::format("{} rows, the reference has {}", it_t->second.rows(), r.rows()));
        mc.tensors.push_back(std::move(t));
        continue;
      }
      // Tensors with a row per prompt token (the trace covers the prefill; the block scores are
      // head-major [Hi*T, NB], token rows only when Hi = 1, which keep_rows then handles right).
      const bool token_rows = r.rows() == T && it_t->second.rows() == T && it_f->second.rows() == T;
      // Head-major block scores [Hi*T, NB]: row h*T + t is token t's, left out with it (a token
      // flipped earlier has other hidden states, so other scores, from then on).
      const Eigen::Index Hi = cfg.index_n_heads;
      const bool head_rows = !token_rows && op == "block_scores" && r.rows() == Hi * T &&
                             it_t->second.rows() == r.rows() && it_f->second.rows() == r.rows();
      std::vector<char> head_flipped;  // [Hi*T]
      if (head_rows)
        for (Eigen::Index h = 0; h < Hi; ++h) head_flipped.insert(head_flipped.end(), flipped.begin(), flipped.begin() + T);
      const std::vector<char>& drop = head_rows ? head_flipped : flipped;
      TensorCheck tc = token_rows || head_rows
                           ? check_float(name, keep_rows(it_t->second, drop), keep_rows(r, drop), keep_rows(it_f->second, drop))
                           : check_float(name, it_t->second, r, it_f->second);
      const auto gate_failure = tc.rule.empty() ? tc.failures.size() - 1 : std::string::npos;  // its line
      tc.rows_excluded = token_rows  ? std::count(flipped.begin(), flipped.begin() + T, 1)
                         : head_rows ? std::count(head_flipped.begin(), head_flipped.end(), 1)
                                     : 0;
      // The flipped tokens' rows (this layer's and earlier layers'): the engine's rows against the
      // reference op re-run on the engine's own input (its gated ffn_norm) with its own experts and
      // weights, so that only the kernel differs; the emulation rule alone (the fp64 truth chose
      // other experts there, or has another input).
      std::vector<Eigen::Index> rows;
      if (token_rows && (op == "moe_out" || op == "attn_out"))
        for (Eigen::Index i = 0; i < T; ++i)
          if (flipped[static_cast<std::size_t>(i)]) rows.push_back(i);
      if (!rows.empty() && op == "attn_out") {
        // The same for attention: the engine's q, k, v and (MSA) selection through the reference op.
        const bool msa = L.attn_type == AttnType::MSA;
        const auto qi = test.trace.find(fmt::format("blk.{}.q", l)), ki = test.trace.find(fmt::format("blk.{}.k", l));
        const auto vi = test.trace.find(fmt::format("blk.{}.v", l));
        const auto si = test.trace.find(fmt::format("blk.{}.selection", l));
        if (qi == test.trace.end() || ki == test.trace.end() || vi == test.trace.end() ||
            (msa && (si == test.trace.end() || si->second.rows() != static_cast<Eigen::Index>(cfg.index_n_heads) * T))) {
          tc.failures.push_back("choices flipped, but the engine's q, k, v or selection are not traced (whole): its "
                                "attention rows cannot be re-run");
        } else {
          const MatF want = attn_rows_with_selection(cfg, msa, qi->second, ki->second, vi->second,
                                                     msa ? &si->second : nullptr, T, rows);  // [rows, Hq*D]
          MatF got(want.rows(), want.cols());                                                // [rows, Hq*D]
          for (std::size_t i = 0; i < rows.size(); ++i) got.row(static_cast<Eigen::Index>(i)) = it_t->second.row(rows[i]);
          const auto m = compare_float(flat(got), flat(want), {got.rows(), got.cols()}, kBf16.atol, kBf16.rtol);
          tc.rows_rerun = static_cast<std::int64_t>(rows.size());
          if (m.unexpected_nan || m.nonfinite_mismatches > 0 || !(m.rel_l2 <= kBf16.rel_l2))
            tc.failures.push_back(fmt::format(
                "{} rows of tokens whose selection or experts flipped: rel-L2 {:.3e} against the reference re-run on "
                "the engine's q, k, v{} (> {:.0e}){}",
                rows.size(), m.rel_l2, msa ? " and selection" : "", kBf16.rel_l2,
                m.unexpected_nan || m.nonfinite_mismatches > 0 ? ", non-finite values differ" : ""));
        }
      } else if (!rows.empty()) {
        const auto xi = test.trace.find(fmt::format("blk.{}.ffn_norm", l));
        const auto ei = test.trace.find(fmt::format("blk.{}.experts", l));
        const auto wi = test.trace.find(fmt::format("blk.{}.expert_weights", l));
        if (xi == test.trace.end() || ei == test.trace.end() || wi == test.trace.end()) {
          tc.failures.push_back("expert choices flipped, but the engine's ffn_norm, experts or expert_weights are not "
                                "traced: its rows cannot be re-run");
        } else {
          const MatF want = moe_rows_with_choice(cfg, L, xi->second, ei->second, wi->second, rows);  // [rows, H]
          MatF got(want.rows(), want.cols());                                                     // [rows, H]
          for (std::size_t i = 0; i < rows.size(); ++i) got.row(static_cast<Eigen::Index>(i)) = it_t->second.row(rows[i]);
          const auto m = compare_float(flat(got), flat(want), {got.rows(), got.cols()}, kBf16.atol, kBf16.rtol);
          tc.rows_rerun = static_cast<std::int64_t>(rows.size());
          if (m.unexpected_nan || m.nonfinite_mismatches > 0) {
            const auto& at = m.first_nonfinite.at;
            tc.failures.push_back(fmt::format(
                "{} at row {} col {} (a token whose experts flipped: checked against the reference re-run on the "
                "engine's input with its experts, which has {:.6g})",
                m.unexpected_nan ? "NaN" : "a non-finite value", at.empty() ? -1 : rows[static_cast<std::size_t>(at[0])],
                at.size() > 1 ? at[1] : -1, m.first_nonfinite.want));
          } else if (!(m.rel_l2 <= kBf16.rel_l2)) {
            tc.failures.push_back(fmt::format("{} rows of tokens whose experts flipped: rel-L2 {:.3e} against the "
                                              "reference re-run on the engine's input with its experts (> {:.0e})",
                                              rows.size(), m.rel_l2, kBf16.rel_l2));
          }
        }
      }
      // The own-inputs rule (model_compare.h): attention and index scores that fail the gate where
      // a compared row follows a token flipped at an earlier layer.
      if (gate_failure != std::string::npos && (op == "attn_out" || op == "block_scores") && (token_rows || head_rows) &&
          kv_contaminated(flipped_before, flipped, T)) {
        auto fl = own_inputs_failures(cfg, test, l, L.attn_type == AttnType::MSA, op, T, it_t->second, tc);
        if (fl.empty()) {
          tc.failures.erase(tc.failures.begin() + static_cast<std::ptrdiff_t>(gate_failure));
          if (tc.failures.empty()) tc.rule = "own-inputs";
        }
        tc.failures.insert(tc.failures.end(), fl.begin(), fl.end());
      }
      mc.tensors.push_back(std::move(tc));
      if (op == "block_scores" || op == "router_logits") score_noise[l] = mc.tensors.back().vs_ref.rel_l2;
    }
  }
  for (const std::string& name : test.order)
    if (!ref.trace.count(name)) {
      TensorCheck t;
      t.name = name;
      t.layer = layer_of(name);
      t.failures.push_back("traced by the engine under test but not by the reference");
      mc.tensors.push_back(std::move(t));
    }

  // End to end.
  EndToEnd& e = mc.e2e;
  e.rows_flipped = std::count(flipped.begin(), flipped.end(), 1);
  const MatD A = keep_rows(test.logits, flipped), B = keep_rows(ref.logits, flipped), C = keep_rows(truth.logits, flipped);
  std::vector<Eigen::Index> full_row;  // row of A, B, C -> row of the full logits
  for (std::size_t r = 0; r < flipped.size(); ++r)
    if (!flipped[r]) full_row.push_back(static_cast<Eigen::Index>(r));
  e.rows = B.rows();
  auto rl2 = [](const MatD& x, const MatD& y) { return (x - y).norm() / y.norm(); };
  e.logits_rel_l2 = rl2(A, B);
  e.logits_err_test = rl2(A, C);
  e.logits_err_ref = rl2(B, C);
  std::int64_t same = 0;
  double kl_sum = 0;
  for (Eigen::Index r = 0; r < B.rows(); ++r) {
    const std::int32_t at = greedy_token(A, r), ar = greedy_token(B, r), af = greedy_token(C, r);
    e.top1_truth_differ_test += at != af;
    e.top1_truth_differ_ref += ar != af;
    if (at == ar) ++same;
    else {
      ++e.top1_differ;
      if (argmax_near_tie(A, B, r, at, ar)) ++e.top1_near_tie;
    }
    const auto p = softmax_row(B, r), q = softmax_row(A, r);
    double kl = 0;
    for (std::size_t j = 0; j < p.size(); ++j)
      if (p[j] > 0) kl += p[j] * (std::log(p[j]) - std::log(std::max(q[j], 1e-300)));
    kl_sum += kl;
    if (kl > e.kl_max) e.kl_max = kl, e.kl_max_row = full_row[static_cast<std::size_t>(r)];
  }
  e.top1_agree = static_cast<double>(same) / static_cast<double>(std::max<std::int64_t>(1, B.rows()));
  e.kl_mean = kl_sum / static_cast<double>(std::max<std::int64_t>(1, B.rows()));
  e.decode_steps = static_cast<int>(ref.greedy.size());
  if (test.greedy.size() != ref.greedy.size() || test.fed != ref.fed)
    mc.failures.push_back("the engine under test was not fed the reference's decode tokens");
  for (int i = 0; i < e.decode_steps && static_cast<std::size_t>(i) < test.greedy.size(); ++i) {
    const std::int32_t gt = test.greedy[static_cast<std::size_t>(i)], gr = ref.greedy[static_cast<std::size_t>(i)];
    if (gt == gr) {
      ++e.greedy_agree;
      continue;
    }
    if (e.first_divergence < 0) e.first_divergence = i;
    const Eigen::Index row = T - 1 + i;  // in the full logits: rows of flipped tokens are explained
    if (row < static_cast<Eigen::Index>(flipped.size()) && flipped[static_cast<std::size_t>(row)]) ++e.greedy_flipped;
    else if (argmax_near_tie(test.logits, ref.logits, row, gt, gr)) ++e.greedy_near_tie;
  }
  for (std::size_t i = 0; i < truth.greedy.size() && i < ref.greedy.size(); ++i)
    e.truth_greedy_agree += truth.greedy[i] == ref.greedy[i];

  if (!(e.logits_rel_l2 <= kBf16.rel_l2 || e.logits_err_test <= kAttnErrFactor * e.logits_err_ref + kAttnFloor))
    mc.failures.push_back(fmt::format("logits: rel-L2 {:.3e} vs the bf16 reference and {:.3e} vs fp64 (> {} x {:.3e} + {:.1e})",
                                      e.logits_rel_l2, e.logits_err_test, kAttnErrFactor, e.logits_err_ref, kAttnFloor));
  if (e.top1_differ > e.top1_near_tie &&
      static_cast<double>(e.top1_truth_differ_test) > kAttnErrFactor * static_cast<double>(e.top1_truth_differ_ref))
    mc.failures.push_back(fmt::format("top-1: {} of {} rows choose another token beyond a near-tie, and {} rows differ "
                                      "from fp64's argmax (> {} x the bf16 reference's {})",
                                      e.top1_differ - e.top1_near_tie, e.rows, e.top1_truth_differ_test, kAttnErrFactor,
                                      e.top1_truth_differ_ref));
  if (e.decode_steps - e.greedy_agree > e.greedy_near_tie + e.greedy_flipped)
    mc.failures.push_back(fmt::format("greedy decode: {} of {} steps differ beyond a near-tie or a flipped expert choice "
                                      "(first at step {})",
                                      e.decode_steps - e.greedy_agree - e.greedy_near_tie - e.greedy_flipped,
                                      e.decode_steps, e.first_divergence));
  return mc;
}

}  // namespace m3::cmp
