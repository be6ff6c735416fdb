// Tests of ref::attention_dense (reference/ops/attention_dense.h) against a plain-loop fp64
// causal GQA with a full (two-pass) softmax, on awkward sizes, query subsets, both dtypes; plus
// the MAC counter, causality, aliasing, a 100K-key decode and bad input.
#include "reference/ops/attention_dense.h"

#include "tests/test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using m3::AttnCounter;
using m3::AttnDims;
using m3::Mat;
using m3::MatD;
using m3::ref::attention_dense;
using m3::test::poison;
using m3::test::rel_l2;
using Pos = std::vector<std::int64_t>;

// fp64 vs fp64: only rounding order differs (Eigen's blocked GEMM vs a plain loop), a few ulp times
// sqrt(terms) for at most ~1e5 terms: ~1e-13 worst case, so 1e-12 still catches any real bug.
constexpr double kTolF64 = 1e-12;
// fp32 vs fp64: unit roundoff 6e-8; scores are dots of <= 128 terms, the weights are rounded to
// fp32 once and summed in the P.V product; measured errors are <= 2e-7 at a few hundred keys, so
// 1e-5 leaves ample room (see Decode_N100000 for 1e5 keys).
constexpr double kTolF32 = 1e-5;

template <class T>
constexpr double tol() { return std::is_same_v<T, double> ? kTolF64 : kTolF32; }

// out[t, h*D + c] = sum_j softmax_j(q_h(t) . k_g(j) / sqrt(D)) v_g(j)[c], j = 0..q_pos[t].
MatD naive_attention(const MatD& q, const MatD& k, const MatD& v, const Pos& q_pos, AttnDims dims) {
  const int G = dims.Hq / dims.Hkv, D = dims.D;
  MatD out = MatD::Zero(q.rows(), q.cols());  // [T, Hq*D]
  for (Eigen::Index t = 0; t < q.rows(); ++t) {
    const std::int64_t n = q_pos[t] + 1;
    for (int h = 0; h < dims.Hq; ++h) {
      const int g = h / G;
      std::vector<double> z(n);
      for (std::int64_t j = 0; j < n; ++j) {
        double dot = 0;
        for (int c = 0; c < D; ++c) dot += q(t, h * D + c) * k(j, g * D + c);
        z[j] = dot / std::sqrt(static_cast<double>(D));
      }
      const double m = *std::max_element(z.begin(), z.end());
      double sum = 0;
      for (std::int64_t j = 0; j < n; ++j) sum += std::exp(z[j] - m);
      for (std::int64_t j = 0; j < n; ++j) {
        const double p = std::exp(z[j] - m) / sum;
        for (int c = 0; c < D; ++c) out(t, h * D + c) += p * v(j, g * D + c);
      }
    }
  }
  return out;
}

std::uint64_t closed_form_macs(const Pos& q_pos, AttnDims dims) {
  std::uint64_t keys = 0;
  for (auto p : q_pos) keys += static_cast<std::uint64_t>(p + 1);
  return static_cast<std::uint64_t>(dims.Hq) * dims.D * keys;
}

Pos prefill_positions(std::int64_t n) {
  Pos p(n);
  std::iota(p.begin(), p.end(), 0);
  return p;
}

std::string label(std::int64_t N, const Pos& q_pos, AttnDims d) {
  return "N=" + std::to_string(N) + " T=" + std::to_string(q_pos.size()) + " Hq=" +
         std::to_string(d.Hq) + " Hkv=" + std::to_string(d.Hkv) + " D=" + std::to_string(d.D);
}

