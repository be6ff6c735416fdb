// `m3h compare`: the GPU against the reference on the same weights and prompt (model_compare.h):
// the DESIGN §4 table per op and per layer, the end-to-end block, a verdict and its exit code.
//   m3h compare --preset tiny --tokens 300 --decode 16 [--format table|json] [--fp8-index]
//   m3h compare --preset m3-layer --tokens 32768 --decode 0 --sample-rows 8   (long context, sampled rows)
//   m3h compare --preset tiny --image synthetic:32x48 --vision-check         (+ the GPU vision tower)
//   m3h compare --preset tiny --tokens 70 --decode 24 --mtp 3                (MTP drafts, mtp_compare.h)
//   m3h compare --preset tiny --tokens 70 --decode 24 --mtp 3 --mtp-weights planted   (drafts accepted)
#include "compare/cli_common.h"
#include "compare/metrics.h"
#include "compare/model_compare.h"
#include "compare/model_sampled.h"
#include "compare/mtp_compare.h"
#include "compare/tolerance.h"
#include "compare/vision_compare.h"
#include "reference/mtp.h"
#include "reference/vision.h"
#include "reference/weights.h"

#if M3_HAVE_GPU
#include "gpu/runtime/device.h"
#include "gpu/vision.h"
#endif

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <optional>
#include <cstdio>

