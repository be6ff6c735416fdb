// The reference forward pass (model.h). Reads top to bottom like spec §2.1:
//   h = Embed(tokens); per layer: h += Attn(RMSNorm(h)); h += FFN(RMSNorm(h)); logits = LMHead(h).
// Projections run over all tokens of all sequences at once; attention runs per sequence over its
// own caches. In BF16 mode every activation is rounded where the GPU path stores bf16.
#include "reference/model.h"

#include "reference/ops/attention_dense.h"
#include "reference/ops/embedding.h"
#include "reference/ops/linear.h"
#include "reference/ops/lm_head.h"
#include "reference/ops/moe_experts.h"
#include "reference/ops/moe_router.h"
#include "reference/ops/msa_attention.h"
#include "reference/ops/msa_index.h"
#include "reference/ops/msa_select.h"
#include "reference/ops/qk_norm_rope.h"
#include "reference/ops/rms_norm.h"
#include "reference/ops/swiglu_oai.h"

#include <fmt/format.h>

#include <limits>
#include <stdexcept>
#include <variant>

namespace m3 {

double TraceView::at(std::int64_t r, std::int64_t c) const {
  const std::int64_t i = r * row_stride + c;
  switch (dtype) {
    case DType::F32: return static_cast<const float*>(data)[i];
    case DType::F64: return static_cast<const double*>(data)[i];
    case DType::I32: return static_cast<const std::int32_t*>(data)[i];
  }
  return 0;
}

namespace {

template <class T>
constexpr TraceView::DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return TraceView::DType::F32;
  else if constexpr (std::is_same_v<T, double>) return TraceView::DType::F64;
  else return TraceView::DType::I32;
}

// Per-sequence caches of one precision; rows beyond `len` are capacity, never read by the ops
// (they only read keys j <= the query's position < len).
template <class T>
struct Caches {
  std::vector<Mat<T>> k, v;  // per layer [cap, Hkv*D]: post-norm, post-RoPE K and raw V
  std::vector<Mat<T>> idx_k; // per layer [cap, Di] on MSA layers, empty on dense layers
};

}  // namespace

struct Sequence::State {
  const void* owner = nullptr;  // the Model::Impl that made it
  std::int64_t len = 0;
  std::variant<Caches<float>, Caches<double>> caches;
};

Sequence::Sequence() = default;
Sequence::~Sequence() = default;
Sequence::Sequence(Sequence&&) noexcept = default;
Sequence& Sequence::operator=(Sequence&&) noexcept = default;
std::int64_t Sequence::length() const { return s_ ? s_->len : 0; }
void Sequence::truncate(std::int64_t n) {
  if (n < 0 || n > length())
    throw std::out_of_range(fmt::format("Sequence::truncate: {} tokens, expected 0..{} (the current length)", n, length()));
  // Cache rows past len are never read (every op bounds its keys by the query positions) and the
  // next append overwrites them.
  if (s_) s_->len = n;
}

// ---------------------------------------------------------------------------------------------

template <class T>
struct Forward {
  const ModelConfig& cfg;
  const ModelWeights<T>& w;
  const bool bf16;
  ForwardStats& stats;

  void rnd(Mat<T>& m) const {
    if (bf16) round_bf16_inplace(m);
  }
  ref::Rounding rounding() const { return bf16 ? ref::Rounding::BF16 : ref::Rounding::NONE; }

  // The rows of sequence s inside a batched tensor, and how to trace them.
  struct Batch {
    std::vector<Caches<T>*> caches;
    std::vector<std::int64_t> start_len;    // cache length before this call, per sequence
    std::vector<Eigen::Index> row0, rows;   // row range of each sequence in batched tensors
    std::vector<std::vector<std::int64_t>> pos;  // absolute positions per sequence
  };

  const TraceFn& trace;
  const bool fp8_index_cache;  // ReferenceOptions::fp8_index_cache