// Draws q, k, v, runs the op on T-typed inputs and compares with the fp64 loop evaluated on the
// very same (T-rounded) values, so only the op's own error is measured. Returns the rel-L2 error.
template <class T>
double check_case(std::int64_t N, const Pos& q_pos, AttnDims dims, std::mt19937_64& g,
                  double q_scale = 1.0) {
  SCOPED_TRACE(label(N, q_pos, dims));
  const Eigen::Index Tq = static_cast<Eigen::Index>(q_pos.size());
  const Mat<T> q = m3::test::randn<T>(Tq, dims.Hq * dims.D, g, q_scale);  // [T, Hq*D]
  const Mat<T> k = m3::test::randn<T>(N, dims.Hkv * dims.D, g);           // [N, Hkv*D]
  const Mat<T> v = m3::test::randn<T>(N, dims.Hkv * dims.D, g);           // [N, Hkv*D]
  Mat<T> out(Tq, dims.Hq * dims.D);                                      // [T, Hq*D]
  poison(out);
  AttnCounter counter;
  attention_dense<T>(q, k, v, q_pos, dims, out, &counter);

  const MatD ref = naive_attention(q.template cast<double>(), k.template cast<double>(),
                                   v.template cast<double>(), q_pos, dims);  // [T, Hq*D]
  EXPECT_GT(q.norm(), 0);
  EXPECT_GT(v.norm(), 0);
  EXPECT_GT(ref.norm(), 0);
  EXPECT_EQ(out.rows(), Tq);
  EXPECT_EQ(out.cols(), dims.Hq * dims.D);
  EXPECT_TRUE(out.allFinite()) << "an output element is NaN/Inf (unwritten or overflowed)";
  const double err = rel_l2(out, ref);
  EXPECT_LE(err, tol<T>());
  EXPECT_EQ(counter.qk_macs, closed_form_macs(q_pos, dims));
  EXPECT_EQ(counter.pv_macs, closed_form_macs(q_pos, dims));
  EXPECT_EQ(counter.index_macs, 0u);
  EXPECT_EQ(counter.select_candidates, 0u);
  return err;
}

// Prefill T = N for every awkward length and head dim, one GQA geometry per test.
template <class T>
void check_prefill_sweep(int Hq, int Hkv) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  for (std::int64_t N : {1, 15, 17, 64, 65, 129})
    for (int D : {1, 8, 17, 32}) check_case<T>(N, prefill_positions(N), AttnDims{Hq, Hkv, D}, g);
}

TEST(AttentionDense_f32, Prefill_Mha1x1) { check_prefill_sweep<float>(1, 1); }
TEST(AttentionDense_f64, Prefill_Mha1x1) { check_prefill_sweep<double>(1, 1); }
TEST(AttentionDense_f32, Prefill_Gqa3x1) { check_prefill_sweep<float>(3, 1); }
TEST(AttentionDense_f64, Prefill_Gqa3x1) { check_prefill_sweep<double>(3, 1); }
TEST(AttentionDense_f32, Prefill_Gqa4x2) { check_prefill_sweep<float>(4, 2); }
TEST(AttentionDense_f64, Prefill_Gqa4x2) { check_prefill_sweep<double>(4, 2); }
TEST(AttentionDense_f32, Prefill_Gqa6x3) { check_prefill_sweep<float>(6, 3); }
TEST(AttentionDense_f64, Prefill_Gqa6x3) { check_prefill_sweep<double>(6, 3); }
TEST(AttentionDense_f32, Prefill_Gqa16x1) { check_prefill_sweep<float>(16, 1); }
TEST(AttentionDense_f64, Prefill_Gqa16x1) { check_prefill_sweep<double>(16, 1); }

// One key: the softmax weight is exactly 1, so every head returns its group's v row.
template <class T>
void check_decode_n1() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  for (AttnDims d :
       {AttnDims{1, 1, 1}, AttnDims{3, 1, 8}, AttnDims{6, 3, 17}, AttnDims{16, 1, 32}}) {
    check_case<T>(1, Pos{0}, d, g);
    const Mat<T> q = m3::test::randn<T>(1, d.Hq * d.D, g);   // [1, Hq*D]
    const Mat<T> k = m3::test::randn<T>(1, d.Hkv * d.D, g);  // [1, Hkv*D]
    const Mat<T> v = m3::test::randn<T>(1, d.Hkv * d.D, g);  // [1, Hkv*D]
    Mat<T> out(1, d.Hq * d.D);                              // [1, Hq*D]
    poison(out);
    attention_dense<T>(q, k, v, Pos{0}, d, out);
    const int G = d.Hq / d.Hkv;
    for (int h = 0; h < d.Hq; ++h)
      for (int c = 0; c < d.D; ++c) EXPECT_EQ(out(0, h * d.D + c), v(0, (h / G) * d.D + c));
  }
}
TEST(AttentionDense_f32, Decode_N1) { check_decode_n1<float>(); }
TEST(AttentionDense_f64, Decode_N1) { check_decode_n1<double>(); }

