// MoE router (spec §4): sigmoid scores of x W_gate^T, top-K_e choice on the bias-corrected score
// (ties to the lower expert id), weights from the uncorrected scores. The logits are one GEMM in T;
// each sigmoid is evaluated in double and stored as T, the biased score is the sum in T (the
// GPU path's fp32 add), and the renormalizing sum is in double.
#include "reference/ops/moe_router.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

namespace m3::ref {

template <class T>
void moe_router(const Mat<T>& x, const Mat<T>& w_gate, const Vec<T>& bias, int top_k,
                bool renormalize, Mat<T>& logits, MatI& experts, Mat<T>& weights) {
  const Eigen::Index Tn = x.rows(), H = x.cols(), E = w_gate.rows();
  if (w_gate.cols() != H)
    throw std::invalid_argument(fmt::format(
        "moe_router: w_gate has {} columns, expected H = {} (x's columns)", w_gate.cols(), H));
  if (bias.size() != E)
    throw std::invalid_argument(fmt::format(
        "moe_router: bias has {} entries, expected E = {} (w_gate's rows)", bias.size(), E));
  if (top_k < 1 || top_k > E)
    throw std::invalid_argument(
        fmt::format("moe_router: top_k is {}, expected 1 <= top_k <= E = {}", top_k, E));
  // int32 ids: an E beyond that range could not be stored in `experts`.
  if (E > std::numeric_limits<std::int32_t>::max())
    throw std::invalid_argument(
        fmt::format("moe_router: E = {} does not fit the int32 expert ids", E));

  logits.noalias() = x * w_gate.transpose();  // [T, E]
  experts.resize(Tn, top_k);                  // [T, K_e]
  weights.resize(Tn, top_k);                  // [T, K_e]

  std::vector<T> s(static_cast<std::size_t>(E));    // [E] sigmoid scores of one token
  std::vector<T> key(static_cast<std::size_t>(E));  // [E] biased scores: the selection key
  std::vector<std::int32_t> ids(static_cast<std::size_t>(E));  // [E] expert ids, sorted in place
  // Biased score descending, then id ascending: a strict total order, so the choice is unique
  // and reproducible whatever the sort's implementation.
  auto before = [&key](std::int32_t a, std::int32_t b) {
    return key[a] > key[b] || (key[a] == key[b] && a < b);
  };
  for (Eigen::Index t = 0; t < Tn; ++t) {
    for (Eigen::Index e = 0; e < E; ++e) {
      const double z = static_cast<double>(logits(t, e));
      // exp(-z) overflows to +inf for z < ~-709 and the quotient is then exactly 0: no NaN.
      s[e] = static_cast<T>(1.0 / (1.0 + std::exp(-z)));
      const T c = s[e] + bias[e];
      // NaN would break the strict weak order the sort needs; it ranks last, like -inf.
      key[e] = std::isnan(c) ? -std::numeric_limits<T>::infinity() : c;
    }
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + top_k, ids.end(), before);

    double sum = 0;  // sum of the chosen unbiased scores
    for (int j = 0; j < top_k; ++j) sum += static_cast<double>(s[ids[j]]);
    for (int j = 0; j < top_k; ++j) {
      experts(t, j) = ids[j];
      const double w = static_cast<double>(s[ids[j]]);
      weights(t, j) = static_cast<T>(renormalize ? w / sum : w);
    }
  }
}

template void moe_router<float>(const Mat<float>&, const Mat<float>&, const Vec<float>&, int, bool,
                                Mat<float>&, MatI&, Mat<float>&);
template void moe_router<double>(const Mat<double>&, const Mat<double>&, const Vec<double>&, int,
                                 bool, Mat<double>&, MatI&, Mat<double>&);

}  // namespace m3::ref
