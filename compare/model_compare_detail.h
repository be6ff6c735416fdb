// Helpers of the model-level comparison shared by model_compare.cpp (whole-run traces) and
// model_sampled.cpp (sampled rows from the engine's own inputs). Not a public interface.
#pragma once

#include "compare/model_compare.h"
#include "reference/weights.h"

#include <string>
#include <vector>

namespace m3::cmp::detail {

std::vector<double> flat(const MatF& m);
std::vector<std::int64_t> flat_ids(const MatF& m);
MatF left(const MatF& m, Eigen::Index cols);  // m's leading min(cols, m.cols()) columns
// The failure line for a NaN in the engine where the reference has none, or for non-finite values
// at other places than the reference's; false (nothing added) when there is neither.
bool add_nonfinite_failure(const FloatMetrics& m, std::vector<std::string>& failures);
// Biased router scores sigmoid(logit) + bias [T, E]: what decides the experts.
MatD expert_scores(const MatF& logits, const Vec<float>& bias, bool use_bias);
// Top-K per row with the router's tie rule, in the router's arithmetic: [T, K] ids as floats.
MatF router_choice(const MatF& logits, const Vec<float>& bias, bool use_bias, int K);
// An index output against the reference's: exact, a near-tie on `scores`, or exactly `own`.
TensorCheck check_index(const std::string& name, const MatF& test, const MatF& ref, const MatD& scores,
                        double noise_rel, const MatF& own);
// ref::moe_experts on rows of x_in with the given experts and weights, in the bf16 emulation.
MatF moe_rows_with_choice(const ModelConfig& cfg, const LayerWeights<float>& L, const MatF& x_in, const MatF& experts,
                          const MatF& weights, const std::vector<Eigen::Index>& rows);

}  // namespace m3::cmp::detail
