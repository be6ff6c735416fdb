// MoE experts + shared expert (spec §4): y = routed_scale * sum_{e chosen} w_e Expert_e(x) +
// Shared(x). The (token, slot) pairs are grouped by expert (a counting sort), so each expert runs
// one SwiGLU-OAI MLP over the rows routed to it: gather rows, run the MLP's GEMMs, scatter-add the
// weighted rows. Experts are visited in id order, so each token's contributions are summed in
// ascending expert id whatever the order of its slots: the result does not depend on that order.
#include "reference/ops/moe_experts.h"

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace m3::ref {

namespace {

// Checks one MLP's weights against the hidden size H; `what` names it in the message.
template <class T>
void check_mlp_shapes(const MlpWeights<T>& w, Eigen::Index H, const std::string& what) {
  const Eigen::Index I = w.gate.rows();
  if (w.gate.cols() != H)
    throw std::invalid_argument(
        fmt::format("moe_experts: {} gate is {}x{}, expected [I, H] with H = {} (x's columns)",
                    what, w.gate.rows(), w.gate.cols(), H));
  if (w.up.rows() != I || w.up.cols() != H)
    throw std::invalid_argument(fmt::format("moe_experts: {} up is {}x{}, expected [I, H] = {}x{}",
                                            what, w.up.rows(), w.up.cols(), I, H));
  if (w.down.rows() != H || w.down.cols() != I)
    throw std::invalid_argument(
        fmt::format("moe_experts: {} down is {}x{}, expected [H, I] = {}x{}", what, w.down.rows(),
                    w.down.cols(), H, I));
}

}  // namespace

template <class T>
void moe_experts(const Mat<T>& x, const MatI& experts, const Mat<T>& weights,
                 const std::vector<MlpWeights<T>>& experts_w, const MlpWeights<T>& shared,
                 double routed_scale, const SwigluParams& p, Mat<T>& y, Rounding r) {
  const Eigen::Index Tn = x.rows(), H = x.cols(), K = experts.cols();
  const auto E = static_cast<Eigen::Index>(experts_w.size());
  if (experts.rows() != Tn)
    throw std::invalid_argument(fmt::format(
        "moe_experts: experts has {} rows, expected T = {} (x's rows)", experts.rows(), Tn));
  if (weights.rows() != Tn || weights.cols() != K)
    throw std::invalid_argument(
        fmt::format("moe_experts: weights is {}x{}, expected [T, K_e] = {}x{} (experts' shape)",
                    weights.rows(), weights.cols(), Tn, K));
  for (Eigen::Index t = 0; t < Tn; ++t)
    for (Eigen::Index j = 0; j < K; ++j)
      if (experts(t, j) < 0 || experts(t, j) >= E)
        throw std::out_of_range(
            fmt::format("moe_experts: experts({}, {}) (token {}, slot {}) is {}, expected an id in "
                        "[0, E) = [0, {})",
                        t, j, t, j, experts(t, j), E));
  for (Eigen::Index e = 0; e < E; ++e)
    check_mlp_shapes(experts_w[e], H, fmt::format("expert {}", e));
  const bool has_shared =
      shared.gate.size() != 0 || shared.up.size() != 0 || shared.down.size() != 0;
  if (has_shared) check_mlp_shapes(shared, H, "shared expert");

  // Counting sort of the T*K_e (token, slot) pairs by expert: pairs of expert e sit at
  // [start[e], start[e+1]) of `order`, in token order.
  std::vector<Eigen::Index> start(E + 1, 0);  // [E+1]
  for (Eigen::Index t = 0; t < Tn; ++t)
    for (Eigen::Index j = 0; j < K; ++j) ++start[experts(t, j) + 1];
  for (Eigen::Index e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<Eigen::Index> fill(start.begin(), start.end() - 1);     // [E] next free position
  std::vector<Eigen::Index> order(static_cast<std::size_t>(Tn * K));  // [T*K_e] flat t*K + j
  for (Eigen::Index t = 0; t < Tn; ++t)
    for (Eigen::Index j = 0; j < K; ++j) order[fill[experts(t, j)]++] = t * K + j;

  Mat<T> acc = Mat<T>::Zero(Tn, H);  // [T, H] sum_e w_e Expert_e(x), accumulated in T
  Mat<T> xe, ye;                     // [n_e, H] rows routed to expert e, and its output
  for (Eigen::Index e = 0; e < E; ++e) {
    const Eigen::Index n = start[e + 1] - start[e];
    if (n == 0) continue;  // an expert no token chose costs nothing
    xe.resize(n, H);
    for (Eigen::Index i = 0; i < n; ++i) xe.row(i) = x.row(order[start[e] + i] / K);
    mlp_swiglu(xe, experts_w[e].gate, experts_w[e].up, experts_w[e].down, p, ye, r);
    for (Eigen::Index i = 0; i < n; ++i) {
      const Eigen::Index flat = order[start[e] + i];
      acc.row(flat / K) += weights(flat / K, flat % K) * ye.row(i);
    }
  }
  acc *= static_cast<T>(routed_scale);  // the routed part only; the shared expert is unscaled
  if (has_shared) {
    Mat<T> sh;  // [T, H]
    mlp_swiglu(x, shared.gate, shared.up, shared.down, p, sh, r);
    acc += sh;
  }
  // Written last, so y may be x itself.
  y = std::move(acc);
}

template void moe_experts<float>(const Mat<float>&, const MatI&, const Mat<float>&,
                                 const std::vector<MlpWeights<float>>&, const MlpWeights<float>&,
                                 double, const SwigluParams&, Mat<float>&, Rounding);
template void moe_experts<double>(const Mat<double>&, const MatI&, const Mat<double>&,
                                  const std::vector<MlpWeights<double>>&, const MlpWeights<double>&,
                                  double, const SwigluParams&, Mat<double>&, Rounding);

}  // namespace m3::ref
