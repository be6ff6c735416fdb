// `m3h cost`: the analytic attention cost model of reference/cost.h (dense GQA vs MSA) for one
// context or a sweep 1K..1M, per layer kind and whole model, as a table, JSON or CSV.
//   m3h cost --preset m3 --context 1048576
//   m3h cost --config path/config.json --sweep --format csv
// Pure arithmetic: no device header; the command line is echoed so that every row can be re-run.
#include "compare/cli_common.h"
#include "reference/config.h"
#include "reference/cost.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace m3::cli {

namespace {

struct CostArgs {
  std::string preset;
  std::string config_file;
  std::int64_t context = 0;
  bool sweep = false;
  double bytes_per_element = kDefaultBytesPerElement;
  Format format = Format::TABLE;
};

// 1K .. 1M in powers of two: the context range of the cost study (DESIGN §5).
constexpr std::int64_t kSweepFirst = 1024;
constexpr std::int64_t kSweepLast = 1048576;

constexpr CostReading kReadings[] = {CostReading::DECODE, CostReading::DECODE_EXACT,
                                     CostReading::CAUSAL_AVG, CostReading::CAUSAL_EXACT};

constexpr double kGiga = 1e9;  // GFLOP
constexpr double kMega = 1e6;  // MB = 10^6 bytes

// Everything printed for one context.
struct ContextCost {
  std::int64_t context = 0;
  ModelCost by_reading[4];  // indexed like kReadings
  const ModelCost& at(CostReading r) const { return by_reading[static_cast<int>(r)]; }
};

ContextCost compute(const ModelConfig& cfg, std::int64_t n, double bpe) {
  ContextCost c;
  c.context = n;
  for (CostReading r : kReadings) c.by_reading[static_cast<int>(r)] = model_cost(cfg, r, n, bpe);
  return c;
}

// The MSA layer's ratio, or nothing when the config has no MSA layer.
std::optional<double> msa_ratio(const ModelCost& m) {
  if (m.msa_layers == 0) return std::nullopt;
  return m.msa_layer.flops_ratio();
}

// --- JSON ---

nlohmann::json attn_json(const AttnCost& a, int layers) {
  return {{"layers", layers},
          {"dense_flops", a.dense_flops},
          {"actual_flops", a.actual_flops()},
          {"index_flops", a.index_flops},
          {"main_flops", a.main_flops},
          {"flops_ratio", a.actual_flops() > 0 ? nlohmann::json(a.flops_ratio()) : nullptr},
          {"select_candidates", a.select_candidates},
          {"dense_bytes", a.dense_bytes},
          {"actual_bytes", a.actual_bytes()},
          {"index_bytes", a.index_bytes},
          {"kv_bytes", a.kv_bytes},
          {"bytes_ratio", a.actual_bytes() > 0 ? nlohmann::json(a.bytes_ratio()) : nullptr}};
}

nlohmann::json model_json(const ModelCost& m) {
  const LinearFlops& l = m.linear;
  nlohmann::json j{{"rule", cost_reading_rule(m.reading)},
                   {"model", attn_json(m.attention, m.dense_layers + m.msa_layers)},
                   {"attn_share_dense", m.attn_share_dense()},
                   {"attn_share_actual", m.attn_share_actual()},
                   {"linear_flops_per_token",
                    {{"attn_proj", l.attn_proj},
                     {"index_proj", l.index_proj},
                     {"dense_mlp", l.dense_mlp},
                     {"router", l.router},
                     {"experts", l.experts},
                     {"shared", l.shared},
                     {"total", l.total()}}},
                   {"lm_head_flops_per_token", m.lm_head_flops}};
  j["dense_layer"] = m.dense_layers > 0 ? attn_json(m.dense_layer, m.dense_layers) : nullptr;
  j["msa_layer"] = m.msa_layers > 0 ? attn_json(m.msa_layer, m.msa_layers) : nullptr;
  return j;
}

nlohmann::json opt_json(std::optional<double> v) { return v ? nlohmann::json(*v) : nullptr; }

nlohmann::json context_json(const ContextCost& c) {
  using R = CostReading;
  nlohmann::json j{
      {"context", c.context},
      {"decode_ratio", opt_json(msa_ratio(c.at(R::DECODE)))},
      {"decode_exact_ratio", opt_json(msa_ratio(c.at(R::DECODE_EXACT)))},
      {"causal_avg_ratio", opt_json(msa_ratio(c.at(R::CAUSAL_AVG)))},
      {"causal_exact_ratio", opt_json(msa_ratio(c.at(R::CAUSAL_EXACT)))},
      {"model_decode_ratio", c.at(R::DECODE).attention.flops_ratio()},
      {"model_decode_exact_ratio", c.at(R::DECODE_EXACT).attention.flops_ratio()},
      {"model_causal_avg_ratio", c.at(R::CAUSAL_AVG).attention.flops_ratio()},
      {"model_causal_exact_ratio", c.at(R::CAUSAL_EXACT).attention.flops_ratio()},
      {"model_decode_bytes_ratio", c.at(R::DECODE).attention.bytes_ratio()}};
  nlohmann::json readings = nlohmann::json::object();
  for (CostReading r : kReadings) readings[std::string(cost_reading_name(r))] = model_json(c.at(r));
  j["readings"] = std::move(readings);
  return j;
}

nlohmann::json header_json(const ModelConfig& cfg, const CostArgs& a) {
  nlohmann::json rules = nlohmann::json::object();
  for (const CostRule& r : cost_rules()) rules[std::string(r.name)] = r.text;
  for (CostReading r : kReadings)
    rules["reading_" + std::string(cost_reading_name(r))] = cost_reading_rule(r);
  const bool has_msa = std::count(cfg.layer_types.begin(), cfg.layer_types.end(), AttnType::MSA) > 0;
  return {{"command", command_line()},
          {"config", cfg.name},
          {"preset", a.config_file.empty() ? nlohmann::json(a.preset) : nullptr},
          {"config_file", a.config_file.empty() ? nullptr : nlohmann::json(a.config_file)},
          {"bytes_per_element", a.bytes_per_element},
          {"kv_cache_bytes_per_token", kv_cache_bytes_per_token(cfg, a.bytes_per_element)},
          {"msa_ratio_limit", has_msa ? nlohmann::json(msa_ratio_limit(cfg)) : nullptr},
          {"units", "FLOPs and bytes per query token; ratios = dense-equivalent / actual"},
          {"rules", rules}};
}

// --- CSV ---

std::string csv_num(std::optional<double> v) { return v ? fmt::format("{:.10g}", *v) : ""; }

void print_csv(const std::vector<ContextCost>& rows) {
  using R = CostReading;
  fmt::print(
      "context,decode_ratio,decode_exact_ratio,causal_avg_ratio,causal_exact_ratio,"
      "model_decode_ratio,model_decode_exact_ratio,model_causal_avg_ratio,"
      "model_causal_exact_ratio,msa_decode_dense_gflop,msa_decode_actual_gflop,"
      "model_decode_dense_gflop,model_decode_actual_gflop,msa_decode_dense_mb,"
      "msa_decode_actual_mb,model_decode_bytes_ratio,attn_share_dense,attn_share_actual\n");
  for (const ContextCost& c : rows) {
    const ModelCost& d = c.at(R::DECODE);
    const bool msa = d.msa_layers > 0;
    auto msa_only = [msa](double v) { return msa ? std::optional<double>(v) : std::nullopt; };
    fmt::print("{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n", c.context,
               csv_num(msa_ratio(d)), csv_num(msa_ratio(c.at(R::DECODE_EXACT))),
               csv_num(msa_ratio(c.at(R::CAUSAL_AVG))), csv_num(msa_ratio(c.at(R::CAUSAL_EXACT))),
               csv_num(d.attention.flops_ratio()),
               csv_num(c.at(R::DECODE_EXACT).attention.flops_ratio()),
               csv_num(c.at(R::CAUSAL_AVG).attention.flops_ratio()),
               csv_num(c.at(R::CAUSAL_EXACT).attention.flops_ratio()),
               csv_num(msa_only(d.msa_layer.dense_flops / kGiga)),
               csv_num(msa_only(d.msa_layer.actual_flops() / kGiga)),
               csv_num(d.attention.dense_flops / kGiga), csv_num(d.attention.actual_flops() / kGiga),
               csv_num(msa_only(d.msa_layer.dense_bytes / kMega)),
               csv_num(msa_only(d.msa_layer.actual_bytes() / kMega)),
               csv_num(d.attention.bytes_ratio()), csv_num(d.attn_share_dense()),
               csv_num(d.attn_share_actual()));
  }
}

// --- table ---

std::string num(double v) { return fmt::format("{:.6g}", v); }
// Counts (top-k candidates) stay in plain digits where {:.6g} would switch to an exponent.
std::string count(double v) { return v >= 1e6 ? fmt::format("{:.0f}", v) : num(v); }
std::string ratio(std::optional<double> v) { return v ? fmt::format("{:.2f}", *v) : "-"; }

void print_config_lines(const ModelConfig& cfg, const CostArgs& a) {
  const ModelCost m = model_cost(cfg, CostReading::DECODE, 1, a.bytes_per_element);
  fmt::print("# {}\n", command_line());
  fmt::print("# config {}: {} layers ({} dense attention, {} MSA); Hq {}, Hkv {}, D {}", cfg.name,
             cfg.num_hidden_layers, m.dense_layers, m.msa_layers, cfg.num_attention_heads,
             cfg.num_key_value_heads, cfg.head_dim);
  if (m.msa_layers > 0)
    fmt::print("; Hi {}, Di {}, BLK {}, K_blk {}, local {}, init {}; MSA/GQA ceiling {:.2f}x",
               cfg.index_n_heads, cfg.index_head_dim, cfg.index_block_size,
               cfg.index_topk_blocks, cfg.index_local_blocks, cfg.index_init_blocks,
               msa_ratio_limit(cfg));
  fmt::print("\n");
  const double kv = kv_cache_bytes_per_token(cfg, a.bytes_per_element);
  fmt::print(
      "# {} bytes per cache element; KV cache {} bytes ({:.2f} KiB) per token; FLOPs = 2 per "
      "multiply-add; GFLOP = 1e9 FLOPs, MB = 1e6 bytes, per query token\n",
      a.bytes_per_element, kv, kv / 1024);
}

void print_table(const ModelConfig& cfg, const CostArgs& a, const ContextCost& c) {
  print_config_lines(cfg, a);
  fmt::print("# context {}\n", c.context);
  constexpr const char* kRow =
      "{:<13} {:<12} {:>6} {:>12} {:>12} {:>12} {:>12} {:>8} {:>10} {:>12} {:>12} {:>7}\n";
  fmt::print(kRow, "reading", "scope", "layers", "dense-eq", "actual", "index", "main", "ratio",
             "top-k", "dense KV", "actual", "bytes");
  fmt::print(kRow, "", "", "", "GFLOP", "GFLOP", "GFLOP", "GFLOP", "x", "candidates", "MB", "MB",
             "ratio x");
  for (CostReading r : kReadings) {
    const ModelCost& m = c.at(r);
    auto row = [&](const char* scope, int layers, const AttnCost& x) {
      fmt::print(kRow, cost_reading_name(r), scope, layers, num(x.dense_flops / kGiga),
                 num(x.actual_flops() / kGiga), num(x.index_flops / kGiga),
                 num(x.main_flops / kGiga), ratio(x.flops_ratio()), count(x.select_candidates),
                 num(x.dense_bytes / kMega), num(x.actual_bytes() / kMega),
                 ratio(x.bytes_ratio()));
    };
    if (m.dense_layers > 0) row("dense layer", m.dense_layers, m.dense_layer);
    if (m.msa_layers > 0) row("MSA layer", m.msa_layers, m.msa_layer);
    row("model", m.dense_layers + m.msa_layers, m.attention);
  }
  const ModelCost& d = c.at(CostReading::DECODE);
  const LinearFlops& l = d.linear;
  fmt::print(
      "# linear layers per token, whole model: {} GFLOP (attention projections {}, index "
      "projections {}, dense MLP {}, MoE router {}, routed experts {}, shared expert {}); LM head "
      "{} GFLOP\n",
      num(l.total() / kGiga), num(l.attn_proj / kGiga), num(l.index_proj / kGiga),
      num(l.dense_mlp / kGiga), num(l.router / kGiga), num(l.experts / kGiga),
      num(l.shared / kGiga), num(d.lm_head_flops / kGiga));
  fmt::print("# attention share of per-token FLOPs (attention + linear + LM head), dense GQA -> MSA:");
  for (CostReading r : kReadings)
    fmt::print(" {} {:.1f}% -> {:.1f}%{}", cost_reading_name(r), 100 * c.at(r).attn_share_dense(),
               100 * c.at(r).attn_share_actual(), r == CostReading::CAUSAL_EXACT ? "" : ";");
  fmt::print("\n");
}

void print_sweep_table(const ModelConfig& cfg, const CostArgs& a,
                       const std::vector<ContextCost>& rows) {
  using R = CostReading;
  print_config_lines(cfg, a);
  fmt::print("# ratio = dense-equivalent / actual; decode and causal_avg: paper reading; "
             "*_exact: what the reference executes\n");
  constexpr const char* kRow =
      "{:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>12} {:>12} {:>12} {:>12} {:>7} {:>6} "
      "{:>6}\n";
  fmt::print(kRow, "context", "decode", "dec.ex", "c.avg", "c.exact", "model", "model", "MSA dense",
             "MSA actual", "model dense", "model actual", "bytes", "attn", "attn");
  fmt::print(kRow, "tokens", "x", "x", "x", "x", "dec x", "c.ex x", "GFLOP", "GFLOP", "GFLOP",
             "GFLOP", "ratio x", "GQA %", "MSA %");
  for (const ContextCost& c : rows) {
    const ModelCost& d = c.at(R::DECODE);
    const bool msa = d.msa_layers > 0;
    fmt::print(kRow, c.context, ratio(msa_ratio(d)), ratio(msa_ratio(c.at(R::DECODE_EXACT))),
               ratio(msa_ratio(c.at(R::CAUSAL_AVG))), ratio(msa_ratio(c.at(R::CAUSAL_EXACT))),
               ratio(d.attention.flops_ratio()), ratio(c.at(R::CAUSAL_EXACT).attention.flops_ratio()),
               msa ? num(d.msa_layer.dense_flops / kGiga) : "-",
               msa ? num(d.msa_layer.actual_flops() / kGiga) : "-",
               num(d.attention.dense_flops / kGiga), num(d.attention.actual_flops() / kGiga),
               ratio(d.attention.bytes_ratio()), fmt::format("{:.1f}", 100 * d.attn_share_dense()),
               fmt::format("{:.1f}", 100 * d.attn_share_actual()));
  }
}

int run_cost(const CostArgs& a) {
  if (!a.preset.empty() && !a.config_file.empty())
    throw std::invalid_argument("cost: give --preset NAME or --config FILE, not both");
  const ModelConfig cfg =
      a.config_file.empty() ? preset(a.preset.empty() ? "m3" : a.preset) : load_config_file(a.config_file);
  if (!(a.bytes_per_element > 0))
    throw std::invalid_argument(
        fmt::format("cost: --bytes-per-element {} must be > 0", a.bytes_per_element));
  const std::int64_t max_ctx = cfg.max_position_embeddings;

  std::vector<std::int64_t> contexts;
  if (a.sweep) {
    for (std::int64_t n = kSweepFirst; n <= kSweepLast && n <= max_ctx; n *= 2) contexts.push_back(n);
    if (contexts.empty())
      throw std::invalid_argument(fmt::format(
          "cost: --sweep starts at context {} but config '{}' has max_position_embeddings = {}",
          kSweepFirst, cfg.name, max_ctx));
    if (contexts.back() < kSweepLast)
      fmt::print(stderr, "m3h cost: sweep stops at context {} = max_position_embeddings of '{}'\n",
                 contexts.back(), cfg.name);
  } else {
    if (a.context < 1 || a.context > max_ctx)
      throw std::invalid_argument(fmt::format(
          "cost: --context {} is out of range: expected 1 <= context <= max_position_embeddings "
          "= {} (config '{}')",
          a.context, max_ctx, cfg.name));
    contexts.push_back(a.context);
  }

  std::vector<ContextCost> rows;
  for (std::int64_t n : contexts) rows.push_back(compute(cfg, n, a.bytes_per_element));

  switch (a.format) {
    case Format::JSON: {
      nlohmann::json j = header_json(cfg, a);
      if (a.sweep) {
        j["rows"] = nlohmann::json::array();
        for (const ContextCost& c : rows) j["rows"].push_back(context_json(c));
      } else {
        j.update(context_json(rows.front()));
      }
      fmt::print("{}\n", j.dump(2));
      break;
    }
    case Format::CSV:
      print_csv(rows);
      break;
    case Format::TABLE:
      if (a.sweep)
        print_sweep_table(cfg, a, rows);
      else
        print_table(cfg, a, rows.front());
      break;
  }
  return kExitOk;
}

}  // namespace

