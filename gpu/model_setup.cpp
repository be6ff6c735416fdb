// The GPU model's set-up (model.h): the supported-config check, the weights' upload (bf16; the
// router fp32), the memory plan and every buffer, checked before any allocation; sequences and
// their cache pages. The forward pass is gpu/model.cpp; the state both share, gpu/model_impl.h.
#include "gpu/model_impl.h"

namespace m3::gpu {

using namespace model_detail;

namespace {

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

}  // namespace m3::gpu
