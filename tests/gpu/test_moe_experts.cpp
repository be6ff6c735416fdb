// gpu::moe_experts against the bf16-emulating reference twin (ref::moe_experts<float> on bf16-rounded
// x and weights, output rounded to bf16), through both GEMM paths (grouped, per-expert loop): awkward
// sizes, experts with no tokens, every token on one expert (with duplicate slots), the expert
// offsets of the permutation (exact), bitwise repeats, y aliasing x, an out-of-range expert id (the
// documented NaN row, nothing else disturbed) and bad arguments.
#include "gpu/kernels/moe_experts.h"
#include "reference/ops/moe_experts.h"
#include "tests/gpu/gpu_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

using namespace m3;
using m3::test::bf16_exact;

namespace {

// The GPU stores three intermediates in bf16 that the reference keeps in fp32: gate_up, act and each
// expert's output rows. Each rounding is a relative error of at most 2^-9 (rms 2^-9 / sqrt(3) = 1.1e-3
// for uniformly spread rounding errors) of the value it rounds; the down projection sums I such
// independent errors with random-sign weights, so the output error stays ~1e-3 of the output's rms
// per rounding, and SwiGLU's sensitivity to its inputs is O(1). Three roundings plus the final one
// give a rel-L2 of a few 1e-3 (measured: 3.0-4.5e-3); 1e-2 keeps a margin of ~2, while a wrong row,
// weight or expert is O(1).
constexpr double kRelL2 = 1e-2;
// Elementwise: both sides' final bf16 roundings (1 ulp each at 2^-8 relative worst case) plus the
// intermediate-rounding error above, which is absolute at the scale of the row, not of the element
// (outputs near zero keep the full error), with heavier tails than a Gaussian (SwiGLU amplifies some
// gate roundings): measured on an H200 over 40 comparisons, rel-L2 3.0-4.5e-3 and max |diff| up to
// 0.051 rms. atol = 0.1 rms leaves a factor 2 on that tail, while a wrong row, chunk of columns or
// missing slot is O(rms) on many elements and fails rel-L2 as well.
constexpr double kUlps = 2.0;
constexpr double kAtolOfRms = 0.1;
constexpr double kRoutedScale = 1.7;  // != 1, so a missing or doubled scale shows

enum class Routing {
  UNIFORM,  // K_e distinct experts per token, uniform
  FEW,      // K_e distinct experts out of {0, E/2, E-1}: the others get no token
  ONE,      // every slot of every token on expert E/3 (K_e > 1: duplicate slots)
};

struct Case {
  int T, H, E, K, I, Is;
  Routing routing = Routing::UNIFORM;
};

std::string describe(const Case& c, gpu::MoeGemmPath path) {
  return "T=" + std::to_string(c.T) + " H=" + std::to_string(c.H) + " E=" + std::to_string(c.E) +
         " K_e=" + std::to_string(c.K) + " I=" + std::to_string(c.I) + " Is=" + std::to_string(c.Is) +
         " routing=" + std::to_string(static_cast<int>(c.routing)) +
         (path == gpu::MoeGemmPath::GROUPED ? " grouped" : " loop");
}

// Host inputs (bf16-exact) and their device copies.
struct Problem {
  MatF x;        // [T, H]
  MatI ids;      // [T, K_e]
  MatF wts;      // [T, K_e] fp32 routing weights
  std::vector<ref::MlpWeights<float>> ex;
  ref::MlpWeights<float> sh;
  gpu::DeviceBuffer<gpu::bf16> dx, dgu, ddown, dsgu, dsdown;
  gpu::DeviceBuffer<std::int32_t> dids;
  gpu::DeviceBuffer<float> dwts;
  gpu::MoeExpertWeights w;
};

MatI make_routing(const Case& c, std::mt19937_64& g) {
  MatI ids(c.T, c.K);
  std::vector<int> pool;
  if (c.routing == Routing::FEW) pool = {0, c.E / 2, c.E - 1};
  else {
    pool.resize(c.E);
    std::iota(pool.begin(), pool.end(), 0);
  }
  for (int t = 0; t < c.T; ++t) {
    if (c.routing == Routing::ONE) {
      ids.row(t).setConstant(c.E / 3);
      continue;
    }
    for (int j = 0; j < c.K; ++j) {  // partial Fisher-Yates: K distinct ids
      std::uniform_int_distribution<int> u(j, static_cast<int>(pool.size()) - 1);
      std::swap(pool[j], pool[u(g)]);
      ids(t, j) = pool[j];
    }
  }
  return ids;
}

Problem make_problem(const Case& c, std::mt19937_64& g) {
  Problem P;
  P.x = bf16_exact(test::randn<float>(c.T, c.H, g));
  P.ids = make_routing(c, g);
  std::uniform_real_distribution<float> uw(0.05f, 1.f);
  P.wts = MatF(c.T, c.K);
  for (Eigen::Index i = 0; i < P.wts.size(); ++i) P.wts.data()[i] = uw(g);
  // Weights scaled so gate/up and the outputs are O(1): a few inputs cross the SwiGLU clamp (7).
  const auto mlp = [&](int I) {
    ref::MlpWeights<float> m;
    m.gate = bf16_exact(test::randn<float>(I, c.H, g, 1.5 / std::sqrt(c.H)));
    m.up = bf16_exact(test::randn<float>(I, c.H, g, 1.5 / std::sqrt(c.H)));
    m.down = bf16_exact(test::randn<float>(c.H, I, g, 1.0 / std::sqrt(I)));
    return m;
  };
  std::vector<float> gu, dn;  // [E, 2I, H], [E, H, I]
  for (int e = 0; e < c.E; ++e) {
    P.ex.push_back(mlp(c.I));
    const auto& m = P.ex.back();
    gu.insert(gu.end(), m.gate.data(), m.gate.data() + m.gate.size());
    gu.insert(gu.end(), m.up.data(), m.up.data() + m.up.size());
    dn.insert(dn.end(), m.down.data(), m.down.data() + m.down.size());
  }
  const auto up = [](const std::vector<float>& h) {
    gpu::DeviceBuffer<gpu::bf16> d(h.size());
    d.upload(gpu::to_bf16(h.data(), h.size()));
    return d;
  };
  P.dx = test::upload_bf16(P.x);
  P.dgu = up(gu);
  P.ddown = up(dn);
  P.w.gate_up = P.dgu.data();
  P.w.down = P.ddown.data();
  P.w.E = c.E;
  P.w.I = c.I;
  if (c.Is > 0) {
    P.sh = mlp(c.Is);
    std::vector<float> sgu(P.sh.gate.data(), P.sh.gate.data() + P.sh.gate.size());
    sgu.insert(sgu.end(), P.sh.up.data(), P.sh.up.data() + P.sh.up.size());
    P.dsgu = up(sgu);
    P.dsdown = test::upload_bf16(P.sh.down);
    P.w.shared_gate_up = P.dsgu.data();
    P.w.shared_down = P.dsdown.data();
    P.w.Is = c.Is;
  }
  P.dids = gpu::DeviceBuffer<std::int32_t>(static_cast<std::size_t>(P.ids.size()));
  P.dids.upload(P.ids.data(), static_cast<std::size_t>(P.ids.size()));
  P.dwts = gpu::DeviceBuffer<float>(static_cast<std::size_t>(P.wts.size()));
  P.dwts.upload(P.wts.data(), static_cast<std::size_t>(P.wts.size()));
  return P;
}

// The bf16-emulating reference output (ids must all be valid).
MatF reference(const Problem& P, const MatI& ids, const gpu::SwigluParams& p) {
  MatF y;
  ref::moe_experts(P.x, ids, P.wts, P.ex, P.sh, kRoutedScale,
                   ref::SwigluParams{static_cast<double>(p.alpha), static_cast<double>(p.limit),
                                     static_cast<double>(p.beta)},
                   y);
  return bf16_exact(y);
}

// Runs the GPU op into a [T + 2, H] buffer poisoned with 0xFF bytes (NaN), y being rows 1..T; checks
// that the guard rows 0 and T + 1 are untouched and returns the raw bf16 bits of y.
std::vector<std::uint16_t> run_gpu(const Case& c, Problem& P, const gpu::SwigluParams& p, gpu::MoeGemmPath path,
                                   gpu::CublasHandle& h, gpu::DeviceBuffer<unsigned char>& ws) {
  const std::size_t TH = static_cast<std::size_t>(c.T) * c.H;
  gpu::DeviceBuffer<gpu::bf16> dy(TH + 2 * static_cast<std::size_t>(c.H));
  dy.fill_bytes(0xFF);
  gpu::moe_experts(h.get(), P.dx.data(), P.dids.data(), P.dwts.data(), c.T, c.H, c.K, P.w, kRoutedScale, p,
                   dy.data() + c.H, ws.data(), ws.size(), nullptr, path);
  const auto raw = dy.download();
  std::vector<std::uint16_t> bits(raw.size());
  std::memcpy(bits.data(), raw.data(), raw.size() * sizeof(std::uint16_t));
  long guard_bad = 0;
  for (int i = 0; i < c.H; ++i) guard_bad += (bits[i] != 0xFFFF) + (bits[TH + c.H + i] != 0xFFFF);
  EXPECT_EQ(guard_bad, 0) << "writes outside y";
  return std::vector<std::uint16_t>(bits.begin() + c.H, bits.begin() + c.H + static_cast<std::ptrdiff_t>(TH));
}

MatF to_mat(const std::vector<std::uint16_t>& bits, int rows, int cols) {
  MatF m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = bf16_bits_to_float(bits[static_cast<std::size_t>(i)]);
  return m;
}

// Compares y with the reference over the rows in `rows` (all when empty).
void expect_close(const MatF& y, const MatF& ref, const std::vector<int>& rows = {}) {
  MatF a = y, b = ref;
  if (!rows.empty()) {
    a.resize(static_cast<Eigen::Index>(rows.size()), y.cols());
    b.resize(a.rows(), a.cols());
    for (std::size_t i = 0; i < rows.size(); ++i) {
      a.row(static_cast<Eigen::Index>(i)) = y.row(rows[i]);
      b.row(static_cast<Eigen::Index>(i)) = ref.row(rows[i]);
    }
  }
  ASSERT_TRUE(a.allFinite());
  ASSERT_GT(b.norm(), 0.0);
  const double rms = b.norm() / std::sqrt(static_cast<double>(b.size()));
  const double err = test::rel_l2(a, b);
  EXPECT_LE(err, kRelL2);
  EXPECT_EQ(test::bf16_violations(a, b, kUlps, kAtolOfRms * rms), 0)
      << "rel-L2 " << err << ", max |diff| / rms " << (a - b).cwiseAbs().maxCoeff() / rms;
}

// The counting sort's offsets, on the host: off[e] = pairs with an id < e.
std::vector<std::int32_t> host_offsets(const MatI& ids, int E) {
  std::vector<std::int32_t> off(static_cast<std::size_t>(E) + 1, 0);
  for (Eigen::Index i = 0; i < ids.size(); ++i) ++off[static_cast<std::size_t>(ids.data()[i]) + 1];
  std::partial_sum(off.begin(), off.end(), off.begin());
  return off;
}

void run_case(const Case& c, gpu::MoeGemmPath path) {
  SCOPED_TRACE(describe(c, path));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  Problem P = make_problem(c, g);
  const gpu::SwigluParams p;
  const MatF ref = reference(P, P.ids, p);
  ASSERT_GT(P.x.norm(), 0.0);

  gpu::CublasHandle h;
  gpu::DeviceBuffer<unsigned char> ws(gpu::moe_experts_workspace_bytes(c.T, c.H, c.K, P.w));
  const MatF y = to_mat(run_gpu(c, P, p, path, h, ws), c.T, c.H);
  expect_close(y, ref);
  // The permutation's offsets exactly (index output).
  const auto off = host_offsets(P.ids, c.E);
  EXPECT_EQ(gpu::moe_experts_offsets(c.T, c.H, c.K, P.w, ws.data(), nullptr), off);
  if (c.routing != Routing::UNIFORM) {  // coverage: the case really leaves experts empty
    int empty = 0;
    for (int e = 0; e < c.E; ++e) empty += off[e + 1] == off[e];
    EXPECT_GT(empty, 0);
  }
}

const std::vector<Case> kAwkward = {
    {1, 64, 8, 1, 48, 0},       // one token, no shared expert
    {7, 200, 8, 2, 96, 64},     // H not a power of two
    {133, 136, 33, 4, 72, 80},  // E = 33: many experts with a handful of rows
    {133, 100, 33, 2, 56, 0},   // H % 8 != 0: scalar gather/combine, grouped falls back to the loop
    {61, 131, 8, 4, 50, 40},    // odd H, I % 8 != 0
    {133, 192, 33, 1, 64, 96},  // K_e = 1
};

}  // namespace