  template <class M>
  void emit(const Batch& b, const std::string& name, const M& m) const {
    if (!trace) return;
    using S = typename M::Scalar;
    for (std::size_t s = 0; s < b.caches.size(); ++s) {
      TraceView v{dtype_of<S>(), m.data() + b.row0[s] * m.cols(), b.rows[s], m.cols(), m.cols()};
      trace(static_cast<int>(s), name, v);
    }
  }
  template <class M>
  void emit_one(int s, const std::string& name, const M& m) const {
    if (!trace) return;
    using S = typename M::Scalar;
    trace(s, name, TraceView{dtype_of<S>(), m.data(), m.rows(), m.cols(), m.cols()});
  }

  // Appends rows of `src` for each sequence into its per-layer cache.
  static void append(Mat<T>& cache, std::int64_t at, const Mat<T>& src, Eigen::Index row0, Eigen::Index n) {
    if (cache.rows() < at + n) {
      Eigen::Index cap = std::max<Eigen::Index>(at + n, 2 * cache.rows());
      cache.conservativeResize(cap, src.cols());
    }
    cache.middleRows(at, n) = src.middleRows(row0, n);
  }

  void attention(int l, const Batch& b, const Mat<T>& a, Mat<T>& attn_out) {
    const LayerWeights<T>& L = w.layers[l];
    const std::string blk = fmt::format("blk.{}.", l);
    const int Hq = cfg.num_attention_heads, Hkv = cfg.num_key_value_heads, D = cfg.head_dim;
    const double eps = cfg.rms_norm_eps;
    std::vector<std::int64_t> pos;  // [T] all rows
    for (auto& p : b.pos) pos.insert(pos.end(), p.begin(), p.end());

    Mat<T> q, k, v;  // [T, Hq*D], [T, Hkv*D], [T, Hkv*D]
    ref::linear(a, L.attn.q_proj, q); rnd(q);
    ref::linear(a, L.attn.k_proj, k); rnd(k);
    ref::linear(a, L.attn.v_proj, v); rnd(v);
    if (cfg.use_qk_norm) {
      ref::qk_norm_rope(q, Hq, D, L.attn.q_norm, eps, cfg.rotary_dim, cfg.rope_theta, pos, q);
      ref::qk_norm_rope(k, Hkv, D, L.attn.k_norm, eps, cfg.rotary_dim, cfg.rope_theta, pos, k);
    } else {
      ref::rope_neox(q, Hq, D, cfg.rotary_dim, cfg.rope_theta, pos);
      ref::rope_neox(k, Hkv, D, cfg.rotary_dim, cfg.rope_theta, pos);
    }
    rnd(q); rnd(k);
    emit(b, blk + "q", q);
    emit(b, blk + "k", k);
    emit(b, blk + "v", v);

    const bool msa = L.attn_type == AttnType::MSA;
    Mat<T> iq, ik;  // [T, Hi*Di], [T, Di]
    if (msa) {
      const int Hi = cfg.index_n_heads, Di = cfg.index_head_dim;
      ref::linear(a, L.attn.index_q_proj, iq); rnd(iq);
      ref::linear(a, L.attn.index_k_proj, ik); rnd(ik);
      ref::qk_norm_rope(iq, Hi, Di, L.attn.index_q_norm, eps, cfg.rotary_dim, cfg.rope_theta, pos, iq);
      ref::qk_norm_rope(ik, 1, Di, L.attn.index_k_norm, eps, cfg.rotary_dim, cfg.rope_theta, pos, ik);
      rnd(iq); rnd(ik);
      emit(b, blk + "idx_q", iq);
      emit(b, blk + "idx_k", ik);
    }

    attn_out.resize(a.rows(), Hq * D);
    for (std::size_t s = 0; s < b.caches.size(); ++s) {
      Caches<T>& c = *b.caches[s];
      const Eigen::Index r0 = b.row0[s], n = b.rows[s];
      append(c.k[l], b.start_len[s], k, r0, n);
      append(c.v[l], b.start_len[s], v, r0, n);
      const Mat<T> qs = q.middleRows(r0, n);  // [T_s, Hq*D]
      Mat<T> os;                              // [T_s, Hq*D]
      if (!msa) {
        ref::attention_dense(qs, c.k[l], c.v[l], b.pos[s], cfg.attn_dims(), os, &stats.dense);
      } else {
        append(c.idx_k[l], b.start_len[s], ik, r0, n);
        if (fp8_index_cache) {  // the GPU's E4M3 cache: keys are rounded once, as they are written
          auto written = c.idx_k[l].middleRows(b.start_len[s], n);
          round_e4m3_inplace(written);
        }
        const Mat<T> iqs = iq.middleRows(r0, n);  // [T_s, Hi*Di]
        Mat<T> scores;                            // [Hi*T_s, NB]
        MatI sel;                                 // [Hi*T_s, K_blk]
        ref::msa_index(iqs, c.idx_k[l], b.pos[s], cfg.msa_dims(), scores, &stats.msa);
        ref::msa_select(scores, b.pos[s], cfg.msa_dims(), sel, &stats.msa);
        emit_one(static_cast<int>(s), blk + "block_scores", scores);
        emit_one(static_cast<int>(s), blk + "selection", sel);
        ref::msa_attention(qs, c.k[l], c.v[l], b.pos[s], sel, cfg.index_block_size, cfg.attn_dims(), os,
                           &stats.msa);
      }
      attn_out.middleRows(r0, n) = os;
    }
    rnd(attn_out);
    emit(b, blk + "attn_out", attn_out);
  }

