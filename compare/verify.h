// Checking an op case file (DESIGN §4, §7): read and validate the case, run an implementation of
// its op on its inputs, compare with its stored outputs under the tolerance policy (tolerance.h).
//
// Roles: b, the reference side of every metric, is the implementation run now (the CPU
// reference, in the case's precision: bf16 cases in the bf16-emulating way); a is the file's
// /outputs: another engine's kernel dumped from PyTorch, or the reference's own outputs for cases
// written by `m3h case`. `m3h verify` (cmd_verify.cpp) prints what verify_case returns.
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
  std::string name;
  bool is_index = false;
  Precision tier = Precision::FP32;  // the tolerance tier (the output's storage precision)
  Tolerance tol;
  Dims dims;
  FloatMetrics f;      // float outputs
  IndexMetrics ix;     // index outputs
  std::string follows;     // the index output whose near-tie rows were skipped here ("" = none)
  bool attn_rule = false;  // the bf16 attention rule was applied:
  double err_file = 0;     //   rel-L2 of a vs the fp64 reference
  double err_ref = 0;      //   rel-L2 of b (bf16-emulating) vs the fp64 reference
  double attn_bound = 0;   //   kAttnErrFactor * err_ref + kAttnFloor
  std::vector<std::string> failures;  // why it disagrees; empty = agrees
  bool pass() const { return failures.empty(); }
  bool near_tie() const { return is_index && ix.rows_differ > 0 && ix.agree(); }
};

struct VerifyResult {
  std::string path;
  cases::Case c;  // as read (inputs and the file's outputs)
  std::vector<OutputCheck> outputs;
  bool pass() const;
};

// Throws cases::CaseError for a bad file (format, op, missing or misshapen tensor, NaN input), for
// inputs the reference rejects, and for Device::GPU while the GPU implementation is not built.
VerifyResult verify_case(const std::string& path, Device device);

// The same on a case in memory (the tests perturb cases without writing them).
std::vector<OutputCheck> verify_outputs(const cases::Case& c, Device device);

}  // namespace m3::cmp