// Queries that are not a contiguous prefill: decode rows in the middle of a cache, unsorted,
// repeated, the first and the last cache slot.
template <class T>
void check_query_subsets() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  check_case<T>(257, Pos{128}, AttnDims{4, 2, 8}, g);
  check_case<T>(200, Pos{150, 3, 199, 77, 77, 0}, AttnDims{6, 3, 17}, g);
  check_case<T>(130, Pos{129, 64, 65, 127, 128}, AttnDims{16, 1, 32}, g);
  check_case<T>(40, Pos{39, 38, 37}, AttnDims{3, 1, 1}, g);
}
TEST(AttentionDense_f32, Decode_QuerySubsets) { check_query_subsets<float>(); }
TEST(AttentionDense_f64, Decode_QuerySubsets) { check_query_subsets<double>(); }

// M3's own head geometry (64/4 heads, D 128) on a short cache with sampled rows.
template <class T>
void check_real_geometry() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  check_case<T>(300, Pos{0, 127, 128, 255, 299}, AttnDims{64, 4, 128}, g);
}
TEST(AttentionDense_f32, Decode_M3Heads64x4_D128) { check_real_geometry<float>(); }
TEST(AttentionDense_f64, Decode_M3Heads64x4_D128) { check_real_geometry<double>(); }

// Logits far beyond exp's range (|z| ~ 1e3 > 709, the softmax nearly one-hot): only a
// max-subtracted softmax avoids inf/inf = NaN. fp64 only: in fp32 the scores themselves carry
// |z| * 6e-8 ~ 6e-5 of rounding, which is the input's conditioning, not the op's error.
TEST(AttentionDense_f64, Prefill_HugeLogits) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  check_case<double>(65, prefill_positions(65), AttnDims{4, 2, 16}, g, /*q_scale=*/300.0);
}

// The counter adds to what it holds (one counter per layer over several calls) and counts the
// closed form Hq*D*sum_t(q_pos[t]+1) for both products: N(N+1)/2 keys summed over a prefill.
TEST(AttentionDense_f32, Counter_Accumulates) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const AttnDims d{6, 3, 17};
  const std::int64_t N = 65;
  const Mat<float> q = m3::test::randn<float>(N, d.Hq * d.D, g);
  const Mat<float> k = m3::test::randn<float>(N, d.Hkv * d.D, g);
  const Mat<float> v = m3::test::randn<float>(N, d.Hkv * d.D, g);
  Mat<float> out;
  AttnCounter c;
  c.index_macs = 7;
  attention_dense<float>(q, k, v, prefill_positions(N), d, out, &c);
  const std::uint64_t once = 6ull * 17 * (65 * 66 / 2);
  EXPECT_EQ(c.qk_macs, once);
  EXPECT_EQ(c.pv_macs, once);
  attention_dense<float>(q, k, v, prefill_positions(N), d, out, &c);
  EXPECT_EQ(c.qk_macs, 2 * once);
  EXPECT_EQ(c.pv_macs, 2 * once);
  EXPECT_EQ(c.index_macs, 7u);
  EXPECT_EQ(c.select_candidates, 0u);
  attention_dense<float>(q, k, v, prefill_positions(N), d, out);  // no counter: must not crash
}

// Causality: keys and values at j > q_pos[t] cannot reach row t. The future is overwritten with
// huge values; rows must stay bitwise equal (the op never reads those keys), while rows that do
// see the changed positions must move (the perturbation is not vacuous).
template <class T>
void check_causality() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const AttnDims d{4, 2, 8};
  const std::int64_t N = 97, cut = 50;  // positions >= cut get perturbed
  const Pos q_pos = prefill_positions(N);
  const Mat<T> q = m3::test::randn<T>(N, d.Hq * d.D, g);  // [T, Hq*D]
  Mat<T> k = m3::test::randn<T>(N, d.Hkv * d.D, g);       // [N, Hkv*D]
  Mat<T> v = m3::test::randn<T>(N, d.Hkv * d.D, g);       // [N, Hkv*D]
  Mat<T> before, after;                                   // [T, Hq*D]
  attention_dense<T>(q, k, v, q_pos, d, before);
  k.bottomRows(N - cut) = m3::test::randn<T>(N - cut, d.Hkv * d.D, g, 1e3);
  v.bottomRows(N - cut) = m3::test::randn<T>(N - cut, d.Hkv * d.D, g, 1e3);
  attention_dense<T>(q, k, v, q_pos, d, after);
  for (std::int64_t t = 0; t < cut; ++t)
    for (Eigen::Index c = 0; c < before.cols(); ++c)
      ASSERT_EQ(before(t, c), after(t, c)) << "row " << t << " saw a future key";
  for (std::int64_t t = cut; t < N; ++t)
    EXPECT_GT(rel_l2(after.row(t), before.row(t)), 1e-3) << "row " << t << " ignored its keys";
}
TEST(AttentionDense_f32, Prefill_Causality) { check_causality<float>(); }
TEST(AttentionDense_f64, Prefill_Causality) { check_causality<double>(); }