  void ffn(int l, const Batch& b, const Mat<T>& m, Mat<T>& out) {
    const LayerWeights<T>& L = w.layers[l];
    const std::string blk = fmt::format("blk.{}.", l);
    const ref::SwigluParams sp{cfg.swiglu_alpha, cfg.swiglu_limit, cfg.swiglu_beta};
    if (L.mlp_type == MlpType::DENSE) {
      ref::mlp_swiglu(m, L.mlp.gate, L.mlp.up, L.mlp.down, sp, out, rounding());
      rnd(out);
      emit(b, blk + "mlp_out", out);
      return;
    }
    Mat<T> logits, weights;  // [T, E], [T, K_e]
    MatI experts;            // [T, K_e]
    ref::moe_router(m, L.router, L.router_bias, cfg.num_experts_per_tok, cfg.norm_topk_prob, logits, experts,
                    weights);
    emit(b, blk + "router_logits", logits);
    emit(b, blk + "experts", experts);
    emit(b, blk + "expert_weights", weights);
    ref::moe_experts(m, experts, weights, L.experts, L.shared, cfg.routed_scaling_factor, sp, out, rounding());
    rnd(out);
    emit(b, blk + "moe_out", out);
  }

  // h_in (an MTP module's model only): per sequence, the previous hidden states [T_s, H].
  // hidden_out (optional): per sequence, the residual stream after the last layer [T_s, H].
  // x_in (optional): per sequence, the input rows [T_s, H] in place of the token embeddings.
  std::vector<MatD> run(const Batch& b, const std::vector<std::int32_t>& tokens, std::span<const MatD* const> h_in,
                        std::vector<MatD>* hidden_out, std::span<const MatD* const> x_in = {}) {
    const double eps = cfg.rms_norm_eps;
    Mat<T> h;  // [T, H] residual stream
    if (!x_in.empty()) {
      h.resize(static_cast<Eigen::Index>(tokens.size()), cfg.hidden_size);
      for (std::size_t s = 0; s < b.caches.size(); ++s) h.middleRows(b.row0[s], b.rows[s]) = x_in[s]->template cast<T>();
      rnd(h);  // the embedding table is bf16 in that mode: so are its rows and the features placed among them
    } else if (w.mtp_in) {
      // Spec §7: x = eh_proj([enorm(Embed(next token)) ; hnorm(h_prev)]), the embedding zeroed at
      // position 0 (Gemma RMSNorm maps a zero row to zero, so before or after the norm is one).
      const MtpInputWeights<T>& m = *w.mtp_in;
      const Eigen::Index n = static_cast<Eigen::Index>(tokens.size()), H = cfg.hidden_size;
      Mat<T> e, en, hp(n, H), hn;  // [T, H] each
      ref::embedding(w.embed_tokens, tokens, e);
      for (std::size_t s = 0; s < b.caches.size(); ++s) {
        for (Eigen::Index i = 0; i < b.rows[s]; ++i)
          if (b.pos[s][static_cast<std::size_t>(i)] == 0) e.row(b.row0[s] + i).setZero();
        hp.middleRows(b.row0[s], b.rows[s]) = h_in[s]->template cast<T>();
      }
      ref::rms_norm(e, m.enorm, eps, en); rnd(en);
      ref::rms_norm(hp, m.hnorm, eps, hn); rnd(hn);
      Mat<T> cat(n, 2 * H);  // [T, 2H] embedding half first
      cat << en, hn;
      ref::linear(cat, m.eh_proj, h); rnd(h);
      emit(b, "mtp.enorm", en);
      emit(b, "mtp.hnorm", hn);
      emit(b, "mtp.x", h);
    } else {
      ref::embedding(w.embed_tokens, tokens, h);
    }
    for (int l = 0; l < cfg.num_hidden_layers; ++l) {
      const LayerWeights<T>& L = w.layers[l];
      const std::string blk = fmt::format("blk.{}.", l);
      Mat<T> a, o, proj;  // [T, H], [T, Hq*D], [T, H]
      ref::rms_norm(h, L.input_layernorm, eps, a); rnd(a);
      emit(b, blk + "attn_norm", a);
      attention(l, b, a, o);
      ref::linear(o, L.attn.o_proj, proj); rnd(proj);
      h += proj; rnd(h);
      ref::rms_norm(h, L.post_attention_layernorm, eps, a); rnd(a);
      emit(b, blk + "ffn_norm", a);
      ffn(l, b, a, proj);
      h += proj; rnd(h);
      emit(b, blk + "out", h);
    }
    Mat<T> logits;  // [T, V]; fp32 on the GPU path too (cuBLAS writes fp32), so never rounded
    ref::lm_head(h, w.norm, eps, w.lm_head, logits);
    emit(b, "logits", logits);
    if (hidden_out) {
      hidden_out->clear();
      for (std::size_t s = 0; s < b.caches.size(); ++s)
        hidden_out->push_back(h.middleRows(b.row0[s], b.rows[s]).template cast<double>());
    }
    std::vector<MatD> out;
    for (std::size_t s = 0; s < b.caches.size(); ++s)
      out.push_back(logits.middleRows(b.row0[s], b.rows[s]).template cast<double>());
    return out;
  }
};

