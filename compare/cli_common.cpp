// Shared pieces of the m3h subcommands (cli_common.h).
#include "compare/cli_common.h"

#include "datasets/hdf5.h"
#include "datasets/ppm.h"
#include "reference/model.h"
#include "reference/rng.h"

#if M3_HAVE_GPU
#include "gpu/model.h"
#include "gpu/mtp.h"
#include "gpu/vision.h"
#endif

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <thread>

#include <unistd.h>

namespace m3::cli {

void add_format_option(CLI::App* cmd, Format* out) {
  cmd->add_option_function<std::string>(
         "--format",
         [out](const std::string& s) {
           *out = s == "json" ? Format::JSON : s == "csv" ? Format::CSV : Format::TABLE;
         },
         "Output format: table (human, default), json or csv")
      ->check(CLI::IsMember({"table", "json", "csv"}));
}

namespace {
std::string g_command_line;
}

const std::string& command_line() { return g_command_line; }

void set_command_line(int argc, char** argv) {
  g_command_line.clear();
  for (int i = 0; i < argc; ++i) {
    if (i) g_command_line += ' ';
    std::string a = argv[i];
    bool quote = a.empty() || a.find_first_of(" \t\"'$") != std::string::npos;
    g_command_line += quote ? "'" + a + "'" : a;
  }
}

CliImage load_image(const std::string& spec, const VisionConfig& vc, std::uint64_t seed) {
  CliImage im;
  if (spec.rfind("synthetic:", 0) == 0) {
    const std::string dims = spec.substr(10);
    const auto x = dims.find('x');
    try {
      if (x == std::string::npos) throw std::invalid_argument("no x");
      std::size_t used_h = 0, used_w = 0;
      im.height = std::stoi(dims.substr(0, x), &used_h);
      im.width = std::stoi(dims.substr(x + 1), &used_w);
      if (used_h != x || used_w != dims.size() - x - 1) throw std::invalid_argument("trailing text");
    } catch (const std::exception&) {
      throw std::invalid_argument(fmt::format("--image {}: expected synthetic:HxW (pixels, e.g. synthetic:32x48)", spec));
    }
    im.pixels = synthetic_image(vc, im.height, im.width, seed);
  } else {
    PpmImage p = read_ppm(spec, vc.max_image);
    im.height = p.height, im.width = p.width, im.pixels = std::move(p.pixels);
    patch_grid(vc, im.height, im.width);  // the size check, before any tower work
  }
  return im;
}

PromptImage prepend_image(const std::string& spec, const ModelConfig& cfg, std::uint64_t seed,
                          std::vector<std::int32_t>& prompt, const CheckpointVision* tower, bool on_gpu) {
#if !M3_HAVE_GPU
  if (on_gpu) throw std::invalid_argument("--image on the GPU needs the CUDA build (configure with -DM3_WITH_CUDA=ON)");
#endif
  const VisionConfig vc = tower ? tower->config : vision_preset(cfg.name);
  if (vc.text_hidden != cfg.hidden_size)  // a checkpoint's loader checked this; a preset pairs by name
    throw std::invalid_argument(fmt::format("--image: vision tower '{}' feeds width {}, the model '{}' has hidden_size {}",
                                            vc.name, vc.text_hidden, cfg.name, cfg.hidden_size));
  const CliImage im = load_image(spec, vc, seed);
  const auto t0 = std::chrono::steady_clock::now();
  PromptImage out;
  out.tower = tower ? "checkpoint" : "seeded";
  const VisionWeights<double> w =
      tower ? vision_weights_cast<double>(tower->weights) : generate_vision_weights(vc, seed);
#if M3_HAVE_GPU
  if (on_gpu) {
    gpu::VisionTower g(vc, w);
    out.features = g.forward(im.pixels, im.height, im.width);  // [N, H], bf16 values
  }
#endif
  if (!on_gpu) out.features = vision_forward(vc, w, im.pixels, im.height, im.width);  // [N, H]
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const auto n = static_cast<std::size_t>(out.features.rows());
  const std::string which = tower ? "from the checkpoint" : fmt::format("seeded, seed {}", seed);
  out.summary = fmt::format("image {}x{} ({}) -> {} tokens (vision tower {} {}, on the {}, {:.1f} ms), then {} text tokens",
                            im.height, im.width, spec, n, vc.name, which, on_gpu ? "gpu" : "cpu", ms, prompt.size());
  prompt.insert(prompt.begin(), n, vc.image_token_id);
  return out;
}

std::uint64_t host_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page) : 0;
}

std::string cpu_description() {
  std::string model = "unknown CPU";
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);) {
    if (line.rfind("model name", 0) == 0) {
      auto pos = line.find(':');
      if (pos != std::string::npos) model = line.substr(pos + 2);
      break;
    }
  }
  return fmt::format("cpu: {}, {} hardware threads", model, std::thread::hardware_concurrency());
}

