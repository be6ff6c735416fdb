// `m3h verify --device gpu` through its API (compare/verify.h): every op case runs on its GPU twin
// (OpCase::run_gpu) and must agree with the case's expected outputs under the tolerance policy.
//  - every committed case datasets/data/cases/*.h5 that is bf16 (all of them: scripts/make-cases);
//  - fresh bf16 cases of every op, `m3h case`-style (make_case: seeded inputs, the reference's
//    outputs), at awkward GPU-legal sizes, covering each op's GPU variants: rms_norm per head
//    (qk_norm_rope with R = 0), the dense prefill kernel on contiguous chunks (p0 = 0 and p0 > 0),
//    both msa_select kernels, both MoE GEMM paths, the fused SwiGLU, the MLP composition;
//  - negatives: one expected element changed by a lot fails (float and index outputs), an fp32
//    case is refused (msa_select's fp32 case is accepted), norm = 0 RoPE and D = 16 attention are
//    refused with a message naming why.
// The seeds come from test_rng (M3_TEST_SEED reproduces a run). Skips without a GPU.
#include "compare/cases/case.h"
#include "compare/verify.h"
#include "tests/gpu/gpu_test_util.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
using m3::Precision;
using namespace m3::cases;
using namespace m3::cmp;

// The committed cases: this file sits in tests/gpu/, the cases in datasets/data/cases/ (CMake
// compiles it by its absolute path, so __FILE__ locates the checkout). M3_CASES_DIR overrides.
fs::path cases_dir() {
  if (const char* d = std::getenv("M3_CASES_DIR")) return d;
  return fs::path(__FILE__).parent_path().parent_path().parent_path() / "datasets/data/cases";
}

std::string failures_of(const std::vector<OutputCheck>& checks) {
  std::vector<std::string> v;
  for (const OutputCheck& o : checks)
    for (const std::string& f : o.failures) v.push_back(o.name + ": " + f);
  return fmt::format("{}", fmt::join(v, "; "));
}

std::set<std::string> names_of(const std::vector<OutputCheck>& checks) {
  std::set<std::string> s;
  for (const OutputCheck& o : checks) s.insert(o.name);
  return s;
}

// Every output of the op is checked at least once, and no check was vacuous.
void expect_complete(const OpCase& op, const Params& p, const std::vector<OutputCheck>& checks) {
  const auto names = names_of(checks);
  for (const TensorSpec& s : op.outputs(p)) EXPECT_TRUE(names.count(s.name)) << "output " << s.name << " unchecked";
  for (const OutputCheck& o : checks) {
    if (o.is_index) EXPECT_GT(o.ix.count, 0) << o.name;
    else EXPECT_GT(o.f.compared, 0) << o.name;
  }
}

Case bf16_case(const std::string& op_name, const std::vector<std::string>& assignments, std::uint64_t seed,
               Precision prec = Precision::BF16) {
  const OpCase& op = find_op(op_name);
  return make_case(op, resolve_params(op, assignments), prec, seed, "test_verify_gpu");
}

// A case whose queries are one contiguous chunk p0..p0+T-1 (the prefill kernel's layout), its
// outputs recomputed by the reference.
Case chunk_case(const std::string& op_name, const std::vector<std::string>& assignments, std::int64_t p0,
                std::uint64_t seed) {
  Case c = bf16_case(op_name, assignments, seed);
  const OpCase& op = find_op(op_name);
  auto& pos = c.inputs.at("q_pos").i;
  for (std::size_t t = 0; t < pos.size(); ++t) pos[t] = p0 + static_cast<std::int64_t>(t);
  c.outputs = run_reference(op, c.params, c.inputs, c.precision);
  return c;
}

struct GenCase {
  std::string op;
  std::vector<std::string> params;
  std::vector<std::string> want;  // checks that must be present besides the plain outputs
};

