// Helpers of the model-level comparison shared by model_compare.cpp (whole-run traces) and
// model_sampled.cpp (sampled rows from the engine's own inputs). Not a public interface.
#pragma once

#include "compare/model_compare.h"
#include "compare/tolerance.h"
#include "reference/weights.h"

#include <span>
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
// The population standard deviation of d (NaN where d holds fewer than 2 values, or a non-finite one).
double std_dev(const std::vector<double>& d);
// A differing argmax of logits row r (a_test on the test engine, a_ref on the reference) is a
// near-tie: the reference's two logits are within kNoiseMargin x the noise of a two-logit gap,
// measured from the engines' differences at the row's other tokens (model_compare.cpp).
bool argmax_near_tie(const MatD& test, const MatD& ref, Eigen::Index r, std::int32_t a_test, std::int32_t a_ref);
// An index output against the reference's: exact, a near-tie on `scores`, or exactly `own`.
TensorCheck check_index(const std::string& name, const MatF& test, const MatF& ref, const MatD& scores,
                        double noise_rel, const MatF& own);
// ref::moe_experts on rows of x_in with the given experts and weights, in the bf16 emulation.
MatF moe_rows_with_choice(const ModelConfig& cfg, const LayerWeights<float>& L, const MatF& x_in, const MatF& experts,
                          const MatF& weights, const std::vector<Eigen::Index>& rows);
// The attention output of `rows` (prompt positions) from the engine's own q [T, Hq*D], k, v
// [T, Hkv*D] and, on an MSA layer, its selection sel [Hi*T, K_blk] (head-major), through the
// reference op in fp32 with the output rounded to bf16 once: [rows.size(), Hq*D]. A selection the
// reference refuses (an id out of range, a duplicate) gives NaN rows, and its reason in *refused.
MatF attn_rows_with_selection(const ModelConfig& cfg, bool msa, const MatF& q, const MatF& k, const MatF& v,
                              const MatF* sel, std::int64_t T, const std::vector<Eigen::Index>& rows,
                              std::string* refused = nullptr);
// ref::msa_index of index-query rows idx_q [n, Hi*Di] at positions pos against the engine's whole
// index-K cache idx_k [T, Di], rounded to E4M3 first where the engine scored against an fp8 cache
// (its traced keys stay bf16): [Hi*n, NB] head-major, fp32 scores.
MatF index_scores_from(const ModelConfig& cfg, const MatF& idx_q, const MatF& idx_k, std::span<const std::int64_t> pos,
                       bool fp8_index_cache);
// The verdict of one op's tier (compare/tolerance.h) on rows that the engine and the reference
// computed from the same inputs (sampled rows, the own-inputs rule): same row count, non-finite
// values at the same places, rel-L2 <= tol.rel_l2, every element within tol.atol + tol.rtol |want|,
// a non-zero reference. `where` ends the rel-L2 line ("on the sampled rows"). m gets the metrics
// over the common leading columns; returns the failure lines (none: the rows agree).
std::vector<std::string> op_tier_failures(const MatF& got, const MatF& want, const Tolerance& tol, const std::string& where,
                                          FloatMetrics& m);

}  // namespace m3::cmp::detail
