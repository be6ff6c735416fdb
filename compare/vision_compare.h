// The vision tower's agreement (DESIGN §4), behind `m3h compare --vision-check` and the GPU tower
// tests: the engine under test (the GPU tower, gpu/vision.h) against the bf16-emulating reference
// tower (m3::vision_forward in Precision::BF16, the gate) and the fp64 tower (the truth), traced
// stage by stage (vis.patch_embed, vis.blk.{l}.out, vis.proj, vis.merged). A stage passes when
// both layers of the policy hold (compare/tolerance.h, "The vision tower"):
//   1. emulation:  rel-L2(test, bf16 ref) <= max(kVisionTower.rel_l2, kAttnErrFactor * err_ref)
//   2. 2x-truth:   err(test vs fp64) <= kAttnErrFactor * err_ref + kAttnFloor
// with err_ref = rel-L2(bf16 ref, fp64) (why layer 1 widens with it: tolerance.h)
// and every element is finite where the reference's is (a NaN fails at once), and the reference
// is not all zero (a vacuous check). A residual block vis.blk.{l}.out (l >= 1) passes only when
// both layers also hold for its increment, vis.blk.{l}.out - vis.blk.{l-1}.out in each of the
// three towers (the block's own contribution, with err_ref the emulation's error on it): at M3's
// depth the accumulated stream's gate is ~3e-2, wide enough for a block that drops a bias or a
// LayerNorm weight, which moves its increment by 3-7x the increment's own gate (tolerance.h). Every
// stage and every increment also passes both layers on its column means over rows (layer 4,
// VisionMeanCheck): a dropped bias shifts every row alike, which the rel-L2 of the whole tensor
// dilutes among the rows' rounding noise and the mean over rows does not. The elementwise rule
// |a - b| <= atol + rtol |b| is measured and reported (pass %), as in the text model's table, not gated.
//
//   VisionComparison c = compare_vision(gpu_trace, bf16_trace, fp64_trace);
//   if (!c.pass()) for (const auto& s : c.stages) for (const auto& f : s.failures) ...
#pragma once

#include "compare/metrics.h"
#include "reference/vision.h"

#include <string>
#include <vector>

namespace m3::cmp {

// Both layers on the column means over rows (the mean over patches of each feature) of a stage or
// of a block's increment: a dropped bias or LayerNorm bias moves every row by about the same vector,
// while the rounding differences of two correct towers are nearly independent across rows, so the
// mean keeps the defect and averages the noise (compare/tolerance.h, layer 4). rel-L2s of the
// [cols] mean vectors; the floor is the norm a mean of independent per-row roundings of 2^-8 has.
struct VisionMeanCheck {
  bool checked = false;
  double vs_ref = 0;     // rel-L2 mean(test) vs mean(bf16 ref)
  double gate = 0;       // max(floor, kAttnErrFactor * err_ref)
  double err_test = 0;   // rel-L2 mean(test) vs mean(fp64)
  double err_ref = 0;    // rel-L2 mean(bf16 ref) vs mean(fp64)
  double bound = 0;      // kAttnErrFactor * err_ref + floor
  double floor = 0;      // vision_mean_floor: kAttnFloor ||fp64|| / (rows ||mean(fp64)||)
  bool emulation_ok = true;
  bool truth_ok = true;
  bool ok() const { return emulation_ok && truth_ok; }
};

struct VisionStageCheck {
  std::string name;        // the traced name, e.g. vis.blk.1.out
  FloatMetrics vs_ref;     // test vs the bf16-emulating reference (elementwise rule at kVisionTower)
  double gate = 0;         // layer 1's bound on vs_ref.rel_l2: vision_emulation_gate(err_ref)
  double err_test = 0;     // rel-L2 test vs fp64
  double err_ref = 0;      // rel-L2 bf16 reference vs fp64
  double bound = 0;        // layer 2's bound on err_test: kAttnErrFactor * err_ref + kAttnFloor
  bool emulation_ok = false;  // layer 1 held
  bool truth_ok = false;      // layer 2 held
  // Residual blocks l >= 1: the same two layers on the block's increment over `increment_of`
  // (vis.blk.{l-1}.out); empty when the stage has none or the previous stage is not comparable.
  std::string increment_of;
  double inc_vs_ref = 0;      // rel-L2 of the test's increment vs the bf16 reference's
  double inc_gate = 0;        // vision_emulation_gate(inc_err_ref)
  double inc_err_test = 0;    // rel-L2 test increment vs fp64 increment
  double inc_err_ref = 0;     // rel-L2 bf16 reference increment vs fp64 increment
  double inc_bound = 0;       // kAttnErrFactor * inc_err_ref + kAttnFloor
  bool increment_ok = true;   // both layers held on the increment (true when not checked)
  // Layer 4 on the stage and on its increment: the column means over rows (vision_column_means).
  VisionMeanCheck mean;
  VisionMeanCheck inc_mean;   // checked only where the increment is
  std::vector<std::string> failures;  // one line each, empty = pass
  bool pass() const { return failures.empty(); }
};

struct VisionComparison {
  std::vector<VisionStageCheck> stages;  // the reference's trace order, then the extra ones
  bool pass() const;                     // at least one stage, and every stage passes
};

// One stage: test, ref (bf16 emulation) and truth (fp64) of the same shape [rows, cols]
// (std::invalid_argument otherwise, naming the three shapes).
VisionStageCheck check_vision_stage(const std::string& name, const MatD& test, const MatD& ref, const MatD& truth);

// The increment check of a residual block (fills the inc_* fields of s, appends its failures):
// test/ref/truth the block's output, *_prev the previous block's, all of one shape
// (std::invalid_argument otherwise).
void check_vision_increment(VisionStageCheck& s, const std::string& prev_name, const MatD& test, const MatD& ref,
                            const MatD& truth, const MatD& test_prev, const MatD& ref_prev, const MatD& truth_prev);

// Layer 4 on [rows, cols] tensors of one shape (the caller checks): the column means of test, ref
// (the bf16 emulation) and truth (fp64), both layers; `what` names the tensor in failure lines,
// appended to `failures`.
VisionMeanCheck check_vision_column_means(const std::string& what, const MatD& test, const MatD& ref, const MatD& truth,
                                          std::vector<std::string>& failures);

// Every stage the bf16 reference traced, looked up by name in the other two traces; a stage that
// test or truth lacks, or has in another shape, is a failure of that stage (not an exception), and
// so is a stage that test or truth traces but the reference does not, or a name a trace holds
// twice (appended after the reference's stages, one failing check each).
VisionComparison compare_vision(const VisionTrace& test, const VisionTrace& ref, const VisionTrace& truth);

}  // namespace m3::cmp