TEST(MoeExperts_bf16, Grouped_AwkwardSizes) {
  M3_REQUIRE_GPU();
  for (const Case& c : kAwkward) run_case(c, gpu::MoeGemmPath::GROUPED);
}

TEST(MoeExperts_bf16, Loop_AwkwardSizes) {
  M3_REQUIRE_GPU();
  for (const Case& c : kAwkward) run_case(c, gpu::MoeGemmPath::LOOP);
}

TEST(MoeExperts_bf16, EmptyExperts_FewRouted) {
  M3_REQUIRE_GPU();
  for (auto path : {gpu::MoeGemmPath::GROUPED, gpu::MoeGemmPath::LOOP}) {
    run_case({133, 136, 33, 2, 72, 80, Routing::FEW}, path);
    run_case({50, 64, 8, 3, 48, 0, Routing::FEW}, path);
  }
}

TEST(MoeExperts_bf16, AllTokensToOneExpert) {
  M3_REQUIRE_GPU();
  for (auto path : {gpu::MoeGemmPath::GROUPED, gpu::MoeGemmPath::LOOP}) {
    run_case({133, 136, 8, 1, 72, 48, Routing::ONE}, path);
    run_case({77, 200, 33, 2, 64, 0, Routing::ONE}, path);  // both slots on one expert: duplicate pairs
  }
}

