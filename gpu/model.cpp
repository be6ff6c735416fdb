// The GPU forward pass (model.h). Reads like the reference's model.cpp, op for op:
//   h = Embed(tokens); per layer: h += Attn(RMSNorm(h)); h += FFN(RMSNorm(h)); logits = LMHead(h)
// with each residual add fused into the norm that follows it (add_rms_norm), so layer l's output
// h is complete only inside layer l+1's first norm (or the final norm): that is where
// blk.{l}.out is traced, in the reference's order.
#include "gpu/model.h"

#include "gpu/kernels/attention_dense.h"
#include "gpu/kernels/attention_prefill.h"
#include "gpu/kernels/embedding.h"
#include "gpu/kernels/kv_cache.h"
#include "gpu/kernels/linear.h"
#include "gpu/kernels/moe_experts.h"
#include "gpu/kernels/moe_router.h"
#include "gpu/kernels/msa_attention.h"
#include "gpu/kernels/msa_index.h"
#include "gpu/kernels/msa_select.h"
#include "gpu/kernels/qk_norm_rope.h"
#include "gpu/kernels/rms_norm.h"
#include "gpu/kernels/swiglu_oai.h"
#include "gpu/runtime/buffer.h"

#include <fmt/format.h>

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace m3::gpu {

namespace {

// The pool of cache pages shared by a model's sequences (host bookkeeping only).
struct PagePool {
  std::vector<std::int32_t> free;  // page ids not owned by any sequence
  int n_pages = 0;
};

void check_free_pages(const PagePool& pool, std::int64_t needed, const char* who) {
  if (needed > static_cast<std::int64_t>(pool.free.size()))
    throw std::runtime_error(fmt::format("{}: needs {} more cache pages, {} free of {}", who, needed, pool.free.size(),
                                         pool.n_pages));
}

DeviceBuffer<bf16> upload(const float* x, std::size_t n) {
  DeviceBuffer<bf16> d(n);
  if (n) d.upload(to_bf16(x, n));
  return d;
}
template <class M>
DeviceBuffer<bf16> upload(const M& m) {
  return upload(m.data(), static_cast<std::size_t>(m.size()));
}
DeviceBuffer<float> upload_f32(const float* x, std::size_t n) {
  DeviceBuffer<float> d(n);
  if (n) d.upload(x, n);
  return d;
}

// Rows of several row-major matrices with the same column count, stacked in order.
std::vector<float> stack(std::initializer_list<const MatF*> parts) {
  std::vector<float> out;
  for (const MatF* m : parts) out.insert(out.end(), m->data(), m->data() + m->size());
  return out;
}

struct LayerDev {
  bool msa = false, moe = false;
  int Wp = 0;                               // fused projection width
  DeviceBuffer<bf16> attn_norm, ffn_norm;   // [H]
  DeviceBuffer<bf16> w_proj;                // [Wp, H]: q | k | v | idx_q | idx_k rows
  DeviceBuffer<bf16> q_norm, k_norm;        // [D]
  DeviceBuffer<bf16> iq_norm, ik_norm;      // [Di]
  DeviceBuffer<bf16> o_proj;                // [H, Hq*D]
  DeviceBuffer<bf16> mlp_gate_up, mlp_down; // dense MLP: [2*I_d, H], [H, I_d]
  DeviceBuffer<float> router, router_bias;  // MoE: [E, H], [E] fp32
  DeviceBuffer<bf16> ex_gate_up, ex_down;   // [E, 2I, H], [E, H, I]
  DeviceBuffer<bf16> sh_gate_up, sh_down;   // [2*Is, H], [H, Is]
  MoeExpertWeights moe_w;
  DeviceBuffer<bf16> k_cache, v_cache;      // [pages*128, Hkv*D]
  DeviceBuffer<bf16> ik_cache;              // [pages*128, Di] (bf16 index-K)
  DeviceBuffer<__nv_fp8_e4m3> ik_cache8;    // [pages*128, Di] (fp8 index-K)
};

// A device tensor of T rows (row stride ld) copied to the host and widened to fp32.
MatF download_rows(const bf16* d, std::int64_t rows, std::int64_t cols, std::int64_t ld, cudaStream_t s) {
  std::vector<bf16> h(static_cast<std::size_t>(rows * cols));
  if (rows > 0)
    M3_CUDA_CHECK(cudaMemcpy2DAsync(h.data(), cols * sizeof(bf16), d, ld * sizeof(bf16), cols * sizeof(bf16), rows,
                                    cudaMemcpyDeviceToHost, s));
  M3_CUDA_CHECK(cudaStreamSynchronize(s));
  const std::vector<float> f = from_bf16(h.data(), h.size());
  MatF m(rows, cols);
  std::copy(f.begin(), f.end(), m.data());
  return m;
}
template <class T>
std::vector<T> download_vec(const T* d, std::size_t n, cudaStream_t s) {
  std::vector<T> h(n);
  if (n) M3_CUDA_CHECK(cudaMemcpyAsync(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost, s));
  M3_CUDA_CHECK(cudaStreamSynchronize(s));
  return h;
}

}  // namespace

struct Sequence::State {
  const void* owner = nullptr;
  std::shared_ptr<PagePool> pool;
  std::vector<std::int32_t> pages;
  std::int64_t len = 0;
  ~State() {
    if (pool) pool->free.insert(pool->free.end(), pages.begin(), pages.end());
  }
};

Sequence::Sequence() = default;
Sequence::~Sequence() = default;
Sequence::Sequence(Sequence&&) noexcept = default;
Sequence& Sequence::operator=(Sequence&&) noexcept = default;
std::int64_t Sequence::length() const { return s_ ? s_->len : 0; }

void Sequence::truncate(std::int64_t n) {
  const std::int64_t len = length();
  if (n < 0 || n > len)
    throw std::out_of_range(fmt::format("gpu::Sequence::truncate: {} tokens, expected 0..{} (the current length)", n, len));
  if (!s_) return;
  const std::size_t keep = static_cast<std::size_t>((n + kPageRows - 1) / kPageRows);
  if (s_->pages.size() > keep) {  // later positions are rewritten before anything reads them
    s_->pool->free.insert(s_->pool->free.end(), s_->pages.begin() + static_cast<std::ptrdiff_t>(keep), s_->pages.end());
    s_->pages.resize(keep);
  }
  s_->len = n;
}

struct Model::Impl {
  ModelConfig cfg;
  ModelOptions opt;
  MemoryPlan plan;
  ForwardTiming timing;
  int pps = 0;  // pages per sequence (page-table row length)
  std::shared_ptr<PagePool> pool = std::make_shared<PagePool>();

  Stream stream;
  CublasHandle cublas;
  Event t0, t1;

  DeviceBuffer<bf16> embed, final_norm, lm_head;  // [V, H], [H], [V, H]
  std::vector<LayerDev> layers;
  // An MTP module's input (spec §7; weights.mtp_in): x = eh_proj([enorm(e) ; hnorm(h_prev)]).
  bool mtp = false;
  DeviceBuffer<bf16> enorm, hnorm, eh_proj;  // [H], [H], [H, 2H]
  DeviceBuffer<bf16> mtp_cat, mtp_tmp;       // [Tm, 2H] (embedding half first), [Tm, H]

  // Activations for max_tokens rows (Tm).
  DeviceBuffer<std::int32_t> tok;          // [Tm]
  DeviceBuffer<std::int64_t> pos, slots;   // [Tm]
  DeviceBuffer<std::int32_t> table;        // [max_batch, pps]
  DeviceBuffer<bf16> h, a, proj, q, k, iq, ik, attn, o;  // [Tm, H], [Tm, H], [Tm, Wp], [Tm, Hq*D], [Tm, Hkv*D], [Tm, Hi*Di], [Tm, Di], [Tm, Hq*D], [Tm, H]
  DeviceBuffer<bf16> mlp_gu, mlp_act;      // [Tm, 2*I_d], [Tm, I_d]
  DeviceBuffer<float> r_logits, r_weights; // [Tm, E], [Tm, K_e]
  DeviceBuffer<std::int32_t> r_experts;    // [Tm, K_e]
  DeviceBuffer<float> scores;              // [max(Hi*Tm, max_batch*Hi), NB_max]
  DeviceBuffer<std::int32_t> sel;          // [max(Hi*Tm, max_batch*Hi), K_blk]
  DeviceBuffer<float> logits;              // [Tm, V]
  DeviceBuffer<unsigned char> attn_ws, moe_ws;

  void ensure_attn_ws(std::size_t bytes) {
    if (bytes <= attn_ws.size()) return;
    stream.sync();
    attn_ws = DeviceBuffer<unsigned char>(bytes);
  }
};

namespace {

void check_supported(const ModelConfig& c) {
  auto bad = [](const std::string& what) {
    throw std::invalid_argument("gpu::Model: " + what + " is not supported by the GPU kernels");
  };
  const int D = c.head_dim, Di = c.index_head_dim;
  if (!(D == 16 || D == 32 || D == 64 || D == 128)) bad(fmt::format("head_dim = {} (supported: 16, 32, 64, 128)", D));
  if (c.num_layers_of(AttnType::MSA) > 0) {
    if (!(Di == 16 || Di == 32 || Di == 64 || Di == 128))
      bad(fmt::format("index_head_dim = {} (supported: 16, 32, 64, 128)", Di));
    if (c.index_block_size % 16 != 0) bad(fmt::format("index_block_size = {} (supported: multiples of 16)", c.index_block_size));
  }
  if (!c.use_qk_norm) bad("use_qk_norm = false (M3 always normalizes q and k)");
}

}  // namespace

Model::Model(ModelConfig cfg, const ModelWeights<float>& w, ModelOptions opt) : p_(std::make_unique<Impl>()) {
  cfg.validate();
  check_supported(cfg);
  if (opt.max_batch < 1) throw std::invalid_argument(fmt::format("gpu::Model: max_batch = {}, expected >= 1", opt.max_batch));
  if (opt.max_tokens < 1) throw std::invalid_argument(fmt::format("gpu::Model: max_tokens = {}, expected >= 1", opt.max_tokens));
  if (opt.max_context <= 0) opt.max_context = std::min<std::int64_t>(cfg.max_position_embeddings, 16384);
  if (opt.max_context > cfg.max_position_embeddings)
    throw std::invalid_argument(fmt::format("gpu::Model: max_context = {} exceeds max_position_embeddings = {}",
                                            opt.max_context, cfg.max_position_embeddings));
  if (static_cast<int>(w.layers.size()) != cfg.num_hidden_layers)
    throw std::invalid_argument(fmt::format("gpu::Model: weights have {} layers, expected num_hidden_layers = {}",
                                            w.layers.size(), cfg.num_hidden_layers));
  Impl& P = *p_;
  P.cfg = cfg;
  P.opt = opt;
  M3_CUDA_CHECK(cudaSetDevice(opt.device));
  const ModelConfig& c = P.cfg;
  const int H = c.hidden_size, Hq = c.num_attention_heads, Hkv = c.num_key_value_heads, D = c.head_dim;
  const int Hi = c.index_n_heads, Di = c.index_head_dim, V = c.vocab_size, E = c.num_local_experts;
  const int K = c.num_experts_per_tok;
  const std::int64_t Tm = opt.max_tokens;

  P.pps = static_cast<int>((opt.max_context + kPageRows - 1) / kPageRows);
  const std::int64_t n_pages64 = static_cast<std::int64_t>(P.pps) * opt.max_batch;
  PlanRequest req;
  req.batch = opt.max_batch;
  req.context = static_cast<std::int64_t>(P.pps) * kPageRows;
  req.chunk_tokens = Tm;
  req.index_cache_bytes = opt.fp8_index_cache ? 1 : 2;
  P.plan = plan_memory(c, req);
  check_fits(P.plan, opt.device);
  if (n_pages64 > std::numeric_limits<std::int32_t>::max() / kPageRows)
    throw std::invalid_argument(fmt::format("gpu::Model: {} cache pages exceed the int32 page ids", n_pages64));
  const int n_pages = static_cast<int>(n_pages64);
  P.pool->n_pages = n_pages;
  for (int i = n_pages - 1; i >= 0; --i) P.pool->free.push_back(i);  // pop_back hands out 0, 1, 2, ...

  // Weights.
  if (w.embed_tokens.rows() != V || w.embed_tokens.cols() != H || w.lm_head.rows() != V || w.lm_head.cols() != H)
    throw std::invalid_argument(fmt::format("gpu::Model: embed_tokens / lm_head are [{}, {}] / [{}, {}], expected [V, H] = [{}, {}]",
                                            w.embed_tokens.rows(), w.embed_tokens.cols(), w.lm_head.rows(),
                                            w.lm_head.cols(), V, H));
  P.embed = upload(w.embed_tokens);
  P.final_norm = upload(w.norm);
  P.lm_head = upload(w.lm_head);
  if (w.mtp_in) {
    const MtpInputWeights<float>& m = *w.mtp_in;
    if (m.enorm.size() != H || m.hnorm.size() != H || m.eh_proj.rows() != H || m.eh_proj.cols() != 2 * H)
      throw std::invalid_argument(fmt::format("gpu::Model: MTP input enorm [{}], hnorm [{}], eh_proj [{}, {}], expected "
                                              "[{}], [{}], [{}, {}]",
                                              m.enorm.size(), m.hnorm.size(), m.eh_proj.rows(), m.eh_proj.cols(), H, H,
                                              H, 2 * H));
    P.mtp = true;
    P.enorm = upload(m.enorm);
    P.hnorm = upload(m.hnorm);
    P.eh_proj = upload(m.eh_proj);
  }
  int Wp_max = 0, Id_max = 0;
  const std::size_t slots_total = static_cast<std::size_t>(n_pages) * kPageRows;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights<float>& L = w.layers[l];
    LayerDev d;
    d.msa = c.layer_types[l] == AttnType::MSA;
    d.moe = c.mlp_layer_types[l] == MlpType::MOE;
    if (L.attn.q_proj.rows() != Hq * D || L.attn.k_proj.rows() != Hkv * D || L.attn.v_proj.rows() != Hkv * D ||
        L.attn.q_proj.cols() != H || L.attn.o_proj.rows() != H || L.attn.o_proj.cols() != Hq * D)
      throw std::invalid_argument(fmt::format("gpu::Model: layer {} attention weights do not match the config", l));
    d.attn_norm = upload(L.input_layernorm);
    d.ffn_norm = upload(L.post_attention_layernorm);
    d.q_norm = upload(L.attn.q_norm);
    d.k_norm = upload(L.attn.k_norm);
    d.o_proj = upload(L.attn.o_proj);
    std::vector<float> wp;
    if (d.msa) {
      if (L.attn.index_q_proj.rows() != Hi * Di || L.attn.index_k_proj.rows() != Di)
        throw std::invalid_argument(fmt::format("gpu::Model: layer {} index weights do not match the config", l));
      wp = stack({&L.attn.q_proj, &L.attn.k_proj, &L.attn.v_proj, &L.attn.index_q_proj, &L.attn.index_k_proj});
      d.iq_norm = upload(L.attn.index_q_norm);
      d.ik_norm = upload(L.attn.index_k_norm);
    } else {
      wp = stack({&L.attn.q_proj, &L.attn.k_proj, &L.attn.v_proj});
    }
    d.Wp = static_cast<int>(wp.size() / H);
    Wp_max = std::max(Wp_max, d.Wp);
    d.w_proj = upload(wp.data(), wp.size());
    if (!d.moe) {
      const int Id = static_cast<int>(L.mlp.gate.rows());
      Id_max = std::max(Id_max, Id);
      const std::vector<float> gu = stack({&L.mlp.gate, &L.mlp.up});
      d.mlp_gate_up = upload(gu.data(), gu.size());
      d.mlp_down = upload(L.mlp.down);
    } else {
      if (static_cast<int>(L.experts.size()) != E)
        throw std::invalid_argument(fmt::format("gpu::Model: layer {} has {} experts, expected {}", l, L.experts.size(), E));
      d.router = upload_f32(L.router.data(), static_cast<std::size_t>(L.router.size()));
      if (c.use_routing_bias) d.router_bias = upload_f32(L.router_bias.data(), static_cast<std::size_t>(L.router_bias.size()));
      else {
        const std::vector<float> zero(E, 0.f);
        d.router_bias = upload_f32(zero.data(), zero.size());
      }
      const int I = static_cast<int>(L.experts[0].gate.rows());
      std::vector<float> gu, dn;
      gu.reserve(static_cast<std::size_t>(E) * 2 * I * H);
      dn.reserve(static_cast<std::size_t>(E) * H * I);
      for (const auto& e : L.experts) {
        if (e.gate.rows() != I || e.up.rows() != I || e.down.cols() != I)
          throw std::invalid_argument(fmt::format("gpu::Model: layer {}: experts of different widths", l));
        const std::vector<float> s = stack({&e.gate, &e.up});
        gu.insert(gu.end(), s.begin(), s.end());
        dn.insert(dn.end(), e.down.data(), e.down.data() + e.down.size());
      }
      d.ex_gate_up = upload(gu.data(), gu.size());
      d.ex_down = upload(dn.data(), dn.size());
      d.moe_w.gate_up = d.ex_gate_up.data();
      d.moe_w.down = d.ex_down.data();
      d.moe_w.E = E;
      d.moe_w.I = I;
      if (L.shared.gate.size() != 0) {
        const std::vector<float> s = stack({&L.shared.gate, &L.shared.up});
        d.sh_gate_up = upload(s.data(), s.size());
        d.sh_down = upload(L.shared.down);
        d.moe_w.shared_gate_up = d.sh_gate_up.data();
        d.moe_w.shared_down = d.sh_down.data();
        d.moe_w.Is = static_cast<int>(L.shared.gate.rows());
      }
      const std::size_t need = moe_experts_workspace_bytes(static_cast<int>(Tm), H, K, d.moe_w);
      if (need > P.moe_ws.size()) P.moe_ws = DeviceBuffer<unsigned char>(need);
    }
    // Caches: every layer holds every page; a page id is the same slot range in each layer.
    d.k_cache = DeviceBuffer<bf16>(slots_total * Hkv * D);
    d.v_cache = DeviceBuffer<bf16>(slots_total * Hkv * D);
    if (d.msa) {
      if (opt.fp8_index_cache) d.ik_cache8 = DeviceBuffer<__nv_fp8_e4m3>(slots_total * Di);
      else d.ik_cache = DeviceBuffer<bf16>(slots_total * Di);
    }
    P.layers.push_back(std::move(d));
  }

  // Activations.
  const std::size_t T = static_cast<std::size_t>(Tm);
  P.tok = DeviceBuffer<std::int32_t>(T);
  P.pos = DeviceBuffer<std::int64_t>(T);
  P.slots = DeviceBuffer<std::int64_t>(T);
  P.table = DeviceBuffer<std::int32_t>(static_cast<std::size_t>(opt.max_batch) * P.pps);
  P.h = DeviceBuffer<bf16>(T * H);
  P.a = DeviceBuffer<bf16>(T * H);
  P.o = DeviceBuffer<bf16>(T * H);
  P.proj = DeviceBuffer<bf16>(T * Wp_max);
  P.q = DeviceBuffer<bf16>(T * Hq * D);
  P.k = DeviceBuffer<bf16>(T * Hkv * D);
  P.attn = DeviceBuffer<bf16>(T * Hq * D);
  if (c.num_layers_of(AttnType::MSA) > 0) {
    const std::size_t NB = static_cast<std::size_t>((opt.max_context + c.index_block_size - 1) / c.index_block_size);
    const std::size_t rows = std::max<std::size_t>(T, opt.max_batch) * Hi;
    P.iq = DeviceBuffer<bf16>(T * Hi * Di);
    P.ik = DeviceBuffer<bf16>(T * Di);
    P.scores = DeviceBuffer<float>(rows * NB);
    P.sel = DeviceBuffer<std::int32_t>(rows * c.index_topk_blocks);
  }
  if (Id_max > 0) {
    P.mlp_gu = DeviceBuffer<bf16>(T * 2 * Id_max);
    P.mlp_act = DeviceBuffer<bf16>(T * Id_max);
  }
  if (c.num_layers_of(MlpType::MOE) > 0) {
    P.r_logits = DeviceBuffer<float>(T * E);
    P.r_weights = DeviceBuffer<float>(T * K);
    P.r_experts = DeviceBuffer<std::int32_t>(T * K);
  }
  P.logits = DeviceBuffer<float>(T * V);
  if (P.mtp) {  // (3 * H * Tm bf16: a few percent of an MTP module's one layer; not in plan_memory)
    P.mtp_cat = DeviceBuffer<bf16>(T * 2 * H);
    P.mtp_tmp = DeviceBuffer<bf16>(T * H);
  }
  M3_CUDA_CHECK(cudaDeviceSynchronize());
}

