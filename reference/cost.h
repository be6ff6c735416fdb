// Analytic cost model of attention, dense GQA vs MSA (DESIGN §5, spec §5), per layer and whole
// model, plus the linear-layer FLOPs that put attention into proportion. Pure arithmetic: nothing
// here runs a model. `m3h cost` prints it; tests/test_cost.cpp checks it.
//
// Counting rules (FLOPs = 2 per multiply-add; norms, RoPE, softmax and activations not counted):
//   dense-equivalent  4*Hq*D per (query, visible key)          q.k and p.v of every visible key
//   actual, index     2*Hi*Di per (query, scored key)          q_I.k_I only (no index value)
//   actual, main      4*Hq*D per (query, attended key)         q.k and p.v of the selected keys
//   top-k work        block scores examined, a count kept apart from FLOPs
//   necessary bytes   each cache element read once per query token:
//                       dense   K+V of the visible keys  = 2*Hkv*D*n*bytes
//                       MSA     index-K of the scored keys = Di*n*bytes, plus K/V of the attended
//                               keys of every KV head (each group reads its own selection)
//                               = Hkv*2*D*attended*bytes; the index queries are computed on the
//                               fly from the token's own activations (not read from a cache)
//                               and are left out, as are weights.
// Dense-attention layers count dense in both columns (actual == dense-equivalent).
//
// Readings (CostReading):
//   DECODE        paper: one query against n keys, main branch min(n, K_blk*BLK) keys
//   DECODE_EXACT  what the reference executes for the query at position p = n-1 (n keys visible)
//   CAUSAL_AVG    paper: the average token of a causal sequence of N tokens, taken as one query at
//                 the mean context N/2 (for M3: 32 / (1 + 2*32*2048/N), 28.44x at N = 2^20)
//   CAUSAL_EXACT  exact: the mean over all N query positions 0..N-1 of the DECODE_EXACT counts
//                 (closed form, exact integer key counts: attn_keys_range)
//
// Exact reading for the query at position p (n = p+1 keys visible, L = floor(p/BLK) its block):
//   index   every visible key is scored, the partial local block included: p+1 keys per index
//           head (msa_index.h);
//   main    if L+1 <= K_blk every visible block is selected: p+1 keys; otherwise exactly K_blk
//           distinct blocks are selected and the query's own block L is one of them (forced, as
//           local_blocks >= 1), so (K_blk-1) full blocks + the causal part p%BLK+1 of block L.
//           Both cases: min(p+1, (K_blk-1)*BLK + p%BLK + 1). This holds for any init_blocks and
//           local_blocks with local_blocks >= 1 and init_blocks + local_blocks <= K_blk (the forced
//           blocks then fit in the budget and every other selected block is a full past block);
//           other settings are refused, as their count depends on the data.
//   top-k   when L+1 > K_blk, Hi*(L+1 - init_blocks - local_blocks) candidate block scores (the
//           non-forced visible blocks, one row per index head); when L+1 <= K_blk, 0 (every
//           visible block is taken without comparing scores).
#pragma once

#include "reference/config.h"
#include "reference/dims.h"

#include <cstdint>
#include <span>
#include <string_view>