TEST(MoeExperts_bf16, RepeatIsBitIdentical) {
  M3_REQUIRE_GPU();
  const Case c{133, 136, 33, 4, 72, 80};
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  Problem P = make_problem(c, g);
  gpu::CublasHandle h;
  gpu::DeviceBuffer<unsigned char> ws(gpu::moe_experts_workspace_bytes(c.T, c.H, c.K, P.w));
  for (auto path : {gpu::MoeGemmPath::GROUPED, gpu::MoeGemmPath::LOOP}) {
    SCOPED_TRACE(describe(c, path));
    const auto a = run_gpu(c, P, {}, path, h, ws);
    const auto b = run_gpu(c, P, {}, path, h, ws);
    EXPECT_TRUE(a == b) << "two calls on the same inputs differ";
    EXPECT_TRUE(to_mat(a, c.T, c.H).allFinite());
  }
}

TEST(MoeExperts_bf16, OutputMayAliasInput) {
  M3_REQUIRE_GPU();
  const Case c{33, 128, 8, 2, 64, 32};
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  Problem P = make_problem(c, g);
  const gpu::SwigluParams p;
  const MatF ref = reference(P, P.ids, p);
  gpu::CublasHandle h;
  gpu::DeviceBuffer<unsigned char> ws(gpu::moe_experts_workspace_bytes(c.T, c.H, c.K, P.w));
  gpu::moe_experts(h.get(), P.dx.data(), P.dids.data(), P.dwts.data(), c.T, c.H, c.K, P.w, kRoutedScale, p,
                   P.dx.data(), ws.data(), ws.size(), nullptr);
  expect_close(test::download_bf16(P.dx, c.T, c.H), ref);
}