namespace m3::cli {

namespace {

struct CompareArgs {
  std::string preset = "tiny";
  std::string tokens = "300";
  int decode = 16;
  std::uint64_t seed = 0;
  bool fp8_index = false;
  bool all_rows = false;
  int sample_rows = -1;  // >= 0: the sampled-row mode with this many random rows beyond the fixed ones
  std::string image;     // an image before the prompt: the CPU tower's rows feed both engines
  bool vision_check = false;  // with --image: also the GPU tower against the reference tower
  int mtp = 0;                // > 0: MTP drafts a round; the drafts are compared (compare_mtp)
  bool mtp_planted = false;   // --mtp-weights planted: plant_successor weights (drafts accepted)
  Format format = Format::TABLE;
};

#if M3_HAVE_GPU
nlohmann::json to_json(const cmp::TensorCheck& t) {
  nlohmann::json j;
  j["name"] = t.name;
  j["layer"] = t.layer;
  j["pass"] = t.pass();
  j["rule"] = t.rule;
  if (t.is_index) {
    j["exact_rate"] = t.ix.exact_rate;
    j["jaccard_mean"] = t.ix.jaccard_mean;
    j["jaccard_min"] = t.ix.jaccard_min;
    j["rows"] = t.ix.rows;
    j["rows_differ"] = t.ix.rows_differ;
    j["rows_near_tie"] = t.ix.rows_near_tie;
    j["tie_rtol"] = t.tie_rtol;
  } else {
    j["rel_l2_vs_bf16_ref"] = t.vs_ref.rel_l2;
    j["max_abs"] = t.vs_ref.max_abs;
    j["max_abs_at"] = t.vs_ref.max_at.at;
    j["max_abs_gpu"] = t.vs_ref.max_at.got;
    j["max_abs_ref"] = t.vs_ref.max_at.want;
    j["elementwise_pass_pct"] = t.vs_ref.pass_pct;
    j["rel_l2_gpu_vs_fp64"] = t.err_test;
    j["rel_l2_bf16_ref_vs_fp64"] = t.err_ref;
    j["bound_vs_fp64"] = t.bound;
    j["rows_rerun"] = t.rows_rerun;
    j["rows_excluded"] = t.rows_excluded;
    j["rows_own_inputs"] = t.rows_own_inputs;
  }
  j["failures"] = t.failures;
  return j;
}
#endif

#if M3_HAVE_GPU
// --vision-check: the GPU vision tower (gpu/vision.h) on the --image and the seeded vision weights
// against the reference tower twice, the bf16 emulation (the gate) and fp64 (the truth), traced
// tensor by tensor (vis.patch_embed, vis.blk.{l}.out, vis.proj, vis.merged) under the two-layer
// rule of compare/vision_compare.h. The text model's rows still come from the fp64 CPU tower (the
// comparison below it stays one of the text model alone).
struct VisionReport {
  cmp::VisionComparison check;
  double gpu_ms = 0;  // one forward without the trace, after one with it
  bool pass() const { return check.pass(); }
};

VisionReport check_vision_tower(const ModelConfig& cfg, const std::string& spec, std::uint64_t seed) {
  const VisionConfig vc = vision_preset(cfg.name);
  const CliImage im = load_image(spec, vc, seed);
  const VisionWeights<double> w = generate_vision_weights(vc, seed);  // the weights prepend_image used
  VisionTrace emu_tr, truth_tr, gpu_tr;
  vision_forward(vc, w, im.pixels, im.height, im.width, &emu_tr, Precision::BF16);
  vision_forward(vc, w, im.pixels, im.height, im.width, &truth_tr, Precision::FP64);
  gpu::VisionTower tower(vc, w);
  tower.forward(im.pixels, im.height, im.width, &gpu_tr);
  const auto t0 = std::chrono::steady_clock::now();
  tower.forward(im.pixels, im.height, im.width);
  VisionReport rep;
  rep.gpu_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  rep.check = cmp::compare_vision(gpu_tr, emu_tr, truth_tr);
  return rep;
}

// Layer 4 (compare/vision_compare.h VisionMeanCheck): the column means' numbers, null when unchecked.
nlohmann::json to_json(const cmp::VisionMeanCheck& m) {
  if (!m.checked) return nullptr;
  return {{"rel_l2_vs_bf16_ref", m.vs_ref}, {"gate_vs_bf16_ref", m.gate},   {"rel_l2_gpu_vs_fp64", m.err_test},
          {"rel_l2_bf16_ref_vs_fp64", m.err_ref}, {"bound_vs_fp64", m.bound}, {"floor", m.floor},
          {"pass", m.ok()}};
}

nlohmann::json to_json(const VisionReport& v) {
  nlohmann::json j;
  j["gpu_forward_ms"] = v.gpu_ms;
  j["pass"] = v.pass();
  for (const auto& s : v.check.stages) {
    nlohmann::json t = {{"name", s.name},
                        {"rel_l2_vs_bf16_ref", s.vs_ref.rel_l2},
                        {"gate_vs_bf16_ref", s.gate},
                        {"max_abs", s.vs_ref.max_abs},
                        {"max_abs_at", s.vs_ref.max_at.at},
                        {"max_abs_gpu", s.vs_ref.max_at.got},
                        {"max_abs_ref", s.vs_ref.max_at.want},
                        {"elementwise_pass_pct", s.vs_ref.pass_pct},
                        {"rel_l2_gpu_vs_fp64", s.err_test},
                        {"rel_l2_bf16_ref_vs_fp64", s.err_ref},
                        {"bound_vs_fp64", s.bound},
                        {"column_means", to_json(s.mean)},
                        {"increment", nullptr},
                        {"failures", s.failures},
                        {"pass", s.pass()}};
    if (!s.increment_of.empty())
      t["increment"] = {{"over", s.increment_of},
                        {"rel_l2_vs_bf16_ref", s.inc_vs_ref},
                        {"gate_vs_bf16_ref", s.inc_gate},
                        {"rel_l2_gpu_vs_fp64", s.inc_err_test},
                        {"rel_l2_bf16_ref_vs_fp64", s.inc_err_ref},
                        {"bound_vs_fp64", s.inc_bound},
                        {"column_means", to_json(s.inc_mean)},
                        {"pass", s.increment_ok && s.inc_mean.ok()}};
    j["tensors"].push_back(std::move(t));
  }
  return j;
}

// --sample-rows: the GPU's prefill checked op by op on sampled rows from its own inputs
// (model_sampled.h): no reference forward, so it reaches m3-layer at long context.
int compare_sampled(const CompareArgs& a, const ModelConfig& cfg, const std::vector<std::int32_t>& prompt) {
  if (a.decode != 0)
    throw std::invalid_argument(fmt::format("compare: --sample-rows checks the prefill; give --decode 0 (got {})", a.decode));
  const auto T = static_cast<std::int64_t>(prompt.size());
  std::fprintf(stderr, "compare: weights (seed %llu) ...\n", static_cast<unsigned long long>(a.seed));
  // The sampled mode exists for m3-layer (36.8 GiB of fp32 weights): it may take up to half of this
  // machine's memory, the other half holding the GPU's trace and the reference's row work.
  const std::uint64_t limit = std::max<std::uint64_t>(std::uint64_t{8} << 30, host_memory_bytes() / 2);
  const ModelWeights<float> w = generate_weights(cfg, a.seed, limit);
  std::fprintf(stderr, "compare: gpu prefill of %lld tokens with the trace ...\n", static_cast<long long>(T));
  cmp::GpuRunOptions go;
  go.last_logits_only = true;
  go.fp8_index_cache = a.fp8_index;
  const cmp::EngineRun test = cmp::run_gpu(cfg, w, prompt, 0, nullptr, go);
  const auto rows = cmp::sample_rows(cfg, T, a.sample_rows, a.seed);
  std::fprintf(stderr, "compare: reference on %zu sampled rows ...\n", rows.size());
  const cmp::SampledComparison sc = cmp::check_sampled_rows(cfg, w, prompt, test, rows, a.fp8_index);
  int failed = 0;
  for (const auto& t : sc.tensors) failed += !t.pass();
  if (a.format == Format::JSON) {
    nlohmann::json j;
    j["command"] = command_line();
    j["device"] = gpu::describe(gpu::device_info(0));
    j["config"] = cfg.name;
    j["seed"] = a.seed;
    j["tokens"] = T;
    j["gpu_prefill_ms"] = test.prefill_ms;
    j["sampled_rows"] = rows;
    for (const auto& t : sc.tensors) j["tensors"].push_back(to_json(t));
    j["verdict"] = sc.pass() ? "agree" : "disagree";
    fmt::print("{}\n", j.dump(2));
  } else {
    fmt::print("# {}\n# {}; {} layers, seed {}, prompt {} tokens; gpu prefill {:.1f} ms\n", command_line(),
               gpu::describe(gpu::device_info(0)), cfg.num_hidden_layers, a.seed, T, test.prefill_ms);
    fmt::print("# every op on {} sampled rows, the reference re-run from the GPU's own inputs (model_sampled.h): rows",
               rows.size());
    for (auto r : rows) fmt::print(" {}", r);
    fmt::print("\n\n{:<24} {:>10} {:>10} {:>22} {:>10}  {}\n", "tensor", "rel-L2", "max abs", "at (gpu / ref)", "gate",
               "verdict");
    for (const auto& t : sc.tensors) {
      if (t.is_index)
        fmt::print("{:<24} exact {:6.2f}%  rows differing {} (near-tie {})  {}\n", t.name, 100 * t.ix.exact_rate,
                   t.ix.rows_differ, t.ix.rows_near_tie, t.pass() ? "ok" : "FAIL");
      else
        fmt::print("{:<24} {:>10.3e} {:>10.3e} {:>22} {:>10.0e}  {}\n", t.name, t.vs_ref.rel_l2, t.vs_ref.max_abs,
                   fmt::format("{} {:.4g}/{:.4g}", cmp::coord_str(t.vs_ref.max_at.at), t.vs_ref.max_at.got,
                               t.vs_ref.max_at.want),
                   t.bound, t.pass() ? "ok" : "FAIL");
      if (!a.all_rows)
        for (const auto& f : t.failures) fmt::print("    {}\n", f);
    }
    fmt::print("\nverdict: {} ({} of {} tensors fail)\n", sc.pass() ? "AGREE" : "DISAGREE", failed, sc.tensors.size());
  }
  return sc.pass() ? kExitOk : kExitDisagree;
}
#endif

#if M3_HAVE_GPU
// --mtp K: generate_mtp on the bf16 reference and on the GPU (main model + modules, the same
// weights on both), `--decode` tokens each; the GPU's drafts are verified by the reference's tokens
// round by round (mtp_compare.h). --mtp-weights planted (reference/weights.h plant_successor) makes
// most drafts right, so the reference's own acceptance is gated too (kPlantedMinAcceptance).
int compare_mtp(const CompareArgs& a, const ModelConfig& cfg0, const std::vector<std::int32_t>& prompt) {
  ModelConfig cfg = cfg0;
  cfg.num_mtp_modules = std::max(1, cfg0.num_mtp_modules);
  ModelWeights<float> w = generate_weights(cfg, a.seed);
  std::vector<ModelWeights<float>> mw;
  if (a.mtp_planted) plant_successor(w);
  for (int i = 0; i < cfg.num_mtp_modules; ++i) {
    mw.push_back(generate_mtp_module(cfg, i, a.seed, w));
    if (a.mtp_planted) plant_successor_module(mw.back());
  }
  const auto T = static_cast<std::int64_t>(prompt.size());
  auto clock_ms = [](auto t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  std::fprintf(stderr, "compare: reference bf16, generate_mtp ...\n");
  MtpStats rst, gst;
  rst.record_decisions = gst.record_decisions = true;  // the near-tie rules read them
  auto t0 = std::chrono::steady_clock::now();
  // The near-tie rules of the modules' and the main model's choices (mtp_compare.h); taken before
  // the gpu run takes the weights.
  const cmp::MtpRouterTies ties = cmp::mtp_router_ties(cfg, mw, &w);
  const std::vector<std::int32_t> rtok =
      run_generate_mtp(false, cfg, w, mw, Precision::BF16, prompt, a.decode, a.mtp, &rst);
  const double ref_ms = clock_ms(t0);
  std::fprintf(stderr, "compare: gpu, generate_mtp ...\n");
  t0 = std::chrono::steady_clock::now();
  const std::vector<std::int32_t> gtok =
      run_generate_mtp(true, cfg, std::move(w), mw, Precision::BF16, prompt, a.decode, a.mtp, &gst);
  const double gpu_ms = clock_ms(t0);
  const double min_acceptance = a.mtp_planted ? cmp::kPlantedMinAcceptance : 0.0;
  const cmp::MtpComparison c = cmp::compare_mtp_runs(rtok, rst, gtok, gst, cmp::kBf16.tie_rtol, min_acceptance, ties);
  const char* weights_name = a.mtp_planted ? "planted" : "seeded";
  const std::string dev = gpu::describe(gpu::device_info(0));
  if (a.format == Format::JSON) {
    nlohmann::json j;
    j["command"] = command_line();
    j["device"] = dev;
    j["config"] = cfg.name;
    j["seed"] = a.seed;
    j["prompt_tokens"] = T;
    j["decode_steps"] = a.decode;
    j["mtp"] = {{"modules", mw.size()}, {"drafts_per_round", a.mtp}, {"weights", weights_name},
                {"min_acceptance", min_acceptance}, {"tokens_agree", c.tokens_agree},
                {"rounds_ref", c.rounds_ref}, {"rounds_gpu", c.rounds_test}, {"rounds_compared", c.rounds_compared},
                {"drafts_equal", c.drafts_equal}, {"drafts_compared", c.drafts_compared},
                {"rounds_near_tie", c.rounds_near_tie}, {"rounds_expert_tie", c.rounds_expert_tie},
                {"rounds_selection_tie", c.rounds_selection_tie}, {"rounds_main_tie", c.rounds_main_tie},
                {"expert_tie_rtol", ties.rtol},
                {"tie_rtol", cmp::kBf16.tie_rtol}, {"accepted_by_ref", c.accepted_by_ref},
                {"accepted_ref", c.accepted_ref}, {"accepted_gpu_own", gst.accepted}, {"drafted_gpu", gst.drafted},
                {"tokens_ref", rtok}, {"tokens_gpu", gtok}, {"ms_ref", ref_ms}, {"ms_gpu", gpu_ms}};
    j["failures"] = c.failures;
    j["pass"] = c.pass();
    fmt::print("{}\n", j.dump(2));
    return c.pass() ? kExitOk : kExitDisagree;
  }
  fmt::print("# {}\n# {}\n# {}\n", command_line(), dev, cpu_description());
  fmt::print("config {} ({} layers), {} weights, seed {}, prompt {} tokens, {} tokens with {} MTP module(s), {} drafts a "
             "round\n",
             cfg.name, cfg.num_hidden_layers, weights_name, a.seed, T, a.decode, mw.size(), a.mtp);
  fmt::print("time: reference bf16 {:.1f} ms, gpu {:.1f} ms\n", ref_ms, gpu_ms);
  fmt::print("tokens: {} of {} agree (the greedy tokens of each engine's main model)\n", c.tokens_agree, c.steps);
  fmt::print("rounds: reference {}, gpu {}; {} drafted from the same history: {} with identical drafts, {} parting at a "
             "module near-tie (margin <= {:.1e}), after a flip at a near-tie (score spread <= {:.1e} x scale): {} module "
             "expert, {} module MSA block, {} main-model on the round's feed rows\n",
             c.rounds_ref, c.rounds_test, c.rounds_compared, c.drafts_equal, c.rounds_near_tie, cmp::kBf16.tie_rtol,
             ties.rtol, c.rounds_expert_tie, c.rounds_selection_tie, c.rounds_main_tie);
  if (a.mtp_planted && c.accepted_by_ref == c.accepted_ref)
    fmt::print("acceptance, planted weights: {} of {} drafts accepted by both (the reference's check of the gpu's drafts "
               "and of its own, over the {} rounds with identical drafts; gate: both equal and >= {:.0f}%); gpu's own "
               "check: {} of {} drafts in all\n",
               c.accepted_ref, c.drafts_compared, c.drafts_equal, 100 * min_acceptance, gst.accepted, gst.drafted);
  else
    fmt::print("acceptance over the equal rounds ({} weights): the reference's check accepts {} of the gpu's {} drafts "
               "and {} of its own (gpu's own check: {} of {} drafts in all{})\n",
               weights_name, c.accepted_by_ref, c.drafts_compared, c.accepted_ref, gst.accepted, gst.drafted,
               a.mtp_planted ? ""
                             : "; seeded modules are right by chance only: --mtp-weights planted makes acceptance "
                               "count");
  for (const auto& f : c.failures) fmt::print("  {}\n", f);
  fmt::print("\nverdict: {}\n", c.pass() ? "AGREE" : "DISAGREE");
  return c.pass() ? kExitOk : kExitDisagree;
}
#endif

int compare(const CompareArgs& a) {
#if !M3_HAVE_GPU
  (void)a;
  throw std::invalid_argument("compare: this build has no CUDA support (configure with -DM3_WITH_CUDA=ON)");
#else
  if (gpu::device_count() == 0) throw std::invalid_argument("compare: no CUDA device is visible on this machine");
  const ModelConfig cfg = resolve_config(a.preset);
  auto prompt = load_tokens(a.tokens, cfg, a.seed);
  if (a.mtp < 0) throw std::invalid_argument(fmt::format("compare: --mtp {}, expected >= 1 drafts a round (0: off)", a.mtp));
  if (a.mtp > 0) {
    if (a.sample_rows >= 0 || !a.image.empty() || a.vision_check || a.fp8_index)
      throw std::invalid_argument("compare: --mtp goes with none of --sample-rows, --image, --vision-check, --fp8-index");
    // One token comes from the prefill; drafting rounds start from the second.
    if (a.decode < 2) throw std::invalid_argument(fmt::format("compare: --mtp needs --decode >= 2, got {}", a.decode));
    return compare_mtp(a, cfg, prompt);
  }
  if (a.mtp_planted) throw std::invalid_argument("compare: --mtp-weights goes with --mtp");
  // --image: the vision tower runs once on the CPU (reference/vision.h); its rows lead the prompt of
  // every engine, so the comparison covers the text model consuming them; --vision-check adds the
  // GPU tower against the reference tower.
  std::optional<MatD> feats;
  std::string image_note;
  if (!a.image.empty()) {
    if (a.sample_rows >= 0) throw std::invalid_argument("compare: --image and --sample-rows together are not supported");
    PromptImage pi = prepend_image(a.image, cfg, a.seed, prompt);
    feats = std::move(pi.features);
    image_note = std::move(pi.summary);
  }
  if (a.vision_check && a.image.empty()) throw std::invalid_argument("compare: --vision-check needs --image");
  std::optional<VisionReport> vis;
  if (a.vision_check) {
    std::fprintf(stderr, "compare: vision tower, gpu vs the bf16 and fp64 reference towers ...\n");
    vis = check_vision_tower(cfg, a.image, a.seed);
  }
  const bool vis_pass = !vis || vis->pass();
  if (a.decode < 0) throw std::invalid_argument("--decode must be >= 0");
  const auto T = static_cast<std::int64_t>(prompt.size());
  if (T + a.decode > cfg.max_position_embeddings)
    throw std::out_of_range(fmt::format("prompt {} + decode {} tokens exceed max_position_embeddings = {}", T, a.decode,
                                        cfg.max_position_embeddings));
  const bool human = a.format == Format::TABLE;
  auto progress = [&](const char* what) { std::fprintf(stderr, "compare: %s ...\n", what); };
  if (a.sample_rows >= 0) return compare_sampled(a, cfg, prompt);
  const ModelWeights<float> w = generate_weights(cfg, a.seed);
  std::optional<MatD> x;  // [T, H] the prompt's input rows with the image's in front
  if (feats) x = leading_image_rows(w.embed_tokens, prompt, *feats);
  const MatD* xp = x ? &*x : nullptr;
  progress("reference, bf16 emulation");
  ReferenceOptions ro;
  ro.fp8_index_cache = a.fp8_index;  // the emulation mirrors the GPU's storage; the fp64 truth stays exact
  const cmp::EngineRun ref = cmp::run_reference(cfg, w, Precision::BF16, prompt, a.decode, nullptr, ro, 0, xp);
  progress("reference, fp64");
  const cmp::EngineRun truth = cmp::run_reference(cfg, w, Precision::FP64, prompt, a.decode, &ref.greedy, {}, 0, xp);
  progress("gpu");
  cmp::GpuRunOptions go;
  go.fp8_index_cache = a.fp8_index;
  go.input_rows = xp;
  const cmp::EngineRun test = cmp::run_gpu(cfg, w, prompt, a.decode, &ref.greedy, go);
  const cmp::ModelComparison mc = cmp::compare_runs(cfg, w, T, test, ref, truth);
  const cmp::EndToEnd& e = mc.e2e;
  const std::string dev = gpu::describe(gpu::device_info(0));

  if (!human) {
    nlohmann::json j;
    j["command"] = command_line();
    j["device"] = dev;
    j["cpu"] = cpu_description();
    j["config"] = cfg.name;
    j["seed"] = a.seed;
    j["prompt_tokens"] = T;
    j["decode_steps"] = a.decode;
    j["fp8_index_cache"] = a.fp8_index;
    if (!image_note.empty()) j["image"] = image_note;
    j["timing_ms"] = {{"gpu_prefill", test.prefill_ms}, {"gpu_decode", test.decode_ms},
                      {"ref_bf16_prefill", ref.prefill_ms}, {"ref_bf16_decode", ref.decode_ms},
                      {"ref_fp64_prefill", truth.prefill_ms}, {"ref_fp64_decode", truth.decode_ms}};
    for (const auto& t : mc.tensors) j["tensors"].push_back(to_json(t));
    j["end_to_end"] = {{"rows", e.rows},
                       {"logits_rel_l2_vs_bf16_ref", e.logits_rel_l2},
                       {"logits_rel_l2_gpu_vs_fp64", e.logits_err_test},
                       {"logits_rel_l2_bf16_ref_vs_fp64", e.logits_err_ref},
                       {"top1_agree", e.top1_agree},
                       {"top1_differ", e.top1_differ},
                       {"top1_near_tie", e.top1_near_tie},
                       {"top1_truth_differ_test", e.top1_truth_differ_test},
                       {"top1_truth_differ_ref", e.top1_truth_differ_ref},
                       {"kl_mean", e.kl_mean},
                       {"kl_max", e.kl_max},
                       {"kl_max_row", e.kl_max_row},
                       {"decode_steps", e.decode_steps},
                       {"greedy_agree", e.greedy_agree},
                       {"greedy_near_tie", e.greedy_near_tie},
                       {"greedy_flipped", e.greedy_flipped},
                       {"rows_flipped", e.rows_flipped},
                       {"first_divergence", e.first_divergence},
                       {"fp64_greedy_agree_with_bf16_ref", e.truth_greedy_agree},
                       {"greedy_tokens_ref", ref.greedy},
                       {"greedy_tokens_gpu", test.greedy}};
    j["failures"] = mc.failures;
    if (vis) j["vision_tower"] = to_json(*vis);
    j["pass"] = mc.pass() && vis_pass;
    fmt::print("{}\n", j.dump(2));
    return mc.pass() && vis_pass ? kExitOk : kExitDisagree;
  }

  fmt::print("# {}\n# {}\n# {}\n", command_line(), dev, cpu_description());
  if (!image_note.empty()) fmt::print("{}\n", image_note);
  fmt::print("config {} ({} layers), seed {}, prompt {} tokens, {} decode steps, index-K cache {}\n", cfg.name,
             cfg.num_hidden_layers, a.seed, T, a.decode, a.fp8_index ? "fp8" : "bf16");
  fmt::print("time: gpu prefill {:.1f} ms, decode {:.1f} ms | reference bf16 {:.1f} + {:.1f} ms, fp64 {:.1f} + {:.1f} ms\n\n",
             test.prefill_ms, test.decode_ms, ref.prefill_ms, ref.decode_ms, truth.prefill_ms, truth.decode_ms);
  fmt::print("gate: rel-L2 vs the bf16 reference <= {:.0e} (emulation), or rel-L2 vs fp64 <= {} x the bf16 reference's + {:.1e} "
             "(2x-truth); ids exact or near-tie\n",
             cmp::kBf16.rel_l2, cmp::kAttnErrFactor, cmp::kAttnFloor);
  fmt::print("{:<24} {:>10} {:>10} {:>22} {:>10} {:>10}  {:<10} {}\n", "tensor", "vs bf16", "max abs", "at (gpu / ref)",
             "gpu-fp64", "ref-fp64", "rule", "verdict");
  int shown_layer = -2;
  for (const auto& t : mc.tensors) {
    if (t.layer != shown_layer && t.layer >= 0) {
      shown_layer = t.layer;
    }
    if (t.is_index) {
      fmt::print("{:<24} exact {:6.2f}%  Jaccard mean {:.4f} min {:.4f}  rows differing {} (near-tie {}), tie rtol {:.1e}  {:<10} {}\n",
                 t.name, 100 * t.ix.exact_rate, t.ix.jaccard_mean, t.ix.jaccard_min, t.ix.rows_differ, t.ix.rows_near_tie,
                 t.tie_rtol, t.rule, t.pass() ? "ok" : "FAIL");
    } else {
      const std::string at = fmt::format("{} {:.4g}/{:.4g}", cmp::coord_str(t.vs_ref.max_at.at), t.vs_ref.max_at.got,
                                         t.vs_ref.max_at.want);
      fmt::print("{:<24} {:>10.3e} {:>10.3e} {:>22} {:>10.3e} {:>10.3e}  {:<10} {}", t.name, t.vs_ref.rel_l2,
                 t.vs_ref.max_abs, at, t.err_test, t.err_ref, t.rule, t.pass() ? "ok" : "FAIL");
      if (t.rows_rerun > 0) fmt::print(" ({} rows re-run with the gpu's experts)", t.rows_rerun);
      if (t.rows_excluded > 0) fmt::print(" ({} flipped-token rows left out)", t.rows_excluded);
      if (t.rows_own_inputs > 0) fmt::print(" ({} rows from the gpu's own inputs)", t.rows_own_inputs);
      fmt::print("\n");
    }
    if (!a.all_rows)
      for (const auto& f : t.failures) fmt::print("    {}\n", f);
  }
  fmt::print("\nend to end over {} logits rows (prompt + decode{}):\n", e.rows,
             e.rows_flipped ? fmt::format(", less {} tokens whose experts flipped", e.rows_flipped) : "");
  fmt::print("  logits rel-L2 vs bf16 reference {:.3e}; vs fp64: gpu {:.3e}, bf16 reference {:.3e}\n", e.logits_rel_l2,
             e.logits_err_test, e.logits_err_ref);
  fmt::print("  top-1 agreement {:.4f} ({} rows differ, {} near-ties; argmax differs from fp64's on {} gpu rows, {} "
             "bf16-reference rows); KL(ref || gpu) mean {:.3e}, max {:.3e} at row {}\n",
             e.top1_agree, e.top1_differ, e.top1_near_tie, e.top1_truth_differ_test, e.top1_truth_differ_ref, e.kl_mean,
             e.kl_max, e.kl_max_row);
  fmt::print("  greedy decode: {} of {} steps agree ({} near-ties, {} at flipped tokens, first divergence {}); fp64 "
             "reference agrees on {}\n",
             e.greedy_agree, e.decode_steps, e.greedy_near_tie, e.greedy_flipped, e.first_divergence,
             e.truth_greedy_agree);
  for (const auto& f : mc.failures) fmt::print("  {}\n", f);
  int failed = 0;
  for (const auto& t : mc.tensors) failed += !t.pass();
  if (vis) {
    fmt::print("\nvision tower (gpu forward {:.2f} ms), gate per stage, both: rel-L2 vs the bf16 reference <= max({:.0e}, "
               "{} x ref-fp64), and gpu-fp64 <= {} x ref-fp64 + {:.1e}; the same on each block's increment (row "
               "'+ increment'), and on the column means over rows of both (mean columns: vs bf16 <= max(floor, {} x "
               "ref-fp64), gpu-fp64 <= {} x ref-fp64 + floor) (compare/vision_compare.h)\n"
               "{:<24} {:>10} {:>10} {:>10} {:>22} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}  {}\n",
               vis->gpu_ms, cmp::kVisionTower.rel_l2, cmp::kAttnErrFactor, cmp::kAttnErrFactor, cmp::kAttnFloor,
               cmp::kAttnErrFactor, cmp::kAttnErrFactor, "tensor", "vs bf16", "gate", "max abs", "at (gpu / ref)",
               "gpu-fp64", "ref-fp64", "bound", "elem %", "mean bf16", "mean gate", "mean gpu", "mean ref", "mean bnd",
               "verdict");
    const auto mean_cols = [](const cmp::VisionMeanCheck& m) {
      return m.checked ? fmt::format("{:>10.3e} {:>10.3e} {:>10.3e} {:>10.3e} {:>10.3e}", m.vs_ref, m.gate, m.err_test,
                                     m.err_ref, m.bound)
                       : fmt::format("{:>10} {:>10} {:>10} {:>10} {:>10}", "-", "-", "-", "-", "-");
    };
    for (const auto& s : vis->check.stages) {
      failed += !s.pass();
      fmt::print("{:<24} {:>10.3e} {:>10.3e} {:>10.3e} {:>22} {:>10.3e} {:>10.3e} {:>10.3e} {:>8.2f} {}  {}\n", s.name,
                 s.vs_ref.rel_l2, s.gate, s.vs_ref.max_abs,
                 fmt::format("{} {:.4g}/{:.4g}", cmp::coord_str(s.vs_ref.max_at.at), s.vs_ref.max_at.got,
                             s.vs_ref.max_at.want),
                 s.err_test, s.err_ref, s.bound, s.vs_ref.pass_pct, mean_cols(s.mean), s.pass() ? "ok" : "FAIL");
      if (!s.increment_of.empty())
        fmt::print("{:<24} {:>10.3e} {:>10.3e} {:>10} {:>22} {:>10.3e} {:>10.3e} {:>10.3e} {:>8} {}  {}\n",
                   "  + increment", s.inc_vs_ref, s.inc_gate, "-", "-", s.inc_err_test, s.inc_err_ref, s.inc_bound, "-",
                   mean_cols(s.inc_mean), s.increment_ok && s.inc_mean.ok() ? "ok" : "FAIL");
      if (!a.all_rows)
        for (const auto& f : s.failures) fmt::print("    {}\n", f);
    }
  }
  const std::size_t n_tensors = mc.tensors.size() + (vis ? vis->check.stages.size() : 0);
  const bool pass = mc.pass() && vis_pass;
  fmt::print("\nverdict: {} ({} of {} tensors fail, {} end-to-end failures)\n", pass ? "AGREE" : "DISAGREE", failed,
             n_tensors, mc.failures.size());
  return pass ? kExitOk : kExitDisagree;
#endif
}

}  // namespace

CLI::App* register_compare(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<CompareArgs>();
  CLI::App* cmd = app.add_subcommand(
      "compare",
      "Run the GPU and the CPU reference (bf16 emulation: the gate; fp64: the truth) on the same seeded weights and "
      "prompt; print per-op and per-layer errors, selection and expert agreement, end-to-end logits error, top-1, KL "
      "and greedy-decode agreement, and a verdict (exit 0 agree, 1 disagree, 2 bad input or no GPU).");
  cmd->add_option("--preset,--config", args->preset, "Preset name (tiny, small) or path to a config.json")
      ->capture_default_str();
  cmd->add_option("--tokens", args->tokens, "Prompt: a count N (drawn from the seed), a file of ids, or FILE.h5:/dataset")
      ->capture_default_str();
  cmd->add_option("--decode", args->decode, "Greedy decode steps (teacher-forced with the reference's tokens)")
      ->capture_default_str();
  cmd->add_option("--seed", args->seed, "Seed of the weights and of a drawn prompt")->capture_default_str();
  cmd->add_flag("--fp8-index", args->fp8_index, "GPU index-K cache in fp8 E4M3 (the bf16 reference rounds its index-K cache to E4M3 too; the fp64 truth stays exact)");
  cmd->add_flag("--quiet-failures", args->all_rows, "Do not print the failure lines under each table row");
  cmd->add_option("--image", args->image,
                  "An image before the prompt (synthetic:HxW or a PPM file): the CPU vision tower's rows feed the "
                  "reference and the GPU alike");
  cmd->add_flag("--vision-check", args->vision_check,
                "With --image: also run the GPU vision tower and check each traced tensor (vis.patch_embed, "
                "vis.blk.{l}.out, vis.proj, vis.merged) against the bf16-emulating reference tower and the fp64 one "
                "(both layers of the policy per stage, on each block's increment, and on the column means over rows of "
                "both)");
  cmd->add_option("--sample-rows", args->sample_rows,
                  "Long-context mode: no reference forward; the GPU's prefill is checked op by op on the first/last "
                  "rows, block and top-k edges, the middle and N seeded random rows, each op re-run by the reference "
                  "from the GPU's own inputs (e.g. --preset m3-layer --tokens 32768 --decode 0 --sample-rows 8)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--mtp", args->mtp,
                  "MTP mode: greedy decoding with this many drafts a round (MTP modules: --mtp-weights) on the bf16 "
                  "reference and on the GPU; the GPU's drafts are verified by the reference's tokens round by round "
                  "and must be accepted exactly as the reference's own (--decode tokens)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option_function<std::string>(
         "--mtp-weights", [args](const std::string& s) { args->mtp_planted = s == "planted"; },
         fmt::format(
             "With --mtp: seeded (default) or planted weights. Seeded MTP modules were never trained and accept ~0 "
             "drafts on both engines, so 'the gpu's drafts are accepted as often as the reference's own' holds as "
             "0 = 0 and only the drafts' identity is tested. Planted weights (reference/weights.h plant_successor) "
             "make the main model emit the successor of its input token (t -> t+1 mod V; its layers' output "
             "projections shrunk, but run and compared) and the modules draft it, so most drafts are accepted and "
             "the equality is tested on nonzero counts (gate: at least {:.0f}% of the reference's own drafts "
             "accepted)",
             100 * cmp::kPlantedMinAcceptance))
      ->check(CLI::IsMember({"seeded", "planted"}));
  add_format_option(cmd, &args->format);
  cmd->callback([args, exit_code] { *exit_code = compare(*args); });
  return cmd;
}

}  // namespace m3::cli
