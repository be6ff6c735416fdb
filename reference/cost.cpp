// Analytic attention cost model (cost.h): the counting rules, the paper and exact readings, the
// closed-form causal sums, and the linear-layer FLOPs. Exact counts are integers (uint64 results,
// unsigned __int128 intermediates); everything reported is double.
#include "reference/cost.h"

#include <fmt/core.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace m3 {

namespace {

using u128 = unsigned __int128;

// Positions up to 2^32 keep every pair count (< M^2/2 = 2^63) exact in uint64 with room to spare;
// 4096x the longest context M3 supports.
constexpr std::int64_t kMaxPositions = std::int64_t{1} << 32;

void check_attn_dims(const ModelConfig& cfg, const char* who) {
  if (cfg.num_attention_heads <= 0 || cfg.num_key_value_heads <= 0 || cfg.head_dim <= 0)
    throw std::invalid_argument(fmt::format(
        "{}: config '{}' needs Hq, Hkv, D > 0, got num_attention_heads {}, "
        "num_key_value_heads {}, head_dim {}",
        who, cfg.name, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim));
}

// The exact reading's main-branch count needs the forced blocks to include the local block and
// to fit in the budget (cost.h); the paper reading needs the same dims to be positive.
void check_msa_dims(const ModelConfig& cfg, const char* who) {
  check_attn_dims(cfg, who);
  if (cfg.index_n_heads <= 0 || cfg.index_head_dim <= 0 || cfg.index_block_size <= 0 ||
      cfg.index_topk_blocks <= 0)
    throw std::invalid_argument(fmt::format(
        "{}: config '{}' has MSA layers but index_n_heads {}, index_head_dim {}, "
        "index_block_size {}, index_topk_blocks {}; expected all > 0",
        who, cfg.name, cfg.index_n_heads, cfg.index_head_dim, cfg.index_block_size,
        cfg.index_topk_blocks));
  if (cfg.index_local_blocks < 1 || cfg.index_init_blocks < 0 ||
      cfg.index_init_blocks + cfg.index_local_blocks > cfg.index_topk_blocks)
    throw std::invalid_argument(fmt::format(
        "{}: config '{}': the cost model needs index_local_blocks >= 1, index_init_blocks >= 0 "
        "and index_init_blocks + index_local_blocks <= index_topk_blocks (otherwise the attended "
        "key count depends on the data), got local {}, init {}, topk {}",
        who, cfg.name, cfg.index_local_blocks, cfg.index_init_blocks, cfg.index_topk_blocks));
}

void check_layer(const ModelConfig& cfg, AttnType t, const char* who) {
  if (t == AttnType::MSA)
    check_msa_dims(cfg, who);
  else
    check_attn_dims(cfg, who);
}

std::uint64_t narrow(u128 v, const char* what) {
  if (v > std::numeric_limits<std::uint64_t>::max())
    throw std::overflow_error(fmt::format("attn_keys_range: {} does not fit in 64 bits", what));
  return static_cast<std::uint64_t>(v);
}

// sum_{p < m} (p + 1): visible (and, in MSA layers, scored) pairs of the first m positions.
u128 sum_visible(u128 m) { return m * (m + 1) / 2; }

// sum_{p < m} p % blk
u128 sum_mod(u128 m, u128 blk) {
  u128 q = m / blk, r = m % blk;
  return q * (blk * (blk - 1) / 2) + r * (r == 0 ? 0 : r - 1) / 2;
}

// sum_{p < m} floor(p / blk)
u128 sum_div(u128 m, u128 blk) {
  u128 q = m / blk, r = m % blk;
  return blk * (q * (q == 0 ? 0 : q - 1) / 2) + r * q;
}

// sum_{p < m} min(p + 1, (K_blk-1)*BLK + p%BLK + 1): the first W = K_blk*BLK positions see at
// most K_blk blocks and attend every visible key; from p = W on, K_blk-1 full blocks + the causal
// part of the local block.
u128 sum_attended(u128 m, const ModelConfig& cfg) {
  const u128 blk = static_cast<u128>(cfg.index_block_size);
  const u128 w = static_cast<u128>(cfg.index_topk_blocks) * blk;
  if (m <= w) return sum_visible(m);
  const u128 full = (static_cast<u128>(cfg.index_topk_blocks) - 1) * blk;
  return sum_visible(w) + (m - w) * (full + 1) + (sum_mod(m, blk) - sum_mod(w, blk));
}

// sum_{p < m} of the top-k candidates: Hi*(L+1 - init - local) for p >= W, else 0.
u128 sum_candidates(u128 m, const ModelConfig& cfg) {
  const u128 blk = static_cast<u128>(cfg.index_block_size);
  const u128 w = static_cast<u128>(cfg.index_topk_blocks) * blk;
  if (m <= w) return 0;
  const u128 forced = static_cast<u128>(cfg.index_init_blocks + cfg.index_local_blocks);
  // (L+1) - forced >= K_blk + 1 - forced >= 1 for every p >= W, so the subtraction is safe.
  const u128 per_head = (sum_div(m, blk) - sum_div(w, blk)) + (m - w) - (m - w) * forced;
  return static_cast<u128>(cfg.index_n_heads) * per_head;
}

// Cost of one query from per-query pair counts (real-valued, so that the paper reading can use
// the mean context N/2).
AttnCost cost_from_pairs(const ModelConfig& cfg, AttnType t, long double visible,
                         long double scored, long double attended, long double candidates,
                         double bpe) {
  const long double hq_d = static_cast<long double>(cfg.num_attention_heads) * cfg.head_dim;
  const long double kv_row = 2.0L * cfg.num_key_value_heads * cfg.head_dim * bpe;  // K+V, all heads
  AttnCost c;
  c.dense_flops = static_cast<double>(4.0L * hq_d * visible);
  c.dense_bytes = static_cast<double>(kv_row * visible);
  if (t == AttnType::DENSE) {
    c.main_flops = c.dense_flops;
    c.kv_bytes = c.dense_bytes;
    return c;
  }
  const long double hi_di = static_cast<long double>(cfg.index_n_heads) * cfg.index_head_dim;
  c.index_flops = static_cast<double>(2.0L * hi_di * scored);
  c.main_flops = static_cast<double>(4.0L * hq_d * attended);
  c.select_candidates = static_cast<double>(candidates);
  c.index_bytes = static_cast<double>(static_cast<long double>(cfg.index_head_dim) * bpe * scored);
  c.kv_bytes = static_cast<double>(kv_row * attended);
  return c;
}

// Paper reading, one query against n keys (n real: CAUSAL_AVG uses N/2).
AttnCost cost_paper(const ModelConfig& cfg, AttnType t, long double n, double bpe) {
  if (t == AttnType::DENSE) return cost_from_pairs(cfg, t, n, 0, n, 0, bpe);
  const long double blk = cfg.index_block_size;
  const long double budget = static_cast<long double>(cfg.index_topk_blocks) * blk;
  const long double nb = std::ceil(n / blk);  // visible blocks
  const long double candidates =
      nb > cfg.index_topk_blocks
          ? static_cast<long double>(cfg.index_n_heads) *
                (nb - cfg.index_init_blocks - cfg.index_local_blocks)
          : 0.0L;
  return cost_from_pairs(cfg, t, n, n, std::min(n, budget), candidates, bpe);
}

void check_bpe(double bpe, const char* who) {
  if (!(bpe > 0) || !std::isfinite(bpe))
    throw std::invalid_argument(
        fmt::format("{}: bytes_per_element must be a finite number > 0, got {}", who, bpe));
}

}  // namespace