// GPU-legal awkward sizes: attention and index head dims 64/128 (the compiled ones), BLK a
// multiple of 16, lengths off the block grid, odd head counts and widths, one-token cases.
const std::vector<GenCase> kGenerated = {
    {"embedding", {"T=9", "V=301", "H=72"}, {}},
    {"embedding", {"T=1", "V=1", "H=8"}, {}},
    {"rms_norm", {"T=7", "H=129"}, {}},
    {"rms_norm", {"T=5", "H=256", "heads=2"}, {}},  // per-head: qk_norm_rope's kernel with R = 0
    {"rms_norm", {"T=3", "H=72", "heads=3"}, {}},
    {"linear", {"T=7", "H_in=129", "H_out=67"}, {}},
    {"linear", {"T=1", "H_in=8", "H_out=3"}, {}},
    {"qk_norm_rope", {"T=9", "heads=4", "D=128", "R=64"}, {}},
    {"qk_norm_rope", {"T=6", "heads=3", "D=64", "R=64"}, {}},
    {"qk_norm_rope", {"T=2", "heads=5", "D=24", "R=16"}, {}},
    {"attention_dense", {"T=9", "N=300", "Hq=16", "Hkv=1", "D=128"}, {}},       // scattered queries
    {"attention_dense", {"T=37", "N=37", "Hq=8", "Hkv=2", "D=128"}, {"out@prefill"}},  // T = N: 0..N-1
    {"attention_dense", {"T=1", "N=1", "Hq=4", "Hkv=4", "D=128"}, {"out@prefill"}},
    {"attention_dense", {"T=5", "N=200", "Hq=6", "Hkv=3", "D=64"}, {}},
    {"msa_index", {"T=9", "N=300", "Hi=1", "Di=128", "BLK=16"}, {}},
    {"msa_index", {"T=6", "N=257", "Hi=3", "Di=64", "BLK=32"}, {}},
    {"msa_select", {"T=9", "N=700", "Hi=4", "BLK=16", "K_blk=16"}, {"sel@single_cta", "sel@split"}},
    {"msa_select", {"T=7", "N=200", "Hi=2", "BLK=16", "K_blk=4", "local_blocks=2", "init_blocks=1"},
     {"sel@single_cta", "sel@split"}},
    {"msa_attention", {"T=9", "N=300", "Hq=16", "Hkv=1", "D=128", "BLK=16", "K_blk=4"}, {}},
    {"msa_attention", {"T=6", "N=333", "Hq=6", "Hkv=3", "D=64", "BLK=32", "K_blk=3"}, {}},
    {"swiglu_oai", {"T=7", "H=64", "I=96"}, {}},
    {"swiglu_oai", {"T=3", "H=20", "I=28"}, {}},
    {"swiglu_oai", {"T=6", "I=28", "mlp=0"}, {"act@fused"}},
    {"moe_router", {"T=9", "H=64", "E=16", "K_e=4"}, {}},
    {"moe_router", {"T=7", "H=24", "E=9", "K_e=3", "renormalize=0"}, {}},
    {"moe_experts", {"T=9", "H=64", "I=32", "E=8", "K_e=3"}, {"y@loop"}},
    {"moe_experts", {"T=6", "H=20", "I=12", "E=5", "K_e=2", "shared=0"}, {"y@loop"}},
    {"lm_head", {"T=5", "H=64", "V=301"}, {}},
    {"lm_head", {"T=1", "H=32", "V=61"}, {}},
};

TEST(VerifyGpu_bf16, CommittedCases) {
  M3_REQUIRE_GPU();
  int n = 0;
  std::set<std::string> ops;
  for (const auto& e : fs::directory_iterator(cases_dir())) {
    if (e.path().extension() != ".h5") continue;
    const std::string path = e.path().string();
    SCOPED_TRACE(path);
    const Case c = read_case(path);
    if (c.precision != Precision::BF16) continue;  // the GPU's tier (verify.h); all committed ones are bf16
    const VerifyResult r = verify_case(path, Device::GPU);
    EXPECT_TRUE(r.pass()) << failures_of(r.outputs);
    expect_complete(find_op(c.op), c.params, r.outputs);
    ++n;
    ops.insert(c.op);
  }
  // One bf16 case per op stem (datasets/data/cases/README.md): every GPU twin is exercised.
  EXPECT_EQ(ops.size(), all_ops().size()) << fmt::format("committed bf16 cases cover {}", fmt::join(ops, ", "));
  EXPECT_GE(n, 12);
}

TEST(VerifyGpu_bf16, GeneratedCasesOfEveryOp) {
  M3_REQUIRE_GPU();
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  std::set<std::string> ops;
  for (const GenCase& gc : kGenerated) {
    const std::uint64_t seed = g();
    SCOPED_TRACE(fmt::format("{} {} seed {}", gc.op, fmt::join(gc.params, " "), seed));
    const Case c = bf16_case(gc.op, gc.params, seed);
    const auto checks = verify_outputs(c, Device::GPU);
    EXPECT_TRUE(std::all_of(checks.begin(), checks.end(), [](const OutputCheck& o) { return o.pass(); }))
        << failures_of(checks);
    expect_complete(find_op(gc.op), c.params, checks);
    const auto names = names_of(checks);
    for (const std::string& w : gc.want) EXPECT_TRUE(names.count(w)) << "no check " << w;
    for (const OutputCheck& o : checks) {
      if (o.tol.attention_rule) {
        EXPECT_TRUE(o.attn_rule) << o.name << ": the attention rule was not applied";
      }
    }
    ops.insert(gc.op);
  }
  EXPECT_EQ(ops.size(), all_ops().size());
}

