// gpu::attention_dense against ref::attention_dense: the bf16-emulating twin (fp32 q.k on the same
// bf16 inputs, fp64 softmax, output rounded to bf16) is the gate, elementwise and in rel-L2; the
// fp64 reference checks that the GPU's error is no worse than twice the twin's own (DESIGN §4).
// Awkward sizes: N = 1, BLK-1, BLK+1, K_blk*BLK, K_blk*BLK+1, 5000 (BLK 128, K_blk 16), GQA 4/2,
// 16/1, 64/4 at D 128 and 48/2 at D 64 (two 16-head m-tiles, the second partial), T = 1 decode and
// T = 37 at scattered positions, B = 1..3 sequences, long contexts that split into many chunks.
// Paged caches (kv_cache.h): the same inputs scattered into a pool of permuted 128-row pages (spare
// and tail rows NaN, pages past a sequence's length unallocated), sequences of different lengths
// (a page multiple, a page + 1, ...); the output must be bit-identical to the contiguous run's, and
// a negative page id must give NaN exactly for the queries that see its keys.
#include "gpu/kernels/attention_dense.h"
#include "reference/ops/attention_dense.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/paged_test_util.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

using namespace m3;
using m3::test::bf16_exact;
using m3::test::make_pages;
using m3::test::PageTable;
using m3::test::scatter_pages;
using m3::test::scattered_positions;

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
  bool decode;  // T = 1 per sequence at p = len - 1; else T scattered distinct positions
  std::vector<int> lens = {};  // per-sequence lengths (positions < len); empty: all N
  bool paged = false;          // also run on a paged copy of the cache: bit-identical output
  int bad_page = -1;           // paged: this logical page of sequence 0 gets id -1
};