std::vector<std::int32_t> load_tokens(const std::string& spec, const ModelConfig& cfg, std::uint64_t seed) {
  const bool numeric = !spec.empty() && spec.find_first_not_of("0123456789") == std::string::npos;
  std::vector<std::int32_t> t;
  if (numeric) {
    const long long n = std::stoll(spec);
    if (n <= 0) throw std::invalid_argument("--tokens: need at least 1 token");
    if (n > cfg.max_position_embeddings)
      throw std::out_of_range(fmt::format("--tokens {}: context exceeds max_position_embeddings = {}", n,
                                          cfg.max_position_embeddings));
    CounterRng rng(seed, "prompt");
    for (long long i = 0; i < n; ++i)
      t.push_back(static_cast<std::int32_t>(rng.bits(static_cast<std::uint64_t>(i)) % cfg.vocab_size));
    return t;
  }
  if (auto colon = spec.find(".h5:"); colon != std::string::npos) {
    // FILE.h5:/dataset - an integer vector (int32 or int64) inside an HDF5 file.
    const std::string file = spec.substr(0, colon + 3), dset = spec.substr(colon + 4);
    auto f = h5::File::open_read(file);
    const auto shape = f.shape(dset);
    if (shape.size() != 1 && !(shape.size() == 2 && shape[0] == 1))
      throw std::invalid_argument(fmt::format("{}:{} has shape [{}], expected a vector of token ids [T] or [1, T]",
                                              file, dset, fmt::join(shape, ", ")));
    const auto dt = f.dtype(dset);
    if (dt != h5::DType::I32 && dt != h5::DType::I64)
      throw std::invalid_argument(fmt::format("{}:{} must hold integers (int32 or int64)", file, dset));
    for (std::int64_t v : f.read<std::int64_t>(dset)) {
      if (v < 0 || v >= cfg.vocab_size)
        throw std::out_of_range(fmt::format("{}:{}: token {} = {} is outside the vocabulary [0, {})", file, dset,
                                            t.size(), v, cfg.vocab_size));
      t.push_back(static_cast<std::int32_t>(v));
    }
    if (t.empty()) throw std::invalid_argument(fmt::format("{}:{} holds no tokens", file, dset));
    return t;
  }
  std::ifstream f(spec);
  if (!f) throw std::invalid_argument(fmt::format("--tokens: '{}' is neither a count nor a readable file", spec));
  std::string word;
  while (f >> word) {
    char* end = nullptr;
    errno = 0;
    long long v = std::strtoll(word.c_str(), &end, 10);
    if (*end != '\0' || errno)
      throw std::invalid_argument(fmt::format("{}: token {} ('{}') is not an integer", spec, t.size(), word));
    if (v < 0 || v >= cfg.vocab_size)
      throw std::out_of_range(fmt::format("{}: token {} = {} is outside the vocabulary [0, {})", spec, t.size(), v,
                                          cfg.vocab_size));
    t.push_back(static_cast<std::int32_t>(v));
  }
  if (t.empty()) throw std::invalid_argument(fmt::format("{}: no tokens in the file", spec));
  return t;
}

std::vector<std::int32_t> run_generate_mtp(bool on_gpu, const ModelConfig& cfg, ModelWeights<float> w,
                                           const std::vector<ModelWeights<float>>& modules, Precision prec,
                                           const std::vector<std::int32_t>& prompt, int steps, int k,
                                           MtpStats* stats, std::int64_t max_context) {
  const ModelConfig mc = mtp_module_config(cfg);
  if (on_gpu) {
#if M3_HAVE_GPU
    gpu::ModelOptions o;
    o.max_batch = 1;
    const auto T = static_cast<std::int64_t>(prompt.size());
    o.max_context = max_context > 0 ? max_context : T + steps + k + 1;
    // generate_mtp hands whole prompts to forward (the main prefill, the modules' first catch-up)
    // and k + 1 tokens to each check: one call must hold the prompt.
    o.max_tokens = T + k + 1;
    gpu::Model main(cfg, w, o);
    w = ModelWeights<float>{};
    std::vector<std::unique_ptr<gpu::Model>> mods;
    std::vector<gpu::Model*> ptrs;
    for (const auto& m : modules) {
      mods.push_back(std::make_unique<gpu::Model>(mc, m, o));
      ptrs.push_back(mods.back().get());
    }
    return gpu::generate_mtp(main, ptrs, prompt, steps, k, stats);
#else
    (void)max_context;  // only the GPU model takes a cache capacity
    throw std::invalid_argument("--device gpu: this build has no CUDA support (configure with -DM3_WITH_CUDA=ON)");
#endif
  }
  Model main(cfg, w, prec);
  w = ModelWeights<float>{};
  std::vector<Model> mods;
  for (const auto& m : modules) mods.emplace_back(mc, m, prec);
  std::vector<Model*> ptrs;
  for (auto& m : mods) ptrs.push_back(&m);
  return generate_mtp(main, ptrs, prompt, steps, k, stats);
}

}  // namespace m3::cli