struct Model::Impl {
  ModelConfig cfg;
  Precision precision;
  ReferenceOptions opt;
  std::variant<ModelWeights<float>, ModelWeights<double>> w;
  ForwardStats stats;
  bool mtp = false;  // an MTP module's model: forward takes the previous hidden states
};

namespace {

void check_shape(const char* what, Eigen::Index r, Eigen::Index c, Eigen::Index er, Eigen::Index ec) {
  if (r != er || c != ec)
    throw std::invalid_argument(fmt::format("weights: {} is [{}, {}], expected [{}, {}] from the config", what, r,
                                            c, er, ec));
}

void check_weights(const ModelConfig& c, const ModelWeights<float>& w) {
  const int H = c.hidden_size, D = c.head_dim;
  check_shape("model.embed_tokens.weight", w.embed_tokens.rows(), w.embed_tokens.cols(), c.vocab_size, H);
  check_shape("lm_head.weight", w.lm_head.rows(), w.lm_head.cols(), c.vocab_size, H);
  check_shape("model.norm.weight", w.norm.rows(), 1, H, 1);
  if (static_cast<int>(w.layers.size()) != c.num_hidden_layers)
    throw std::invalid_argument(fmt::format("weights: {} layers, expected num_hidden_layers = {}", w.layers.size(),
                                            c.num_hidden_layers));
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const auto& L = w.layers[l];
    const std::string p = fmt::format("layer {}: ", l);
    if (L.attn_type != c.layer_types[l] || L.mlp_type != c.mlp_layer_types[l])
      throw std::invalid_argument(p + "layer type differs from the config");
    check_shape((p + "q_proj").c_str(), L.attn.q_proj.rows(), L.attn.q_proj.cols(), c.num_attention_heads * D, H);
    check_shape((p + "k_proj").c_str(), L.attn.k_proj.rows(), L.attn.k_proj.cols(), c.num_key_value_heads * D, H);
    check_shape((p + "v_proj").c_str(), L.attn.v_proj.rows(), L.attn.v_proj.cols(), c.num_key_value_heads * D, H);
    check_shape((p + "o_proj").c_str(), L.attn.o_proj.rows(), L.attn.o_proj.cols(), H, c.num_attention_heads * D);
    if (L.attn_type == AttnType::MSA)
      check_shape((p + "index_q_proj").c_str(), L.attn.index_q_proj.rows(), L.attn.index_q_proj.cols(),
                  c.index_n_heads * c.index_head_dim, H);
    if (L.mlp_type == MlpType::MOE && static_cast<int>(L.experts.size()) != c.num_local_experts)
      throw std::invalid_argument(fmt::format("{}{} experts, expected num_local_experts = {}", p, L.experts.size(),
                                              c.num_local_experts));
  }
  if (w.mtp_in) {
    check_shape("mtp enorm.weight", w.mtp_in->enorm.rows(), 1, H, 1);
    check_shape("mtp hnorm.weight", w.mtp_in->hnorm.rows(), 1, H, 1);
    check_shape("mtp eh_proj.weight", w.mtp_in->eh_proj.rows(), w.mtp_in->eh_proj.cols(), H, 2 * H);
  }
}

