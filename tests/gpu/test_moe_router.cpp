// gpu::moe_router against ref::moe_router run in fp32 on the same bf16-rounded x and fp32 weights.
// Logits: fp32 sums in different orders (rel-L2 bound). Expert ids: exactly equal, except where
// the reference's own biased scores make a near-tie (two of its top K_e + 1 keys within 1e-5
// relative): the logits' rounding differences (~1e-6 relative) can legitimately flip those, so the
// test then checks sets: every expert clearly inside must be chosen, and every GPU choice must be
// one of the near-tied candidates; it reports how many rows were such. Exact ties (identical rows
// of W_gate with exactly representable sums) must pick the lower id on both sides.
#include "gpu/kernels/moe_router.h"
#include "reference/ops/moe_router.h"
#include "tests/gpu/gpu_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <vector>

using namespace m3;
using m3::test::bf16_exact;

namespace {

// fp32 logits: both sides sum H exact bf16 x fp32 products in fp32, in different orders (ours:
// sequential; Eigen: blocked). A recursive fp32 sum has relative rms error ~ u sqrt(H / 6)
// (u = 6e-8): 2e-6 at H = 6144. 1e-5 covers both sides' error.
constexpr double kLogits = 1e-5;
// Weights are s / sum(s) with s = sigmoid(logit): d(s) <= 0.25 d(logit), so their relative error is
// below the logits' bound; the division itself is fp64 on both sides.
constexpr double kWeights = 1e-5;
// Near-tie window on the biased keys: 10x the ~1e-6 relative key difference the logits' rounding
// can make (keys are ~0.5-1.5, so relative and absolute are alike).
constexpr double kTie = 1e-5;

struct Case {
  int T, H, E, K;
  bool renormalize = true;
};

struct Outputs {
  MatF logits;       // [T, E]
  MatI experts;      // [T, K_e]
  MatF weights;      // [T, K_e]
};

Outputs run_gpu(const MatF& x, const MatF& w_gate, const Vec<float>& bias, const Case& c) {
  auto dx = test::upload_bf16(x);
  gpu::DeviceBuffer<float> dw(w_gate.size()), db(bias.size());
  dw.upload(w_gate.data(), w_gate.size());
  db.upload(bias.data(), bias.size());
  gpu::DeviceBuffer<float> dlogits(static_cast<std::size_t>(c.T) * c.E), dweights(static_cast<std::size_t>(c.T) * c.K);
  gpu::DeviceBuffer<std::int32_t> dexperts(static_cast<std::size_t>(c.T) * c.K);
  dlogits.fill_bytes(0xFF);   // NaN poison
  dweights.fill_bytes(0xFF);
  dexperts.fill_bytes(0x80);  // large negative ids: never a valid expert
  gpu::moe_router(dx.data(), dw.data(), db.data(), c.K, c.renormalize, dlogits.data(), dexperts.data(),
                  dweights.data(), c.T, c.H, c.E, nullptr);
  Outputs o;
  const auto l = dlogits.download(), w = dweights.download();
  const auto e = dexperts.download();
  o.logits = Eigen::Map<const MatF>(l.data(), c.T, c.E);
  o.weights = Eigen::Map<const MatF>(w.data(), c.T, c.K);
  o.experts = Eigen::Map<const MatI>(e.data(), c.T, c.K);
  return o;
}

// The reference's selection keys for row t, recomputed from its logits exactly as it does.
std::vector<float> ref_keys(const MatF& logits, const Vec<float>& bias, Eigen::Index t) {
  std::vector<float> k(logits.cols());
  for (Eigen::Index e = 0; e < logits.cols(); ++e) {
    const float s = static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(logits(t, e)))));
    const float c = s + bias[e];
    k[e] = std::isnan(c) ? -std::numeric_limits<float>::infinity() : c;
  }
  return k;
}

bool near(float a, float b) { return std::abs(a - b) <= kTie * std::max(std::abs(a), std::abs(b)); }