// Ids outside [0, E) (E itself and -1): those tokens' rows are NaN, every other row is the reference's
// (computed with the bad ids replaced: the other rows do not depend on them), y's guards intact.
TEST(MoeExperts_bf16, OutOfRangeExpertGivesNanRow) {
  M3_REQUIRE_GPU();
  const Case c{9, 64, 8, 2, 48, 32};
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  Problem P = make_problem(c, g);
  const gpu::SwigluParams p;
  const MatF ref = reference(P, P.ids, p);
  MatI bad = P.ids;
  bad(3, 1) = c.E;
  bad(6, 0) = -1;
  P.dids.upload(bad.data(), static_cast<std::size_t>(bad.size()));
  gpu::CublasHandle h;
  gpu::DeviceBuffer<unsigned char> ws(gpu::moe_experts_workspace_bytes(c.T, c.H, c.K, P.w));
  for (auto path : {gpu::MoeGemmPath::GROUPED, gpu::MoeGemmPath::LOOP}) {
    SCOPED_TRACE(describe(c, path));
    const MatF y = to_mat(run_gpu(c, P, p, path, h, ws), c.T, c.H);
    EXPECT_TRUE(y.row(3).array().isNaN().all());
    EXPECT_TRUE(y.row(6).array().isNaN().all());
    expect_close(y, ref, {0, 1, 2, 4, 5, 7, 8});
  }
}

