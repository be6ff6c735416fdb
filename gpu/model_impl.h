// Private to gpu/model.cpp (the forward pass) and gpu/model_setup.cpp (weights, memory plan,
// buffers, sequences): the device state of a Model and of a Sequence. Not part of the API.
#pragma once

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

#include <memory>
#include <vector>

namespace m3::gpu {

namespace model_detail {

// The pool of cache pages shared by a model's sequences (host bookkeeping only).
struct PagePool {
  std::vector<std::int32_t> free;  // page ids not owned by any sequence
  int n_pages = 0;
};

inline void check_free_pages(const PagePool& pool, std::int64_t needed, const char* who) {
  if (needed > static_cast<std::int64_t>(pool.free.size()))
    throw std::runtime_error(fmt::format("{}: needs {} more cache pages, {} free of {}", who, needed, pool.free.size(),
                                         pool.n_pages));
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
inline MatF download_rows(const bf16* d, std::int64_t rows, std::int64_t cols, std::int64_t ld, cudaStream_t s) {
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

}  // namespace model_detail

struct Sequence::State {
  const void* owner = nullptr;
  std::shared_ptr<model_detail::PagePool> pool;
  std::vector<std::int32_t> pages;
  std::int64_t len = 0;
  ~State() {
    if (pool) pool->free.insert(pool->free.end(), pages.begin(), pages.end());
  }
};

struct Model::Impl {
  ModelConfig cfg;
  ModelOptions opt;
  MemoryPlan plan;
  ForwardTiming timing;
  int pps = 0;  // pages per sequence (page-table row length)
  std::shared_ptr<model_detail::PagePool> pool = std::make_shared<model_detail::PagePool>();

  Stream stream;
  CublasHandle cublas;
  Event t0, t1;

  DeviceBuffer<bf16> embed, final_norm, lm_head;  // [V, H], [H], [V, H]
  std::vector<model_detail::LayerDev> layers;
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

}  // namespace m3::gpu