template <class T>
Caches<T> make_caches(const ModelConfig& c) {
  Caches<T> k;
  const int L = c.num_hidden_layers;
  k.k.assign(L, Mat<T>(0, c.num_key_value_heads * c.head_dim));
  k.v.assign(L, Mat<T>(0, c.num_key_value_heads * c.head_dim));
  k.idx_k.resize(L);
  for (int l = 0; l < L; ++l)
    if (c.layer_types[l] == AttnType::MSA) k.idx_k[l] = Mat<T>(0, c.index_head_dim);
  return k;
}

}  // namespace

Model::Model(ModelConfig cfg, const ModelWeights<float>& weights, Precision precision, ReferenceOptions opt)
    : p_(std::make_unique<Impl>()) {
  if (opt.fp8_index_cache && precision != Precision::BF16)
    throw std::invalid_argument(fmt::format("Model: the fp8 index-K cache emulates the GPU in bf16 mode, not {}",
                                            precision_name(precision)));
  p_->opt = opt;
  cfg.validate();
  check_weights(cfg, weights);
  p_->cfg = std::move(cfg);
  p_->precision = precision;
  p_->mtp = weights.mtp_in.has_value();
  if (precision == Precision::FP64) p_->w = convert_weights<double>(weights, precision);
  else p_->w = convert_weights<float>(weights, precision);
}
Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

const ModelConfig& Model::config() const { return p_->cfg; }
Precision Model::precision() const { return p_->precision; }
bool Model::takes_hidden_states() const { return p_->mtp; }

MatD Model::final_norm(const MatD& h) const {
  if (h.cols() != p_->cfg.hidden_size)
    throw std::invalid_argument(fmt::format("final_norm: [{}, {}], expected {} columns", h.rows(), h.cols(),
                                            p_->cfg.hidden_size));
  const bool bf16 = p_->precision == Precision::BF16;
  return std::visit(
      [&](const auto& w) -> MatD {
        using T = typename std::decay_t<decltype(w.norm)>::Scalar;
        Mat<T> x = h.cast<T>(), y;  // [T, H]
        ref::rms_norm(x, w.norm, p_->cfg.rms_norm_eps, y);
        if (bf16) round_bf16_inplace(y);
        return y.template cast<double>();
      },
      p_->w);
}
const ForwardStats& Model::stats() const { return p_->stats; }
void Model::reset_stats() { p_->stats = {}; }