namespace m3 {

// bf16 caches, the default of `m3h cost --bytes-per-element`.
inline constexpr double kDefaultBytesPerElement = 2.0;

enum class CostReading { DECODE, DECODE_EXACT, CAUSAL_AVG, CAUSAL_EXACT };

// Exact integer counts of one attention layer over a set of query positions (the exact reading).
// Pairs are (query, key) and do not include the head factors; select_candidates does (it is the
// number of block scores the top-k examines, summed over index heads, as AttnCounter counts it).
struct AttnKeys {
  std::uint64_t queries = 0;
  std::uint64_t visible = 0;   // causally visible pairs: the dense-equivalent work
  std::uint64_t scored = 0;    // pairs scored by the index branch (0 in dense layers)
  std::uint64_t attended = 0;  // pairs in the main branch (== visible in dense layers)
  std::uint64_t select_candidates = 0;
  AttnKeys& operator+=(const AttnKeys& o);
};

// Cost of one attention layer per query token (for CAUSAL_* the mean over the sequence's tokens).
struct AttnCost {
  double dense_flops = 0;         // dense-equivalent
  double index_flops = 0;         // actual, index branch
  double main_flops = 0;          // actual, main branch
  double select_candidates = 0;   // top-k block scores examined (not FLOPs)
  double dense_bytes = 0;         // necessary bytes of dense GQA: K+V of the visible keys
  double index_bytes = 0;         // necessary bytes, index-K of the scored keys
  double kv_bytes = 0;            // necessary bytes, K+V of the attended keys
  double actual_flops() const { return index_flops + main_flops; }
  double actual_bytes() const { return index_bytes + kv_bytes; }
  double flops_ratio() const { return dense_flops / actual_flops(); }  // dense / actual
  double bytes_ratio() const { return dense_bytes / actual_bytes(); }
  AttnCost& operator+=(const AttnCost& o);
  AttnCost scaled(double f) const;  // every field times f (f layers of one kind)
};

// Linear-layer FLOPs of one token (2 per multiply-add), one layer or summed over layers.
struct LinearFlops {
  double attn_proj = 0;   // q, k, v, o projections
  double index_proj = 0;  // MSA index q and k projections (MSA layers)
  double dense_mlp = 0;   // gate, up, down of the dense MLP (dense-MLP layers)
  double router = 0;      // MoE router logits (MoE layers)
  double experts = 0;     // the K_e active routed experts (MoE layers)
  double shared = 0;      // the shared expert (MoE layers)
  double total() const { return attn_proj + index_proj + dense_mlp + router + experts + shared; }
  LinearFlops& operator+=(const LinearFlops& o);
};

// Whole model under one reading; attention summed over layers by their AttnType.
struct ModelCost {
  CostReading reading = CostReading::DECODE;
  std::int64_t context = 0;     // n (DECODE*) or N (CAUSAL_*)
  double bytes_per_element = kDefaultBytesPerElement;
  int dense_layers = 0;         // layers with AttnType::DENSE
  int msa_layers = 0;           // layers with AttnType::MSA
  AttnCost dense_layer;         // one dense-attention layer (zero when dense_layers == 0)
  AttnCost msa_layer;           // one MSA layer (zero when msa_layers == 0)
  AttnCost attention;           // all layers
  LinearFlops linear;           // all layers, per token (independent of the context)
  double lm_head_flops = 0;     // per token
  // Attention's share of the per-token FLOPs (attention + linear layers + LM head), with dense
  // GQA attention in every layer and with the model's actual attention.
  double attn_share_dense() const;
  double attn_share_actual() const;
};

// --- exact reading ---
// One query at absolute position p >= 0 in a layer of type t.
AttnKeys attn_keys_at(const ModelConfig& cfg, AttnType t, std::int64_t p);
// The queries at positions p0 .. p0+T-1 (a prefill chunk; p0 = 0, T = N: a whole causal
// sequence), in closed form. Throws std::overflow_error past 2^32 positions.
AttnKeys attn_keys_range(const ModelConfig& cfg, AttnType t, std::int64_t p0, std::int64_t T);
// The multiply-adds the reference's counters report for those queries:
// qk_macs = pv_macs = Hq*D*attended, index_macs = Hi*Di*scored, select_candidates as above.
AttnCounter attn_counter(const ModelConfig& cfg, AttnType t, const AttnKeys& keys);
// FLOPs and bytes of the exact reading for one query at position p.
AttnCost attn_cost_at(const ModelConfig& cfg, AttnType t, std::int64_t p,
                      double bytes_per_element = kDefaultBytesPerElement);
// Per-query mean cost of the given exact counts.
AttnCost attn_cost_of(const ModelConfig& cfg, AttnType t, const AttnKeys& keys,
                      double bytes_per_element = kDefaultBytesPerElement);

// --- any reading ---
// One layer of type t at context n (DECODE*) or sequence length N (CAUSAL_*), n >= 1.
AttnCost attn_cost(const ModelConfig& cfg, AttnType t, CostReading r, std::int64_t n,
                   double bytes_per_element = kDefaultBytesPerElement);
ModelCost model_cost(const ModelConfig& cfg, CostReading r, std::int64_t n,
                     double bytes_per_element = kDefaultBytesPerElement);

// --- context-free pieces ---
LinearFlops linear_flops_per_token(const ModelConfig& cfg, int layer);
double lm_head_flops_per_token(const ModelConfig& cfg);
// KV-cache bytes one token adds: K+V of every layer + index-K of every MSA layer (spec §3.7).
double kv_cache_bytes_per_token(const ModelConfig& cfg,
                                double bytes_per_element = kDefaultBytesPerElement);
// The MSA/GQA FLOPs ratio as n -> infinity: 4*Hq*D / (2*Hi*Di) (32 for M3).
double msa_ratio_limit(const ModelConfig& cfg);

std::string_view cost_reading_name(CostReading r);  // "decode", "decode_exact", ...
std::string_view cost_reading_rule(CostReading r);  // one sentence, for reports
// The counting rules above, one sentence each, for reports.
struct CostRule {
  std::string_view name;  // "flops", "dense_equivalent", "index", "main", "top_k", "bytes", ...
  std::string_view text;
};
std::span<const CostRule> cost_rules();

}  // namespace m3