TEST(MoeExperts_bf16, ZeroTokensIsNoOp) {
  M3_REQUIRE_GPU();
  gpu::MoeExpertWeights w;
  gpu::DeviceBuffer<gpu::bf16> dummy(8);
  w.gate_up = w.down = dummy.data();
  w.E = 4;
  w.I = 8;
  EXPECT_EQ(gpu::moe_experts_workspace_bytes(0, 64, 2, w), 0u);
  gpu::CublasHandle h;
  EXPECT_NO_THROW(gpu::moe_experts(h.get(), nullptr, nullptr, nullptr, 0, 64, 2, w, 1.0, {}, nullptr, nullptr, 0,
                                   nullptr));
}

TEST(MoeExperts_bf16, RejectsBadArguments) {
  M3_REQUIRE_GPU();
  const Case c{5, 64, 8, 2, 48, 32};
  auto g = test::test_rng();
  Problem P = make_problem(c, g);
  gpu::CublasHandle h;
  const std::size_t need = gpu::moe_experts_workspace_bytes(c.T, c.H, c.K, P.w);
  gpu::DeviceBuffer<unsigned char> ws(need);
  gpu::DeviceBuffer<gpu::bf16> dy(static_cast<std::size_t>(c.T) * c.H);
  const auto call = [&](int K, const gpu::MoeExpertWeights& w, const float* wts, std::size_t bytes,
                        cublasHandle_t hh) {
    gpu::moe_experts(hh, P.dx.data(), P.dids.data(), wts, c.T, c.H, K, w, kRoutedScale, {}, dy.data(), ws.data(),
                     bytes, nullptr);
  };
  EXPECT_THROW(call(0, P.w, P.dwts.data(), need, h.get()), gpu::GpuError);
  EXPECT_THROW(call(-1, P.w, P.dwts.data(), need, h.get()), gpu::GpuError);
  EXPECT_THROW(call(gpu::kMoeMaxExpertsPerToken + 1, P.w, P.dwts.data(), need, h.get()), gpu::GpuError);
  EXPECT_THROW(gpu::moe_experts_workspace_bytes(c.T, c.H, 0, P.w), gpu::GpuError);
  EXPECT_THROW(gpu::moe_experts_workspace_bytes(c.T, 0, c.K, P.w), gpu::GpuError);
  gpu::MoeExpertWeights no_gate_up = P.w, no_down = P.w, half_shared = P.w, no_experts = P.w;
  no_gate_up.gate_up = nullptr;
  no_down.down = nullptr;
  half_shared.shared_down = nullptr;
  no_experts.E = 0;
  EXPECT_THROW(call(c.K, no_gate_up, P.dwts.data(), need, h.get()), gpu::GpuError);
  EXPECT_THROW(call(c.K, no_down, P.dwts.data(), need, h.get()), gpu::GpuError);
  EXPECT_THROW(call(c.K, half_shared, P.dwts.data(), need, h.get()), gpu::GpuError);
  EXPECT_THROW(call(c.K, no_experts, P.dwts.data(), need, h.get()), gpu::GpuError);
  EXPECT_THROW(call(c.K, P.w, nullptr, need, h.get()), gpu::GpuError);  // null routing weights
  EXPECT_THROW(call(c.K, P.w, P.dwts.data(), need - 1, h.get()), gpu::GpuError);
  EXPECT_THROW(call(c.K, P.w, P.dwts.data(), need, nullptr), gpu::GpuError);
  // The valid call goes through (the throws above came from the checks, not from the setup).
  EXPECT_NO_THROW(call(c.K, P.w, P.dwts.data(), need, h.get()));
}