Sequence Model::new_sequence() const {
  Sequence s;
  s.s_ = std::make_unique<Sequence::State>();
  s.s_->owner = p_.get();
  if (p_->precision == Precision::FP64) s.s_->caches = make_caches<double>(p_->cfg);
  else s.s_->caches = make_caches<float>(p_->cfg);
  return s;
}

std::vector<MatD> Model::forward(std::span<Sequence* const> seqs,
                                 std::span<const std::span<const std::int32_t>> tokens, const TraceFn& trace) {
  return forward(seqs, tokens, trace, {}, nullptr);
}

std::vector<MatD> Model::forward(std::span<Sequence* const> seqs,
                                 std::span<const std::span<const std::int32_t>> tokens, const TraceFn& trace,
                                 std::span<const MatD* const> h_in, std::vector<MatD>* hidden_out) {
  return forward_impl(seqs, tokens, trace, h_in, hidden_out, {});
}

MatD Model::prefill_embeds(Sequence& seq, std::span<const std::int32_t> tokens, const MatD& x, const TraceFn& trace) {
  if (p_->mtp) throw std::invalid_argument("prefill_embeds: an MTP module's model takes forward with hidden states");
  if (x.rows() != static_cast<Eigen::Index>(tokens.size()) || x.cols() != p_->cfg.hidden_size)
    throw std::invalid_argument(fmt::format("prefill_embeds: input rows [{}, {}], expected [{}, {}] (tokens, hidden_size)",
                                            x.rows(), x.cols(), tokens.size(), p_->cfg.hidden_size));
  Sequence* s[] = {&seq};
  std::span<const std::int32_t> t[] = {tokens};
  const MatD* xi[] = {&x};
  return std::move(forward_impl(s, t, trace, {}, nullptr, xi)[0]);
}

