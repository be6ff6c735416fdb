// Sampled-row checking from the engine's own inputs (model_sampled.h). Each step mirrors
// reference/model.cpp's bf16 mode op for op (weights rounded to bf16 except the router, a rounding
// wherever the GPU stores bf16), on S rows instead of T.
#include "compare/model_sampled.h"

#include "compare/model_compare_detail.h"
#include "compare/tolerance.h"
#include "reference/ops/linear.h"
#include "reference/ops/lm_head.h"
#include "reference/ops/moe_router.h"
#include "reference/ops/msa_index.h"
#include "reference/ops/msa_select.h"
#include "reference/ops/qk_norm_rope.h"
#include "reference/ops/rms_norm.h"
#include "reference/ops/swiglu_oai.h"

#include <fmt/format.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <stdexcept>

namespace m3::cmp {

using namespace detail;

bool SampledComparison::pass() const {
  return std::all_of(tensors.begin(), tensors.end(), [](const TensorCheck& t) { return t.pass(); });
}

std::vector<std::int64_t> sample_rows(const ModelConfig& cfg, std::int64_t T, int n_random, std::uint64_t seed) {
  const std::int64_t B = std::max(1, cfg.index_block_size), W = B * std::max(1, cfg.index_topk_blocks);
  std::vector<std::int64_t> r = {0, 1, B - 1, B, 2 * B - 1, W - 1, W, W + 1, T / 2, T - 2, T - 1};
  std::mt19937_64 g(seed);
  for (int i = 0; i < n_random && T > 0; ++i) r.push_back(static_cast<std::int64_t>(g() % static_cast<std::uint64_t>(T)));
  std::erase_if(r, [&](std::int64_t x) { return x < 0 || x >= T; });
  std::sort(r.begin(), r.end());
  r.erase(std::unique(r.begin(), r.end()), r.end());
  return r;
}

namespace {

// A bf16-rounded copy (a weight in the GPU's storage, or a value the GPU stores in bf16).
template <class M>
typename M::PlainObject rounded(const Eigen::MatrixBase<M>& m) {
  typename M::PlainObject c = m;
  round_bf16_inplace(c);
  return c;
}

struct Checker {
  const EngineRun& test;
  const std::vector<std::int64_t>& rows;
  std::int64_t T;
  std::vector<TensorCheck>& out;