Model::~Model() = default;
const ModelConfig& Model::config() const { return p_->cfg; }
const ModelOptions& Model::options() const { return p_->opt; }
const MemoryPlan& Model::plan() const { return p_->plan; }
const ForwardTiming& Model::last_timing() const { return p_->timing; }

Sequence Model::new_sequence() {
  Sequence s;
  s.s_ = std::make_unique<Sequence::State>();
  s.s_->owner = p_.get();
  s.s_->pool = p_->pool;
  return s;
}

std::int64_t Model::check_append(const Sequence* seq, std::span<const std::int32_t> tokens, int s,
                                 const char* who) const {
  const Impl& P = *p_;
  if (!seq || !seq->s_ || seq->s_->owner != p_.get())
    throw std::invalid_argument(fmt::format("{}: sequence {} was not made by this model", who, s));
  if (tokens.empty()) throw std::invalid_argument(fmt::format("{}: sequence {} has no tokens", who, s));
  const auto& st = *seq->s_;
  const std::int64_t end = st.len + static_cast<std::int64_t>(tokens.size());
  if (end > P.cfg.max_position_embeddings)
    throw std::out_of_range(fmt::format("{}: sequence {}: context of {} tokens exceeds max_position_embeddings = {}", who,
                                        s, end, P.cfg.max_position_embeddings));
  if (end > P.opt.max_context)
    throw std::out_of_range(fmt::format("{}: sequence {}: context of {} tokens exceeds the GPU model's max_context = {} "
                                        "(raise ModelOptions::max_context / --max-context)",
                                        who, s, end, P.opt.max_context));
  check_token_ids(tokens.data(), tokens.size(), P.cfg.vocab_size);
  return (end + kPageRows - 1) / kPageRows - static_cast<std::int64_t>(st.pages.size());
}

