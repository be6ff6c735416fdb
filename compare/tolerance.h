// The one table of agreement thresholds (DESIGN §4). Every check of m3-harness that says "agree"
// (`m3h verify` on op cases today, the GPU comparison later) asks tolerance(op, precision) and
// nothing else, so a threshold changes in exactly one place, next to the reason it has.
//
// A float output agrees when, over the elements that are finite on both sides,
//   rel-L2 = ||a - b|| / ||b|| <= rel_l2                       (global rule)
//   |a - b| <= atol + rtol * |b|  for every element           (elementwise rule)
// with b the reference, and the non-finite elements sit at the same positions on both sides.
// The case generators keep tensors O(1) (weights scaled by 1/sqrt(fan-in)), which is what makes an
// absolute atol meaningful. Index outputs match exactly, except that ids chosen differently where
// the deciding scores are within tie_rtol * (the row's largest |score|) count as a near-tie.
//
// These are starting points (style guide §8 rule 14); calibrate them on GPU data and change a
// number only together with its comment.
#pragma once

#include "reference/tensor.h"

#include <algorithm>
#include <string_view>

namespace m3::cmp {

struct Tolerance {
  double rel_l2 = 0;    // global gate on ||a - b|| / ||b||
  double atol = 0;      // elementwise: |a - b| <= atol + rtol * |b|
  double rtol = 0;
  double tie_rtol = 0;  // index outputs: scores closer than tie_rtol * row scale are a near-tie
  // Attention in bf16 additionally: err(a vs fp64) <= kAttnErrFactor * err(b vs fp64) + kAttnFloor,
  // err = rel-L2 against the fp64 reference run on the same (bf16-valued) inputs.
  bool attention_rule = false;
};

// bf16 keeps 8 significant bits: the spacing of bf16 values in [1, 2) is 2^-7, so 2^-7 is the
// relative size of one bf16 ulp (at worst; 2^-8 just below a power of two).
inline constexpr double kBf16Ulp = 0x1p-7;

// FP64 ground truth vs another fp64 evaluation: only the summation order differs. fp64 roundoff
// is 1.1e-16; sums of up to ~10^4 O(1) terms stay far below 1e-12 (the reference tests' bound).
inline constexpr Tolerance kFp64{
    .rel_l2 = 1e-12,
    .atol = 1e-12,   // near-zero elements from cancelling O(1) terms: 10^4 * 1e-16
    .rtol = 1e-10,   // per element, 100x the global bound: a single element may be ill-conditioned
    .tie_rtol = 1e-12,
};

// FP32 paths (fp32 storage and arithmetic, any summation order): fp32 roundoff is 6e-8; 1e-5
// leaves room for reductions of a few thousand terms (the reference tests' bound, and llm.c's
// 1e-5..1e-6 for fp32 kernels).
inline constexpr Tolerance kFp32{
    .rel_l2 = 1e-5,
    .atol = 1e-5,    // O(1) outputs: an element that cancels to ~0 keeps the absolute error of its terms
    .rtol = 1e-4,    // ~840 fp32 ulps: one element may sum thousands of terms in another order
    .tie_rtol = 1e-5,  // an fp32 kernel's scores may differ from ours by the global fp32 bound
};

// BF16 paths (bf16 inputs, fp32 arithmetic, bf16 outputs; DESIGN §4 "rel-L2 <= 1e-2"): rounding an
// O(1) tensor to bf16 alone costs rel-L2 ~ 2^-8/sqrt(3) = 2.3e-3; 1e-2 leaves 4x that for the
// intermediate roundings a kernel may add (P in attention, gate/up in the MLP).
inline constexpr Tolerance kBf16{
    .rel_l2 = 1e-2,
    .atol = kBf16Ulp,      // one bf16 ulp at magnitude 1: an O(1) intermediate rounded to bf16
                           // leaves this much absolute error in an output that cancels to ~0
    .rtol = 2 * kBf16Ulp,  // two ulps: both sides rounding the same value to adjacent bf16
                           // neighbours, plus one ulp of intermediate rounding (FlashMLA: 3/128)
    .tie_rtol = 2 * kBf16Ulp,  // scores from bf16 operands can differ by the same two ulps
};

// SwiGLU MLPs (swiglu_oai with mlp = 1, moe_experts) in bf16: their intermediates are far from O(1)
// (gate and up reach the clamp at 7, act up to (7 + 1) * 7 = 56) and each is stored in bf16, a
// relative error of 2^-8 of its own size; the down projection turns those into an absolute error
// of ~2^-8 of the row's scale in every element of the output, with heavier tails than a Gaussian
// (SwiGLU amplifies some gate roundings), which the O(1) atol above cannot absorb where an output
// element cancels. The reference in bf16 rounds at the GPU's points (ref::Rounding::BF16), but
// any evaluation that does not (the fp64 truth rounded to bf16, Fp64EvalTest) or whose fp32 sums
// land on the other side of one intermediate's rounding differs by that much: measured 0.0117
// (fp64 truth vs the bf16 emulation, moe_experts T=9 H=64 I=32) and 0.0159 (an H200 vs the
// emulation without intermediate rounding). Four ulps at magnitude 1 (0.031) keep a factor 2 over
// both, while a wrong row, weight or expert is O(1) on many elements and fails rel-L2 as well.
inline constexpr double kMlpAtol = 4 * kBf16Ulp;
// ... and the part of that error no constant holds: an output element that sums a large
// intermediate (act ~ 10-56) through its down weights moves by up to the bf16 unit roundoff
// (2^-8) of each intermediate's contribution, in each of the two evaluations compared. The op's
// case computes that contribution, sum over the intermediates v of |d out / d v| |v| to first order
// (OpCase::rounding_scale), and the bf16 tier allows kBf16RoundingFactor times it per element on top
// of atol + rtol|b|: 2 x 2^-8, one unit roundoff for each side's roundings. Why: with the constant
// atol alone, the fp64 truth rounded to bf16 failed the tier on 5 of 1500 random moe_experts cases
// (one element each, 0.032-0.047 off against 0.032-0.044 allowed: intermediates of ~10 rounded),
// CI's flake of 2026-11-29 (M3_TEST_SEED=11766187861863083242). A wrong expert, weight or row is
// O(1) on many elements and still fails rel-L2 and the elementwise bound.
inline constexpr double kBf16RoundingFactor = 2 * 0x1p-8;

inline constexpr bool is_mlp_op(std::string_view op) { return op == "swiglu_oai" || op == "moe_experts"; }

// The attention rule of flash-attention's tests (DESIGN §4, style guide rule 14): a kernel may be
// twice as far from the fp64 truth as our bf16-emulating reference is; the floor covers the case
// where the emulation happens to be nearly exact (tiny heads), so the bound is never below the
// output's own bf16 rounding: 2^-8 is the unit roundoff of bf16.
inline constexpr double kAttnErrFactor = 2.0;
inline constexpr double kAttnFloor = 0x1p-8;

// Ops whose bf16 outputs get the attention rule: those that end in a long softmax-weighted sum,
// where the error of an emulation is a meaningful yardstick.
inline constexpr bool is_attention_op(std::string_view op) {
  return op == "attention_dense" || op == "msa_attention";
}

// The vision tower on the GPU (gpu/vision.h), per traced stage (vis.patch_embed, vis.blk.{l}.out,
// vis.proj, vis.merged; compare/vision_compare.h), gated by both layers of DESIGN §4, with
// err_ref = rel-L2 of the bf16-emulating tower (m3::vision_forward, Precision::BF16: a bf16
// rounding at every point where the GPU stores bf16, fp32 arithmetic) against the fp64 tower:
// 1. emulation: rel-L2(gpu, emulation) <= max(kVisionTower.rel_l2, kAttnErrFactor * err_ref)
//    (vision_emulation_gate; the elementwise atol / rtol of the bf16 tier measured and reported).
//    Two evaluations that round at the same points do not stay bit-equal: wherever fp32 roundoff
//    of another summation order (cuBLAS vs Eigen, the flash kernel's online softmax, P rounded
//    against the running max) moves a value across a bf16 rounding boundary, that one-ulp flip
//    nudges every value computed from it, which flips more roundings downstream, and so on: the
//    activations' roundings decorrelate with depth (the weights' and pixels' stay shared). Two
//    correct evaluations whose roundings are independent, each err_ref from fp64, are
//    sqrt(2) * err_ref apart; the policy's factor 2 keeps a margin of sqrt(2) over that. Measured
//    on the CPU (the emulation vs itself with fp64 sums, or on pixels nudged by 2^-14, at the
//    sizes of tests/test_vision.cpp): at 2 blocks up to 6.3e-3 apart (merged) where err_ref is
//    7.4e-3; at 32 blocks 1.1e-2 apart where err_ref is 1.5e-2 - so a fixed 1e-2 would fail a
//    correct M3 tower (32 blocks), while 2 * err_ref holds 1.5-2.3x over the measure at every
//    depth. kBf16's 1e-2 stays the floor: shallow stages (patch_embed, err_ref 2.8e-3) get the
//    policy's bf16 gate. A missing bias moves its stage by ~2e-2 (tests/test_vision.cpp), a wrong
//    weight, position or window order by O(1).
// 2. 2x-truth: rel-L2(gpu, fp64) <= kAttnErrFactor * err_ref + kAttnFloor: err_ref is the size a
//    correct bf16 tower has (the emulation vs fp64, tiny / small / M3 geometry at 2 blocks:
//    2.8e-3 patch_embed, 4.1-5.2e-3 blocks, 6.2-6.7e-3 proj, 7.0-7.7e-3 merged, the errors an H200
//    measured against fp64 before: 2.6-8.2e-3), and the floor keeps the bound above one rounding
//    of the output itself.
// 3. the block's increment: for vis.blk.{l}.out, l >= 1, layers 1 and 2 again (the same gate and
//    bound functions) on x_l - x_{l-1} of each tower, with err_ref the emulation's error on that
//    increment. The accumulated stream cannot see one block's defect at depth: a block adds ~0.09
//    of the stream's norm, so a dropped bias (0.02 per element) moves its stage by ~2e-2 of the
//    stream, under the deep stages' gates. Measured with the CPU stand-in at M3 geometry and depth
//    (head_dim 80, 78 rotated dims, mlp 4 Hv, patch 14, 32 blocks; Hv 160, 112x112 pixels,
//    tests/test_vision.cpp VisionBf16.M3DepthDefectsFailTheBlockIncrement): out_b or fc2_b dropped
//    in block 16 or 31 is 0.70-0.93 of the stream gate and of the 2x-truth bound at every stage -
//    it passed layers 1 and 2 - while its increment is 0.18-0.23 from the emulation's, 6.0-7.9x
//    the increment's err_ref (~2.9e-2); LN1's weight dropped: 2.8-3.5x; two heads swapped: 20-27x.
//    A correct stand-in's increment is 0.51-0.83x its err_ref on every block (Hv 160 and 320,
//    2-32 blocks, 9 seeds), 0.90x at Hv 640 (wider sums flip more roundings): the increment's err_ref is dominated by the bf16 rounding of x_l itself
//    (2^-9 of the stream, ~1e-2 of an increment) and two towers whose roundings decorrelate are
//    sqrt(2) err_ref apart at most, so the factor 2 keeps the margin of layer 1. Downstream blocks
//    of a defect stay below the gate (1.5-1.8x: their inputs moved), so the failure points at the
//    block. LN2's weight dropped is caught here too (1.4-1.7x the increment's gate, 7 seeds).
//    Block 0's increment is not checked: the stream before it (after pre_layrnorm) is not traced,
//    and at block 0 the stream's own gate is the floor 1e-2 (a dropped bias there fails it).
// 4. column means (vision_compare.h VisionMeanCheck): layers 1 and 2 again on the mean over rows
//    (patches) of each column, for every stage and every increment: gate max(floor, 2 err_ref),
//    bound 2 err_ref + floor, err_ref the emulation's error on the mean vector (vision_mean_gate,
//    vision_mean_floor). Why: a dropped bias is coherent, it moves every row by about the same
//    vector, while two correct towers' rounding differences are nearly independent across rows
//    (measured: ||mean of the difference|| * rows / ||difference|| is 0.9-1.3 for correct stand-ins,
//    sqrt(rows) = 8 for a pure shift), so the mean keeps the defect and averages the noise by
//    1/sqrt(rows); a defect's ratio grows as sqrt(patches) (doubled at 256 patches). The factor 2
//    is layer 1's: two towers with independent roundings have means sqrt(2) err_ref apart. The
//    emulation's own error on the mean is incoherent too (the same ratio 0.9-1.6), so err_ref of the
//    mean is ~err_ref / sqrt(rows) of the stream's scale, 4e-3..8e-3 of the mean vector; kBf16's
//    1e-2 floor would be the gate there, hence a floor of its own (vision_mean_floor, 0.04-0.85x
//    2 err_ref measured, the largest at vis.patch_embed). Measured on the M3 stand-in (Hv 160,
//    32 blocks, 8 x 8 patches, 8 seeds; value / gate of the stricter layer, > 1 fails): correct
//    stand-ins (fp64 sums, or pixels nudged by 2^-14) at most 0.58 on any stage or increment, and
//    at most 0.58 too with Hv 320 / 640 at 32 blocks, 4 and 16 patches, M3's width (1280) at 2
//    blocks, tiny and small at the test sizes (2-8 seeds each): a margin of 1.7. Newly caught, on
//    the block's increment: LN2's bias dropped 1.6-1.8 (block 16) and 1.2-1.5 (block 31), v bias
//    2.3-3.6, LN1's bias 2.9-3.5; on the stage (non-residual): proj1_b 2.6-3.2, proj2_b 4.7-6.1,
//    merge1_b 2.5-3.2, merge2_b 4.9-5.9 (layers 1 and 2 had them at 0.54-1.0). Also: out_b / fc2_b
//    17-27, LN1 / LN2 weight 2.5-4.6, fc1_b 1.4-1.8.
//    Still not caught (measured): a dropped q bias (0.6-1.3: it only moves attention scores, whose
//    effect is not a shift; 1.5-2.3 at 256 patches), a dropped k bias (0.4-0.5: a key bias adds
//    q.b to all of a query's scores alike, which the softmax cancels up to RoPE's rotation of b),
//    and LN2's bias in the last blocks at small images is caught with 1.2x margin only. Anything
//    rows share that is not in the stream's traces (a defect confined to one sublayer's internals
//    that leaves its output's mean and rel-L2 within rounding) stays below every layer here.
// Both, not either as in the text model (model_compare.h): the text model's engines take discrete
// decisions (MSA selections, MoE experts) whose near-tie flips move whole rows deep in the model,
// so one layer may legitimately miss; the tower has none, every stage is a continuous function of
// the same pixels and weights in every engine, and a correct GPU tower meets both.
// Replaces per-stage gates against fp64 alone (1e-2 / 1.5e-2 / 2.5e-2, 3x the H200's errors, to be
// recalibrated for 32 blocks): the emulation's error is the yardstick that follows each stage's
// depth, whatever the tower.
inline constexpr Tolerance kVisionTower = kBf16;

inline double vision_emulation_gate(double err_ref) {
  return std::max(kVisionTower.rel_l2, kAttnErrFactor * err_ref);
}

// Layer 4's floor, relative to ||mean(truth)||: kAttnFloor (one bf16 rounding of every element)
// carried to a mean over `rows` rows whose roundings are independent, which has the norm
// kAttnFloor * ||truth|| / rows. Not kBf16's 1e-2 nor kAttnFloor itself: those bound a whole tensor,
// and the mean vectors' own err_ref is 4e-3..8e-3 (measured, M3 stand-in), so either would be the
// gate and let a dropped bias through. This floor is 0.04-0.85x 2 * err_ref of the means measured.
inline double vision_mean_floor(double rows, double truth_norm, double truth_mean_norm) {
  return kAttnFloor * truth_norm / (rows * truth_mean_norm);
}
inline double vision_mean_gate(double err_ref, double floor) { return std::max(floor, kAttnErrFactor * err_ref); }

// The thresholds for one output of `op` in precision `p`: the precision the output is stored in
// (fp32 outputs of a bf16 case, e.g. block scores and router outputs, use the fp32 tier).
inline Tolerance tolerance(std::string_view op, Precision p) {
  switch (p) {
    case Precision::FP64: return kFp64;
    case Precision::FP32: return kFp32;
    case Precision::BF16: {
      Tolerance t = kBf16;
      t.attention_rule = is_attention_op(op);
      if (is_mlp_op(op)) t.atol = kMlpAtol;
      return t;
    }
  }
  return kFp32;
}

}  // namespace m3::cmp