void check(const Case& c, const MatF& x, const MatF& w_gate, const Vec<float>& bias) {
  Outputs ref;
  ref::moe_router(x, w_gate, bias, c.K, c.renormalize, ref.logits, ref.experts, ref.weights);
  const Outputs gpu = run_gpu(x, w_gate, bias, c);
  ASSERT_TRUE(gpu.logits.allFinite());
  ASSERT_TRUE(gpu.weights.allFinite());
  ASSERT_GT(ref.logits.norm(), 0.0);
  EXPECT_LE(test::rel_l2(gpu.logits, ref.logits), kLogits);
  ASSERT_TRUE((gpu.experts.array() >= 0).all() && (gpu.experts.array() < c.E).all()) << "an id was not written";

  int near_tie_rows = 0;
  MatF w_matched(c.T, c.K);  // the GPU's weights in the reference's expert order
  for (int t = 0; t < c.T; ++t) {
    const auto key = ref_keys(ref.logits, bias, t);
    std::vector<int> order(c.E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return key[a] > key[b]; });
    bool tie = false;
    for (int j = 0; j + 1 < std::min(c.K + 1, c.E); ++j) tie |= near(key[order[j]], key[order[j + 1]]);
    std::map<int, float> gpu_w;
    for (int j = 0; j < c.K; ++j) gpu_w[gpu.experts(t, j)] = gpu.weights(t, j);
    if (!tie) {
      for (int j = 0; j < c.K; ++j)
        EXPECT_EQ(gpu.experts(t, j), ref.experts(t, j)) << "row " << t << " slot " << j;
    } else {
      ++near_tie_rows;
      // The K-th key, and the best key left out (-inf when K_e = E: nothing is left out).
      const float kth = key[order[c.K - 1]];
      const float out = c.K < c.E ? key[order[c.K]] : -std::numeric_limits<float>::infinity();
      for (int j = 0; j < c.K; ++j) {
        const int e = order[j];
        if (!near(key[e], out)) {  // clearly above everything left out: must be chosen
          EXPECT_TRUE(gpu_w.count(e)) << "row " << t << " misses expert " << e;
        }
      }
      for (const auto& [e, w] : gpu_w) {  // every choice is inside or near-tied with the K-th
        EXPECT_TRUE(key[e] >= kth || near(key[e], kth)) << "row " << t << " chose expert " << e;
      }
    }
    // Weights are compared by expert id; a row whose set flipped at a near-tie renormalizes over
    // other experts, so its weights are not comparable and take the reference's values.
    bool same_set = true;
    for (int j = 0; j < c.K; ++j) same_set &= gpu_w.count(ref.experts(t, j)) > 0;
    for (int j = 0; j < c.K; ++j)
      w_matched(t, j) = same_set ? gpu_w.at(ref.experts(t, j)) : ref.weights(t, j);
  }
  EXPECT_LE(test::rel_l2(w_matched, ref.weights), kWeights);
  // Not bounded: with K_e close to E most rows hold some near-equal pair; a logits error that
  // hid behind "ties" would still fail the logits bound above.
  if (near_tie_rows) std::printf("  moe_router: %d of %d rows near-tied (compared as sets)\n", near_tie_rows, c.T);
}

void run_case(const Case& c) {
  SCOPED_TRACE("T=" + std::to_string(c.T) + " H=" + std::to_string(c.H) + " E=" + std::to_string(c.E) +
               " K=" + std::to_string(c.K) + (c.renormalize ? " renormalized" : " raw"));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  MatF x = bf16_exact(test::randn<float>(c.T, c.H, g));
  MatF w_gate = test::randn<float>(c.E, c.H, g, 1.0 / std::sqrt(c.H));  // fp32 weights; logits ~ N(0, 1)
  Vec<float> bias = test::randn_vec<float>(c.E, g, 0.1);
  ASSERT_GT(x.norm(), 0.0);
  check(c, x, w_gate, bias);
}

}  // namespace

TEST(MoeRouter_fp32, AwkwardSizes) {
  M3_REQUIRE_GPU();
  for (const Case& c : {Case{1, 7, 5, 1}, Case{65, 64, 33, 4}, Case{64, 100, 128, 4, false}, Case{3, 16, 130, 130},
                        Case{17, 33, 1024, 8}, Case{63, 17, 1, 1}, Case{129, 31, 64, 64, false}})
    run_case(c);
}

TEST(MoeRouter_fp32, M3Shape) {
  M3_REQUIRE_GPU();
  run_case({333, 6144, 128, 4});  // spec §4: E 128, top-4, H 6144
}