AttnKeys& AttnKeys::operator+=(const AttnKeys& o) {
  queries += o.queries;
  visible += o.visible;
  scored += o.scored;
  attended += o.attended;
  select_candidates += o.select_candidates;
  return *this;
}

AttnCost& AttnCost::operator+=(const AttnCost& o) {
  dense_flops += o.dense_flops;
  index_flops += o.index_flops;
  main_flops += o.main_flops;
  select_candidates += o.select_candidates;
  dense_bytes += o.dense_bytes;
  index_bytes += o.index_bytes;
  kv_bytes += o.kv_bytes;
  return *this;
}

AttnCost AttnCost::scaled(double f) const {
  AttnCost c = *this;
  c.dense_flops *= f;
  c.index_flops *= f;
  c.main_flops *= f;
  c.select_candidates *= f;
  c.dense_bytes *= f;
  c.index_bytes *= f;
  c.kv_bytes *= f;
  return c;
}

LinearFlops& LinearFlops::operator+=(const LinearFlops& o) {
  attn_proj += o.attn_proj;
  index_proj += o.index_proj;
  dense_mlp += o.dense_mlp;
  router += o.router;
  experts += o.experts;
  shared += o.shared;
  return *this;
}

double ModelCost::attn_share_dense() const {
  return attention.dense_flops / (attention.dense_flops + linear.total() + lm_head_flops);
}

