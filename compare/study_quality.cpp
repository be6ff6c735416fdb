// Selection quality (study_quality.h). The planted signal is one unit direction per KV group
// (main branch) and one for the shared index-K (index branch); a key j carries c_j of it:
//   main:  q_h = n + sqrt(D) u_g,   k_j = n + c_j * gain * u_g      => logit q.k/sqrt(D) ~ noise + c_j gain
//   index: qI_i = n + sqrt(Di) w,    kI_j = n + c_j * g_idx * w      => score ~ noise + c_j g_idx sqrt(Di)
// with n standard normal noise; c_j = 0 everywhere for `random` (and no planted query component),
// 1 on the needle blocks for `retrieval`, exp(-(N-1-j)/tau) for `decay`.
#include "compare/study_quality.h"

#include "reference/ops/attention_dense.h"
#include "reference/ops/msa_attention.h"
#include "reference/ops/msa_index.h"
#include "reference/ops/msa_select.h"
#include "reference/tensor.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>
#include <stdexcept>

namespace m3::study {

const char* pattern_name(Pattern p) {
  switch (p) {
    case Pattern::RANDOM: return "random";
    case Pattern::RETRIEVAL: return "retrieval";
    case Pattern::DECAY: return "decay";
  }
  return "?";
}

Pattern parse_pattern(const std::string& s) {
  if (s == "random") return Pattern::RANDOM;
  if (s == "retrieval") return Pattern::RETRIEVAL;
  if (s == "decay") return Pattern::DECAY;
  throw std::invalid_argument(fmt::format("unknown pattern '{}': expected random, retrieval or decay", s));
}

namespace {

// Index-branch signal: the planted score gap in units of the noise's standard deviation
// (sqrt(2 Di) for two independent unit-normal vectors plus the query's planted part). 6 sigma
// stands above the maximum of ~8K noisy block maxima at 1M (about 4.5 sigma): a clearly
// informative but imperfect indexer.
constexpr double kIndexSnr = 6.0;
// Main-branch gain over ln(N / signal keys): +2 puts e^2/(1+e^2) = 88% of the mass on the signal.
constexpr double kMainExtra = 2.0;

MatF normals(std::int64_t rows, std::int64_t cols, std::mt19937_64& g) {
  std::normal_distribution<float> nd(0.f, 1.f);  // study data, not golden bits: std:: is fine here
  MatF m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = nd(g);
  return m;
}
Eigen::VectorXf unit(int n, std::mt19937_64& g) {
  std::normal_distribution<float> nd(0.f, 1.f);
  Eigen::VectorXf u(n);
  for (int i = 0; i < n; ++i) u(i) = nd(g);
  return u.normalized();
}

}  // namespace

QualityPoint measure_quality(Pattern p, std::int64_t N, const QualityOptions& o) {
  const auto t_start = std::chrono::steady_clock::now();
  const int Hq = o.attn.Hq, Hkv = o.attn.Hkv, D = o.attn.D, G = Hq / Hkv;
  const int Hi = o.msa.Hi, Di = o.msa.Di, BLK = o.msa.BLK;
  const int Q = o.queries;
  if (N < Q || Q < 1) throw std::invalid_argument(fmt::format("quality: context {} with {} queries", N, Q));
  if (Hi != Hkv) throw std::invalid_argument("quality: the index heads must equal the KV heads (one selection a group)");
  const std::int64_t NB = (N + BLK - 1) / BLK;
  std::mt19937_64 g(o.seed * 0x9E3779B97F4A7C15ull + static_cast<std::uint64_t>(N) * 31 + static_cast<int>(p));

  // c_j: the planted share of key j, and the gains.
  std::vector<float> c(static_cast<std::size_t>(N), 0.f);  // [N]
  double gain = 0;
  if (p == Pattern::RETRIEVAL) {
    const std::int64_t far = std::max<std::int64_t>(1, NB - 2);  // needles strictly before the last two blocks
    std::vector<std::int64_t> blocks;
    std::uniform_int_distribution<std::int64_t> pick(0, far - 1);
    while (static_cast<int>(blocks.size()) < std::min<std::int64_t>(o.needles, far)) {
      const std::int64_t b = pick(g);
      if (std::find(blocks.begin(), blocks.end(), b) == blocks.end()) blocks.push_back(b);
    }
    for (std::int64_t b : blocks)
      for (std::int64_t j = b * BLK; j < std::min(N, (b + 1) * BLK); ++j) c[static_cast<std::size_t>(j)] = 1.f;
    gain = std::log(static_cast<double>(N) / (static_cast<double>(blocks.size()) * BLK)) + kMainExtra;
  } else if (p == Pattern::DECAY) {
    for (std::int64_t j = 0; j < N; ++j)
      c[static_cast<std::size_t>(j)] = static_cast<float>(std::exp(-static_cast<double>(N - 1 - j) / o.decay_tokens));
    gain = std::max(3.0, std::log(static_cast<double>(N) / o.decay_tokens) + kMainExtra + 1.0);
  }
  const bool planted = p != Pattern::RANDOM;
  const double g_idx = kIndexSnr * std::sqrt(2.0);  // score gap kIndexSnr * sqrt(2 Di) = c * g_idx * sqrt(Di)

  MatF k = normals(N, static_cast<std::int64_t>(Hkv) * D, g);  // [N, Hkv*D]
  MatF v = normals(N, static_cast<std::int64_t>(Hkv) * D, g);  // [N, Hkv*D]
  MatF ik = normals(N, Di, g);                                 // [N, Di]
  MatF q = normals(Q, static_cast<std::int64_t>(Hq) * D, g);   // [Q, Hq*D]
  MatF iq = normals(Q, static_cast<std::int64_t>(Hi) * Di, g); // [Q, Hi*Di]
  if (planted) {
    const Eigen::VectorXf w = unit(Di, g);
    for (int gr = 0; gr < Hkv; ++gr) {
      const Eigen::VectorXf u = unit(D, g);
      for (std::int64_t j = 0; j < N; ++j)
        if (c[static_cast<std::size_t>(j)] != 0.f)
          k.row(j).segment(gr * D, D) += (c[static_cast<std::size_t>(j)] * static_cast<float>(gain)) * u.transpose();
      for (int t = 0; t < Q; ++t)
        for (int h = gr * G; h < (gr + 1) * G; ++h) q.row(t).segment(h * D, D) += std::sqrt(static_cast<float>(D)) * u.transpose();
      for (int t = 0; t < Q; ++t) iq.row(t).segment(gr * Di, Di) += std::sqrt(static_cast<float>(Di)) * w.transpose();
    }
    for (std::int64_t j = 0; j < N; ++j)
      if (c[static_cast<std::size_t>(j)] != 0.f)
        ik.row(j) += (c[static_cast<std::size_t>(j)] * static_cast<float>(g_idx)) * w.transpose();
  }
  std::vector<std::int64_t> pos(static_cast<std::size_t>(Q));  // the last Q positions
  for (int t = 0; t < Q; ++t) pos[static_cast<std::size_t>(t)] = N - Q + t;

  MatF scores;  // [Hi*Q, NB]
  MatI sel;     // [Hi*Q, K_blk]
  ref::msa_index(iq, ik, pos, o.msa, scores);
  ref::msa_select(scores, pos, o.msa, sel);

  // Dense attention mass per block, per (query, head): two passes over key chunks with Eigen GEMMs
  // (max, then the block sums of exp(z - max) in fp64).
  constexpr std::int64_t kChunk = 1 << 16;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> recall, local;
  for (int t = 0; t < Q; ++t) {
    const std::int64_t pt = pos[static_cast<std::size_t>(t)], nk = pt + 1, own = pt / BLK;
    for (int gr = 0; gr < Hkv; ++gr) {
      MatF qg(G, D);  // [G, D] the group's query heads
      for (int h = 0; h < G; ++h) qg.row(h) = q.row(t).segment((gr * G + h) * D, D);
      Eigen::VectorXd mx = Eigen::VectorXd::Constant(G, -INFINITY);  // [G]
      MatD bm = MatD::Zero(G, NB);                                    // [G, NB] block masses
      for (int pass = 0; pass < 2; ++pass)
        for (std::int64_t j0 = 0; j0 < nk; j0 += kChunk) {
          const std::int64_t n = std::min(kChunk, nk - j0);
          const MatF z = qg * k.block(j0, gr * D, n, D).transpose();  // [G, n]
          for (int h = 0; h < G; ++h)
            for (std::int64_t j = 0; j < n; ++j) {
              const double zz = z(h, j) * scale;
              if (pass == 0) mx(h) = std::max(mx(h), zz);
              else bm(h, (j0 + j) / BLK) += std::exp(zz - mx(h));
            }
        }
      for (int h = 0; h < G; ++h) {
        const double tot = bm.row(h).sum();
        double on = 0;
        for (int s = 0; s < sel.cols(); ++s) {
          const std::int32_t b = sel(static_cast<Eigen::Index>(gr) * Q + t, s);
          if (b >= 0) on += bm(h, b);
        }
        recall.push_back(on / tot);
        local.push_back(bm(h, own) / tot);
      }
    }
  }

  MatF out_msa, out_dense;  // [Q, Hq*D]
  ref::msa_attention(q, k, v, pos, sel, BLK, o.attn, out_msa);
  ref::attention_dense(q, k, v, pos, o.attn, out_dense);

  QualityPoint r;
  r.pattern = p;
  r.context = N;
  r.queries = Q;
  std::vector<double> sorted = recall;
  std::sort(sorted.begin(), sorted.end());
  double sum = 0;
  for (double x : recall) sum += x;
  r.recall_mean = sum / static_cast<double>(recall.size());
  r.recall_min = sorted.front();
  r.recall_p10 = sorted[sorted.size() / 10];
  double ls = 0;
  for (double x : local) ls += x;
  r.local_mass_mean = ls / static_cast<double>(local.size());
  r.out_rel_l2 = (out_msa - out_dense).cast<double>().norm() / out_dense.cast<double>().norm();
  r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_start).count();
  return r;
}

}  // namespace m3::study
