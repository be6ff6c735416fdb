// `m3h golden`: write a golden file (datasets/golden.h) from the reference, or check one by
// recomputing it from its own config, seed and tokens.
#include "compare/cli_common.h"
#include "datasets/golden.h"

#include <fmt/format.h>

namespace m3::cli {

namespace {

struct GoldenArgs {
  std::string preset = "tiny";
  std::string tokens = "100";
  int decode = 8;
  std::string precision = "fp64";
  std::string storage = "float64";
  std::uint64_t seed = 0;
  std::int64_t max_rows = 256;
  std::string image;  // --image: placeholders + the tower's rows before the prompt
  int mtp = 0;        // --mtp K: the drafts of the config's seeded MTP modules over the decode steps
  std::string out;
  std::string check;
};

// Tolerances for recomputation on another machine or compiler: the same fp64 arithmetic in
// another summation order differs by ~1e-13 relative after a few layers; float64 storage allows
// 1e-9 of each tensor's max (four decades of room), float32 storage adds one fp32 rounding
// (6e-8), so 1e-6. Index tensors and tokens are compared exactly.
double golden_tolerance(bool f64) { return f64 ? 1e-9 : 1e-6; }

int write(const GoldenArgs& a) {
  if (a.out.empty()) throw std::invalid_argument("golden: --out FILE is required (or --check FILE)");
  const ModelConfig cfg = resolve_config(a.preset);
  const Precision prec = parse_precision(a.precision);
  auto tokens = load_tokens(a.tokens, cfg, a.seed);
  GoldenExtras ex;
  CliImage im;
  if (a.mtp < 0) throw std::invalid_argument(fmt::format("--mtp {}: expected >= 1 (0: off)", a.mtp));
  ex.mtp_k = a.mtp;
  if (!a.image.empty()) {
    const VisionConfig vc = vision_preset(cfg.name);
    im = load_image(a.image, vc, a.seed);
    ex.image = &im.pixels, ex.image_h = im.height, ex.image_w = im.width;
    const auto n = patch_grid(vc, im.height, im.width).tokens(vc.merge);
    tokens.insert(tokens.begin(), static_cast<std::size_t>(n), vc.image_token_id);
  }
  if (a.decode < 0) throw std::invalid_argument("--decode must be >= 0");
  if (static_cast<std::int64_t>(tokens.size()) + a.decode > cfg.max_position_embeddings)
    throw std::out_of_range(fmt::format("prompt {} + decode {} tokens exceed max_position_embeddings = {}",
                                        tokens.size(), a.decode, cfg.max_position_embeddings));
  const auto T = static_cast<std::int64_t>(tokens.size());
  const auto rows = sample_rows(T, cfg.index_block_size, cfg.index_topk_blocks, a.max_rows, a.seed);
  GoldenRun g = make_golden(cfg, a.seed, prec, tokens, a.decode, rows, generate_weights(cfg, a.seed), ex);
  g.generator = command_line();
  g.store_f64 = a.storage == "float64";
  write_golden(a.out, g);
  fmt::print("wrote {}: config {}, {} tokens ({} rows traced), {} decode steps, precision {}, storage {}\n", a.out,
             cfg.name, T, rows.size(), a.decode, a.precision, a.storage);
  return kExitOk;
}

int check(const GoldenArgs& a) {
  const GoldenRun stored = read_golden(a.check);
  GoldenExtras ex;
  if (stored.image.size() > 0) ex.image = &stored.image, ex.image_h = static_cast<int>(stored.image_h),
                               ex.image_w = static_cast<int>(stored.image_w);
  ex.mtp_k = stored.mtp_k;
  const GoldenRun got = make_golden(stored.config, stored.seed, stored.precision, stored.tokens,
                                    static_cast<int>(stored.decode_tokens.size()), stored.rows,
                                    generate_weights(stored.config, stored.seed), ex);
  const double tol = golden_tolerance(stored.store_f64);
  const std::string diff = first_difference(got, stored, tol);
  fmt::print("# {}\n# {}\n", command_line(), cpu_description());
  fmt::print("{}: config {}, {} tokens, {} rows, {} decode steps, precision {}, tolerance {:g} of each tensor's max\n",
             a.check, stored.config.name, stored.tokens.size(), stored.rows.size(), stored.decode_tokens.size(),
             precision_name(stored.precision), tol);
  if (!diff.empty()) {
    fmt::print("first difference: {}\n# verdict: MISMATCH\n", diff);
    return kExitDisagree;
  }
  fmt::print("{} trace tensors, logits and decode steps reproduced\n# verdict: OK\n", stored.trace.size());
  return kExitOk;
}

}  // namespace

CLI::App* register_golden(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<GoldenArgs>();
  CLI::App* cmd = app.add_subcommand(
      "golden", "Write a golden HDF5 file from the CPU reference (layout: datasets/golden.h), or --check one by "
                "recomputing it from its own config, seed and tokens (exit 1 with the first differing tensor "
                "and its coordinates).");
  cmd->add_option("--preset,--config", args->preset, "Preset name or path to a config.json")->capture_default_str();
  cmd->add_option("--tokens", args->tokens, "Prompt: a count N (drawn from the seed), a file of ids, or FILE.h5:/dataset")
      ->capture_default_str();
  cmd->add_option("--decode", args->decode, "Greedy decode steps after the prefill")->capture_default_str();
  cmd->add_option("--precision", args->precision, "Reference precision: fp64 (default, the ground truth), fp32, bf16")
      ->check(CLI::IsMember({"fp32", "fp64", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--storage", args->storage, "Element type of stored tensors: float64 or float32 (half the size)")
      ->check(CLI::IsMember({"float64", "float32"}))
      ->capture_default_str();
  cmd->add_option("--max-rows", args->max_rows,
                  "Prefill rows to trace: all when T <= this, else block/top-k edges + seeded random rows")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 40))
      ->capture_default_str();
  cmd->add_option("--seed", args->seed, "Seed of the weights and of a drawn prompt")->capture_default_str();
  cmd->add_option("--image", args->image,
                  "Also an image before the prompt: synthetic:HxW or a PPM file (schema 2: /inputs/image, "
                  "/vision/features)");
  cmd->add_option("--mtp", args->mtp,
                  "Also the MTP drafts, K a round, of the config's seeded MTP modules over the decode steps "
                  "(schema 2: /mtp/drafts)")
      ->capture_default_str();
  cmd->add_option("--out", args->out, "Golden file to write");
  cmd->add_option("--check", args->check, "Golden file to recompute and compare instead of writing one");
  cmd->callback([args, exit_code] { *exit_code = args->check.empty() ? write(*args) : check(*args); });
  return cmd;
}

}  // namespace m3::cli