CLI::App* register_cost(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<CostArgs>();
  CLI::App* cmd = app.add_subcommand(
      "cost",
      "Analytic attention cost, dense GQA vs MSA (reference/cost.h): FLOPs and necessary bytes "
      "per query token, per layer kind and whole model, at one context or a sweep 1K..1M.");
  auto* p = cmd->add_option("--preset", args->preset,
                            "Model preset: m3 (default), m3-layer, small, tiny");
  auto* f = cmd->add_option("--config", args->config_file,
                            "A checkpoint's config.json (either spelling) instead of a preset");
  p->excludes(f);
  auto* ctx = cmd->add_option(
      "--context", args->context,
      "Context N in tokens, 1 <= N <= max_position_embeddings: decode at n = N keys, and a "
      "causal sequence of N tokens");
  auto* sw = cmd->add_flag("--sweep", args->sweep,
                           "One row per context 1024, 2048, ..., 1048576 (capped at "
                           "max_position_embeddings) instead of --context");
  ctx->excludes(sw);
  add_format_option(cmd, &args->format);
  cmd->add_option("--bytes-per-element", args->bytes_per_element,
                  "Bytes per K/V/index-K cache element for the necessary-bytes columns "
                  "(default 2 = bf16; 1 for fp8)");
  cmd->footer(
      "Readings (ratio = dense-equivalent FLOPs / actual FLOPs):\n"
      "  decode        paper: one query against n keys; dense 4*Hq*D*n, MSA index 2*Hi*Di*n +\n"
      "                main 4*Hq*D*min(n, K_blk*BLK).  M3 at n = 2^20: 30.12x\n"
      "  decode_exact  what the reference executes for the query at position n-1: index\n"
      "                scores all n keys, main attends min(n, (K_blk-1)*BLK + (n-1)%BLK + 1).\n"
      "  causal_avg    paper: the average token of a causal sequence of N tokens, one query at\n"
      "                mean context N/2; M3: 32/(1+2*32*2048/N) = 28.44x at N = 2^20\n"
      "  causal_exact  exact: mean over all N query positions (closed form); M3: 28.55x\n"
      "Dense-attention layers count dense in both columns; the model rows sum all layers.\n"
      "Necessary bytes: each cache element read once per query token (dense K+V of all keys;\n"
      "MSA index-K of all keys + each KV head's own selected K/V). Top-k work is a count of\n"
      "block scores examined, not FLOPs. Linear layers and the LM head are listed apart to show\n"
      "attention's share of the per-token FLOPs.");
  cmd->callback([args, exit_code, ctx] {
    if (!args->sweep && ctx->count() == 0)
      throw std::invalid_argument("cost: give --context N (1 <= N <= max_position_embeddings) "
                                  "or --sweep");
    *exit_code = run_cost(*args);
  });
  return cmd;
}

}  // namespace m3::cli