std::vector<MatD> Model::forward_impl(std::span<Sequence* const> seqs,
                                      std::span<const std::span<const std::int32_t>> tokens, const TraceFn& trace,
                                      std::span<const MatD* const> h_in, std::vector<MatD>* hidden_out,
                                      std::span<const MatD* const> x_in) {
  const ModelConfig& c = p_->cfg;
  if (seqs.size() != tokens.size())
    throw std::invalid_argument(fmt::format("forward: {} sequences but {} token lists", seqs.size(), tokens.size()));
  if (!p_->mtp && !h_in.empty())
    throw std::invalid_argument("forward: previous hidden states given to a model without MTP input weights");
  if (p_->mtp && h_in.size() != seqs.size())
    throw std::invalid_argument(fmt::format("forward: an MTP module's model needs the previous hidden states of every "
                                            "sequence, got {} for {} sequences",
                                            h_in.size(), seqs.size()));
  for (std::size_t s = 0; s < h_in.size(); ++s)
    if (!h_in[s] || h_in[s]->rows() != static_cast<Eigen::Index>(tokens[s].size()) || h_in[s]->cols() != c.hidden_size)
      throw std::invalid_argument(fmt::format(
          "forward: sequence {}: previous hidden states {}, expected [{}, {}] (one row per token, hidden_size)", s,
          h_in[s] ? fmt::format("[{}, {}]", h_in[s]->rows(), h_in[s]->cols()) : std::string("missing"),
          tokens[s].size(), c.hidden_size));
  // Validate everything before touching any cache, so a bad request changes nothing.
  std::vector<std::int32_t> all;
  for (std::size_t s = 0; s < seqs.size(); ++s) {
    if (!seqs[s] || !seqs[s]->s_ || seqs[s]->s_->owner != p_.get())
      throw std::invalid_argument(fmt::format("forward: sequence {} was not made by this model", s));
    if (tokens[s].empty()) throw std::invalid_argument(fmt::format("forward: sequence {} has no tokens", s));
    const std::int64_t end = seqs[s]->s_->len + static_cast<std::int64_t>(tokens[s].size());
    if (end > c.max_position_embeddings)
      throw std::out_of_range(fmt::format(
          "sequence {}: context of {} tokens exceeds max_position_embeddings = {}", s, end,
          c.max_position_embeddings));
    for (std::size_t i = 0; i < tokens[s].size(); ++i)
      if (tokens[s][i] < 0 || tokens[s][i] >= c.vocab_size)
        throw std::out_of_range(fmt::format("sequence {}: token {} at position {} is outside the vocabulary [0, {})",
                                            s, tokens[s][i], i, c.vocab_size));
    all.insert(all.end(), tokens[s].begin(), tokens[s].end());
  }

  auto go = [&](auto& weights) {
    using T = typename std::decay_t<decltype(weights.norm)>::Scalar;
    typename Forward<T>::Batch b;
    Eigen::Index row = 0;
    for (std::size_t s = 0; s < seqs.size(); ++s) {
      auto& st = *seqs[s]->s_;
      b.caches.push_back(&std::get<Caches<T>>(st.caches));
      b.start_len.push_back(st.len);
      b.row0.push_back(row);
      b.rows.push_back(static_cast<Eigen::Index>(tokens[s].size()));
      std::vector<std::int64_t> pos(tokens[s].size());
      for (std::size_t i = 0; i < pos.size(); ++i) pos[i] = st.len + static_cast<std::int64_t>(i);
      b.pos.push_back(std::move(pos));
      row += b.rows.back();
    }
    Forward<T> f{c, weights, p_->precision == Precision::BF16, p_->stats, trace, p_->opt.fp8_index_cache};
    auto out = f.run(b, all, h_in, hidden_out, x_in);
    for (std::size_t s = 0; s < seqs.size(); ++s) seqs[s]->s_->len += static_cast<std::int64_t>(tokens[s].size());
    return out;
  };
  return std::visit(go, p_->w);
}

MatD Model::prefill(Sequence& seq, std::span<const std::int32_t> tokens, const TraceFn& trace) {
  Sequence* s[] = {&seq};
  std::span<const std::int32_t> t[] = {tokens};
  return std::move(forward(s, t, trace)[0]);
}

MatD Model::decode(Sequence& seq, std::int32_t token, const TraceFn& trace) {
  return prefill(seq, std::span<const std::int32_t>(&token, 1), trace);
}

std::int32_t greedy_token(const MatD& logits, Eigen::Index r) {
  std::int32_t best = -1;
  double bv = -std::numeric_limits<double>::infinity();
  for (Eigen::Index j = 0; j < logits.cols(); ++j) {
    const double x = logits(r, j);
    if (x > bv || (best < 0 && !std::isnan(x))) { bv = x; best = static_cast<std::int32_t>(j); }
  }
  if (best < 0) throw std::runtime_error(fmt::format("greedy_token: row {} of the logits is all NaN", r));
  return best;
}

std::vector<std::int32_t> generate_greedy(Model& model, std::span<const std::int32_t> prompt, int steps,
                                          MatD* logits_out, const TraceFn& trace) {
  Sequence seq = model.new_sequence();
  MatD logits = model.prefill(seq, prompt, trace);  // [T, V]
  std::vector<std::int32_t> out;
  std::vector<MatD> rows{logits};
  for (int i = 0; i < steps; ++i) {
    out.push_back(greedy_token(rows.back(), rows.back().rows() - 1));
    rows.push_back(model.decode(seq, out.back(), trace));
  }
  if (logits_out) {
    Eigen::Index n = 0;
    for (auto& r : rows) n += r.rows();
    logits_out->resize(n, logits.cols());
    n = 0;
    for (auto& r : rows) { logits_out->middleRows(n, r.rows()) = r; n += r.rows(); }
  }
  return out;
}

}  // namespace m3
