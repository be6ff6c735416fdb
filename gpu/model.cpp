// The GPU forward pass (model.h). Reads like the reference's model.cpp, op for op:
//   h = Embed(tokens); per layer: h += Attn(RMSNorm(h)); h += FFN(RMSNorm(h)); logits = LMHead(h)
// with each residual add fused into the norm that follows it (add_rms_norm), so layer l's output
// h is complete only inside layer l+1's first norm (or the final norm): that is where
// blk.{l}.out is traced, in the reference's order.
// Set-up (weights, plan, buffers, sequences) is gpu/model_setup.cpp; the shared state gpu/model_impl.h.
#include "gpu/model_impl.h"

namespace m3::gpu {

using namespace model_detail;

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
        // Selection and sparse attention: one fused kernel at decode-sized grids (msa_attention.h).
        P.ensure_attn_ws(msa_attention_workspace_bytes(Tq, Kb, ad, B));
        msa_select_attention(P.scores.data(), NBs, md, q, L.k_cache.data(), L.v_cache.data(), qp, Tq, Ns, ad,
                             P.sel.data(), out, S, P.attn_ws.data(), P.attn_ws.size(), B, pages);
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
