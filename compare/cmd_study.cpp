// `m3h study`: the measured MSA vs GQA cost study (DESIGN §5, issue 5). Parts:
//   cpu      one decode token of one layer on the reference, dense vs MSA, contexts min..max in
//            powers of two: wall time, counted multiply-adds, the analytic model (must agree exactly)
//   gpu      one layer's attention on the GPU (compare/study_gpu.h): decode b = 1 and 8 and chunked
//            prefill, dense vs MSA (bf16 and fp8 index-K), time, FLOPs, bytes, fractions of the
//            measured peaks, speedups, and the rest of the layer's time (attention share)
//   quality  recall of dense attention mass by the selected blocks and MSA-vs-dense output error,
//            random / retrieval / decay patterns (compare/study_quality.h)
// Progress on stderr; results as a table or JSON (--format json, --out FILE writes the JSON too).
//   m3h study --preset m3-layer --part cpu,quality --max-context 1048576 --out study_cpu.json
#include "compare/cli_common.h"
#include "compare/study_cpu.h"
#include "compare/study_quality.h"
#include "datasets/golden.h"
#if M3_HAVE_GPU
#include "compare/study_gpu.h"
#endif

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <ctime>
#include <filesystem>
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
  int chunk = 16384;
  bool no_prefill = false, no_decode = false;
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
  // Every argument is checked before any part runs: a sweep to 1M takes minutes to hours, and a
  // bad part name or an unwritable --out found afterwards would lose it.
  const std::vector<std::string> parts = split(a.parts);
  for (const std::string& part : parts) {
    if (part != "cpu" && part != "quality" && part != "gpu")
      throw std::invalid_argument(fmt::format("study: unknown part '{}': expected cpu, quality or gpu", part));
#if !M3_HAVE_GPU
    if (part == "gpu")
      throw std::invalid_argument("study: --part gpu needs the CUDA build (configure with -DM3_WITH_CUDA=ON)");
#endif
  }
  if (!a.out.empty()) {
    // app: an existing file stays as it is until the end; one the probe creates is removed again,
    // so that a study failing later leaves no empty --out behind.
    std::error_code ec;
    const bool existed = std::filesystem::exists(a.out, ec) || ec;  // unknown: keep it
    if (!std::ofstream(a.out, std::ios::app)) throw std::invalid_argument(fmt::format("study: cannot write {}", a.out));
    if (!existed) std::filesystem::remove(a.out, ec);
  }
  nlohmann::json j;
  j["command"] = command_line();
  j["build_commit"] = build_git_commit();  // the commit the binary was built from, "-dirty" with local changes
  {
    const std::time_t now = std::time(nullptr);
    char stamp[32];
    std::strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", std::gmtime(&now));
    j["date_utc"] = stamp;
  }
  j["cpu"] = cpu_description();
  j["config"] = cfg.name;
  j["seed"] = a.seed;
  const bool human = a.format == Format::TABLE;
  if (human) fmt::print("# {}\n# {}\nconfig {} (one layer's attention; contexts clipped to max_position_embeddings {})\n",
                        command_line(), cpu_description(), cfg.name, cap);
  for (const std::string& part : parts) {
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
    } else if (part == "gpu") {
#if M3_HAVE_GPU
      study::GpuStudyOptions go;
      go.min_context = a.min_context;
      go.max_context = hi;
      go.chunk = a.chunk;
      go.prefill = !a.no_prefill;
      go.decode = !a.no_decode;
      go.seed = a.seed;
      const study::GpuStudy g =
          study::run_gpu_study(cfg, go, [](const std::string& s) { std::fprintf(stderr, "study gpu: %s\n", s.c_str()); });
      j["gpu"]["device"] = g.device;
      j["gpu"]["peaks"] = {{"gemm_tflops", g.peaks.gemm_tflops}, {"copy_gbps", g.peaks.copy_gbps}};
      j["gpu"]["rest_prefill_us_per_token"] = g.rest_prefill_us_per_token;
      for (const auto& r : g.decode)
        j["gpu"]["decode"].push_back({{"context", r.context}, {"batch", r.batch}, {"dense_us", r.dense_us},
                                      {"index_us", r.index_us}, {"index_fp8_us", r.index_fp8_us},
                                      {"select_us", r.select_us}, {"sparse_us", r.sparse_us}, {"msa_us", r.msa_us},
                                      {"msa_fp8_us", r.msa_fp8_us}, {"read_us", r.read_us},
                                      {"read_fp8_us", r.read_fp8_us}, {"dense_bytes", r.dense_bytes},
                                      {"msa_bytes", r.msa_bytes}, {"msa_fp8_bytes", r.msa_fp8_bytes},
                                      {"dense_flops", r.dense_flops}, {"msa_flops", r.msa_flops},
                                      {"rest_us", r.rest_us}});
      for (const auto& r : g.prefill)
        j["gpu"]["prefill"].push_back({{"context", r.context}, {"chunk", r.chunk}, {"chunks", r.chunks},
                                       {"chunks_timed", r.chunks_timed}, {"dense_kernel", r.dense_kernel}, {"index_kernel", r.index_kernel},
                                       {"sparse_kernel", r.sparse_kernel},
                                       {"dense_ms", r.dense_ms}, {"index_ms", r.index_ms}, {"select_ms", r.select_ms},
                                       {"sparse_ms", r.sparse_ms}, {"msa_ms", r.msa_ms}, {"dense_flops", r.dense_flops},
                                       {"index_flops", r.index_flops}, {"sparse_flops", r.sparse_flops},
                                       {"rest_ms", r.rest_ms}});
      if (human) {
        const double copy = g.peaks.copy_gbps;
        fmt::print("\n## GPU ({}); peaks: bf16 GEMM {:.1f} TFLOP/s, copy {:.0f} GB/s\n", g.device, g.peaks.gemm_tflops, copy);
        fmt::print("decode: {:>3} {:>9} {:>10} {:>10} {:>8} {:>10} {:>8} {:>8} {:>9}\n", "b", "n", "dense us", "MSA us",
                   "x", "fp8 us", "x fp8", "MSA/cp", "attn %");
        for (const auto& r : g.decode)
          fmt::print("        {:>3} {:>9} {:>10.1f} {:>10.1f} {:>7.2f}x {:>10.1f} {:>7.2f}x {:>7.1f}% {:>8.1f}%\n", r.batch,
                     r.context, r.dense_us, r.msa_us, r.dense_us / r.msa_us, r.msa_fp8_us, r.dense_us / r.msa_fp8_us,
                     100 * r.msa_bytes / (r.msa_us * 1e-6) / 1e9 / copy,
                     r.rest_us > 0 ? 100 * r.msa_us / (r.msa_us + r.rest_us) : 0.0);
        fmt::print("prefill: {:>9} {:>11} {:>11} {:>9} {:>9} {:>9} {:>8} {:>10}\n", "n", "dense ms", "MSA ms", "index",
                   "select", "sparse", "x", "dense TF/s");
        for (const auto& r : g.prefill)
          fmt::print("         {:>9} {:>11.1f} {:>11.1f} {:>9.1f} {:>9.1f} {:>9.1f} {:>7.2f}x {:>10.1f}\n", r.context,
                     r.dense_ms, r.msa_ms, r.index_ms, r.select_ms, r.sparse_ms, r.dense_ms / r.msa_ms,
                     r.dense_flops / (r.dense_ms * 1e-3) / 1e12);
      }
#endif  // without the CUDA build, the check above refused the part
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
  cmd->add_option("--part", args->parts, "Comma-separated parts: cpu, quality, gpu")->capture_default_str();
  cmd->add_option("--chunk", args->chunk, "GPU prefill: queries per chunk")->capture_default_str();
  cmd->add_flag("--no-prefill", args->no_prefill, "GPU: skip the prefill sweep");
  cmd->add_flag("--no-decode", args->no_decode, "GPU: skip the decode sweep");
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