  const MatF* find(const std::string& name) {
    const auto it = test.trace.find(name);
    if (it != test.trace.end()) return &it->second;
    TensorCheck t;
    t.name = name;
    t.failures.push_back(fmt::format("missing from the {} trace", test.engine));
    out.push_back(std::move(t));
    return nullptr;
  }
  // The sampled rows of a token-row tensor [T, C] -> [S, C].
  MatF rows_of(const MatF& m) const {
    if (m.rows() != T)
      throw std::invalid_argument(fmt::format("check_sampled_rows: a traced tensor has {} rows, expected T = {}",
                                              m.rows(), T));
    MatF s(static_cast<Eigen::Index>(rows.size()), m.cols());
    for (std::size_t i = 0; i < rows.size(); ++i) s.row(static_cast<Eigen::Index>(i)) = m.row(rows[i]);
    return s;
  }
  // Head-major rows [H*T, C] of the sampled queries -> [H*S, C] (row i*S + s).
  MatF head_rows_of(const MatF& m, int heads) const {
    const auto S = static_cast<Eigen::Index>(rows.size());
    MatF s(heads * S, m.cols());
    for (int i = 0; i < heads; ++i)
      for (Eigen::Index j = 0; j < S; ++j) s.row(i * S + j) = m.row(i * T + rows[static_cast<std::size_t>(j)]);
    return s;
  }
  // The engine's rows against the reference's, under the op's tier.
  void check(const std::string& name, const MatF& got, const MatF& want, const Tolerance& tol) {
    TensorCheck t;
    t.name = name;
    t.layer = name.rfind("blk.", 0) == 0 ? std::atoi(name.c_str() + 4) : -1;
    t.bound = tol.rel_l2;
    t.failures = op_tier_failures(got, want, tol, "on the sampled rows", t.vs_ref);
    t.rule = t.failures.empty() ? "rows" : "";
    out.push_back(std::move(t));
  }
};

}  // namespace

namespace detail {  // shared with model_compare.cpp's own-inputs rule through model_compare_detail.h

std::vector<std::string> op_tier_failures(const MatF& got, const MatF& want, const Tolerance& tol, const std::string& where,
                                          FloatMetrics& m) {
  std::vector<std::string> failures;
  const Eigen::Index cols = std::min(got.cols(), want.cols());
  const MatF a = left(got, cols), b = left(want, cols);
  m = compare_float(flat(a), flat(b), {a.rows(), a.cols()}, tol.atol, tol.rtol);
  if (got.rows() != want.rows())
    failures.push_back(fmt::format("{} rows, the reference {}", got.rows(), want.rows()));
  else if (!add_nonfinite_failure(m, failures)) {
    if (!(m.rel_l2 <= tol.rel_l2))
      failures.push_back(fmt::format("rel-L2 {:.3e} > {:.0e} {}", m.rel_l2, tol.rel_l2, where));
    else if (m.violations > 0)
      failures.push_back(fmt::format("{} of {} elements outside {:.3g} + {:.3g}|b|, first at {}", m.violations, m.compared,
                                     tol.atol, tol.rtol, m.first.empty() ? "?" : coord_str(m.first.front().at)));
  }
  if (m.ref_norm == 0 && m.compared > 0) failures.push_back("the reference is all zero: a vacuous check");
  return failures;
}

MatF index_scores_from(const ModelConfig& cfg, const MatF& idx_q, const MatF& idx_k, std::span<const std::int64_t> pos,
                       bool fp8_index_cache) {
  MatF scores;  // [Hi*n, NB]
  if (!fp8_index_cache) {
    ref::msa_index(idx_q, idx_k, pos, cfg.msa_dims(), scores);
    return scores;
  }
  MatF ik8 = idx_k;  // [T, Di] the cache's E4M3 values
  round_e4m3_inplace(ik8);
  ref::msa_index(idx_q, ik8, pos, cfg.msa_dims(), scores);
  return scores;
}

}  // namespace detail

SampledComparison check_sampled_rows(const ModelConfig& cfg, const ModelWeights<float>& w,
                                     const std::vector<std::int32_t>& prompt, const EngineRun& test,
                                     const std::vector<std::int64_t>& rows, bool fp8_index_cache) {
  const auto T = static_cast<std::int64_t>(prompt.size());
  for (auto r : rows)
    if (r < 0 || r >= T) throw std::invalid_argument(fmt::format("check_sampled_rows: row {} outside the prompt [0, {})", r, T));
  SampledComparison sc;
  sc.rows = rows;
  if (rows.empty()) return sc;
  Checker c{test, rows, T, sc.tensors};
  const Tolerance t_norm = tolerance("rms_norm", Precision::BF16), t_qk = tolerance("qk_norm_rope", Precision::BF16);
  const Tolerance t_lin = tolerance("linear", Precision::BF16), t_mlp = tolerance("moe_experts", Precision::BF16);
  const Tolerance t_bf16 = kBf16, t_fp32 = kFp32;
  const double eps = cfg.rms_norm_eps, theta = cfg.rope_theta;
  const int Hq = cfg.num_attention_heads, Hkv = cfg.num_key_value_heads, D = cfg.head_dim, R = cfg.rotary_dim;
  const int Hi = cfg.index_n_heads, Di = cfg.index_head_dim;
  std::vector<std::int64_t> pos(rows.begin(), rows.end());  // [S] positions of the sampled queries
  const ref::SwigluParams sp{cfg.swiglu_alpha, cfg.swiglu_limit, cfg.swiglu_beta};

  MatF h_prev(static_cast<Eigen::Index>(rows.size()), cfg.hidden_size);  // [S, H] the residual stream entering layer l
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto id = prompt[static_cast<std::size_t>(rows[i])];
    if (id < 0 || id >= w.embed_tokens.rows())
      throw std::invalid_argument(fmt::format("check_sampled_rows: token {} at row {} outside the vocabulary", id, rows[i]));
    h_prev.row(static_cast<Eigen::Index>(i)) = w.embed_tokens.row(id);
  }
  round_bf16_inplace(h_prev);
  for (int l = 0; l < cfg.num_hidden_layers; ++l) {
    const auto& L = w.layers[static_cast<std::size_t>(l)];
    const std::string b = fmt::format("blk.{}.", l);
    const bool msa = L.attn_type == AttnType::MSA;
    const MatF *an = c.find(b + "attn_norm"), *q = c.find(b + "q"), *k = c.find(b + "k"), *v = c.find(b + "v");
    const MatF *ao = c.find(b + "attn_out"), *fn = c.find(b + "ffn_norm"), *o = c.find(b + "out");
    if (!an || !q || !k || !v || !ao || !fn || !o) return sc;
    MatF y;  // reference rows
    ref::rms_norm(h_prev, rounded(L.input_layernorm), eps, y);
    c.check(b + "attn_norm", c.rows_of(*an), rounded(y), t_norm);
    const MatF x = c.rows_of(*an);  // [S, H] the engine's attention input
    auto proj_norm_rope = [&](const Mat<float>& W, const Vec<float>& nw, int heads, int d) {
      MatF p;
      ref::linear(x, rounded(W), p);
      round_bf16_inplace(p);
      ref::qk_norm_rope(p, heads, d, rounded(nw), eps, R, theta, pos, p);
      return rounded(p);
    };
    c.check(b + "q", c.rows_of(*q), proj_norm_rope(L.attn.q_proj, L.attn.q_norm, Hq, D), t_qk);
    c.check(b + "k", c.rows_of(*k), proj_norm_rope(L.attn.k_proj, L.attn.k_norm, Hkv, D), t_qk);
    ref::linear(x, rounded(L.attn.v_proj), y);
    c.check(b + "v", c.rows_of(*v), rounded(y), t_lin);
    const MatF* sel = nullptr;  // [Hi*T, K_blk] the engine's selection (MSA layers)
    if (msa) {
      const MatF *iq = c.find(b + "idx_q"), *ik = c.find(b + "idx_k"), *bs = c.find(b + "block_scores");
      sel = c.find(b + "selection");
      if (!iq || !ik || !bs || !sel) return sc;
      c.check(b + "idx_q", c.rows_of(*iq), proj_norm_rope(L.attn.index_q_proj, L.attn.index_q_norm, Hi, Di), t_qk);
      c.check(b + "idx_k", c.rows_of(*ik), proj_norm_rope(L.attn.index_k_proj, L.attn.index_k_norm, 1, Di), t_qk);
      // Block scores of the sampled queries against the engine's whole index-K cache.
      const MatF scores = index_scores_from(cfg, c.rows_of(*iq), *ik, pos, fp8_index_cache);  // [Hi*S, NB]
      const MatF own = c.head_rows_of(*bs, Hi);  // [Hi*S, NB'] the engine's
      c.check(b + "block_scores", own, scores, tolerance("msa_index", Precision::FP32));
      // The selection from the engine's own scores, exactly (ties by the rule).
      MatI want;
      ref::msa_select(MatF(left(own, scores.cols())), pos, cfg.msa_dims(), want);
      const MatF got_sel = c.head_rows_of(*sel, Hi);
      sc.tensors.push_back(check_index(b + "selection", got_sel, want.cast<float>(), own.cast<double>(), 0.0,
                                       want.cast<float>()));
    }
    // The attention of those rows with the engine's own selection: its kernel, not its choice.
    std::string refused;  // why the reference refuses the engine's inputs (a selection id out of range, a duplicate)
    const MatF attn = attn_rows_with_selection(cfg, msa, *q, *k, *v, sel, T,  // [S, Hq*D]
                                               std::vector<Eigen::Index>(rows.begin(), rows.end()), &refused);
    if (refused.empty()) {
      c.check(b + "attn_out", c.rows_of(*ao), attn, t_bf16);
    } else {  // the layer carries on from the engine's attn_out rows
      TensorCheck t;
      t.name = b + "attn_out";
      t.layer = l;
      t.failures.push_back(fmt::format("not re-run: the engine's selection is invalid ({})", refused));
      sc.tensors.push_back(std::move(t));
    }
    // o_proj, the residual add and the FFN norm, from the engine's attention output.
    ref::linear(c.rows_of(*ao), rounded(L.attn.o_proj), y);
    const MatF h_mid = rounded(h_prev + rounded(y));
    ref::rms_norm(h_mid, rounded(L.post_attention_layernorm), eps, y);
    c.check(b + "ffn_norm", c.rows_of(*fn), rounded(y), t_norm);
    const MatF x2 = c.rows_of(*fn);  // [S, H] the engine's FFN input
    MatF ffn;                        // [S, H] the engine's FFN output rows
    if (L.mlp_type == MlpType::DENSE) {
      const MatF* mo = c.find(b + "mlp_out");
      if (!mo) return sc;
      ref::mlp_swiglu(x2, rounded(L.mlp.gate), rounded(L.mlp.up), rounded(L.mlp.down), sp, y, ref::Rounding::BF16);
      c.check(b + "mlp_out", c.rows_of(*mo), rounded(y), t_mlp);
      ffn = c.rows_of(*mo);
    } else {
      const MatF *rl = c.find(b + "router_logits"), *ex = c.find(b + "experts"), *ew = c.find(b + "expert_weights"),
                 *mo = c.find(b + "moe_out");
      if (!rl || !ex || !ew || !mo) return sc;
      MatF logits, weights;  // [S, E], [S, K_e]
      MatI experts;          // [S, K_e]
      ref::moe_router(x2, L.router, L.router_bias, cfg.num_experts_per_tok, cfg.norm_topk_prob, logits, experts, weights);
      const MatF own_logits = c.rows_of(*rl), got_ex = c.rows_of(*ex), got_w = c.rows_of(*ew);
      c.check(b + "router_logits", own_logits, logits, t_fp32);
      sc.tensors.push_back(check_index(b + "experts", got_ex, experts.cast<float>(),
                                       expert_scores(logits, L.router_bias, cfg.use_routing_bias), 0.0,
                                       router_choice(own_logits, L.router_bias, cfg.use_routing_bias,
                                                     cfg.num_experts_per_tok)));
      if (got_ex == experts.cast<float>()) c.check(b + "expert_weights", got_w, weights, t_fp32);
      // The MoE output from the engine's own experts and weights (a near-tie choice included).
      std::vector<Eigen::Index> all(rows.size());
      std::iota(all.begin(), all.end(), Eigen::Index{0});
      c.check(b + "moe_out", c.rows_of(*mo), moe_rows_with_choice(cfg, L, x2, got_ex, got_w, all), t_mlp);
      ffn = c.rows_of(*mo);
    }
    c.check(b + "out", c.rows_of(*o), rounded(h_mid + ffn), t_bf16);
    h_prev = c.rows_of(*o);
  }
  // The LM head on the engine's last hidden rows; logits stay fp32 on both sides. An engine that
  // returned only the prompt's last row (gpu::ModelOptions::last_logits_only) is checked there.
  MatF lg;
  ref::lm_head(h_prev, rounded(w.norm), eps, rounded(w.lm_head), lg);
  if (test.logits.rows() >= T) {
    MatF got(static_cast<Eigen::Index>(rows.size()), test.logits.cols());
    for (std::size_t i = 0; i < rows.size(); ++i)
      got.row(static_cast<Eigen::Index>(i)) = test.logits.row(rows[i]).cast<float>();
    c.check("logits", got, lg, t_bf16);
  } else if (test.logits.rows() >= 1 && rows.back() == T - 1) {
    c.check("logits", MatF(test.logits.topRows(1).cast<float>()), MatF(lg.bottomRows(1)), t_bf16);
  } else {
    TensorCheck t;
    t.name = "logits";
    t.failures.push_back(fmt::format("the engine returned {} logits rows of a {}-token prompt: nothing to check",
                                     test.logits.rows(), T));
    sc.tensors.push_back(std::move(t));
  }
  return sc;
}

}  // namespace m3::cmp