// The prefill kernel on a chunk that does not start at 0 (a later chunk of a long prompt), with
// keys past the chunk in the cache (which it must not read into the causal sums).
TEST(VerifyGpu_bf16, AttentionPrefillChunkAtOffset) {
  M3_REQUIRE_GPU();
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  for (const auto& [params, p0] : std::vector<std::pair<std::vector<std::string>, std::int64_t>>{
           {{"T=45", "N=300", "Hq=16", "Hkv=2", "D=128"}, 129},   // chunk 129..173, keys up to 299
           {{"T=130", "N=130", "Hq=8", "Hkv=1", "D=128"}, 0},     // 128-query tile + 2
           {{"T=3", "N=250", "Hq=4", "Hkv=4", "D=128"}, 247}}) {  // chunk ending at N - 1
    const std::uint64_t seed = g();
    SCOPED_TRACE(fmt::format("{} p0 = {} seed {}", fmt::join(params, " "), p0, seed));
    const Case c = chunk_case("attention_dense", params, p0, seed);
    const auto checks = verify_outputs(c, Device::GPU);
    EXPECT_TRUE(names_of(checks).count("out@prefill"));
    for (const OutputCheck& o : checks) EXPECT_TRUE(o.pass()) << o.name << ": " << failures_of({o});
  }
}

// One expected element changed by a lot: the GPU path must say disagree, at that coordinate.
TEST(VerifyGpu_bf16, PerturbedExpectedOutputFails) {
  M3_REQUIRE_GPU();
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  {
    Case c = bf16_case("linear", {"T=7", "H_in=129", "H_out=67"}, g());
    ASSERT_TRUE(verify_outputs(c, Device::GPU).front().pass());
    auto& y = c.outputs.at("y").f;  // [T, H_out]
    y[3 * 67 + 17] += 4.0 + std::abs(y[3 * 67 + 17]);  // far beyond 2^-7 + 2^-6|b|
    const auto checks = verify_outputs(c, Device::GPU);
    ASSERT_EQ(checks.size(), 1u);
    EXPECT_FALSE(checks[0].pass());
    EXPECT_EQ(checks[0].f.violations, 1);
    EXPECT_NE(failures_of(checks).find("[3, 17]"), std::string::npos) << failures_of(checks);
  }
  {  // attention: the prefill variant is checked against the same expected output and fails too
    Case c = chunk_case("attention_dense", {"T=20", "N=20", "Hq=4", "Hkv=2", "D=128"}, 0, g());
    c.outputs.at("out").f[5 * 512 + 100] += 8.0;
    const auto checks = verify_outputs(c, Device::GPU);
    ASSERT_EQ(checks.size(), 2u);
    for (const OutputCheck& o : checks) {
      EXPECT_FALSE(o.pass()) << o.name;
      EXPECT_EQ(o.f.violations, 1) << o.name;
    }
  }
  {  // an index output: one selected block dropped. (Not swapped for a neighbour id: random
     // scores are within the near-tie window of each other a few percent of the time.)
    Case c = bf16_case("msa_select", {"T=9", "N=700", "Hi=4", "BLK=16", "K_blk=16"}, g());
    auto& sel = c.outputs.at("sel").i;  // [Hi*T, K_blk]
    const std::size_t at = 5 * 16;       // row 5, slot 0: always a block (the local one at least)
    ASSERT_GE(sel[at], 0);
    sel[at] = -1;
    const auto checks = verify_outputs(c, Device::GPU);
    for (const OutputCheck& o : checks) EXPECT_FALSE(o.pass()) << o.name;
  }
}

// Requests the GPU path refuses: a CaseError (m3h exit 2) whose message says why.
TEST(VerifyGpu_bf16, RefusedRequests) {
  M3_REQUIRE_GPU();
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  auto expect_refused = [](const Case& c, const std::string& why) {
    try {
      verify_outputs(c, Device::GPU);
      ADD_FAILURE() << c.op << ": accepted, expected a CaseError with '" << why << "'";
    } catch (const CaseError& e) {
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
    }
  };
  expect_refused(bf16_case("linear", {"T=3"}, g(), Precision::FP32), "write the case with --precision bf16");
  expect_refused(bf16_case("moe_router", {}, g(), Precision::FP32), "write the case with --precision bf16");
  expect_refused(bf16_case("attention_dense", {}, g(), Precision::FP64), "write the case with --precision bf16");
  expect_refused(bf16_case("qk_norm_rope", {"norm=0"}, g()), "no GPU twin");
  expect_refused(bf16_case("attention_dense", {"D=48"}, g()), "expected 16, 32, 64 or 128");
  // msa_select's GPU path is fp32 (scores) and exact (ids) end to end: its fp32 cases are checked.
  const Case sel32 = bf16_case("msa_select", {}, g(), Precision::FP32);
  const auto checks = verify_outputs(sel32, Device::GPU);
  for (const OutputCheck& o : checks) EXPECT_TRUE(o.pass()) << o.name << ": " << failures_of({o});
}

}  // namespace