std::vector<MatD> Model::forward(std::span<Sequence* const> seqs, std::span<const std::span<const std::int32_t>> tokens,
                                 const TraceFn& trace) {
  return forward_impl(seqs, tokens, trace, nullptr);
}

std::vector<MatD> Model::forward(std::span<Sequence* const> seqs, std::span<const std::span<const std::int32_t>> tokens,
                                 const TraceFn& trace, std::span<const MatD* const> h_in, std::vector<MatD>* hidden_out) {
  return forward_impl(seqs, tokens, trace, nullptr, h_in, hidden_out);
}

bool Model::takes_hidden_states() const { return p_->mtp; }

MatD Model::final_norm(const MatD& h) const {
  const Impl& P = *p_;
  const int H = P.cfg.hidden_size;
  if (h.cols() != H)
    throw std::invalid_argument(fmt::format("gpu::final_norm: [{}, {}], expected {} columns", h.rows(), h.cols(), H));
  if (h.rows() == 0) return MatD(0, H);
  if (!h.allFinite()) throw std::invalid_argument("gpu::final_norm: the rows hold NaN or Inf");
  const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> hf = h.cast<float>();  // [T, H]
  const std::size_t n = static_cast<std::size_t>(hf.size());
  DeviceBuffer<bf16> x(n), y(n);  // [T, H] each
  cudaStream_t S = P.stream.get();
  x.upload(to_bf16(hf.data(), n).data(), n, S);
  rms_norm(x.data(), P.final_norm.data(), P.cfg.rms_norm_eps, y.data(), static_cast<int>(h.rows()), H, S);
  return download_rows(y.data(), h.rows(), H, H, S).cast<double>();
}

