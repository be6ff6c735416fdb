// `m3h export`: writes a preset's seeded weights as a checkpoint directory (config.json +
// safetensors, either layout of spec Appendix A), the small checkpoints tests and users feed back
// through `m3h run --checkpoint` and `m3h inspect`.
#include "compare/cli_common.h"
#include "datasets/checkpoint.h"

#include <fmt/format.h>

#include <optional>

namespace m3::cli {

namespace {

struct ExportArgs {
  bool mtp = false;
  bool vision = false;
  std::string preset = "tiny";
  std::uint64_t seed = 0;
  std::string out;
  std::string layout = "official";
  std::string dtype = "F32";
  int shards = 1;
};

int run_export(const ExportArgs& a) {
  const ModelConfig cfg = resolve_config(a.preset);
  const auto dtype = parse_dtype(a.dtype);
  if (!dtype) throw std::invalid_argument(fmt::format("--dtype {}: expected F32, BF16 or F16", a.dtype));
  const ModelWeights<float> w = generate_weights(cfg, a.seed);
  std::vector<ModelWeights<float>> mtp;  // --mtp: the config's MTP modules, seeded as m3h run --mtp makes them
  if (a.mtp)
    for (int i = 0; i < cfg.num_mtp_modules; ++i) mtp.push_back(generate_mtp_module(cfg, i, a.seed, w));
  std::optional<CheckpointVision> vision;  // --vision: the preset's tower, seeded as m3h run --image makes it
  if (a.vision) {
    const VisionConfig vc = vision_preset(cfg.name);
    vision = CheckpointVision{vc, vision_weights_cast<float>(generate_vision_weights(vc, a.seed))};
  }
  save_checkpoint(a.out, cfg, w, parse_layout(a.layout), *dtype, a.shards, mtp, vision ? &*vision : nullptr);
  fmt::print("wrote {}: config {}, seed {}, layout {}, {} in {} file(s), {} MTP module(s), vision tower {}\n", a.out,
             cfg.name, a.seed, a.layout, a.dtype, a.shards, mtp.size(), vision ? vision->config.name : "none");
  return kExitOk;
}

}  // namespace

CLI::App* register_export(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<ExportArgs>();
  CLI::App* cmd = app.add_subcommand(
      "export", "Write a preset's seeded weights as a checkpoint directory (config.json + safetensors) in the "
                "official or the Hugging Face layout (spec Appendix A).");
  cmd->add_option("--preset,--config", args->preset, "Preset name or path to a config.json")->capture_default_str();
  cmd->add_option("--seed", args->seed, "Seed of the weights")->capture_default_str();
  cmd->add_option("--out", args->out, "Checkpoint directory to write (created)")->required();
  cmd->add_option("--layout", args->layout, "official (A.1 names) or hf (A.2, fused gate_up)")
      ->check(CLI::IsMember({"official", "hf"}))
      ->capture_default_str();
  cmd->add_option("--dtype", args->dtype, "Tensor dtype: F32, BF16 or F16 (the router stays F32)")
      ->check(CLI::IsMember({"F32", "BF16", "F16"}))
      ->capture_default_str();
  cmd->add_flag("--mtp", args->mtp, "Also write the config's MTP modules (mtp.layers.{i}.*, seeded)");
  cmd->add_flag("--vision", args->vision,
                "Also write the preset's vision tower and projector (visual.*, multi_modal_projector.*, "
                "patch_merge_mlp.*, seeded; config.json gets vision_config and image_token_id)");
  cmd->add_option("--shards", args->shards, "Number of safetensors files (> 1 writes model.safetensors.index.json)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->callback([args, exit_code] { *exit_code = run_export(*args); });
  return cmd;
}

}  // namespace m3::cli
