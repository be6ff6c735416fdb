// gpu::attention_dense against ref::attention_dense: the bf16-emulating twin (fp32 q.k on the same
// bf16 inputs, fp64 softmax, output rounded to bf16) is the gate, elementwise and in rel-L2; the
// fp64 reference checks that the GPU's error is no worse than twice the twin's own (DESIGN §4).
// Awkward sizes: N = 1, BLK-1, BLK+1, K_blk*BLK, K_blk*BLK+1, 5000 (BLK 128, K_blk 16), GQA 4/2,
// 16/1, 64/4 at D 128 and 48/2 at D 64 (two 16-head m-tiles, the second partial), T = 1 decode and
// T = 37 at scattered positions, B = 1..3 sequences, long contexts that split into many chunks.
#include "gpu/kernels/attention_dense.h"
#include "reference/ops/attention_dense.h"
#include "tests/gpu/gpu_test_util.h"

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

using namespace m3;
using m3::test::bf16_exact;

namespace {

// One bf16 rounding flip: the GPU and the twin round pre-rounding values that differ by fp32
// noise (~1e-6 relative), so an element may land one bf16 ulp apart; 2 ulps at 2^-8 relative
// covers one ulp anywhere in a binade.
constexpr double kUlps = 2.0;
// Absolute noise of the fp32 softmax and P.V sums: ~1e-6 of max|v| (~4 for N(0,1) values); 1e-5
// keeps the rule meaningful for outputs of ~1e-2 (averages of 5000 random rows).
constexpr double kAtol = 1e-5;
constexpr double kRelL2 = 1e-2;  // bf16 paths (DESIGN §4)
// GPU error vs fp64 <= 2 x (twin's error vs fp64) + floor; the floor covers cases where the twin
// is exact (N = 1: the output is v itself) and the GPU is off by fp32 noise only.
constexpr double kFp64Factor = 2.0, kFp64Floor = 1e-5;

struct Case {
  int B, T, N, Hq, Hkv, D;
  bool decode;  // T = 1 per sequence at p = N - 1; else T scattered distinct positions
};

std::string name(const Case& c) {
  return "B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) + " N=" + std::to_string(c.N) +
         " Hq=" + std::to_string(c.Hq) + " Hkv=" + std::to_string(c.Hkv) + " D=" + std::to_string(c.D) +
         (c.decode ? " decode" : " scattered");
}

// T positions in [0, N): distinct where T <= N, unsorted, always including N - 1.
std::vector<std::int64_t> scattered_positions(int T, int N, std::mt19937_64& g) {
  std::vector<std::int64_t> all(N);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), g);
  std::vector<std::int64_t> p(T);
  for (int t = 0; t < T; ++t) p[t] = all[t % N];
  p[std::uniform_int_distribution<int>(0, T - 1)(g)] = N - 1;
  return p;
}

MatD to_d(const MatF& m) { return m.cast<double>(); }