MatD Model::prefill_embeds(Sequence& seq, std::span<const std::int32_t> tokens, const MatD& x, const TraceFn& trace) {
  const ModelConfig& c = p_->cfg;
  if (x.rows() != static_cast<Eigen::Index>(tokens.size()) || x.cols() != c.hidden_size)
    throw std::invalid_argument(fmt::format("gpu::prefill_embeds: input rows [{}, {}], expected [{}, {}] (tokens, "
                                            "hidden_size)",
                                            x.rows(), x.cols(), tokens.size(), c.hidden_size));
  if (static_cast<std::int64_t>(tokens.size()) > p_->opt.max_tokens)
    throw std::invalid_argument(fmt::format("gpu::prefill_embeds: {} rows, at most max_tokens = {} (no chunking here)",
                                            tokens.size(), p_->opt.max_tokens));
  if (!x.allFinite()) throw std::invalid_argument("gpu::prefill_embeds: the input rows hold NaN or Inf");
  Sequence* s[] = {&seq};
  std::span<const std::int32_t> t[] = {tokens};
  return std::move(forward_impl(s, t, trace, &x)[0]);
}

std::vector<MatD> Model::forward_impl(std::span<Sequence* const> seqs,
                                      std::span<const std::span<const std::int32_t>> tokens, const TraceFn& trace,
                                      const MatD* x_in, std::span<const MatD* const> h_in,
                                      std::vector<MatD>* hidden_out) {
  Impl& P = *p_;
  const ModelConfig& c = P.cfg;
  const int nseq = static_cast<int>(seqs.size());
  if (seqs.size() != tokens.size())
    throw std::invalid_argument(fmt::format("gpu::forward: {} sequences but {} token lists", seqs.size(), tokens.size()));
  if (nseq == 0) return {};
  if (nseq > P.opt.max_batch)
    throw std::invalid_argument(fmt::format("gpu::forward: {} sequences, the model was planned for max_batch = {}",
                                            nseq, P.opt.max_batch));
  // Validate everything before touching a cache or the page pool.
  std::int64_t T = 0, pages_needed = 0;
  for (int s = 0; s < nseq; ++s) {
    pages_needed += check_append(seqs[s], tokens[s], s, "gpu::forward");
    T += static_cast<std::int64_t>(tokens[s].size());
  }
  if (T > P.opt.max_tokens)
    throw std::invalid_argument(fmt::format("gpu::forward: {} tokens in one call, the model was planned for max_tokens = {} "
                                            "(prefill() chunks long prompts)", T, P.opt.max_tokens));
  if (!P.mtp && !h_in.empty())
    throw std::invalid_argument("gpu::forward: h_in given to a model without MTP input weights (mtp_in)");
  if (P.mtp && !x_in && h_in.size() != seqs.size())
    throw std::invalid_argument(fmt::format("gpu::forward: an MTP module's model needs h_in for each of the {} sequences, "
                                            "got {}", seqs.size(), h_in.size()));
  for (std::size_t s = 0; s < h_in.size(); ++s)
    if (!h_in[s] || h_in[s]->rows() != static_cast<Eigen::Index>(tokens[s].size()) ||
        h_in[s]->cols() != c.hidden_size || !h_in[s]->allFinite())
      throw std::invalid_argument(fmt::format(
          "gpu::forward: h_in of sequence {} is {}, expected [{}, {}] (tokens, hidden_size), finite", s,
          h_in[s] ? fmt::format("[{}, {}]", h_in[s]->rows(), h_in[s]->cols()) : std::string("missing"),
          tokens[s].size(), c.hidden_size));
  check_free_pages(*P.pool, pages_needed, "gpu::forward");

  // Pages, positions, slots, page tables.
  std::vector<std::int32_t> tok;  // [T]
  std::vector<std::int64_t> pos, slot;  // [T]
  std::vector<std::int32_t> table(static_cast<std::size_t>(nseq) * P.pps, -1);  // [nseq, pps]
  std::vector<std::int64_t> row0(nseq), rows(nseq), len0(nseq);
  std::int64_t N = 0;  // the longest sequence after this call: the logical cache length of the launches
  bool all_one = true;
  for (int s = 0; s < nseq; ++s) {
    auto& st = *seqs[s]->s_;
    const std::int64_t n = static_cast<std::int64_t>(tokens[s].size()), end = st.len + n;
    while (static_cast<std::int64_t>(st.pages.size()) * kPageRows < end) {
      st.pages.push_back(P.pool->free.back());
      P.pool->free.pop_back();
    }
    row0[s] = static_cast<std::int64_t>(tok.size());
    rows[s] = n;
    len0[s] = st.len;
    all_one &= n == 1;
    N = std::max(N, end);
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t p = st.len + i;
      tok.push_back(tokens[s][i]);
      pos.push_back(p);
      slot.push_back(static_cast<std::int64_t>(st.pages[p / kPageRows]) * kPageRows + p % kPageRows);
    }
    std::copy(st.pages.begin(), st.pages.end(), table.begin() + static_cast<std::ptrdiff_t>(s) * P.pps);
  }
  cudaStream_t S = P.stream.get();
  P.tok.upload(tok, S);
  P.pos.upload(pos, S);
  P.slots.upload(slot, S);
  P.table.upload(table, S);

  const int H = c.hidden_size, Hq = c.num_attention_heads, Hkv = c.num_key_value_heads, D = c.head_dim;
  const int Hi = c.index_n_heads, Di = c.index_head_dim, V = c.vocab_size, E = c.num_local_experts;
  const int K = c.num_experts_per_tok, R = c.rotary_dim, BLK = c.index_block_size, Kb = c.index_topk_blocks;
  const double eps = c.rms_norm_eps, theta = c.rope_theta;
  const int Ti = static_cast<int>(T), Ni = static_cast<int>(N);
  const std::int64_t n_slots = static_cast<std::int64_t>(P.pool->n_pages) * kPageRows;
  const AttnDims ad = c.attn_dims();
  const MsaDims md = c.msa_dims();
  const SwigluParams sp{static_cast<float>(c.swiglu_alpha), static_cast<float>(c.swiglu_limit),
                        static_cast<float>(c.swiglu_beta)};

  // Tracing: host copies per sequence, in the reference's order and layouts.
  auto emit = [&](const std::string& name, const bf16* d, std::int64_t cols, std::int64_t ld) {
    if (!trace) return;
    const MatF m = download_rows(d, T, cols, ld, S);
    for (int s = 0; s < nseq; ++s)
      trace(s, name, TraceView{TraceView::DType::F32, m.data() + row0[s] * cols, rows[s], cols, cols});
  };
  auto emit_f32 = [&](const std::string& name, const float* d, std::int64_t cols) {
    if (!trace) return;
    const std::vector<float> m = download_vec(d, static_cast<std::size_t>(T * cols), S);
    for (int s = 0; s < nseq; ++s)
      trace(s, name, TraceView{TraceView::DType::F32, m.data() + row0[s] * cols, rows[s], cols, cols});
  };
  auto emit_i32 = [&](const std::string& name, const std::int32_t* d, std::int64_t cols) {
    if (!trace) return;
    const std::vector<std::int32_t> m = download_vec(d, static_cast<std::size_t>(T * cols), S);
    for (int s = 0; s < nseq; ++s)
      trace(s, name, TraceView{TraceView::DType::I32, m.data() + row0[s] * cols, rows[s], cols, cols});
  };

  if (x_in) {  // the input rows in bf16, as the embedding table holds its rows (before the timed part)
    const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> xf = x_in->cast<float>();  // [T, H]
    P.h.upload(to_bf16(xf.data(), static_cast<std::size_t>(xf.size())).data(), static_cast<std::size_t>(xf.size()), S);
  }
  const bool mtp_input = P.mtp && !x_in;
  if (mtp_input) {  // h_prev rows in bf16, in the row order of the tokens (before the timed part)
    std::vector<float> hp(static_cast<std::size_t>(T) * H);  // [T, H]
    for (int s = 0; s < nseq; ++s)
      for (std::int64_t i = 0; i < rows[s]; ++i)
        for (int j = 0; j < H; ++j) hp[static_cast<std::size_t>((row0[s] + i) * H + j)] = static_cast<float>((*h_in[s])(i, j));
    P.o.upload(to_bf16(hp.data(), hp.size()).data(), hp.size(), S);
  }
  P.t0.record(S);
  if (mtp_input) {
    // Spec §7: x = eh_proj([enorm(Embed(token)) ; hnorm(h_prev)]), the embedding zeroed at
    // position 0. [e ; h] is assembled in mtp_cat [T, 2H] so that eh_proj is one GEMM with one
    // rounding, as the reference's linear over the concatenation.
    embedding(P.embed.data(), P.tok.data(), Ti, V, H, P.a.data(), S);
    for (std::int64_t r = 0; r < T; ++r)
      if (pos[static_cast<std::size_t>(r)] == 0) M3_CUDA_CHECK(cudaMemsetAsync(P.a.data() + r * H, 0, H * sizeof(bf16), S));
    const std::size_t row_b = static_cast<std::size_t>(H) * sizeof(bf16);
    rms_norm(P.a.data(), P.enorm.data(), eps, P.mtp_tmp.data(), Ti, H, S);
    M3_CUDA_CHECK(cudaMemcpy2DAsync(P.mtp_cat.data(), 2 * row_b, P.mtp_tmp.data(), row_b, row_b, T,
                                    cudaMemcpyDeviceToDevice, S));
    rms_norm(P.o.data(), P.hnorm.data(), eps, P.mtp_tmp.data(), Ti, H, S);
    M3_CUDA_CHECK(cudaMemcpy2DAsync(P.mtp_cat.data() + H, 2 * row_b, P.mtp_tmp.data(), row_b, row_b, T,
                                    cudaMemcpyDeviceToDevice, S));
    linear(P.cublas.get(), P.mtp_cat.data(), P.eh_proj.data(), P.h.data(), Ti, 2 * H, H, S);
    emit("mtp.enorm", P.mtp_cat.data(), H, 2 * H);
    emit("mtp.hnorm", P.mtp_cat.data() + H, H, 2 * H);
    emit("mtp.x", P.h.data(), H, H);
  } else if (!x_in) {
    embedding(P.embed.data(), P.tok.data(), Ti, V, H, P.h.data(), S);
  }
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    LayerDev& L = P.layers[l];
    const std::string blk = fmt::format("blk.{}.", l);
    if (l == 0) {
      rms_norm(P.h.data(), L.attn_norm.data(), eps, P.a.data(), Ti, H, S);
    } else {
      add_rms_norm(P.h.data(), P.o.data(), L.attn_norm.data(), eps, P.a.data(), Ti, H, S);
      emit(fmt::format("blk.{}.out", l - 1), P.h.data(), H, H);
    }
    emit(blk + "attn_norm", P.a.data(), H, H);

    // Projections (one GEMM), norms + RoPE with the cache writes.
    linear(P.cublas.get(), P.a.data(), L.w_proj.data(), P.proj.data(), Ti, H, L.Wp, S);
    const bf16* pq = P.proj.data();
    const bf16* pk = pq + static_cast<std::int64_t>(Hq) * D;
    const bf16* pv = pk + static_cast<std::int64_t>(Hkv) * D;
    qk_norm_rope_to_cache(pq, L.Wp, Hq, D, L.q_norm.data(), eps, R, theta, P.pos.data(), P.q.data(),
                          static_cast<std::int64_t>(Hq) * D, Ti, nullptr, 0, nullptr, 0, S);
    qk_norm_rope_to_cache(pk, L.Wp, Hkv, D, L.k_norm.data(), eps, R, theta, P.pos.data(), P.k.data(),
                          static_cast<std::int64_t>(Hkv) * D, Ti, L.k_cache.data(), static_cast<std::int64_t>(Hkv) * D,
                          P.slots.data(), n_slots, S);
    kv_cache_write(pv, L.Wp, Hkv * D, Ti, L.v_cache.data(), static_cast<std::int64_t>(Hkv) * D, P.slots.data(),
                   n_slots, S);
    emit(blk + "q", P.q.data(), static_cast<std::int64_t>(Hq) * D, static_cast<std::int64_t>(Hq) * D);
    emit(blk + "k", P.k.data(), static_cast<std::int64_t>(Hkv) * D, static_cast<std::int64_t>(Hkv) * D);
    emit(blk + "v", pv, static_cast<std::int64_t>(Hkv) * D, L.Wp);
    if (L.msa) {
      const bf16* piq = pv + static_cast<std::int64_t>(Hkv) * D;
      const bf16* pik = piq + static_cast<std::int64_t>(Hi) * Di;
      qk_norm_rope_to_cache(piq, L.Wp, Hi, Di, L.iq_norm.data(), eps, R, theta, P.pos.data(), P.iq.data(),
                            static_cast<std::int64_t>(Hi) * Di, Ti, nullptr, 0, nullptr, 0, S);
      qk_norm_rope_to_cache(pik, L.Wp, 1, Di, L.ik_norm.data(), eps, R, theta, P.pos.data(), P.ik.data(), Di, Ti,
                            P.opt.fp8_index_cache ? nullptr : L.ik_cache.data(), Di, P.slots.data(), n_slots, S);
      if (P.opt.fp8_index_cache)
        kv_cache_write(P.ik.data(), Di, Di, Ti, L.ik_cache8.data(), Di, P.slots.data(), n_slots, S);
      emit(blk + "idx_q", P.iq.data(), static_cast<std::int64_t>(Hi) * Di, static_cast<std::int64_t>(Hi) * Di);
      emit(blk + "idx_k", P.ik.data(), Di, Di);
    }

    // Attention: one batched launch for a decode step of several sequences, else per sequence.
    const int groups = all_one ? 1 : nseq;
    for (int gi = 0; gi < groups; ++gi) {
      const int B = all_one ? nseq : 1;
      const int Tq = all_one ? 1 : static_cast<int>(rows[gi]);
      const std::int64_t r0 = all_one ? 0 : row0[gi];
      const int Ns = all_one ? Ni : static_cast<int>(len0[gi] + rows[gi]);
      const CachePages pages{P.table.data() + static_cast<std::ptrdiff_t>(all_one ? 0 : gi) * P.pps, P.pps};
      const bf16* q = P.q.data() + r0 * Hq * D;
      const std::int64_t* qp = P.pos.data() + r0;
      bf16* out = P.attn.data() + r0 * Hq * D;
      if (!L.msa) {
        if (!all_one && D == 128 && Tq >= 64) {
          // A prompt chunk: the tensor-core prefill kernel (queries at len0 .. len0 + Tq - 1).
          attention_dense_prefill(q, L.k_cache.data(), L.v_cache.data(), len0[gi], Tq, Ns, ad, out, S, pages);
        } else {
          P.ensure_attn_ws(attention_dense_workspace_bytes(Tq, Ns, ad, B));
          attention_dense(q, L.k_cache.data(), L.v_cache.data(), qp, Tq, Ns, ad, out, S, P.attn_ws.data(),
                          P.attn_ws.size(), B, pages);
        }
      } else {
        const int NBs = (Ns + BLK - 1) / BLK;
        const bf16* iq = P.iq.data() + r0 * Hi * Di;
        if (P.opt.fp8_index_cache)
          msa_index_fp8(iq, L.ik_cache8.data(), qp, Tq, Ns, NBs, md, P.scores.data(), S, B, pages);
        else
          msa_index(iq, L.ik_cache.data(), qp, Tq, Ns, NBs, md, P.scores.data(), S, B, pages);
        msa_select(P.scores.data(), qp, Tq, NBs, md, P.sel.data(), S, B);
        if (trace) {
          // Per sequence, [Hi*T_s, NB_s] and [Hi*T_s, K_blk] as the reference traces them.
          const std::vector<float> sc = download_vec(P.scores.data(), static_cast<std::size_t>(B) * Hi * Tq * NBs, S);
          const std::vector<std::int32_t> se = download_vec(P.sel.data(), static_cast<std::size_t>(B) * Hi * Tq * Kb, S);
          for (int b = 0; b < B; ++b) {
            const int s = all_one ? b : gi;
            trace(s, blk + "block_scores",
                  TraceView{TraceView::DType::F32, sc.data() + static_cast<std::int64_t>(b) * Hi * Tq * NBs,
                            static_cast<std::int64_t>(Hi) * Tq, NBs, NBs});
            trace(s, blk + "selection",
                  TraceView{TraceView::DType::I32, se.data() + static_cast<std::int64_t>(b) * Hi * Tq * Kb,
                            static_cast<std::int64_t>(Hi) * Tq, Kb, Kb});
          }
        }
        P.ensure_attn_ws(msa_attention_workspace_bytes(Tq, Kb, ad, B));
        msa_attention(q, L.k_cache.data(), L.v_cache.data(), qp, P.sel.data(), Tq, Ns, BLK, Kb, ad, out, S,
                      P.attn_ws.data(), P.attn_ws.size(), B, pages);
      }
    }
    emit(blk + "attn_out", P.attn.data(), static_cast<std::int64_t>(Hq) * D, static_cast<std::int64_t>(Hq) * D);
    linear(P.cublas.get(), P.attn.data(), L.o_proj.data(), P.o.data(), Ti, Hq * D, H, S);
    add_rms_norm(P.h.data(), P.o.data(), L.ffn_norm.data(), eps, P.a.data(), Ti, H, S);
    emit(blk + "ffn_norm", P.a.data(), H, H);

    if (!L.moe) {
      const int Id = static_cast<int>(L.mlp_down.size() / H);
      linear(P.cublas.get(), P.a.data(), L.mlp_gate_up.data(), P.mlp_gu.data(), Ti, H, 2 * Id, S);
      swiglu_oai(P.mlp_gu.data(), sp, P.mlp_act.data(), Ti, Id, S);
      linear(P.cublas.get(), P.mlp_act.data(), L.mlp_down.data(), P.o.data(), Ti, Id, H, S);
      emit(blk + "mlp_out", P.o.data(), H, H);
    } else {
      moe_router(P.a.data(), L.router.data(), L.router_bias.data(), K, c.norm_topk_prob, P.r_logits.data(),
                 P.r_experts.data(), P.r_weights.data(), Ti, H, E, S);
      emit_f32(blk + "router_logits", P.r_logits.data(), E);
      emit_i32(blk + "experts", P.r_experts.data(), K);
      emit_f32(blk + "expert_weights", P.r_weights.data(), K);
      moe_experts(P.cublas.get(), P.a.data(), P.r_experts.data(), P.r_weights.data(), Ti, H, K, L.moe_w,
                  c.routed_scaling_factor, sp, P.o.data(), P.moe_ws.data(), P.moe_ws.size(), S);
      emit(blk + "moe_out", P.o.data(), H, H);
    }
  }
  // Final residual add + norm, then the LM head GEMM with fp32 logits (gpu::lm_head's two steps,
  // the first fused with the last layer's residual add).
  add_rms_norm(P.h.data(), P.o.data(), P.final_norm.data(), eps, P.a.data(), Ti, H, S);
  emit(fmt::format("blk.{}.out", c.num_hidden_layers - 1), P.h.data(), H, H);
  linear(P.cublas.get(), P.a.data(), P.lm_head.data(), P.logits.data(), Ti, H, V, S);
  P.t1.record(S);
  if (hidden_out) {  // the residual stream after the last layer, before the final norm
    const MatF hf = download_rows(P.h.data(), T, H, H, S);  // [T, H]
    hidden_out->clear();
    for (int s = 0; s < nseq; ++s) hidden_out->push_back(hf.middleRows(row0[s], rows[s]).cast<double>());
  }
  // The rows that leave the device: all ([T, V], sequence s at row0[s]), or each sequence's last
  // (last_logits_only: [nseq, V], sequence s at row s).
  const bool last = P.opt.last_logits_only;
  std::vector<float> lg;
  if (last) {
    lg.resize(static_cast<std::size_t>(nseq) * V);
    for (int s = 0; s < nseq; ++s)
      M3_CUDA_CHECK(cudaMemcpyAsync(lg.data() + static_cast<std::size_t>(s) * V,
                                    P.logits.data() + (row0[s] + rows[s] - 1) * V,
                                    static_cast<std::size_t>(V) * sizeof(float), cudaMemcpyDeviceToHost, S));
    M3_CUDA_CHECK(cudaStreamSynchronize(S));
  } else {
    lg = download_vec(P.logits.data(), static_cast<std::size_t>(T) * V, S);
  }
  P.timing.ms = P.t1.since(P.t0);
  P.timing.tokens = T;
  std::vector<std::int64_t> at(nseq), count(nseq);  // per sequence: its first row in lg, its rows there
  for (int s = 0; s < nseq; ++s) at[s] = last ? s : row0[s], count[s] = last ? 1 : rows[s];
  if (trace)
    for (int s = 0; s < nseq; ++s)
      trace(s, "logits", TraceView{TraceView::DType::F32, lg.data() + at[s] * V, count[s], V, V});

  std::vector<MatD> out;
  for (int s = 0; s < nseq; ++s) {
    MatD m(count[s], V);
    for (std::int64_t r = 0; r < count[s]; ++r)
      for (int v = 0; v < V; ++v) m(r, v) = lg[static_cast<std::size_t>((at[s] + r) * V + v)];
    out.push_back(std::move(m));
    seqs[s]->s_->len += rows[s];
  }
  return out;
}