std::string name(const Case& c) {
  return "B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) + " N=" + std::to_string(c.N) +
         " Hq=" + std::to_string(c.Hq) + " Hkv=" + std::to_string(c.Hkv) + " D=" + std::to_string(c.D) +
         (c.decode ? " decode" : " scattered") + (c.paged ? " paged" : "") +
         (c.bad_page >= 0 ? " bad page " + std::to_string(c.bad_page) : "");
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
      const int L = c.lens.empty() ? c.N : c.lens[b];
      auto p = c.decode ? std::vector<std::int64_t>(c.T, L - 1) : scattered_positions(c.T, L, g);
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
  if (c.paged) {
    const std::vector<int> lens = c.lens.empty() ? std::vector<int>(c.B, c.N) : c.lens;
    PageTable t = make_pages(c.N, lens, 3, g);
    if (c.bad_page >= 0) t.ids[c.bad_page] = -1;  // sequence 0's page
    const std::int64_t W = static_cast<std::int64_t>(c.Hkv) * c.D;
    const auto hk = gpu::to_bf16(k.data(), static_cast<std::size_t>(k.size()));
    const auto hv = gpu::to_bf16(v.data(), static_cast<std::size_t>(v.size()));
    gpu::DeviceBuffer<gpu::bf16> pk(static_cast<std::size_t>(t.n_pages) * gpu::kPageRows * W), pv(pk.size());
    pk.upload(scatter_pages(hk, c.N, W, lens, t));
    pv.upload(scatter_pages(hv, c.N, W, lens, t));
    gpu::DeviceBuffer<std::int32_t> dtab(t.ids.size());
    dtab.upload(t.ids);
    gpu::DeviceBuffer<gpu::bf16> pout(static_cast<std::size_t>(q.size()));
    pout.fill_bytes(0xFF);
    ws.fill_bytes(0xFF);
    gpu::attention_dense(dq.data(), pk.data(), pv.data(), dpos.data(), c.T, c.N, dims, pout.data(), nullptr, ws.data(),
                         wsb, c.B, gpu::CachePages{dtab.data(), t.pps});
    const auto want = dout.download(), got = pout.download();
    const std::size_t row = static_cast<std::size_t>(c.Hq) * c.D;
    long differ = 0, not_nan = 0;
    for (std::size_t r = 0; r < pos.size(); ++r) {
      // Sequence 0's queries that see a key of the bad page read nothing of it: a NaN row.
      const bool bad = c.bad_page >= 0 && r < static_cast<std::size_t>(c.T) && pos[r] >= c.bad_page * gpu::kPageRows;
      for (std::size_t i = r * row; i < (r + 1) * row; ++i) {
        if (bad) not_nan += !std::isnan(gpu::from_bf16(&got[i], 1)[0]);
        else differ += std::memcmp(&got[i], &want[i], sizeof(gpu::bf16)) != 0;
      }
    }
    EXPECT_EQ(differ, 0) << "paged output elements that differ from the contiguous run's bits";
    EXPECT_EQ(not_nan, 0) << "outputs of queries that see an unallocated page are not NaN";
  }
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

// The tiny preset's heads (D 16, GQA 4 over 2) and D 32: one and two k-steps of q.k, two and four
// n-tiles of the output; decode, scattered rows and a paged copy.
TEST(AttentionDense_bf16, SmallHeadDims_16_32) {
  M3_REQUIRE_GPU();
  for (int D : {16, 32}) {
    for (int N : {1, 63, 129, 3000}) run_case({2, 5, N, 4, 2, D, false});
    run_case({1, 1, 2049, 4, 2, D, true});
    run_case({3, 7, 1000, 8, 1, D, false, {1000, 129, 64}, true});
  }
}

TEST(AttentionDense_bf16, LongContext_ManySplits) {
  M3_REQUIRE_GPU();
  // 100000 keys split over ~256 chunks of 7 tiles for 2 x 2 queries.
  run_case({2, 2, 100000, 16, 1, 128, true});
  run_case({1, 3, 100000, 64, 4, 128, false});
}

// Sequences of 256 (two pages), 129 (a page + 1), 1000 and 1 keys in one batch (N = 1000 the
// capacity), decode and 37 scattered queries each, M3 heads at D 128 and two m-tiles at D 64.
TEST(AttentionDense_bf16, Paged_UnevenLengths_BitIdentical) {
  M3_REQUIRE_GPU();
  const std::vector<int> lens{256, 129, 1000, 1};
  run_case({4, 1, 1000, 64, 4, 128, true, lens, true});
  run_case({4, 37, 1000, 64, 4, 128, false, lens, true});
  run_case({4, 5, 1000, 48, 2, 64, false, lens, true});
  run_case({2, 1, 1000, 16, 1, 128, true, {1000, 128}, true});
}

TEST(AttentionDense_bf16, Paged_LongContext_ManySplits) {
  M3_REQUIRE_GPU();
  // Chunks of several tiles: the page id is fetched one pipeline step ahead across many pages.
  run_case({2, 2, 100000, 16, 1, 128, true, {100000, 70017}, true});
  run_case({3, 37, 5000, 8, 2, 128, false, {5000, 4096, 2049}, true});
}

TEST(AttentionDense_bf16, Paged_NegativePageId_GivesNaNRows) {
  M3_REQUIRE_GPU();
  // Page 1 of sequence 0 unallocated: its queries at p >= 128 are NaN, those at p < 128 and every
  // query of sequence 1 keep their contiguous bits.
  run_case({2, 37, 1000, 16, 2, 128, false, {1000, 700}, true, 1});
  run_case({2, 1, 3000, 64, 4, 128, true, {3000, 129}, true, 20});
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
  // A page table too short for N (2 pages of 128 < 300 rows), a table without pages.
  gpu::DeviceBuffer<std::int32_t> tab(8);
  EXPECT_THROW(gpu::attention_dense(p, p, p, pos.data(), 1, 300, {4, 2, 64}, p, nullptr, ws.data(), 1 << 20, 1,
                                    gpu::CachePages{tab.data(), 2}),
               gpu::GpuError);
  EXPECT_THROW(gpu::attention_dense(p, p, p, pos.data(), 1, 64, {4, 2, 64}, p, nullptr, ws.data(), 1 << 20, 1,
                                    gpu::CachePages{tab.data(), 0}),
               gpu::GpuError);
  // T = 0 is a no-op, not an error.
  EXPECT_NO_THROW(gpu::attention_dense(p, p, p, pos.data(), 0, 64, {4, 2, 64}, p, nullptr, nullptr, 0));
}
