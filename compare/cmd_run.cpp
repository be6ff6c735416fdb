// `m3h run`: prefill a prompt, then K greedy decode steps on the CPU reference or on the GPU
// (--device gpu, bf16); prints timing, the greedy tokens and a logits checksum (an FNV-1a hash of
// the logits' bits plus their fp64 sum). Both engines share one driver: their Model classes have
// the same new_sequence / prefill / decode interface and the same trace vocabulary.
#include "compare/cli_common.h"
#include "datasets/checkpoint.h"
#include "datasets/golden.h"
#include "reference/model.h"
#include "reference/mtp.h"
#include "reference/rng.h"
#include "reference/vision.h"
#if M3_HAVE_GPU
#include "gpu/model.h"
#include "gpu/runtime/device.h"
#endif

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <sstream>

namespace m3::cli {

namespace {

struct RunArgs {
  std::string preset = "tiny";
  std::string tokens = "64";
  int decode = 0;
  std::string precision;  // "" = fp32 on the CPU, bf16 on the GPU
  std::string device = "cpu";
  std::int64_t max_context = 0;
  bool show_plan = false;
  std::uint64_t seed = 0;
  std::string out;
  std::string checkpoint;
  std::string image;    // "synthetic:HxW" or a PPM file: its features lead the prompt (CPU)
  int mtp = 0;          // draft tokens a round with MTP modules (0: plain greedy decode)
  int mtp_modules = 0;  // modules to generate (0: the config's num_mtp_modules, at least 1)
  bool mtp_planted = false;  // --mtp-weights planted: plant_successor weights (reference/weights.h)
  Format format = Format::TABLE;
};

// --mtp K: the decode steps drafted by seeded MTP modules and checked by the model (generate_mtp,
// reference/mtp.h); prints the tokens (the same as plain greedy decode) and the acceptance.
// With a checkpoint, its MTP modules (Checkpoint::mtp, all of them or the first --mtp-modules);
// otherwise seeded ones, or planted ones (--mtp-weights planted: drafts mostly right).
int run_mtp(const RunArgs& a, const ModelConfig& cfg0, Precision prec, const std::string& prec_name,
            const std::vector<std::int32_t>& prompt, std::optional<Checkpoint>& ck) {
  ModelConfig cfg = cfg0;
  std::vector<ModelWeights<float>> mw;  // the modules' weights
  ModelWeights<float> w;                // the main model's
  const bool from_checkpoint = ck.has_value();  // ck is released below, once its weights are moved out
  const char* weights_name = from_checkpoint ? "checkpoint" : a.mtp_planted ? "planted" : "seeded";
  if (ck) {
    if (ck->mtp.empty())
      throw std::invalid_argument(fmt::format("--mtp: the checkpoint has no MTP modules (mtp.layers.{{i}}.*; its config "
                                              "says num_mtp_modules = {})", cfg.num_mtp_modules));
    const int k = a.mtp_modules > 0 ? a.mtp_modules : static_cast<int>(ck->mtp.size());
    if (k > static_cast<int>(ck->mtp.size()))
      throw std::invalid_argument(fmt::format("--mtp-modules {}: the checkpoint has {} MTP modules", k, ck->mtp.size()));
    mw.assign(std::make_move_iterator(ck->mtp.begin()), std::make_move_iterator(ck->mtp.begin() + k));
    w = std::move(ck->weights);
    ck.reset();
  } else {
    cfg.num_mtp_modules = a.mtp_modules > 0 ? a.mtp_modules : std::max(1, cfg0.num_mtp_modules);
    w = generate_weights(cfg, a.seed);
    if (a.mtp_planted) plant_successor(w);
    for (int i = 0; i < cfg.num_mtp_modules; ++i) {
      mw.push_back(generate_mtp_module(cfg, i, a.seed, w));
      if (a.mtp_planted) plant_successor_module(mw.back());
    }
  }
  const std::size_t n_mods = mw.size();
  MtpStats st;
  std::string device_line = cpu_description();
#if M3_HAVE_GPU
  if (a.device == "gpu") device_line = gpu::describe(gpu::device_info(0));
#endif
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<std::int32_t> toks =
      run_generate_mtp(a.device == "gpu", cfg, std::move(w), mw, prec, prompt, a.decode, a.mtp, &st, a.max_context);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const double rate = st.drafted > 0 ? static_cast<double>(st.accepted) / st.drafted : 0.0;
  if (a.format == Format::JSON) {
    nlohmann::json j;
    j["command"] = command_line();
    j["config"] = cfg.name;
    j["precision"] = prec_name;
    j["seed"] = a.seed;
    j["prompt_tokens"] = prompt.size();
    j["decode_steps"] = a.decode;
    j["device"] = a.device;
    j["mtp"] = {{"modules", n_mods}, {"drafts_per_round", a.mtp}, {"rounds", st.rounds},
                {"drafted", st.drafted}, {"accepted", st.accepted}, {"accepted_at", st.accepted_at},
                {"acceptance", rate}};
    j["weights"] = weights_name;  // seeded, planted or checkpoint
    j["ms"] = ms;
    j["greedy_tokens"] = toks;
    fmt::print("{}\n", j.dump(2));
    return kExitOk;
  }
  fmt::print("# {}\n# {}\n", command_line(), device_line);
  fmt::print("config {} ({} layers, H {}, V {}), precision {}, seed {}; {} MTP module(s), {} drafts a round\n", cfg.name,
             cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, prec_name, a.seed, n_mods, a.mtp);
  fmt::print("prefill + {} tokens in {:.1f} ms: {} checking forwards, {} of {} drafts accepted ({:.1f}%), by slot: {}\n",
             a.decode, ms, st.rounds, st.accepted, st.drafted, 100 * rate, fmt::join(st.accepted_at, " "));
  if (a.mtp_planted)
    fmt::print("(planted weights: the model emits the successor of its input token and the modules draft it, so\n"
               " most drafts are accepted; the tokens are the model's greedy tokens, as without drafts)\n");
  else if (!from_checkpoint)
    fmt::print("(seeded weights: the modules were never trained, so acceptance is chance; the tokens are the\n"
               " model's greedy tokens, as without drafts)\n");
  if (!toks.empty()) fmt::print("greedy tokens: {}\n", fmt::join(toks, " "));
  return kExitOk;
}

std::uint64_t logits_hash(const MatD& l) {
  std::uint64_t h = fnv1a64("");
  for (Eigen::Index i = 0; i < l.size(); ++i) {
    std::uint64_t bits;
    std::memcpy(&bits, l.data() + i, sizeof bits);
    for (int b = 0; b < 8; ++b) { h ^= (bits >> (8 * b)) & 0xff; h *= 0x100000001b3ull; }
  }
  return h;
}

int run(const RunArgs& a) {
  // A checkpoint brings its own config and weights; otherwise the preset and the seeded generator.
  std::optional<Checkpoint> ck;
  if (!a.checkpoint.empty()) ck = load_checkpoint(a.checkpoint);
  const std::vector<std::string> warnings = ck ? ck->warnings : std::vector<std::string>{};  // what the loader assumed
  const ModelConfig cfg = ck ? ck->config : resolve_config(a.preset);
  if (a.device == "gpu") {
#if M3_HAVE_GPU
    if (gpu::device_count() == 0)
      throw std::invalid_argument("--device gpu: no CUDA device is visible on this machine");
#else
    throw std::invalid_argument("--device gpu: this build has no CUDA support (configure with -DM3_WITH_CUDA=ON)");
#endif
    if (!a.precision.empty() && a.precision != "bf16")
      throw std::invalid_argument(fmt::format("--device gpu computes in bf16; --precision {} is a CPU reference "
                                              "precision (omit it or say bf16)", a.precision));
  }
  const std::string prec_name = !a.precision.empty() ? a.precision : a.device == "gpu" ? "bf16" : "fp32";
  const Precision prec = parse_precision(prec_name);
  auto prompt = load_tokens(a.tokens, cfg, a.seed);
  // --image: the vision tower's rows replace image-placeholder tokens put before the prompt.
  std::optional<MatD> image_feats;  // [N, H] the tower's rows
  std::optional<MatD> image_x;      // [T, H] the prompt's input rows with them in front
  std::string image_line, image_tower;
  if (!a.image.empty()) {
    if (a.mtp > 0) throw std::invalid_argument("--image and --mtp together are not supported");
    // run's golden layout holds tokens, trace and logits only; `m3h golden --image` writes the image too.
    if (!a.out.empty())
      throw std::invalid_argument("--image: --out is not written for image runs (write an image golden with `m3h golden "
                                  "--image ...`)");
    // The checkpoint's tower when it has one; otherwise the seeded tower of the config's preset; on
    // the device the text model runs on.
    PromptImage pi = prepend_image(a.image, cfg, a.seed, prompt, ck && ck->vision ? &*ck->vision : nullptr,
                                   a.device == "gpu");
    image_feats = std::move(pi.features);
    image_line = std::move(pi.summary);
    image_tower = std::move(pi.tower);
  }
  if (a.decode < 0) throw std::invalid_argument("--decode must be >= 0");
  if (static_cast<std::int64_t>(prompt.size()) + a.decode > cfg.max_position_embeddings)
    throw std::out_of_range(fmt::format("prompt {} + decode {} tokens exceed max_position_embeddings = {}",
                                        prompt.size(), a.decode, cfg.max_position_embeddings));

  if (a.mtp < 0) throw std::invalid_argument(fmt::format("--mtp {}: expected >= 1 draft tokens a round (0: off)", a.mtp));
  if (a.mtp_modules < 0 || (a.mtp_modules > 0 && a.mtp == 0))
    throw std::invalid_argument(fmt::format("--mtp-modules {}: expected >= 1, and only with --mtp", a.mtp_modules));
  if (a.mtp_planted && (a.mtp == 0 || ck))
    throw std::invalid_argument("--mtp-weights planted: only with --mtp and seeded weights (no --checkpoint)");
  if (a.mtp > 0) {
    if (!a.out.empty()) throw std::invalid_argument("--mtp: --out is not written for drafted runs");
    return run_mtp(a, cfg, prec, prec_name, prompt, ck);
  }
  using clock = std::chrono::steady_clock;
  auto ms = [](auto d) { return std::chrono::duration<double, std::milli>(d).count(); };
  const auto T = static_cast<std::int64_t>(prompt.size());
  TraceRecorder rec(T, sample_rows(T, 1, 1, T, 0));  // every row
  std::vector<std::int32_t> gen;
  MatD all;
  // Prefill with the trace (when --out), then greedy steps; the same for both engines.
  auto drive = [&](auto& model, auto& seq) {
    const TraceFn tf = a.out.empty() ? TraceFn{} : rec.fn();
    if (image_x) {
      all = model.prefill_embeds(seq, prompt, *image_x, tf);  // [T, V]
    } else {
      all = model.prefill(seq, prompt, tf);  // [T, V]
    }
    const auto t = clock::now();
    for (int i = 0; i < a.decode; ++i) {
      gen.push_back(greedy_token(all, all.rows() - 1));
      MatD step = model.decode(seq, gen.back());
      all.conservativeResize(all.rows() + 1, Eigen::NoChange);
      all.row(all.rows() - 1) = step.row(0);
    }
    return t;
  };
  double load_ms = 0, prefill_ms = 0, decode_ms = 0;
  AttnCounter dense_st, msa_st;
  std::string device_line = cpu_description();
  if (a.device == "cpu") {
    auto t0 = clock::now();
    ModelWeights<float> w = ck ? std::move(ck->weights) : generate_weights(cfg, a.seed);
    // The image's rows go at the positions of the placeholders put before the prompt (0..N-1); the
    // text's own ids keep their embeddings, even an id equal to the placeholder's.
    if (image_feats) image_x = leading_image_rows(w.embed_tokens, prompt, *image_feats);
    Model model(cfg, w, prec);
    w = ModelWeights<float>{};  // the model holds its own converted copy
    if (ck) ck.reset();
    auto t1 = clock::now();
    Sequence seq = model.new_sequence();
    auto t2 = drive(model, seq);
    auto t3 = clock::now();
    load_ms = ms(t1 - t0), prefill_ms = ms(t2 - t1), decode_ms = ms(t3 - t2);
    dense_st = model.stats().dense;
    msa_st = model.stats().msa;
  } else {
#if M3_HAVE_GPU
    device_line = gpu::describe(gpu::device_info(0));
    gpu::ModelOptions o;
    o.max_batch = 1;
    o.max_context = a.max_context > 0 ? a.max_context : T + a.decode;
    // prefill_embeds takes the image prompt in one call (no chunking); a text prompt goes in chunks.
    o.max_tokens = image_feats ? T : std::min<std::int64_t>(T, 16384);
    auto t0 = clock::now();
    if (a.show_plan) {
      // The plan the model will check before allocating, printed first so a refusal can be read.
      gpu::PlanRequest req;
      req.batch = o.max_batch;
      req.context = o.max_context;
      req.chunk_tokens = o.max_tokens;
      std::fprintf(stderr, "memory plan (%s, context %lld, %lld tokens a call):\n%s", cfg.name.c_str(),
                   static_cast<long long>(o.max_context), static_cast<long long>(o.max_tokens),
                   gpu::plan_memory(cfg, req).describe().c_str());
    }
    ModelWeights<float> w = ck ? std::move(ck->weights) : generate_weights(cfg, a.seed);
    if (image_feats) image_x = leading_image_rows(w.embed_tokens, prompt, *image_feats);
    gpu::Model model(cfg, w, o);
    w = ModelWeights<float>{};  // the model holds the device copy
    if (ck) ck.reset();
    auto t1 = clock::now();
    gpu::Sequence seq = model.new_sequence();
    auto t2 = drive(model, seq);
    auto t3 = clock::now();
    load_ms = ms(t1 - t0), prefill_ms = ms(t2 - t1), decode_ms = ms(t3 - t2);
#endif
  }
  const std::uint64_t hash = logits_hash(all);
  const double sum = all.sum();
  if (!a.out.empty()) {
    GoldenRun g;
    g.generator = command_line();
    g.seed = a.seed;
    g.config = cfg;
    g.precision = prec;
    g.store_f64 = prec == Precision::FP64;
    g.tokens = prompt;
    g.rows = rec.rows();
    g.trace = rec.tensors();
    g.logits = all.topRows(T);
    g.decode_tokens = gen;
    g.decode_logits = all.bottomRows(a.decode);
    write_golden(a.out, g);
  }

  if (a.format == Format::JSON) {
    nlohmann::json j;
    j["command"] = command_line();
    j["device"] = device_line;
    j["engine"] = a.device;
    j["config"] = cfg.name;
    j["precision"] = prec_name;
    j["seed"] = a.seed;
    j["prompt_tokens"] = prompt.size();
    j["decode_steps"] = a.decode;
    if (!image_line.empty())
      j["image"] = {{"spec", a.image}, {"tokens", image_feats->rows()}, {"tower", image_tower}, {"summary", image_line}};
    if (!warnings.empty()) j["warnings"] = warnings;
    j["weights_ms"] = load_ms;
    j["prefill_ms"] = prefill_ms;
    j["decode_ms"] = decode_ms;
    j["greedy_tokens"] = gen;
    j["logits_rows"] = all.rows();
    j["logits_fnv1a64"] = fmt::format("{:016x}", hash);
    j["logits_sum"] = sum;
    if (a.device == "cpu")
      j["attn_macs"] = {{"dense", dense_st.qk_macs + dense_st.pv_macs},
                        {"msa_main", msa_st.qk_macs + msa_st.pv_macs},
                        {"msa_index", msa_st.index_macs}};
    fmt::print("{}\n", j.dump(2));
    return kExitOk;
  }
  const bool csv = a.format == Format::CSV;
  if (csv) {
    fmt::print("config,precision,prompt_tokens,decode_steps,prefill_ms,decode_ms,logits_fnv1a64,logits_sum\n");
    fmt::print("{},{},{},{},{:.3f},{:.3f},{:016x},{:.17g}\n", cfg.name, prec_name, prompt.size(), a.decode,
               prefill_ms, decode_ms, hash, sum);
    return kExitOk;
  }
  fmt::print("# {}\n# {}\n", command_line(), device_line);
  fmt::print("config {} ({} layers, H {}, V {}), precision {}, seed {}\n", cfg.name, cfg.num_hidden_layers,
             cfg.hidden_size, cfg.vocab_size, prec_name, a.seed);
  if (!image_line.empty()) fmt::print("{}\n", image_line);
  for (const auto& w : warnings) fmt::print("# warning: {}\n", w);
  fmt::print("weights   {:10.1f} ms\n", load_ms);
  fmt::print("prefill   {:10.1f} ms  {:6d} tokens  {:10.1f} tok/s\n", prefill_ms, prompt.size(),
             prompt.size() / (prefill_ms / 1e3));
  if (a.decode > 0)
    fmt::print("decode    {:10.1f} ms  {:6d} steps   {:10.2f} ms/token\n", decode_ms, a.decode, decode_ms / a.decode);
  if (a.device == "cpu")
    fmt::print("attention MACs: dense layers {}, MSA main {}, MSA index {}\n", dense_st.qk_macs + dense_st.pv_macs,
               msa_st.qk_macs + msa_st.pv_macs, msa_st.index_macs);
  if (!gen.empty()) fmt::print("greedy tokens: {}\n", fmt::join(gen, " "));
  fmt::print("logits [{} x {}] fnv1a64 {:016x} sum {:.17g}\n", all.rows(), all.cols(), hash, sum);
  return kExitOk;
}

}  // namespace

CLI::App* register_run(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<RunArgs>();
  CLI::App* cmd = app.add_subcommand(
      "run", "Run the model on the CPU reference or the GPU: prefill a prompt, then greedy decode steps; print timing, the greedy "
             "tokens and a logits checksum (same seed and precision -> same checksum on every machine).");
  cmd->add_option("--preset,--config", args->preset,
                  "Preset name (m3-layer, small, tiny) or path to a config.json")
      ->capture_default_str();
  cmd->add_option("--tokens", args->tokens,
                  "Prompt: a count N (N ids drawn from the seed), a file of whitespace-separated ids, or "
                  "FILE.h5:/dataset (an int32/int64 vector)")
      ->capture_default_str();
  cmd->add_option("--decode", args->decode, "Greedy decode steps after the prefill")->capture_default_str();
  cmd->add_option("--precision", args->precision,
                  "CPU: fp32 (default), fp64 (ground truth) or bf16 (GPU emulation); the GPU is always bf16")
      ->check(CLI::IsMember({"fp32", "fp64", "bf16"}));
  cmd->add_option("--device", args->device, "cpu (the Eigen reference) or gpu (the CUDA implementation, bf16)")
      ->check(CLI::IsMember({"cpu", "gpu"}))
      ->capture_default_str();
  cmd->add_option("--max-context", args->max_context,
                  "GPU: tokens of cache to plan per sequence (default: prompt + decode steps)");
  cmd->add_flag("--show-plan", args->show_plan, "GPU: print the memory plan (stderr) before allocating");
  cmd->add_option("--seed", args->seed, "Seed of the weights and of a drawn prompt")->capture_default_str();
  cmd->add_option("--checkpoint", args->checkpoint,
                  "Checkpoint directory (config.json + safetensors, single or sharded, either layout of spec "
                  "Appendix A) instead of --preset and seeded weights")
      ->excludes("--preset");
  cmd->add_option("--out", args->out, "Write an HDF5 file in the golden layout (datasets/golden.h): prompt, /logits [T, V], "
                  "/decode/tokens and /decode/logits, and the prefill's trace under /trace/blk.{l}.<name>, "
                  "selection as [Hi, T, K_blk] int32 (-1 padded); float32, float64 in fp64 runs");
  cmd->add_option("--image", args->image,
                  "An image before the prompt (CPU): synthetic:HxW (a seeded picture) or a PPM file (P6/P3; convert "
                  "PNGs with e.g. `convert in.png out.ppm`); its sides must be multiples of patch * 2 (tiny 8, small "
                  "16, m3 28) within the preset's maximum; the vision tower's features replace as many image-"
                  "placeholder tokens; with --checkpoint, the checkpoint's vision tower when it holds one (m3h export "
                  "--vision), else the preset's seeded tower");
  cmd->add_option("--mtp", args->mtp,
                  "Draft this many tokens a round with MTP modules (spec §7) and check them with the model: the "
                  "same greedy tokens, fewer model forwards when drafts are right; prints the acceptance (seeded "
                  "weights or a checkpoint's modules; CPU reference or --device gpu)")
      ->capture_default_str();
  cmd->add_option("--mtp-modules", args->mtp_modules,
                  "MTP modules for --mtp: the first M of the checkpoint's, or M seeded ones (default: all the "
                  "checkpoint's, or the config's num_mtp_modules, at least 1)");
  cmd->add_option_function<std::string>(
         "--mtp-weights", [args](const std::string& s) { args->mtp_planted = s == "planted"; },
         "With --mtp and no checkpoint: seeded (default) or planted weights. Seeded modules were never trained and "
         "accept ~0 drafts; planted ones (reference/weights.h plant_successor) pair a main model that emits the "
         "successor of its input token (t -> t+1 mod V) with modules that draft it, so most drafts are accepted "
         "(what m3h compare --mtp --mtp-weights planted compares between the engines)")
      ->check(CLI::IsMember({"seeded", "planted"}));
  add_format_option(cmd, &args->format);
  cmd->callback([args, exit_code] { *exit_code = run(*args); });
  return cmd;
}

}  // namespace m3::cli