double ModelCost::attn_share_actual() const {
  return attention.actual_flops() / (attention.actual_flops() + linear.total() + lm_head_flops);
}

AttnKeys attn_keys_at(const ModelConfig& cfg, AttnType t, std::int64_t p) {
  check_layer(cfg, t, "attn_keys_at");
  if (p < 0 || p >= kMaxPositions)
    throw std::invalid_argument(
        fmt::format("attn_keys_at: position {} out of range [0, 2^32)", p));
  const auto n = static_cast<std::uint64_t>(p) + 1;
  AttnKeys k;
  k.queries = 1;
  k.visible = n;
  if (t == AttnType::DENSE) {
    k.attended = n;
    return k;
  }
  const auto blk = static_cast<std::uint64_t>(cfg.index_block_size);
  const auto topk = static_cast<std::uint64_t>(cfg.index_topk_blocks);
  const std::uint64_t local_block = static_cast<std::uint64_t>(p) / blk;  // L
  k.scored = n;
  k.attended = std::min(n, (topk - 1) * blk + static_cast<std::uint64_t>(p) % blk + 1);
  if (local_block + 1 > topk)
    k.select_candidates =
        static_cast<std::uint64_t>(cfg.index_n_heads) *
        (local_block + 1 -
         static_cast<std::uint64_t>(cfg.index_init_blocks + cfg.index_local_blocks));
  return k;
}

AttnKeys attn_keys_range(const ModelConfig& cfg, AttnType t, std::int64_t p0, std::int64_t T) {
  check_layer(cfg, t, "attn_keys_range");
  if (p0 < 0 || T < 0 || p0 > kMaxPositions - T)
    throw std::invalid_argument(fmt::format(
        "attn_keys_range: positions [{}, {} + {}) must lie in [0, 2^32)", p0, p0, T));
  const auto a = static_cast<u128>(p0), b = static_cast<u128>(p0 + T);
  AttnKeys k;
  k.queries = static_cast<std::uint64_t>(T);
  k.visible = narrow(sum_visible(b) - sum_visible(a), "visible pairs");
  if (t == AttnType::DENSE) {
    k.attended = k.visible;
    return k;
  }
  k.scored = k.visible;
  k.attended = narrow(sum_attended(b, cfg) - sum_attended(a, cfg), "attended pairs");
  k.select_candidates =
      narrow(sum_candidates(b, cfg) - sum_candidates(a, cfg), "top-k candidates");
  return k;
}

AttnCounter attn_counter(const ModelConfig& cfg, AttnType t, const AttnKeys& keys) {
  check_layer(cfg, t, "attn_counter");
  const auto hq_d = static_cast<u128>(cfg.num_attention_heads) * cfg.head_dim;
  AttnCounter c;
  c.qk_macs = narrow(hq_d * keys.attended, "qk multiply-adds");
  c.pv_macs = c.qk_macs;
  if (t == AttnType::MSA) {
    const auto hi_di = static_cast<u128>(cfg.index_n_heads) * cfg.index_head_dim;
    c.index_macs = narrow(hi_di * keys.scored, "index multiply-adds");
    c.select_candidates = keys.select_candidates;
  }
  return c;
}

