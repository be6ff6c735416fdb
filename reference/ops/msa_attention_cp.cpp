// Context-parallel MSA (msa_attention_cp.h): the four steps of the header, one (query, group) at a
// time, each shard touching only its own rows of the caches.
#include "reference/ops/msa_attention_cp.h"

#include "reference/ops/msa_index.h"
#include "reference/ops/msa_select.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

namespace m3::ref {

namespace {

void check_args(Eigen::Index T, Eigen::Index N, std::span<const std::int64_t> shard_begin,
                const MsaDims& msa, const AttnDims& attn, Eigen::Index q_cols, Eigen::Index iq_cols,
                Eigen::Index k_cols, Eigen::Index v_rows, Eigen::Index v_cols, Eigen::Index ik_rows,
                Eigen::Index ik_cols, std::size_t n_pos) {
  auto bad = [](const std::string& what) { throw std::invalid_argument("msa_attention_cp: " + what); };
  if (attn.Hq <= 0 || attn.Hkv <= 0 || attn.D <= 0 || attn.Hq % attn.Hkv != 0)
    bad(fmt::format("expected Hq, Hkv, D > 0 and Hq % Hkv == 0, got Hq = {}, Hkv = {}, D = {}", attn.Hq,
                    attn.Hkv, attn.D));
  if (msa.Hi != attn.Hkv)
    bad(fmt::format("expected one index head per KV group (Hi == Hkv), got Hi = {}, Hkv = {}", msa.Hi, attn.Hkv));
  if (q_cols != Eigen::Index{attn.Hq} * attn.D)
    bad(fmt::format("q has {} columns, expected Hq*D = {}", q_cols, Eigen::Index{attn.Hq} * attn.D));
  if (iq_cols != Eigen::Index{msa.Hi} * msa.Di)
    bad(fmt::format("idx_q has {} columns, expected Hi*Di = {}", iq_cols, Eigen::Index{msa.Hi} * msa.Di));
  if (k_cols != Eigen::Index{attn.Hkv} * attn.D || v_cols != k_cols || v_rows != N)
    bad(fmt::format("k [{}, {}] and v [{}, {}], expected both [N, Hkv*D] = [{}, {}]", N, k_cols, v_rows, v_cols, N,
                    Eigen::Index{attn.Hkv} * attn.D));
  if (ik_rows != N || ik_cols != msa.Di)
    bad(fmt::format("idx_k [{}, {}], expected [N, Di] = [{}, {}]", ik_rows, ik_cols, N, msa.Di));
  if (n_pos != static_cast<std::size_t>(T))
    bad(fmt::format("q_pos has {} entries, expected one per query = {}", n_pos, T));
  if (shard_begin.size() < 2 || shard_begin.front() != 0 || shard_begin.back() != N)
    bad(fmt::format("shard_begin needs R+1 >= 2 boundaries from 0 to N = {}, got {} entries", N, shard_begin.size()));
  for (std::size_t r = 1; r < shard_begin.size(); ++r) {
    if (shard_begin[r] < shard_begin[r - 1])
      bad(fmt::format("shard_begin[{}] = {} < shard_begin[{}] = {}: boundaries must not decrease", r,
                      shard_begin[r], r - 1, shard_begin[r - 1]));
    if (r + 1 < shard_begin.size() && shard_begin[r] % msa.BLK != 0 && shard_begin[r] != shard_begin.back())
      bad(fmt::format("shard_begin[{}] = {} is not a multiple of BLK = {}: a block would straddle two shards", r,
                      shard_begin[r], msa.BLK));
  }
}

struct Cand {
  double score;  // a T score, widened exactly
  std::int32_t id;
};
bool before(const Cand& a, const Cand& b) { return select_ranks_before(a.score, a.id, b.score, b.id); }

// A shard's partial over the selected keys it holds, per query head of the group.
struct Partial {
  Eigen::VectorXd m, l;  // [G] max logit (-inf: no key here), sum of e^(z - m)
  MatD o;                // [G, D] sum of e^(z - m) v
};

}  // namespace

template <class T>
void msa_attention_cp(const Mat<T>& q, const Mat<T>& idx_q, const Mat<T>& k, const Mat<T>& v,
                      const Mat<T>& idx_k, std::span<const std::int64_t> q_pos,
                      std::span<const std::int64_t> shard_begin, const MsaDims& msa,
                      const AttnDims& attn, MatI& sel, Mat<T>& out) {
  const Eigen::Index n_tok = q.rows(), N = k.rows();
  check_args(n_tok, N, shard_begin, msa, attn, q.cols(), idx_q.cols(), k.cols(), v.rows(), v.cols(),
             idx_k.rows(), idx_k.cols(), q_pos.size());
  if (idx_q.rows() != n_tok)
    throw std::invalid_argument(fmt::format("msa_attention_cp: idx_q has {} rows, expected T = {}", idx_q.rows(), n_tok));
  for (std::size_t t = 0; t < q_pos.size(); ++t)
    if (q_pos[t] < 0 || q_pos[t] >= N)
      throw std::out_of_range(fmt::format("msa_attention_cp: q_pos[{}] = {}, expected in [0, N) with N = {}", t,
                                          q_pos[t], N));
  const int R = static_cast<int>(shard_begin.size()) - 1, D = attn.D, G = attn.Hq / attn.Hkv, BLK = msa.BLK;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  sel.resize(Eigen::Index{attn.Hkv} * n_tok, msa.K_blk);  // [Hkv*T, K_blk]
  sel.setConstant(-1);
  out.resize(n_tok, Eigen::Index{attn.Hq} * D);  // [T, Hq*D]

  // Step 1's scores, shard by shard: scores[r] [Hi*T, NB_r] over the shard's own blocks, each
  // query at its position clipped into the shard (a query before the shard sees none of it).
  std::vector<Mat<T>> scores(static_cast<std::size_t>(R));
  for (int r = 0; r < R; ++r) {
    const std::int64_t b0 = shard_begin[r], n = shard_begin[r + 1] - b0;
    if (n == 0) continue;
    std::vector<std::int64_t> local(q_pos.size());  // [T]
    for (std::size_t t = 0; t < q_pos.size(); ++t) local[t] = std::clamp<std::int64_t>(q_pos[t] - b0, 0, n - 1);
    msa_index<T>(idx_q, idx_k.middleRows(b0, n), local, msa, scores[static_cast<std::size_t>(r)]);
  }

  std::vector<Cand> shard_best, merged;  // one shard's candidates; all shards' candidates
  std::vector<Partial> parts(static_cast<std::size_t>(R));
  for (Eigen::Index t = 0; t < n_tok; ++t) {
    const std::int64_t p = q_pos[static_cast<std::size_t>(t)];
    // The forced blocks and the budget, as msa_select defines them.
    const auto [L, init_end, tail_begin, n_valid, n_free] = select_row(p, msa);
    for (int g = 0; g < attn.Hkv; ++g) {
      const Eigen::Index row = g * n_tok + t;  // index head g = KV group g
      // Steps 1-2: each shard's best n_free non-forced visible blocks, merged under the tie rule.
      merged.clear();
      for (int r = 0; r < R; ++r) {
        const std::int64_t b0 = shard_begin[r], b1 = shard_begin[r + 1];
        if (b1 == b0 || p < b0) continue;
        shard_best.clear();
        const std::int64_t first = b0 / BLK, last = std::min((b1 - 1) / BLK, L);  // the shard's visible blocks
        for (std::int64_t b = std::max(first, init_end); b <= std::min(last, tail_begin - 1); ++b)
          shard_best.push_back({static_cast<double>(scores[static_cast<std::size_t>(r)](row, b - first)),
                                static_cast<std::int32_t>(b)});
        const auto keep = std::min<std::size_t>(shard_best.size(), static_cast<std::size_t>(n_free));
        std::partial_sort(shard_best.begin(), shard_best.begin() + static_cast<std::ptrdiff_t>(keep), shard_best.end(),
                          before);
        merged.insert(merged.end(), shard_best.begin(), shard_best.begin() + static_cast<std::ptrdiff_t>(keep));
      }
      std::sort(merged.begin(), merged.end(), before);  // every non-forced visible block is someone's candidate
      Eigen::Index slot = 0;
      for (std::int64_t i = 0; i < n_free; ++i) sel(row, slot++) = merged[static_cast<std::size_t>(i)].id;
      for (std::int64_t b = 0; b < init_end; ++b) sel(row, slot++) = static_cast<std::int32_t>(b);
      for (std::int64_t b = tail_begin; b <= L; ++b) sel(row, slot++) = static_cast<std::int32_t>(b);

      // Step 3: each shard's partial over the selected keys it holds (j <= p).
      const Eigen::Map<const Mat<T>> q_g(q.row(t).data() + Eigen::Index{g} * G * D, G, D);  // [G, D]
      for (int r = 0; r < R; ++r) {
        Partial& P = parts[static_cast<std::size_t>(r)];
        P.m = Eigen::VectorXd::Constant(G, -std::numeric_limits<double>::infinity());
        P.l = Eigen::VectorXd::Zero(G);
        P.o = MatD::Zero(G, D);
        std::vector<std::int64_t> keys;  // [keys of this shard in the selection, ascending]
        for (Eigen::Index s = 0; s < slot; ++s) {
          const std::int64_t j0 = std::int64_t{sel(row, s)} * BLK, j1 = std::min<std::int64_t>(j0 + BLK, p + 1);
          if (j0 < shard_begin[r] || j0 >= shard_begin[r + 1]) continue;
          for (std::int64_t j = j0; j < j1; ++j) keys.push_back(j);
        }
        if (keys.empty()) continue;
        std::sort(keys.begin(), keys.end());
        MatD z(G, static_cast<Eigen::Index>(keys.size()));  // [G, keys]
        for (std::size_t c = 0; c < keys.size(); ++c) {
          const auto kj = k.row(keys[c]).segment(Eigen::Index{g} * D, D);
          z.col(static_cast<Eigen::Index>(c)) = (q_g * kj.transpose()).template cast<double>() * scale;
        }
        P.m = z.rowwise().maxCoeff();
        z = (z.colwise() - P.m).array().exp().matrix();
        P.l = z.rowwise().sum();
        for (std::size_t c = 0; c < keys.size(); ++c)
          P.o += z.col(static_cast<Eigen::Index>(c)) *
                 v.row(keys[c]).segment(Eigen::Index{g} * D, D).template cast<double>();
      }
      // Step 4: the log-sum-exp merge of the shards' partials.
      for (int h = 0; h < G; ++h) {
        double M = -std::numeric_limits<double>::infinity();
        for (const Partial& P : parts) M = std::max(M, P.m(h));
        double l = 0;
        Eigen::RowVectorXd o = Eigen::RowVectorXd::Zero(D);  // [D]
        for (const Partial& P : parts) {
          if (P.m(h) == -std::numeric_limits<double>::infinity()) continue;  // no selected key in that shard
          const double w = std::exp(P.m(h) - M);
          l += w * P.l(h);
          o += w * P.o.row(h);
        }
        out.row(t).segment((Eigen::Index{g} * G + h) * D, D) = (o / l).template cast<T>();
      }
    }
  }
}

template void msa_attention_cp<float>(const Mat<float>&, const Mat<float>&, const Mat<float>&, const Mat<float>&,
                                      const Mat<float>&, std::span<const std::int64_t>,
                                      std::span<const std::int64_t>, const MsaDims&, const AttnDims&, MatI&,
                                      Mat<float>&);
template void msa_attention_cp<double>(const Mat<double>&, const Mat<double>&, const Mat<double>&,
                                       const Mat<double>&, const Mat<double>&, std::span<const std::int64_t>,
                                       std::span<const std::int64_t>, const MsaDims&, const AttnDims&, MatI&,
                                       Mat<double>&);

}  // namespace m3::ref
