// Op case files end to end (compare/cases, compare/verify.h), for every registered op and each
// precision: a generated case verifies; an independent evaluation (the fp64 reference rounded to
// the case's storage) passes the tolerance tier; one perturbed output element is reported as a
// disagreement at its coordinates; a NaN input, a wrong format attribute, a missing input and a
// misshapen input are rejected with a message naming them. Plus the metrics' near-tie rule.
#include "compare/cases/case.h"
#include "compare/metrics.h"
#include "compare/verify.h"
#include "datasets/hdf5.h"
#include "tests/test_util.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <random>
#include <string>

namespace {

namespace fs = std::filesystem;
using m3::MatD;
using m3::Precision;
using namespace m3::cases;
using namespace m3::cmp;

// A fresh folder per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            fmt::format("m3h_cases_{}_{}_{}", info->name(), ::getpid(), std::random_device{}());
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

struct Param {
  std::string op;
  Precision precision;
  std::vector<std::string> assignments;  // variants: rms_norm heads, qk_norm_rope norm, swiglu mlp
  std::string label;
};

void PrintTo(const Param& p, std::ostream* os) { *os << p.label; }

std::vector<Param> all_params() {
  std::vector<Param> v;
  for (const OpCase* op : all_ops())
    for (Precision p : {Precision::FP32, Precision::BF16, Precision::FP64})
      v.push_back({op->op(), p, {}, fmt::format("{}_{}", op->op(), m3::precision_name(p))});
  // The other entry point of the stems that have two (and one size at 1 token).
  v.push_back({"rms_norm", Precision::FP32, {"heads=3"}, "rms_norm_heads_fp32"});
  v.push_back({"qk_norm_rope", Precision::BF16, {"norm=0"}, "rope_neox_bf16"});
  v.push_back({"swiglu_oai", Precision::FP32, {"mlp=0"}, "swiglu_act_fp32"});
  v.push_back({"msa_attention", Precision::BF16, {"T=1", "N=129", "BLK=16", "K_blk=4"}, "msa_attention_decode_bf16"});
  v.push_back({"msa_select", Precision::FP32, {"T=9", "init_blocks=1", "local_blocks=2", "K_blk=5"},
               "msa_select_init_local_fp32"});
  return v;
}

class OpCaseTest : public ::testing::TestWithParam<Param> {
 protected:
  Case make() const {
    const OpCase& op = find_op(GetParam().op);
    return make_case(op, resolve_params(op, GetParam().assignments), GetParam().precision, m3::test::test_seed(),
                     "test_cases");
  }
};

// The first finite element at or after the middle (msa_index scores hold -inf past each query's block).
std::size_t pick(const Tensor& t) {
  const std::size_t n = t.f.empty() ? t.i.size() : t.f.size();
  for (std::size_t k = 0; k < n; ++k) {
    const std::size_t i = (n / 2 + k) % n;
    if (t.f.empty() || std::isfinite(t.f[i])) return i;
  }
  return 0;
}

const OutputCheck& check_of(const std::vector<OutputCheck>& v, const std::string& name) {
  for (const OutputCheck& o : v)
    if (o.name == name) return o;
  throw std::logic_error("no output " + name);
}

TEST_P(OpCaseTest, GeneratedCaseAgrees) {
  SCOPED_TRACE(m3::test::seed_note());
  TempDir dir;
  const Case c = make();
  // Not vacuous: every float input has a non-zero norm.
  for (const auto& [name, t] : c.inputs) {
    double ss = 0;
    for (double x : t.f) ss += std::isfinite(x) ? x * x : 0;
    if (!t.f.empty()) {
      EXPECT_GT(ss, 0) << "input " << name;
    }
  }
  const std::string path = dir.file("case.h5");
  write_case(path, c);
  const VerifyResult r = verify_case(path, Device::CPU);
  ASSERT_TRUE(r.pass());
  ASSERT_EQ(r.outputs.size(), find_op(c.op).outputs(c.params).size());
  for (const OutputCheck& o : r.outputs) {
    SCOPED_TRACE(o.name);
    if (o.is_index) {
      EXPECT_TRUE(o.ix.exact());
      EXPECT_EQ(o.ix.exact_rate, 1.0);
      continue;
    }
    // The same deterministic reference on the same stored inputs: bit for bit.
    EXPECT_EQ(o.f.rel_l2, 0.0);
    EXPECT_EQ(o.f.max_abs, 0.0);
    EXPECT_GT(o.f.ref_norm, 0.0);
    EXPECT_GT(o.f.compared, 0);
    EXPECT_EQ(o.f.pass_pct, 100.0);
  }
  // The file holds what was written: storage round trip is exact.
  const Case back = read_case(path);
  for (Tensors Case::*group : {&Case::inputs, &Case::outputs})
    for (const auto& [name, t] : c.*group) {
      const Tensor& u = (back.*group).at(name);
      EXPECT_EQ(u.dims, t.dims) << name;
      EXPECT_EQ(u.i, t.i) << name;
      ASSERT_EQ(u.f.size(), t.f.size()) << name;
      for (std::size_t i = 0; i < t.f.size(); ++i)
        ASSERT_TRUE(u.f[i] == t.f[i] || (std::isnan(u.f[i]) && std::isnan(t.f[i]))) << name << " element " << i;
    }
}

// An independent evaluation, the fp64 reference rounded to the case's storage, must pass the
// tier: the tolerances are not tighter than the reference's own rounding.
class Fp64EvalTest : public OpCaseTest {};

TEST_P(Fp64EvalTest, Fp64EvaluationPassesTheTier) {
  SCOPED_TRACE(m3::test::seed_note());
  Case c = make();
  const OpCase& op = find_op(c.op);
  c.outputs = run_reference(op, c.params, c.inputs, Precision::FP64);
  round_to_storage(op.outputs(c.params), c.precision, c.outputs);
  const auto checks = verify_outputs(c, Device::CPU);
  for (const OutputCheck& o : checks) {
    SCOPED_TRACE(o.name);
    EXPECT_TRUE(o.pass()) << (o.failures.empty() ? "" : o.failures.front());
    if (!o.is_index) {
      EXPECT_GT(o.f.ref_norm, 0.0);
    }
  }
}

TEST_P(OpCaseTest, PerturbedOutputDisagreesAtItsCoordinates) {
  SCOPED_TRACE(m3::test::seed_note());
  TempDir dir;
  const Case c = make();
  for (const auto& [name, t] : c.outputs) {
    SCOPED_TRACE(name);
    Case bad = c;
    Tensor& u = bad.outputs.at(name);
    const std::size_t i = pick(u);
    // Far beyond every tier: 0.5 + 0.5|b| against at most 2^-7 + 2^-6|b| (bf16).
    if (u.f.empty()) u.i[i] = u.i[i] >= 0 ? u.i[i] + 1 : 0;
    else u.f[i] += 0.5 + 0.5 * std::abs(u.f[i]);
    const std::string path = dir.file("bad_" + name + ".h5");
    write_case(path, bad);
    const VerifyResult r = verify_case(path, Device::CPU);
    EXPECT_FALSE(r.pass());
    const OutputCheck& o = check_of(r.outputs, name);
    ASSERT_FALSE(o.pass());
    const Coord want = unravel(static_cast<std::int64_t>(i), u.dims);
    const auto& first = o.is_index ? o.ix.first : o.f.first;
    ASSERT_FALSE(first.empty());
    EXPECT_EQ(first.front().at, want);
    bool named = false;  // some failure line names the coordinates
    for (const std::string& f : o.failures) named |= f.find(coord_str(want)) != std::string::npos;
    EXPECT_TRUE(named) << o.failures.front();
    if (!o.is_index) {
      EXPECT_EQ(o.f.violations, 1);
      EXPECT_EQ(o.f.max_at.at, want);
    }
    for (const OutputCheck& other : r.outputs) {  // one bad element does not spread to the others
      if (other.name != name) {
        EXPECT_TRUE(other.pass()) << other.name;
      }
    }
  }
}

TEST_P(OpCaseTest, NanInputIsRejectedWithItsCoordinates) {
  SCOPED_TRACE(m3::test::seed_note());
  TempDir dir;
  Case c = make();
  for (auto& [name, t] : c.inputs) {
    if (t.f.empty()) continue;
    const std::size_t i = pick(t);
    t.f[i] = std::numeric_limits<double>::quiet_NaN();
    const std::string path = dir.file("nan.h5");
    write_case(path, c);
    const std::string want = fmt::format("input /inputs/{} has NaN at {}", name,
                                         coord_str(unravel(static_cast<std::int64_t>(i), t.dims)));
    try {
      verify_case(path, Device::CPU);
      ADD_FAILURE() << "a NaN in " << name << " was accepted";
    } catch (const CaseError& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
    return;  // one poisoned input per case is enough
  }
}

TEST_P(OpCaseTest, BadFilesAreRejectedByName) {
  SCOPED_TRACE(m3::test::seed_note());
  TempDir dir;
  const Case c = make();
  const std::string first_input = find_op(c.op).inputs(c.params).front().name;
  auto expect_error = [&](const std::string& path, const std::string& want) {
    try {
      verify_case(path, Device::CPU);
      ADD_FAILURE() << "accepted " << path << ", expected an error containing: " << want;
    } catch (const CaseError& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("HINT"), std::string::npos) << e.what();
    }
  };
  const std::string fmt_path = dir.file("format.h5");
  write_case(fmt_path, c);
  m3::h5::File::open_rw(fmt_path).set_attr("/", "format", std::string("m3h-golden"));
  expect_error(fmt_path, "attribute format is 'm3h-golden', expected 'm3h-case'");

  const std::string missing = dir.file("missing.h5");
  write_case(missing, c);
  {
    auto f = m3::h5::File::open_rw(missing);
    ASSERT_GE(H5Ldelete(f.id(), ("/inputs/" + first_input).c_str(), H5P_DEFAULT), 0);
  }
  expect_error(missing, fmt::format("input /inputs/{} is missing", first_input));

  const std::string shape = dir.file("shape.h5");
  write_case(shape, c);
  {
    auto f = m3::h5::File::open_rw(shape);
    ASSERT_GE(H5Ldelete(f.id(), ("/inputs/" + first_input).c_str(), H5P_DEFAULT), 0);
    const std::vector<std::int64_t> d = {3, 1, 2};
    const std::int64_t zeros[6] = {};
    f.write("/inputs/" + first_input, zeros, d);
  }
  expect_error(shape, fmt::format("input /inputs/{} has shape [3, 1, 2], expected", first_input));

  const std::string op_path = dir.file("op.h5");
  write_case(op_path, c);
  m3::h5::File::open_rw(op_path).set_attr("/", "op", std::string("flash_mla"));
  expect_error(op_path, "unknown op 'flash_mla'");

  EXPECT_THROW(verify_case(fmt_path, Device::GPU), CaseError);
}

std::string label(const ::testing::TestParamInfo<Param>& i) { return i.param.label; }

INSTANTIATE_TEST_SUITE_P(AllOps, OpCaseTest, ::testing::ValuesIn(all_params()), label);

// fp64 cases have no coarser tier to check an fp64 evaluation against.
std::vector<Param> non_fp64_params() {
  std::vector<Param> v;
  for (const Param& p : all_params())
    if (p.precision != Precision::FP64) v.push_back(p);
  return v;
}
INSTANTIATE_TEST_SUITE_P(AllOps, Fp64EvalTest, ::testing::ValuesIn(non_fp64_params()), label);

// --- the bf16 MLPs' per-element rounding allowance (compare/tolerance.h kBf16RoundingFactor) ---

// moe_experts and swiglu_oai (mlp = 1) give one; no other op (nor swiglu_oai's mlp = 0) does. It is
// a fraction of the output, not a blanket: over 40 seeds the mean allowance stays under 15% of the
// output's rms. And it does not hide a wrong expert: routing one token to another expert fails
// (rel-L2 or elementwise), on every seed.
TEST(CaseRoundingScale, MlpsOnlyBoundedAndAWrongExpertStillFails) {
  SCOPED_TRACE(m3::test::seed_note());
  const std::uint64_t seed0 = m3::test::test_seed();
  for (const auto& o : all_ops()) {
    const Params p = resolve_params(*o, {});
    const Case c = make_case(*o, p, Precision::BF16, seed0, "rounding_scale");
    const Tensors s = o->rounding_scale(c.params, c.inputs);
    const bool mlp = o->op() == "moe_experts" || o->op() == "swiglu_oai";
    EXPECT_EQ(!s.empty(), mlp) << o->op();
  }
  const Params p0 = resolve_params(find_op("swiglu_oai"), {"mlp=0"});
  EXPECT_TRUE(find_op("swiglu_oai").rounding_scale(p0, make_case(find_op("swiglu_oai"), p0, Precision::BF16, seed0, "rs").inputs).empty());

  for (const char* name : {"moe_experts", "swiglu_oai"}) {
    SCOPED_TRACE(name);
    const OpCase& op = find_op(name);
    const Params p = resolve_params(op, {});
    double worst = 0;
    for (std::uint64_t k = 0; k < 40; ++k) {
      const Case c = make_case(op, p, Precision::BF16, seed0 + k, "rounding_scale");
      const Tensor& y = c.outputs.at("y");
      const Tensors scale = op.rounding_scale(c.params, c.inputs);
      const Tensor& s = scale.at("y");
      ASSERT_EQ(s.dims, y.dims);
      double ss = 0, yy = 0;
      for (std::size_t i = 0; i < y.f.size(); ++i) {
        ASSERT_TRUE(std::isfinite(s.f[i]) && s.f[i] > 0) << "element " << i;
        ss += kBf16RoundingFactor * s.f[i];
        yy += y.f[i] * y.f[i];
      }
      worst = std::max(worst, (ss / y.f.size()) / std::sqrt(yy / y.f.size()));
    }
    std::printf("[rounding scale] %s: the largest mean allowance over 40 seeds, %.3f of the output's rms\n", name, worst);
    EXPECT_LT(worst, 0.15) << "mean allowance over the output's rms";
  }

  const OpCase& moe = find_op("moe_experts");
  const Params p = resolve_params(moe, {});
  for (std::uint64_t k = 0; k < 20; ++k) {
    Case c = make_case(moe, p, Precision::BF16, seed0 + k, "rounding_scale");
    Tensor& ex = c.inputs.at("experts");  // token 0's first expert -> one it does not use
    const std::int64_t E = pint(c.params, "E"), K = pint(c.params, "K_e");
    std::int64_t e = (ex.i[0] + 1) % E;
    for (bool used = true; used;) {
      used = false;
      for (std::int64_t j = 0; j < K; ++j) used |= ex.i[static_cast<std::size_t>(j)] == e;
      if (used) e = (e + 1) % E;
    }
    ex.i[0] = e;  // c.outputs stay those of the right routing
    bool failed = false;
    for (const OutputCheck& o : verify_outputs(c, Device::CPU)) failed |= !o.pass();
    EXPECT_TRUE(failed) << "seed " << seed0 + k << ": a token routed to expert " << e << " passed";
  }
}

// --- the index rule on hand-made scores ---

TEST(CaseMetrics_index, NearTieSwapIsATieAndAWorseBlockIsNot) {
  TieScores ties{MatD(1, 5), 1e-5};
  ties.scores << 5.0, 3.0, 3.0 + 1e-6, 1.0, -std::numeric_limits<double>::infinity();
  const Dims dims = {1, 3};
  const std::vector<std::int64_t> ref = {0, 1, 3};
  const std::vector<std::int64_t> tie = {0, 2, 3};    // 1 -> 2: scores 1e-6 apart, scale 5
  const std::vector<std::int64_t> worse = {0, 3, 1};  // reordered: 3.0 and 1.0 are not a tie
  const std::vector<std::int64_t> dup = {0, 0, 3};
  auto m = compare_index(tie, ref, dims, &ties);
  EXPECT_EQ(m.rows_differ, 1);
  EXPECT_EQ(m.rows_near_tie, 1);
  EXPECT_TRUE(m.agree());
  EXPECT_DOUBLE_EQ(m.jaccard_mean, 0.5);  // {0,2,3} vs {0,1,3}: 2 of 4
  EXPECT_EQ(m.first.front().at, (Coord{0, 1}));
  m = compare_index(worse, ref, dims, &ties);
  EXPECT_FALSE(m.agree());
  EXPECT_DOUBLE_EQ(m.jaccard_mean, 1.0);  // same set, wrong order: still a mismatch
  EXPECT_FALSE(compare_index(dup, ref, dims, &ties).agree());
  EXPECT_FALSE(compare_index(tie, ref, dims, nullptr).agree());  // without scores: exact only
}

TEST(CaseMetrics_float, NonFinitePositionsMustMatch) {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  const Dims dims = {2, 2};
  const std::vector<double> b = {1.0, -inf, 2.0, 3.0};
  auto m = compare_float(std::vector<double>{1.0, -inf, 2.0, 3.0}, b, dims, 0, 0);
  EXPECT_EQ(m.nonfinite_mismatches, 0);
  EXPECT_EQ(m.compared, 3);
  m = compare_float(std::vector<double>{1.0, -inf, nan, 3.0}, b, dims, 1, 1);
  EXPECT_TRUE(m.unexpected_nan);
  EXPECT_EQ(m.first_nonfinite.at, (Coord{1, 0}));
  m = compare_float(std::vector<double>{1.0, inf, 2.0, 3.0}, b, dims, 1, 1);  // sign differs
  EXPECT_EQ(m.nonfinite_mismatches, 1);
  EXPECT_FALSE(m.unexpected_nan);
  m = compare_float(std::vector<double>{0.0, 0.0}, std::vector<double>{0.0, 0.0}, {2}, 0, 0);
  EXPECT_EQ(m.ref_norm, 0.0);  // verify calls this vacuous
}

}  // namespace