AttnCost attn_cost_of(const ModelConfig& cfg, AttnType t, const AttnKeys& keys,
                      double bytes_per_element) {
  check_layer(cfg, t, "attn_cost_of");
  check_bpe(bytes_per_element, "attn_cost_of");
  if (keys.queries == 0)
    throw std::invalid_argument("attn_cost_of: the counts cover 0 queries; expected >= 1");
  const long double q = static_cast<long double>(keys.queries);
  return cost_from_pairs(cfg, t, keys.visible / q, keys.scored / q, keys.attended / q,
                         keys.select_candidates / q, bytes_per_element);
}

AttnCost attn_cost_at(const ModelConfig& cfg, AttnType t, std::int64_t p,
                      double bytes_per_element) {
  return attn_cost_of(cfg, t, attn_keys_at(cfg, t, p), bytes_per_element);
}

AttnCost attn_cost(const ModelConfig& cfg, AttnType t, CostReading r, std::int64_t n,
                   double bytes_per_element) {
  check_layer(cfg, t, "attn_cost");
  check_bpe(bytes_per_element, "attn_cost");
  if (n < 1)
    throw std::invalid_argument(
        fmt::format("attn_cost: context {} out of range, expected >= 1", n));
  switch (r) {
    case CostReading::DECODE:
      return cost_paper(cfg, t, static_cast<long double>(n), bytes_per_element);
    case CostReading::DECODE_EXACT:
      return attn_cost_at(cfg, t, n - 1, bytes_per_element);
    case CostReading::CAUSAL_AVG:
      return cost_paper(cfg, t, static_cast<long double>(n) / 2, bytes_per_element);
    case CostReading::CAUSAL_EXACT:
      return attn_cost_of(cfg, t, attn_keys_range(cfg, t, 0, n), bytes_per_element);
  }
  throw std::invalid_argument("attn_cost: unknown CostReading");
}

LinearFlops linear_flops_per_token(const ModelConfig& cfg, int layer) {
  if (layer < 0 || layer >= static_cast<int>(cfg.layer_types.size()) ||
      layer >= static_cast<int>(cfg.mlp_layer_types.size()))
    throw std::out_of_range(fmt::format(
        "linear_flops_per_token: layer {} out of range, config '{}' has {} layer_types and {} "
        "mlp_layer_types",
        layer, cfg.name, cfg.layer_types.size(), cfg.mlp_layer_types.size()));
  const double h = cfg.hidden_size;
  const double q_width = static_cast<double>(cfg.num_attention_heads) * cfg.head_dim;
  const double kv_width = static_cast<double>(cfg.num_key_value_heads) * cfg.head_dim;
  LinearFlops f;
  f.attn_proj = 2.0 * h * (q_width + 2 * kv_width + q_width);  // q, k, v in; o out
  if (cfg.layer_types[layer] == AttnType::MSA)  // index q (Hi heads) and the one index-K head
    f.index_proj = 2.0 * h * (static_cast<double>(cfg.index_n_heads) + 1) * cfg.index_head_dim;
  if (cfg.mlp_layer_types[layer] == MlpType::DENSE) {
    f.dense_mlp = 2.0 * 3 * h * cfg.dense_intermediate_size;  // gate, up, down
  } else {
    f.router = 2.0 * h * cfg.num_local_experts;
    f.experts = 2.0 * 3 * h * cfg.intermediate_size * cfg.num_experts_per_tok;
    // shared_intermediate_size is the whole shared width (n_shared * I), config.h
    f.shared = 2.0 * 3 * h * cfg.shared_intermediate_size;
  }
  return f;
}

double lm_head_flops_per_token(const ModelConfig& cfg) {
  return 2.0 * cfg.hidden_size * static_cast<double>(cfg.vocab_size);
}

double kv_cache_bytes_per_token(const ModelConfig& cfg, double bytes_per_element) {
  check_bpe(bytes_per_element, "kv_cache_bytes_per_token");
  double elements = 0;
  for (AttnType t : cfg.layer_types) {
    elements += 2.0 * cfg.num_key_value_heads * cfg.head_dim;  // K and V, every layer
    if (t == AttnType::MSA) elements += cfg.index_head_dim;    // one index-K head
  }
  return elements * bytes_per_element;
}

double msa_ratio_limit(const ModelConfig& cfg) {
  check_msa_dims(cfg, "msa_ratio_limit");
  return 4.0 * cfg.num_attention_heads * cfg.head_dim /
         (2.0 * cfg.index_n_heads * cfg.index_head_dim);
}