MatD Model::prefill(Sequence& seq, std::span<const std::int32_t> tokens, const TraceFn& trace) {
  if (tokens.empty()) throw std::invalid_argument("gpu::prefill: no tokens");
  const std::size_t chunk = static_cast<std::size_t>(p_->opt.max_tokens);
  // forward() validates one chunk at a time; a prompt refused by a later chunk must not leave the
  // earlier chunks in the cache, so the whole prompt is checked first, by the same checks.
  if (tokens.size() > chunk) check_free_pages(*p_->pool, check_append(&seq, tokens, 0, "gpu::prefill"), "gpu::prefill");
  const bool last = p_->opt.last_logits_only;
  MatD all(last ? 1 : static_cast<Eigen::Index>(tokens.size()), p_->cfg.vocab_size);
  for (std::size_t at = 0; at < tokens.size(); at += chunk) {
    const std::size_t n = std::min(chunk, tokens.size() - at);
    Sequence* s[] = {&seq};
    std::span<const std::int32_t> t[] = {tokens.subspan(at, n)};
    MatD lg = forward(s, t, trace)[0];  // [n, V], or [1, V] with last_logits_only
    if (last) all = std::move(lg);
    else all.middleRows(static_cast<Eigen::Index>(at), static_cast<Eigen::Index>(n)) = lg;
  }
  return all;
}

MatD Model::decode(Sequence& seq, std::int32_t token, const TraceFn& trace) {
  return prefill(seq, std::span<const std::int32_t>(&token, 1), trace);
}

std::vector<std::int32_t> generate_greedy(Model& model, std::span<const std::int32_t> prompt, int steps,
                                          MatD* logits_out, const TraceFn& trace) {
  Sequence seq = model.new_sequence();
  std::vector<MatD> rows{model.prefill(seq, prompt, trace)};
  std::vector<std::int32_t> out;
  for (int i = 0; i < steps; ++i) {
    out.push_back(greedy_token(rows.back(), rows.back().rows() - 1));
    rows.push_back(model.decode(seq, out.back(), trace));
  }
  if (logits_out) {
    Eigen::Index n = 0;
    for (auto& r : rows) n += r.rows();
    logits_out->resize(n, model.config().vocab_size);
    n = 0;
    for (auto& r : rows) {
      logits_out->middleRows(n, r.rows()) = r;
      n += r.rows();
    }
  }
  return out;
}

}  // namespace m3::gpu