// out may be one of the inputs (q has out's shape): the result must equal a separate output.
TEST(AttentionDense_f64, Prefill_OutAliasesQ) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const AttnDims d{6, 3, 8};
  const std::int64_t N = 33;
  Mat<double> q = m3::test::randn<double>(N, d.Hq * d.D, g);
  const Mat<double> k = m3::test::randn<double>(N, d.Hkv * d.D, g);
  const Mat<double> v = m3::test::randn<double>(N, d.Hkv * d.D, g);
  Mat<double> separate;
  attention_dense<double>(q, k, v, prefill_positions(N), d, separate);
  attention_dense<double>(q, k, v, prefill_positions(N), d, q);
  EXPECT_EQ(q, separate);
}

// A long cache (1e5 keys) with single decode queries: the op's memory is one [G, N] block, and
// the softmax over 1e5 keys must still match the fp64 loop. The same fp32 bound holds although the
// P.V sum has 1e5 terms: Eigen's GEMM sums in short register blocks, so the error grows far slower
// than 1e5 * 6e-8 (measured <= 7e-7 over several seeds).
template <class T>
void check_long_decode() {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const std::int64_t N = 100000;
  check_case<T>(N, Pos{N - 1}, AttnDims{4, 1, 16}, g);
  check_case<T>(N, Pos{54321, N - 1, 0}, AttnDims{4, 1, 16}, g);
}
TEST(AttentionDense_f64, Decode_N100000) { check_long_decode<double>(); }
TEST(AttentionDense_f32, Decode_N100000) { check_long_decode<float>(); }

TEST(AttentionDense_f32, BadInput_Throws) {
  const AttnDims d{4, 2, 8};
  const Mat<float> q = Mat<float>::Ones(2, 32), k = Mat<float>::Ones(5, 16), v = k;
  const Pos pos{3, 4};
  Mat<float> out;
  EXPECT_NO_THROW(attention_dense<float>(q, k, v, pos, d, out));
  EXPECT_THROW(attention_dense<float>(Mat<float>::Ones(2, 31), k, v, pos, d, out),
               std::invalid_argument);
  EXPECT_THROW(attention_dense<float>(q, Mat<float>::Ones(5, 17), v, pos, d, out),
               std::invalid_argument);
  EXPECT_THROW(attention_dense<float>(q, k, Mat<float>::Ones(5, 8), pos, d, out),
               std::invalid_argument);
  EXPECT_THROW(attention_dense<float>(q, k, Mat<float>::Ones(4, 16), Pos{1, 2}, d, out),
               std::invalid_argument);  // k and v of different lengths
  EXPECT_THROW(attention_dense<float>(q, k, v, Pos{3}, d, out), std::invalid_argument);
  EXPECT_THROW(attention_dense<float>(q, k, v, pos, AttnDims{3, 2, 8}, out), std::invalid_argument);
  EXPECT_THROW(attention_dense<float>(q, k, v, pos, AttnDims{4, 0, 8}, out), std::invalid_argument);
  EXPECT_THROW(attention_dense<float>(q, k, v, pos, AttnDims{0, 0, 0}, out), std::invalid_argument);
  EXPECT_THROW(attention_dense<float>(q, k, v, Pos{3, 5}, d, out), std::out_of_range);   // == N
  EXPECT_THROW(attention_dense<float>(q, k, v, Pos{-1, 4}, d, out), std::out_of_range);
  try {
    attention_dense<float>(q, Mat<float>::Ones(5, 12), Mat<float>::Ones(5, 12), pos, d, out);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("k has 12 columns, expected Hkv*D = 2*8 = 16"),
              std::string::npos) << e.what();
  }
}

}  // namespace
