// `m3h study`: the measured MSA vs GQA cost study (DESIGN §5, issue 5). Parts:
//   cpu      one decode token of one layer on the reference, dense vs MSA, contexts min..max in
//            powers of two: wall time, counted multiply-adds, the analytic model (must agree exactly)
//   quality  recall of dense attention mass by the selected blocks and MSA-vs-dense output error,
//            random / retrieval / decay patterns (compare/study_quality.h)
// Progress on stderr; results as a table or JSON (--format json, --out FILE writes the JSON too).
//   m3h study --preset m3-layer --part cpu,quality --max-context 1048576 --out study_cpu.json
#include "compare/cli_common.h"
#include "compare/study_cpu.h"
#include "compare/study_quality.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <sstream>

namespace m3::cli {

namespace {

struct StudyArgs {
  std::string preset = "m3-layer";
  std::string parts = "cpu,quality";
  std::int64_t min_context = 4096;
  std::int64_t max_context = 1 << 20;
  std::int64_t quality_max_context = 1 << 18;
  std::string patterns = "random,retrieval,decay";
  int queries = 8;
  std::uint64_t seed = 1;
  std::string out;
  Format format = Format::TABLE;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');)
    if (!x.empty()) v.push_back(x);
  return v;
}

std::vector<std::int64_t> contexts(std::int64_t lo, std::int64_t hi) {
  std::vector<std::int64_t> v;
  for (std::int64_t n = lo; n <= hi; n *= 2) v.push_back(n);
  return v;
}

int study(const StudyArgs& a) {
  const ModelConfig cfg = resolve_config(a.preset);
  if (cfg.index_block_size <= 0 || cfg.num_layers_of(AttnType::MSA) == 0)
    throw std::invalid_argument(fmt::format("study: {} has no MSA layer to study", cfg.name));
  const std::int64_t cap = cfg.max_position_embeddings;
  if (a.min_context < 1 || a.min_context > a.max_context)
    throw std::invalid_argument(fmt::format("study: --min-context {} must be in [1, --max-context = {}]", a.min_context,
                                            a.max_context));
  const std::int64_t hi = std::min(a.max_context, cap);
  nlohmann::json j;
  j["command"] = command_line();
  j["cpu"] = cpu_description();
  j["config"] = cfg.name;
  j["seed"] = a.seed;
  const bool human = a.format == Format::TABLE;
  if (human) fmt::print("# {}\n# {}\nconfig {} (one layer's attention; contexts clipped to max_position_embeddings {})\n",
                        command_line(), cpu_description(), cfg.name, cap);
  for (const std::string& part : split(a.parts)) {
    if (part == "cpu") {
      std::fprintf(stderr, "study cpu: allocating caches for %lld keys ...\n", static_cast<long long>(hi));
      study::CpuDecodeStudy s(cfg, hi, a.seed);
      if (human)
        fmt::print("\n## CPU decode, one token at context n: dense GQA vs MSA (index + select + sparse)\n"
                   "{:>9} {:>11} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>7}\n",
                   "n", "dense ms", "MSA ms", "index", "select", "sparse", "time x", "FLOP x", "analytic", "counts");
      for (std::int64_t n : contexts(a.min_context, hi)) {
        std::fprintf(stderr, "study cpu: n = %lld\n", static_cast<long long>(n));
        const auto r = s.measure(n);
        const double analytic = r.dense_analytic.dense_flops / r.msa_analytic.actual_flops();
        j["cpu_decode"].push_back({{"context", n},
                                   {"dense_ms", r.dense_ms},
                                   {"msa_ms", r.msa_ms},
                                   {"index_ms", r.index_ms},
                                   {"select_ms", r.select_ms},
                                   {"sparse_ms", r.sparse_ms},
                                   {"reps", r.reps},
                                   {"dense_macs", r.dense_counted.qk_macs + r.dense_counted.pv_macs},
                                   {"msa_main_macs", r.msa_counted.qk_macs + r.msa_counted.pv_macs},
                                   {"msa_index_macs", r.msa_counted.index_macs},
                                   {"select_candidates", r.msa_counted.select_candidates},
                                   {"flops_ratio_counted", r.flops_ratio_counted()},
                                   {"flops_ratio_analytic", analytic},
                                   {"time_ratio", r.time_ratio()},
                                   {"counts_match_analytic", r.counts_match}});
        if (human)
          fmt::print("{:>9} {:>11.2f} {:>10.2f} {:>9.2f} {:>9.2f} {:>10.2f} {:>8.2f}x {:>8.2f}x {:>8.2f}x {:>7}\n", n,
                     r.dense_ms, r.msa_ms, r.index_ms, r.select_ms, r.sparse_ms, r.time_ratio(),
                     r.flops_ratio_counted(), analytic, r.counts_match ? "exact" : "DIFFER");
        if (!r.counts_match) throw std::runtime_error(fmt::format("study cpu: counted work differs from the analytic model at n = {}", n));
      }
    } else if (part == "quality") {
      study::QualityOptions o;
      o.attn = cfg.attn_dims();
      o.msa = cfg.msa_dims();
      o.queries = a.queries;
      o.seed = a.seed;
      const std::int64_t qhi = std::min(a.quality_max_context, cap);
      if (human)
        fmt::print("\n## Selection quality: dense attention mass on the selected blocks (recall), MSA vs dense output\n"
                   "{:<10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>11}\n",
                   "pattern", "n", "recall", "p10", "min", "local", "out rel-L2");
      for (const std::string& pn : split(a.patterns)) {
        const auto p = study::parse_pattern(pn);
        for (std::int64_t n : contexts(a.min_context, qhi)) {
          std::fprintf(stderr, "study quality: %s n = %lld\n", pn.c_str(), static_cast<long long>(n));
          const auto r = study::measure_quality(p, n, o);
          j["quality"].push_back({{"pattern", pn},
                                  {"context", n},
                                  {"queries", r.queries},
                                  {"recall_mean", r.recall_mean},
                                  {"recall_p10", r.recall_p10},
                                  {"recall_min", r.recall_min},
                                  {"local_mass_mean", r.local_mass_mean},
                                  {"out_rel_l2", r.out_rel_l2},
                                  {"ms", r.ms}});
          if (human)
            fmt::print("{:<10} {:>9} {:>8.4f} {:>8.4f} {:>8.4f} {:>8.4f} {:>11.3e}\n", pn, n, r.recall_mean, r.recall_p10,
                       r.recall_min, r.local_mass_mean, r.out_rel_l2);
        }
      }
    } else {
      throw std::invalid_argument(fmt::format("study: unknown part '{}': expected cpu or quality (the GPU part is "
                                              "bench_gpu's attention benchmarks until issue 5 lands it here)", part));
    }
  }
  if (!a.out.empty()) {
    std::ofstream f(a.out);
    if (!f) throw std::invalid_argument(fmt::format("study: cannot write {}", a.out));
    f << j.dump(2) << "\n";
  }
  if (!human) fmt::print("{}\n", j.dump(2));
  return kExitOk;
}

}  // namespace

CLI::App* register_study(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<StudyArgs>();
  CLI::App* cmd = app.add_subcommand(
      "study", "The MSA vs dense GQA cost study on one layer: CPU decode time and counted FLOPs against the analytic "
               "model, and the selection quality (recall of attention mass) on synthetic patterns.");
  cmd->add_option("--preset,--config", args->preset, "Preset (m3-layer, small, tiny) or config.json")->capture_default_str();
  cmd->add_option("--part", args->parts, "Comma-separated parts: cpu, quality")->capture_default_str();
  cmd->add_option("--min-context", args->min_context, "Smallest context (powers of two from here)")->capture_default_str();
  cmd->add_option("--max-context", args->max_context, "Largest context of the cpu part (clipped to the preset's "
                  "max_position_embeddings; 1M needs ~4.5 GiB of RAM at M3's dimensions)")->capture_default_str();
  cmd->add_option("--quality-max-context", args->quality_max_context, "Largest context of the quality part")
      ->capture_default_str();
  cmd->add_option("--patterns", args->patterns, "Quality patterns: random, retrieval, decay")->capture_default_str();
  cmd->add_option("--queries", args->queries, "Sampled query rows per quality point")->capture_default_str();
  cmd->add_option("--seed", args->seed, "Seed of the synthetic data")->capture_default_str();
  cmd->add_option("--out", args->out, "Also write the JSON results to this file");
  add_format_option(cmd, &args->format);
  cmd->callback([args, exit_code] { *exit_code = study(*args); });
  return cmd;
}

}  // namespace m3::cli
