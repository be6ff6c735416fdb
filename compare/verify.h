// Checking an op case file (DESIGN §4, §7): read and validate the case, run an implementation of
// its op on its inputs, compare with the expected outputs under the tolerance policy (tolerance.h).
// `m3h verify` (cmd_verify.cpp) prints what verify_case returns.
//
// Roles, a the side under test and b the expected values (the reference side of every metric):
//  - Device::CPU: b is the CPU reference run now on the case's inputs, in the case's precision
//    (bf16 cases in the bf16-emulating way: fp32 math on the bf16 inputs, outputs rounded to
//    bf16); a is the file's /outputs: another engine's kernel dumped from PyTorch, or the
//    reference's own outputs for cases written by `m3h case`.
//  - Device::GPU: a is the GPU twin's output (OpCase::run_gpu: gpu/kernels on the case's inputs
//    in the GPU's storage); b is the file's /outputs, the expected values (for cases written by
//    `m3h case`, the reference's in the case's precision). Outputs that several GPU kernels
//    compute are checked once per kernel ("out", "out@prefill", ...: case.h), all against b.
// On both devices the CPU reference is also run now: index outputs match exactly, or differ only
// by near-ties whose deciding scores come from that run (tie_scores); the bf16 attention rule
// compares a's rel-L2 against the fp64 reference with the bf16-emulating reference's own, both
// computed now on the CPU on the case's (bf16-valued) inputs.
// GPU precision: the GPU computes in bf16, so only bf16 cases are checked there, plus fp32 cases
// of ops whose GPU path holds no bf16 value anywhere (OpCase::gpu_precision_ok: msa_select, whose
// scores are fp32 and whose ids are exact). The router is fp32 inside but takes x in bf16, so its
// fp32 cases are refused like the others': "the GPU computes in bf16; write the case with
// --precision bf16". Without CUDA in the build, or without a visible device, --device gpu is a
// CaseError (m3h: exit 2), as is a case the GPU kernels reject (their GpuError message kept:
// unsupported head dims, block sizes, ...) or an op / parameter with no GPU twin.
#pragma once

#include "compare/cases/case.h"
#include "compare/metrics.h"
#include "compare/tolerance.h"

#include <string>
#include <vector>

namespace m3::cmp {

enum class Device { CPU, GPU };

// One output's comparison and verdict.
struct OutputCheck {
  std::string name;    // the output's name; "<output>@<kernel>" for an extra GPU kernel (case.h)
  bool is_index = false;
  Precision tier = Precision::FP32;  // the tolerance tier (the output's storage precision)
  Tolerance tol;
  Dims dims;
  FloatMetrics f;      // float outputs
  IndexMetrics ix;     // index outputs
  std::string follows;     // the index output whose near-tie rows were skipped here ("" = none)
  bool attn_rule = false;  // the bf16 attention rule was applied:
  double err_a = 0;        //   rel-L2 of a (the side under test) vs the fp64 reference
  double err_ref = 0;      //   rel-L2 of the bf16-emulating reference (run now) vs the fp64 one
  double attn_bound = 0;   //   kAttnErrFactor * err_ref + kAttnFloor
  std::vector<std::string> failures;  // why it disagrees; empty = agrees
  bool pass() const { return failures.empty(); }
  bool near_tie() const { return is_index && ix.rows_differ > 0 && ix.agree(); }
};

struct VerifyResult {
  std::string path;
  Device device = Device::CPU;
  cases::Case c;  // as read (inputs and the file's outputs)
  std::vector<OutputCheck> outputs;  // in the op's output order, extra GPU kernels after their output
  bool pass() const;
};

// Throws cases::CaseError for a bad file (format, op, missing or misshapen tensor, NaN input), for
// inputs the reference rejects, and for Device::GPU where it cannot run (see above).
VerifyResult verify_case(const std::string& path, Device device);

// Throws cases::CaseError unless this build has CUDA and a device is visible; the message says
// which is missing. gpu_description() is that device's one-line description.
void require_gpu();
std::string gpu_description();

// The same on a case in memory (the tests perturb cases without writing them).
std::vector<OutputCheck> verify_outputs(const cases::Case& c, Device device);

}  // namespace m3::cmp
