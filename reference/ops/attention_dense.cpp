// Dense causal GQA attention (spec §2.3). For each query row t and KV group g the G = Hq/Hkv
// query heads of the group are scored against the visible keys as one GEMM,
//   S [G, n] = Q_tg [G, D] * K_g[0..n)^T,   n = q_pos[t] + 1,
// the softmax is taken row by row with an fp64 max and sum, and the unnormalized fp64 weights
// multiply V_g[0..n) [n, D] in fp64, chunk by chunk. Memory is two [G, N] scratch blocks, linear in N; no T x N or N x N matrix is ever formed, so a decode query at N = 2^20 fits.
#include "reference/ops/attention_dense.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

namespace m3::ref {
namespace {

template <class T>
void check_args(const Mat<T>& q, const Mat<T>& k, const Mat<T>& v,
                std::span<const std::int64_t> q_pos, const AttnDims& dims) {
  const auto [Hq, Hkv, D] = dims;
  if (Hq <= 0 || Hkv <= 0 || D <= 0)
    throw std::invalid_argument(fmt::format(
        "attention_dense: dims Hq = {}, Hkv = {}, D = {}, expected all > 0", Hq, Hkv, D));
  if (Hq % Hkv != 0)
    throw std::invalid_argument(fmt::format(
        "attention_dense: Hq = {} is not a multiple of Hkv = {}, expected Hq % Hkv == 0", Hq, Hkv));
  const Eigen::Index q_cols = static_cast<Eigen::Index>(Hq) * D;
  const Eigen::Index kv_cols = static_cast<Eigen::Index>(Hkv) * D;
  if (q.cols() != q_cols)
    throw std::invalid_argument(fmt::format(
        "attention_dense: q has {} columns, expected Hq*D = {}*{} = {}", q.cols(), Hq, D, q_cols));
  if (k.cols() != kv_cols)
    throw std::invalid_argument(fmt::format(
        "attention_dense: k has {} columns, expected Hkv*D = {}*{} = {}", k.cols(), Hkv, D,
        kv_cols));
  if (v.cols() != kv_cols)
    throw std::invalid_argument(fmt::format(
        "attention_dense: v has {} columns, expected Hkv*D = {}*{} = {}", v.cols(), Hkv, D,
        kv_cols));
  if (k.rows() != v.rows())
    throw std::invalid_argument(fmt::format(
        "attention_dense: k has {} rows and v has {}, expected the same cache length N",
        k.rows(), v.rows()));
  if (q.rows() != static_cast<Eigen::Index>(q_pos.size()))
    throw std::invalid_argument(fmt::format(
        "attention_dense: q has {} rows, expected T = q_pos.size() = {}", q.rows(), q_pos.size()));
  for (std::size_t t = 0; t < q_pos.size(); ++t)
    if (q_pos[t] < 0 || q_pos[t] >= k.rows())
      throw std::out_of_range(fmt::format(
          "attention_dense: q_pos[{}] = {}, expected a cache position in [0, N) = [0, {})", t,
          q_pos[t], k.rows()));
}

// Keys per P.V step: a [len, D] slice of V widened to fp64 stays in L2 (4096 x 128 x 8 B = 4 MiB).
constexpr Eigen::Index kPvChunk = 4096;

template <class T>
void attend(const Mat<T>& q, const Mat<T>& k, const Mat<T>& v, std::span<const std::int64_t> q_pos,
            const AttnDims& dims, Mat<T>& out) {
  using MapMat = Eigen::Map<Mat<T>>;
  using CMapMat = Eigen::Map<const Mat<T>>;
  using StridedD = Eigen::Map<const MatD, 0, Eigen::OuterStride<>>;
  const int G = dims.Hq / dims.Hkv;
  const Eigen::Index D = dims.D;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::int64_t n_max = 0;
  for (std::int64_t p : q_pos) n_max = std::max(n_max, p + 1);
  const auto scratch_len = static_cast<std::size_t>(G) * static_cast<std::size_t>(n_max);
  std::vector<T> scores(scratch_len);   // [G, N] q.k in T
  std::vector<double> probs(scratch_len);  // [G, N] unnormalized softmax weights, fp64
  std::vector<double> inv_sum(G);       // [G]
  MatD acc(G, D);                       // [G, D] fp64 P.V accumulator

  for (Eigen::Index t = 0; t < q.rows(); ++t) {
    const Eigen::Index n = q_pos[t] + 1;  // keys 0..q_pos[t] are visible
    for (int g = 0; g < dims.Hkv; ++g) {
      const Eigen::Index c0 = static_cast<Eigen::Index>(g) * G * D;  // first column of group g in q
      CMapMat q_tg(q.data() + t * q.cols() + c0, G, D);                 // [G, D]
      MapMat s(scores.data(), G, n);                                    // [G, n]
      s.noalias() = q_tg * k.block(0, g * D, n, D).transpose();
      for (int h = 0; h < G; ++h) {
        const T* row = s.data() + h * n;  // [n]
        double* p = probs.data() + h * n;  // [n]
        // The max is exact in T, so Eigen's vectorized max equals the fp64 one; PropagateNaN makes
        // a NaN score poison the whole row instead of being skipped.
        const double m = static_cast<double>(s.row(h).template maxCoeff<Eigen::PropagateNaN>());
        double sum = 0.0;
        for (Eigen::Index j = 0; j < n; ++j) {
          p[j] = std::exp((static_cast<double>(row[j]) - m) * scale);
          sum += p[j];
        }
        inv_sum[h] = 1.0 / sum;  // sum >= 1: the max key contributes exp(0)
      }
      // P.V is a reduction over all n keys: fp64 (DESIGN §3), in chunks of V widened to fp64.
      acc.setZero();
      for (Eigen::Index j0 = 0; j0 < n; j0 += kPvChunk) {
        const Eigen::Index len = std::min(kPvChunk, n - j0);
        StridedD p(probs.data() + j0, G, len, Eigen::OuterStride<>(n));  // [G, len]
        acc.noalias() += p * v.block(j0, g * D, len, D).template cast<double>();
      }
      MapMat o(out.data() + t * out.cols() + c0, G, D);  // [G, D]
      for (int h = 0; h < G; ++h) o.row(h) = (acc.row(h) * inv_sum[h]).template cast<T>();
    }
  }
}

}  // namespace

template <class T>
void attention_dense(const Mat<T>& q, const Mat<T>& k, const Mat<T>& v,
                     std::span<const std::int64_t> q_pos, const AttnDims& dims, Mat<T>& out,
                     AttnCounter* counter) {
  check_args(q, k, v, q_pos, dims);
  // The output is written group by group while q, k and v are still read, so a caller passing one
  // of them as out gets the result through a separate buffer.
  const bool aliased = &out == &q || &out == &k || &out == &v;
  Mat<T> separate;
  Mat<T>& dst = aliased ? separate : out;
  dst.resize(q.rows(), q.cols());  // [T, Hq*D]
  attend(q, k, v, q_pos, dims, dst);
  if (aliased) out.swap(separate);
  if (counter) {
    // Exactly the MACs executed: every head dots D values with each of the q_pos[t] + 1 visible
    // keys, and weighs as many V rows of D values. The cost model compares these counts exactly.
    const std::uint64_t per_key = static_cast<std::uint64_t>(dims.Hq) * dims.D;
    for (std::int64_t p : q_pos) {
      counter->qk_macs += per_key * static_cast<std::uint64_t>(p + 1);
      counter->pv_macs += per_key * static_cast<std::uint64_t>(p + 1);
    }
  }
}

template void attention_dense<float>(const Mat<float>&, const Mat<float>&, const Mat<float>&,
                                     std::span<const std::int64_t>, const AttnDims&, Mat<float>&,
                                     AttnCounter*);
template void attention_dense<double>(const Mat<double>&, const Mat<double>&, const Mat<double>&,
                                      std::span<const std::int64_t>, const AttnDims&, Mat<double>&,
                                      AttnCounter*);

}  // namespace m3::ref