ModelCost model_cost(const ModelConfig& cfg, CostReading r, std::int64_t n,
                     double bytes_per_element) {
  if (static_cast<int>(cfg.layer_types.size()) != cfg.num_hidden_layers ||
      static_cast<int>(cfg.mlp_layer_types.size()) != cfg.num_hidden_layers)
    throw std::invalid_argument(fmt::format(
        "model_cost: config '{}' has num_hidden_layers {} but {} layer_types and {} "
        "mlp_layer_types",
        cfg.name, cfg.num_hidden_layers, cfg.layer_types.size(), cfg.mlp_layer_types.size()));
  ModelCost m;
  m.reading = r;
  m.context = n;
  m.bytes_per_element = bytes_per_element;
  m.dense_layers = static_cast<int>(
      std::count(cfg.layer_types.begin(), cfg.layer_types.end(), AttnType::DENSE));
  m.msa_layers = cfg.num_hidden_layers - m.dense_layers;
  if (m.dense_layers > 0) m.dense_layer = attn_cost(cfg, AttnType::DENSE, r, n, bytes_per_element);
  if (m.msa_layers > 0) m.msa_layer = attn_cost(cfg, AttnType::MSA, r, n, bytes_per_element);
  m.attention = m.dense_layer.scaled(m.dense_layers);
  m.attention += m.msa_layer.scaled(m.msa_layers);
  for (int l = 0; l < cfg.num_hidden_layers; ++l) m.linear += linear_flops_per_token(cfg, l);
  m.lm_head_flops = lm_head_flops_per_token(cfg);
  return m;
}

std::string_view cost_reading_name(CostReading r) {
  switch (r) {
    case CostReading::DECODE: return "decode";
    case CostReading::DECODE_EXACT: return "decode_exact";
    case CostReading::CAUSAL_AVG: return "causal_avg";
    case CostReading::CAUSAL_EXACT: return "causal_exact";
  }
  return "?";
}

std::string_view cost_reading_rule(CostReading r) {
  switch (r) {
    case CostReading::DECODE:
      return "paper reading, one decode query against n keys: index 2*Hi*Di*n, main "
             "4*Hq*D*min(n, K_blk*BLK)";
    case CostReading::DECODE_EXACT:
      return "exact reading, the decode query at position p = n-1: index 2*Hi*Di*(p+1), main "
             "4*Hq*D*min(p+1, (K_blk-1)*BLK + p%BLK + 1)";
    case CostReading::CAUSAL_AVG:
      return "paper reading, the average token of a causal sequence of N tokens = one query at "
             "the mean context N/2 (M3: 32/(1+2*32*2048/N))";
    case CostReading::CAUSAL_EXACT:
      return "exact reading, mean over all N query positions 0..N-1 of the exact per-query "
             "counts (closed-form integer sums)";
  }
  return "?";
}

std::span<const CostRule> cost_rules() {
  static constexpr std::array<CostRule, 7> kRules{{
      {"flops", "2 FLOPs per multiply-add; norms, RoPE, softmax and activations not counted"},
      {"dense_equivalent", "4*Hq*D FLOPs per (query, visible key): q.k and p.v of every visible "
                           "key, i.e. dense causal GQA"},
      {"index", "2*Hi*Di FLOPs per (query, scored key): q_I.k_I of every visible key, the "
                "partial local block included; no index value"},
      {"main", "4*Hq*D FLOPs per (query, attended key): the keys of the selected blocks, causal "
               "inside the local block"},
      {"top_k", "block scores examined by the top-k (Hi*(L+1-init-local) per query when "
                "L+1 > K_blk, else 0), a count, not FLOPs"},
      {"bytes", "necessary bytes per query token, each cache element read once: dense K+V "
                "2*Hkv*D*n*bytes; MSA index-K Di*n*bytes + K/V of each KV head's own attended "
                "keys Hkv*2*D*attended*bytes; index queries (computed, not read) and weights "
                "left out"},
      {"dense_layers", "layers with dense attention count dense in both columns"},
  }};
  return kRules;
}

}  // namespace m3
