// Shared pieces of the `m3h` subcommands: output formats, the device header, the echoed command
// line, and the exit-code convention (0 ok, 1 disagreement or failed gate, 2 bad input or usage).
#pragma once

#include <CLI/CLI.hpp>

#include "datasets/checkpoint.h"  // defines: CheckpointVision (a checkpoint's vision tower)
#include "reference/config.h"
#include "reference/mtp.h"
#include "reference/weights.h"
#include "reference/tensor.h"
#include "reference/vision.h"

#include <cstdint>
#include <string>
#include <vector>

namespace m3::cli {

enum class Format { TABLE, JSON, CSV };

inline constexpr int kExitOk = 0;
inline constexpr int kExitDisagree = 1;
inline constexpr int kExitBadInput = 2;

// Adds `--format table|json|csv` (default table).
void add_format_option(CLI::App* cmd, Format* out);

// The full argument line of this process, so that every printed row can be re-run.
const std::string& command_line();
void set_command_line(int argc, char** argv);

// "cpu: <model name>, <n> threads" — the device header of human-readable output.
std::string cpu_description();

// Physical memory of this machine in bytes (sysconf), 0 where it cannot be read.
std::uint64_t host_memory_bytes();

// An image from `--image`: "synthetic:HxW" (a seeded picture of the vision part vc) or a PPM file
// (datasets/ppm.h); pixels [C, H*W]. Throws std::invalid_argument / std::runtime_error naming the
// spec and what is wrong (std::invalid_argument for a size the tower cannot patch).
struct CliImage {
  MatD pixels;
  int height = 0, width = 0;
};
CliImage load_image(const std::string& spec, const VisionConfig& vc, std::uint64_t seed);

// `--image` for a prompt: loads the image (load_image), runs the tower and puts as many
// image-placeholder tokens before `prompt`. The tower is `tower` when given (a checkpoint's: its
// config and fp32 weights, widened to the reference's fp64), else the seeded one of cfg's preset
// (vision_preset(cfg.name), generate_vision_weights(seed)); it runs on the CPU reference (fp64), or
// with on_gpu on GPU 0 (gpu::VisionTower, bf16; the CUDA build only). Returns the tower's rows
// [N, H] (leading_image_rows places them), a one-line summary naming the tower, where it ran and
// its time, and which tower ran ("checkpoint" | "seeded").
struct PromptImage {
  MatD features;  // [N, H]
  std::string summary;
  std::string tower;
};
PromptImage prepend_image(const std::string& spec, const ModelConfig& cfg, std::uint64_t seed,
                          std::vector<std::int32_t>& prompt, const CheckpointVision* tower = nullptr,
                          bool on_gpu = false);

// generate_mtp (reference/mtp.h) of the main model (cfg, w) with the MTP modules' weights `modules`
// (models of mtp_module_config(cfg)): on the CPU reference in `prec`, or with on_gpu on the GPU
// (gpu::generate_mtp, bf16), its models sized for one sequence of the prompt plus `steps` tokens
// (max_context when > 0) and forward calls that hold the whole prompt. `w` is released once the
// main model holds its own copy. Shared by `m3h run --mtp` and `m3h compare --mtp`.
std::vector<std::int32_t> run_generate_mtp(bool on_gpu, const ModelConfig& cfg, ModelWeights<float> w,
                                           const std::vector<ModelWeights<float>>& modules, Precision prec,
                                           const std::vector<std::int32_t>& prompt, int steps, int k,
                                           MtpStats* stats, std::int64_t max_context = 0);

// A prompt from `--tokens`: a count N (N ids drawn from the seed, the same on every machine), a
// text file of whitespace-separated ids, or FILE.h5:/dataset (an int32/int64 vector). Every id is
// checked against the vocabulary and the length against max_position_embeddings.
std::vector<std::int32_t> load_tokens(const std::string& spec, const ModelConfig& cfg, std::uint64_t seed);

// Subcommand registration; each returns the subcommand and arranges for `*exit_code` to be set.
CLI::App* register_cost(CLI::App& app, int* exit_code);
CLI::App* register_run(CLI::App& app, int* exit_code);
CLI::App* register_case(CLI::App& app, int* exit_code);
CLI::App* register_verify(CLI::App& app, int* exit_code);
CLI::App* register_golden(CLI::App& app, int* exit_code);
CLI::App* register_inspect(CLI::App& app, int* exit_code);
CLI::App* register_export(CLI::App& app, int* exit_code);
CLI::App* register_compare(CLI::App& app, int* exit_code);
CLI::App* register_study(CLI::App& app, int* exit_code);

}  // namespace m3::cli
