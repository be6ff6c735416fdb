// MSA index branch scoring (spec §3.2): block-max of the plain dot products qI_i(t) . kI(j) over
// the causally visible keys of every visible block. One query row at a time, keys in chunks, so
// memory stays bounded whatever the context (a decode query at N = 2^20 streams the index-K cache
// once).
#include "reference/ops/msa_index.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>

namespace m3::ref {

namespace {

// Keys scored per GEMM. 4096 keys x Di 128 x 4 B = 2 MiB of index-K: large enough that the GEMM
// runs at full speed, small enough that the [chunk, Hi] score tile stays in cache. Rounded down to
// whole blocks (at least one block) so that no block straddles two chunks.
constexpr std::int64_t kKeyChunk = 4096;

void check_args(Eigen::Index t_rows, Eigen::Index q_cols, Eigen::Index n_keys, Eigen::Index k_cols,
                std::span<const std::int64_t> q_pos, const MsaDims& dims) {
  if (dims.Hi <= 0 || dims.Di <= 0 || dims.BLK <= 0)
    throw std::invalid_argument(fmt::format(
        "msa_index: expected Hi, Di, BLK > 0, got Hi = {}, Di = {}, BLK = {}", dims.Hi, dims.Di,
        dims.BLK));
  if (q_cols != static_cast<Eigen::Index>(dims.Hi) * dims.Di)
    throw std::invalid_argument(fmt::format(
        "msa_index: idx_q has {} columns, expected Hi*Di = {}*{} = {}", q_cols, dims.Hi, dims.Di,
        static_cast<Eigen::Index>(dims.Hi) * dims.Di));
  if (k_cols != dims.Di)
    throw std::invalid_argument(fmt::format(
        "msa_index: idx_k has {} columns, expected Di = {}", k_cols, dims.Di));
  if (static_cast<Eigen::Index>(q_pos.size()) != t_rows)
    throw std::invalid_argument(fmt::format(
        "msa_index: q_pos has {} entries, expected one per idx_q row = {}", q_pos.size(), t_rows));
  for (std::size_t t = 0; t < q_pos.size(); ++t)
    if (q_pos[t] < 0 || q_pos[t] >= n_keys)
      throw std::out_of_range(fmt::format(
          "msa_index: q_pos[{}] = {}, expected in [0, N) with N = {} idx_k rows", t, q_pos[t],
          n_keys));
}

}  // namespace

template <class T>
void msa_index(const Mat<T>& idx_q, const Mat<T>& idx_k, std::span<const std::int64_t> q_pos,
               const MsaDims& dims, Mat<T>& scores, AttnCounter* counter) {
  check_args(idx_q.rows(), idx_q.cols(), idx_k.rows(), idx_k.cols(), q_pos, dims);
  const Eigen::Index n_tok = idx_q.rows();
  const int Hi = dims.Hi, Di = dims.Di;
  const std::int64_t blk = dims.BLK;
  if (n_tok == 0) {  // no queries: no visible block, NB = 0
    scores.resize(0, 0);
    return;
  }
  const std::int64_t p_max = *std::max_element(q_pos.begin(), q_pos.end());
  const Eigen::Index nb = static_cast<Eigen::Index>(p_max / blk + 1);

  // A caller passing idx_q or idx_k as scores gets the result through a separate buffer, as the
  // resize would otherwise destroy inputs still being read.
  const bool aliased = &scores == &idx_q || &scores == &idx_k;
  Mat<T> separate;
  Mat<T>& dst = aliased ? separate : scores;
  // Blocks past a query's own block stay -inf: they are not visible to it.
  dst.resize(static_cast<Eigen::Index>(Hi) * n_tok, nb);  // [Hi*T, NB]
  dst.setConstant(-std::numeric_limits<T>::infinity());

  const std::int64_t chunk = std::max<std::int64_t>(1, kKeyChunk / blk) * blk;
  // Column-major so that each head's scores over the chunk are one contiguous column.
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> s_tile;  // [chunk, Hi]
  std::uint64_t macs = 0;

  for (Eigen::Index t = 0; t < n_tok; ++t) {
    const std::int64_t p = q_pos[static_cast<std::size_t>(t)];
    const Eigen::Map<const Mat<T>> q_t(idx_q.row(t).data(), Hi, Di);  // [Hi, Di]
    for (std::int64_t c0 = 0; c0 <= p; c0 += chunk) {
      const Eigen::Index len = static_cast<Eigen::Index>(std::min(chunk, p + 1 - c0));
      s_tile.resize(len, Hi);
      s_tile.noalias() = idx_k.middleRows(c0, len) * q_t.transpose();  // [len, Hi]
      // The chunk starts on a block edge; its last block may be partial (keys j <= p only).
      // PropagateNaN: a NaN dot product (a bug upstream) shows in the block score instead of being
      // silently skipped; msa_select then ranks it as -inf.
      for (Eigen::Index off = 0; off < len; off += blk) {
        const Eigen::Index b = static_cast<Eigen::Index>((c0 + off) / blk);
        const Eigen::Index seg = std::min<Eigen::Index>(blk, len - off);
        for (int i = 0; i < Hi; ++i)
          dst(i * n_tok + t, b) =
              s_tile.col(i).segment(off, seg).template maxCoeff<Eigen::PropagateNaN>();
      }
    }
    macs += static_cast<std::uint64_t>(Hi) * static_cast<std::uint64_t>(Di) *
            static_cast<std::uint64_t>(p + 1);
  }
  if (aliased) scores.swap(separate);
  if (counter) counter->index_macs += macs;
}

template void msa_index<float>(const Mat<float>&, const Mat<float>&, std::span<const std::int64_t>,
                               const MsaDims&, Mat<float>&, AttnCounter*);
template void msa_index<double>(const Mat<double>&, const Mat<double>&,
                                std::span<const std::int64_t>, const MsaDims&, Mat<double>&,
                                AttnCounter*);

}  // namespace m3::ref