// Exact ties: small integers times multiples of 1/8 sum exactly in fp32 in any order, so identical
// rows of W_gate give identical logits on both sides, and identical biases identical keys.
TEST(MoeRouter_fp32, ExactTiesPickLowerId) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  std::uniform_int_distribution<int> xi(-2, 2), wi(-8, 8);
  const int T = 37, H = 16, E = 40, K = 4;
  MatF x(T, H), w(E, H);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(xi(g));
  for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = wi(g) / 8.0f;
  Vec<float> bias = Vec<float>::Zero(E);
  // Experts 3, 9, 17, 30 share one row and a large bias: they win every token, tied 4 ways.
  for (int e : {9, 17, 30}) w.row(e) = w.row(3);
  for (int e : {3, 9, 17, 30}) bias[e] = 4.0f;
  // Experts 5 and 6 share a row and a bias that puts them next in line: top_k = 5 and 6 below.
  w.row(6) = w.row(5);
  bias[5] = bias[6] = 2.0f;
  Outputs ref;
  ref::moe_router(x, w, bias, K, true, ref.logits, ref.experts, ref.weights);
  const Outputs o = run_gpu(x, w, bias, {T, H, E, K});
  // Exact sums: the logits agree bit for bit, and so do ids and weights.
  EXPECT_TRUE((o.logits.array() == ref.logits.array()).all());
  EXPECT_TRUE((o.experts.array() == ref.experts.array()).all());
  EXPECT_TRUE((o.weights.array() == ref.weights.array()).all());
  for (int t = 0; t < T; ++t) {
    EXPECT_EQ(o.experts(t, 0), 3);
    EXPECT_EQ(o.experts(t, 1), 9);
    EXPECT_EQ(o.experts(t, 2), 17);
    EXPECT_EQ(o.experts(t, 3), 30);
  }
  const Outputs o5 = run_gpu(x, w, bias, {T, H, E, 5});
  for (int t = 0; t < T; ++t) EXPECT_EQ(o5.experts(t, 4), 5) << "the tie between 5 and 6 goes to 5";
  // All experts tied (all rows equal, no bias): ids 0..K-1 in order.
  MatF same = w.row(0).replicate(E, 1);
  const Outputs oa = run_gpu(x, same, Vec<float>::Zero(E), {T, H, E, K});
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < K; ++j) EXPECT_EQ(oa.experts(t, j), j);
}

// A NaN in x makes the whole row's logits NaN: every key ranks as -inf, so ids 0..K-1 (the tie rule).
TEST(MoeRouter_fp32, NanRowRanksAsMinusInf) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const Case c{4, 32, 16, 4};
  MatF x = bf16_exact(test::randn<float>(c.T, c.H, g));
  x(2, 7) = std::numeric_limits<float>::quiet_NaN();
  MatF w = test::randn<float>(c.E, c.H, g, 0.2);
  Vec<float> bias = test::randn_vec<float>(c.E, g, 0.1);
  Outputs ref;
  ref::moe_router(x, w, bias, c.K, true, ref.logits, ref.experts, ref.weights);
  const Outputs o = run_gpu(x, w, bias, c);
  EXPECT_TRUE((o.experts.array() == ref.experts.array()).all());
  for (int j = 0; j < c.K; ++j) EXPECT_EQ(o.experts(2, j), j);
}

TEST(MoeRouter_fp32, RejectsBadArguments) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<gpu::bf16> x(64);
  gpu::DeviceBuffer<float> w(2048 * 8), b(2048), l(2048), wt(2048);
  gpu::DeviceBuffer<std::int32_t> e(2048);
  auto call = [&](int top_k, int T, int H, int E) {
    gpu::moe_router(x.data(), w.data(), b.data(), top_k, true, l.data(), e.data(), wt.data(), T, H, E, nullptr);
  };
  EXPECT_THROW(call(0, 1, 8, 16), gpu::GpuError);     // top_k < 1
  EXPECT_THROW(call(17, 1, 8, 16), gpu::GpuError);    // top_k > E
  EXPECT_THROW(call(4, 1, 8, 1025), gpu::GpuError);   // E beyond the kernel's limit
  EXPECT_THROW(call(4, 1, 0, 16), gpu::GpuError);     // H = 0
  EXPECT_THROW(call(4, -1, 8, 16), gpu::GpuError);    // T < 0
  EXPECT_NO_THROW(call(4, 0, 8, 16));                 // T = 0: nothing to do
}