// Runs one case; positions == nullptr draws them. Returns the GPU output [B*T, Hq*D].
MatF run_case(const Case& c, const std::vector<std::int64_t>* given_pos = nullptr) {
  SCOPED_TRACE(name(c));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const AttnDims dims{c.Hq, c.Hkv, c.D};
  // q scaled so that softmax weights are neither flat nor one-hot (z ~ N(0, 4)).
  MatF q = bf16_exact(test::randn<float>(static_cast<Eigen::Index>(c.B) * c.T, c.Hq * c.D, g, 2.0));
  MatF k = bf16_exact(test::randn<float>(static_cast<Eigen::Index>(c.B) * c.N, c.Hkv * c.D, g));
  MatF v = bf16_exact(test::randn<float>(static_cast<Eigen::Index>(c.B) * c.N, c.Hkv * c.D, g));
  std::vector<std::int64_t> pos;
  if (given_pos) pos = *given_pos;
  else
    for (int b = 0; b < c.B; ++b) {
      auto p = c.decode ? std::vector<std::int64_t>(c.T, c.N - 1) : scattered_positions(c.T, c.N, g);
      pos.insert(pos.end(), p.begin(), p.end());
    }

  MatF ref(q.rows(), q.cols());   // [B*T, Hq*D] bf16-emulating twin
  MatD truth(q.rows(), q.cols()); // [B*T, Hq*D] fp64
  for (int b = 0; b < c.B; ++b) {
    const MatF qb = q.middleRows(static_cast<Eigen::Index>(b) * c.T, c.T);
    const MatF kb = k.middleRows(static_cast<Eigen::Index>(b) * c.N, c.N);
    const MatF vb = v.middleRows(static_cast<Eigen::Index>(b) * c.N, c.N);
    std::vector<std::int64_t> pb(pos.begin() + b * c.T, pos.begin() + (b + 1) * c.T);
    bool all_valid = true;
    for (auto p : pb) all_valid = all_valid && p >= 0 && p < c.N;
    if (!all_valid) continue;  // the NaN-row test compares those rows itself
    MatF rb;
    ref::attention_dense<float>(qb, kb, vb, pb, dims, rb);
    ref.middleRows(static_cast<Eigen::Index>(b) * c.T, c.T) = bf16_exact(rb);
    MatD tb;
    ref::attention_dense<double>(to_d(qb), to_d(kb), to_d(vb), pb, dims, tb);
    truth.middleRows(static_cast<Eigen::Index>(b) * c.T, c.T) = tb;
  }

  auto dq = test::upload_bf16(q), dk = test::upload_bf16(k), dv = test::upload_bf16(v);
  gpu::DeviceBuffer<std::int64_t> dpos(pos.size());
  dpos.upload(pos);
  gpu::DeviceBuffer<gpu::bf16> dout(static_cast<std::size_t>(q.size()));
  dout.fill_bytes(0xFF);  // NaN: every element must be written
  const std::size_t wsb = gpu::attention_dense_workspace_bytes(c.T, c.N, dims, c.B);
  gpu::DeviceBuffer<unsigned char> ws(std::max<std::size_t>(wsb, 1));
  ws.fill_bytes(0xFF);  // NaN: every partial the merge reads must have been written
  gpu::attention_dense(dq.data(), dk.data(), dv.data(), dpos.data(), c.T, c.N, dims, dout.data(), nullptr,
                       ws.data(), wsb, c.B);
  MatF out = test::download_bf16(dout, q.rows(), q.cols());
  if (given_pos) return out;

  EXPECT_TRUE(out.allFinite()) << "unwritten or NaN output elements";
  EXPECT_GT(q.norm(), 0.0);
  EXPECT_GT(ref.norm(), 0.0);
  EXPECT_EQ(test::bf16_violations(out, ref, kUlps, kAtol), 0) << "max |gpu - ref| = " << (out - ref).cwiseAbs().maxCoeff();
  EXPECT_LE(test::rel_l2(out, ref), kRelL2);
  const double e_gpu = test::rel_l2(to_d(out), truth), e_ref = test::rel_l2(to_d(ref), truth);
  EXPECT_LE(e_gpu, kFp64Factor * e_ref + kFp64Floor) << "GPU vs fp64 " << e_gpu << ", twin vs fp64 " << e_ref;
  return out;
}

const int kAwkwardN[] = {1, 127, 129, 2048, 2049, 5000};

}  // namespace

TEST(AttentionDense_bf16, Decode_M3Heads_AwkwardN) {
  M3_REQUIRE_GPU();
  for (int N : kAwkwardN) run_case({1, 1, N, 64, 4, 128, true});
}

TEST(AttentionDense_bf16, Decode_Gqa16over1_Batch3) {
  M3_REQUIRE_GPU();
  for (int N : {1, 129, 5000}) run_case({3, 1, N, 16, 1, 128, true});
}

TEST(AttentionDense_bf16, Scattered37_Gqa4over2_16over1_64over4) {
  M3_REQUIRE_GPU();
  for (auto [hq, hkv] : {std::pair{4, 2}, {16, 1}, {64, 4}})
    for (int N : {129, 2049, 5000}) run_case({1, 37, N, hq, hkv, 128, false});
}

TEST(AttentionDense_bf16, Scattered37_Batch3_LongChunks) {
  M3_REQUIRE_GPU();
  // 3 x 37 queries x 2 groups: few splits, so each CTA streams 16 tiles (the pipeline wraps).
  run_case({3, 37, 5000, 8, 2, 128, false});
}

TEST(AttentionDense_bf16, Gqa24_TwoMtiles_D64) {
  M3_REQUIRE_GPU();
  for (int N : {1, 129, 3000}) run_case({2, 5, N, 48, 2, 64, false});
  run_case({1, 1, 2049, 48, 2, 64, true});
}

TEST(AttentionDense_bf16, LongContext_ManySplits) {
  M3_REQUIRE_GPU();
  // 100000 keys split over ~256 chunks of 7 tiles for 2 x 2 queries.
  run_case({2, 2, 100000, 16, 1, 128, true});
  run_case({1, 3, 100000, 64, 4, 128, false});
}

TEST(AttentionDense_bf16, OutOfRangePositionGivesNaNRow) {
  M3_REQUIRE_GPU();
  const Case c{1, 3, 300, 8, 2, 64, false};
  const std::vector<std::int64_t> pos{299, 300, -1};  // row 0 valid, rows 1 and 2 violate p < N / p >= 0
  MatF out = run_case(c, &pos);
  EXPECT_TRUE(out.row(0).allFinite());
  for (int r = 1; r < 3; ++r)
    for (Eigen::Index j = 0; j < out.cols(); ++j) EXPECT_TRUE(std::isnan(out(r, j))) << "row " << r;
}

TEST(AttentionDense_bf16, RejectsBadArguments) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<gpu::bf16> buf(1 << 16);
  gpu::DeviceBuffer<std::int64_t> pos(4);
  gpu::DeviceBuffer<unsigned char> ws(1 << 20);
  auto* p = buf.data();
  const std::size_t wsb = gpu::attention_dense_workspace_bytes(1, 64, {4, 2, 64}, 1);
  // Head dim not compiled, Hq not a multiple of Hkv, zero heads.
  EXPECT_THROW(gpu::attention_dense(p, p, p, pos.data(), 1, 64, {4, 2, 96}, p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  EXPECT_THROW(gpu::attention_dense(p, p, p, pos.data(), 1, 64, {6, 4, 64}, p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  EXPECT_THROW(gpu::attention_dense(p, p, p, pos.data(), 1, 64, {0, 1, 64}, p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  // Empty cache, negative T, B = 0.
  EXPECT_THROW(gpu::attention_dense(p, p, p, pos.data(), 1, 0, {4, 2, 64}, p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  EXPECT_THROW(gpu::attention_dense(p, p, p, pos.data(), -1, 64, {4, 2, 64}, p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  EXPECT_THROW(gpu::attention_dense(p, p, p, pos.data(), 1, 64, {4, 2, 64}, p, nullptr, ws.data(), 1 << 20, 0), gpu::GpuError);
  // Workspace one byte short, misaligned k.
  EXPECT_THROW(gpu::attention_dense(p, p, p, pos.data(), 1, 64, {4, 2, 64}, p, nullptr, ws.data(), wsb - 1), gpu::GpuError);
  EXPECT_THROW(gpu::attention_dense(p, p + 1, p, pos.data(), 1, 64, {4, 2, 64}, p, nullptr, ws.data(), wsb), gpu::GpuError);
  // T = 0 is a no-op, not an error.
  EXPECT_NO_THROW(gpu::attention_dense(p, p, p, pos.data(), 0, 64, {4, 2, 64}, p, nullptr, nullptr, 0));
}
