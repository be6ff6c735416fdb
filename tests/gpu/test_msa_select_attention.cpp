// gpu::msa_select_attention (msa_attention.h): msa_select + msa_attention, fused into one kernel
// where the decode grid allows. On the same inputs and device it must return exactly what the two
// separate launches return (detail::set_select_attention_fusion(false) runs them): the selection
// slot by slot, and the attention output bit for bit; and its selection must equal
// ref::msa_select's. The two launches are themselves checked against the reference in
// test_msa_select and test_msa_attention, so bit identity carries those checks over.
// Inputs: the tie-rule stress scores of test_msa_select (score_test_util.h) uploaded directly (no
// index kernel: the scores are the op's input); awkward contexts (1 token, block edges, 200K
// tokens at BLK 16: chunks of ~780 blocks, near the fused kernel's 1024 limit); forced-block
// layouts with init and local blocks; K_blk 4 .. 64; batches with uneven lengths, contiguous and
// paged; several queries a sequence; positions outside the cache (NaN rows, -1 selections).
// Outputs are poisoned before every run.
#include "gpu/kernels/attention_dense.h"
#include "gpu/kernels/msa_attention.h"
#include "reference/ops/msa_select.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/paged_test_util.h"
#include "tests/gpu/score_test_util.h"

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace m3;
using m3::test::Dist;

namespace {

struct Case {
  int B, T, N;
  AttnDims a;
  MsaDims m;                   // m.Hi == a.Hkv
  std::vector<int> lens = {};  // per-sequence lengths (empty: all N); queries at the last T positions
  bool paged = false;
  bool expect_fused = true;    // asserted where msa_attention.h's conditions hold (fusable); false: not asserted
};

std::string name(const Case& c, Dist d) {
  return "B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) + " N=" + std::to_string(c.N) + " Hq=" +
         std::to_string(c.a.Hq) + " Hkv=" + std::to_string(c.a.Hkv) + " D=" + std::to_string(c.a.D) + " BLK=" +
         std::to_string(c.m.BLK) + " K_blk=" + std::to_string(c.m.K_blk) + " local=" +
         std::to_string(c.m.local_blocks) + " init=" + std::to_string(c.m.init_blocks) + (c.paged ? " paged " : " ") +
         m3::test::dist_name(d);
}

std::vector<int> lens_of(const Case& c) { return c.lens.empty() ? std::vector<int>(static_cast<std::size_t>(c.B), c.N) : c.lens; }

struct Inputs {
  MatF q, k, v;                    // [B*T, Hq*D], [B*N, Hkv*D] x 2
  MatF scores;                     // [B*Hi*T, NB]
  std::vector<std::int64_t> pos;   // [B*T]
  int NB = 0;
};

struct Result {
  std::vector<std::int32_t> sel;  // [B*Hi*T, K_blk]
  std::vector<gpu::bf16> out;     // [B*T, Hq*D]
  bool fused = false;
};

Inputs make_inputs(const Case& c, Dist d, std::mt19937_64& g) {
  Inputs in;
  in.q = test::bf16_exact(test::randn<float>(static_cast<Eigen::Index>(c.B) * c.T, c.a.Hq * c.a.D, g, 2.0));
  in.k = test::bf16_exact(test::randn<float>(static_cast<Eigen::Index>(c.B) * c.N, c.a.Hkv * c.a.D, g));
  in.v = test::bf16_exact(test::randn<float>(static_cast<Eigen::Index>(c.B) * c.N, c.a.Hkv * c.a.D, g));
  in.NB = (c.N + c.m.BLK - 1) / c.m.BLK;
  in.scores = m3::test::draw_scores(static_cast<Eigen::Index>(c.B) * c.m.Hi * c.T, in.NB, d, g);
  for (int b = 0; b < c.B; ++b) {
    const int len = lens_of(c)[static_cast<std::size_t>(b)];
    for (int t = 0; t < c.T; ++t) in.pos.push_back(len - c.T + t);
  }
  return in;
}

// msa_attention.h's documented conditions for one kernel, short of the device's cluster fit:
// splits <= 16 (one cluster), K_blk <= 64, ceil(NB / splits) <= 1024.
bool fusable(const Case& c, int NB) {
  const auto plan = gpu::detail::plan_sparse_splits(c.B, c.T, c.m.K_blk, c.a);
  return plan.splits <= 16 && c.m.K_blk <= 64 && (NB + plan.splits - 1) / plan.splits <= 1024;
}

Result run(const Case& c, const Inputs& in, bool fusion, const m3::test::PageTable* pages) {
  struct Reset {
    ~Reset() { gpu::detail::set_select_attention_fusion(true); }
  } reset;
  gpu::detail::set_select_attention_fusion(fusion);
  auto dq = test::upload_bf16(in.q);
  m3::test::PagedKv paged;
  gpu::DeviceBuffer<gpu::bf16> dk, dv;
  gpu::CachePages cp;
  if (pages) {
    paged = m3::test::upload_paged_kv(in.k, in.v, c.N, static_cast<std::int64_t>(c.a.Hkv) * c.a.D, lens_of(c), *pages);
    cp = paged.pages();
  } else {
    dk = test::upload_bf16(in.k);
    dv = test::upload_bf16(in.v);
  }
  gpu::DeviceBuffer<float> ds(static_cast<std::size_t>(in.scores.size()));
  ds.upload(in.scores.data(), static_cast<std::size_t>(in.scores.size()));
  gpu::DeviceBuffer<std::int64_t> dpos(in.pos.size());
  dpos.upload(in.pos);
  gpu::DeviceBuffer<std::int32_t> dsel(static_cast<std::size_t>(in.scores.rows()) * c.m.K_blk);
  dsel.fill_bytes(0x80);  // large negative ints: every slot must be written
  gpu::DeviceBuffer<gpu::bf16> dout(static_cast<std::size_t>(in.q.size()));
  dout.fill_bytes(0xFF);
  const std::size_t wsb = gpu::msa_attention_workspace_bytes(c.T, c.m.K_blk, c.a, c.B);
  gpu::DeviceBuffer<unsigned char> ws(std::max<std::size_t>(wsb, 1));
  ws.fill_bytes(0xFF);
  Result r;
  r.fused = gpu::msa_select_attention(ds.data(), in.NB, c.m, dq.data(), pages ? paged.k.data() : dk.data(),
                                      pages ? paged.v.data() : dv.data(), dpos.data(), c.T, c.N, c.a, dsel.data(),
                                      dout.data(), nullptr, ws.data(), wsb, c.B, cp);
  r.sel = dsel.download();
  r.out = dout.download();
  return r;
}

void run_case(const Case& c, Dist d) {
  SCOPED_TRACE(name(c, d));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const Inputs in = make_inputs(c, d, g);
  m3::test::PageTable pt;
  if (c.paged) {
    pt = m3::test::make_pages(c.N, lens_of(c), 3, g);
  }
  const Result fused = run(c, in, true, c.paged ? &pt : nullptr);
  const Result two = run(c, in, false, c.paged ? &pt : nullptr);
  if (c.expect_fused && fusable(c, in.NB)) {
    EXPECT_TRUE(fused.fused) << "the fused kernel did not run (fell back to two launches)";
  }
  EXPECT_FALSE(two.fused);
  EXPECT_TRUE(fused.sel == two.sel) << "fused and separate selections differ";
  long differ = 0;
  for (std::size_t i = 0; i < fused.out.size(); ++i) differ += std::memcmp(&fused.out[i], &two.out[i], 2) != 0;
  EXPECT_EQ(differ, 0) << "output elements whose bits differ from msa_select + msa_attention";

  // The selection against the reference, sequence by sequence (positions inside the cache).
  const Eigen::Index rows_seq = static_cast<Eigen::Index>(c.m.Hi) * c.T;
  long bad_rows = 0;
  for (int b = 0; b < c.B; ++b) {
    std::vector<std::int64_t> pb(in.pos.begin() + b * c.T, in.pos.begin() + (b + 1) * c.T);
    MatI want;
    ref::msa_select<float>(MatF(in.scores.middleRows(rows_seq * b, rows_seq)), pb, c.m, want);
    for (Eigen::Index r = 0; r < rows_seq; ++r)
      for (int j = 0; j < c.m.K_blk; ++j)
        if (fused.sel[static_cast<std::size_t>((rows_seq * b + r) * c.m.K_blk + j)] != want(r, j)) {
          ++bad_rows;
          break;
        }
  }
  EXPECT_EQ(bad_rows, 0) << "selection rows that differ from ref::msa_select";
  // Every output written, finite (every position here is valid and selects its own block).
  long nonfinite = 0;
  for (const gpu::bf16 x : fused.out) nonfinite += !std::isfinite(__bfloat162float(x));
  EXPECT_EQ(nonfinite, 0) << "unwritten or NaN output elements";
}

// Sets the sparse merge mode for a scope (the fused kernel runs where the 8-warp cluster would).
struct ForceMerge {
  explicit ForceMerge(gpu::detail::SparseMerge m) { gpu::detail::set_sparse_merge(m); }
  ~ForceMerge() { gpu::detail::set_sparse_merge(gpu::detail::SparseMerge::Auto); }
};

const AttnDims kM3Attn{64, 4, 128};
const MsaDims kM3Msa{4, 128, 128, 16, 1, 0};
const Dist kAllDists[] = {Dist::Normal,      Dist::SmallInts,   Dist::Constant, Dist::Specials,
                          Dist::ThreeValues, Dist::SignedZeros, Dist::NanInf,   Dist::Narrow};

}  // namespace

// M3's decode geometry at contexts around block edges and budgets: 1 token (only the forced
// block), K_blk blocks exactly (every block, nothing to choose beyond), K_blk*BLK + 1 (one to
// spare), 5000, 65537 (513 blocks: chunks of 32), every tie-rule distribution.
TEST(MsaSelectAttention, Decode_M3_AwkwardContexts_EveryDistribution) {
  M3_REQUIRE_GPU();
  for (int N : {1, 127, 129, 2048, 2049, 5000, 65537})
    for (Dist d : kAllDists) run_case({1, 1, N, kM3Attn, kM3Msa}, d);
}

// Long rows with small blocks (the chunk near its 1024-block limit) and the tiny preset's geometry.
TEST(MsaSelectAttention, LongRows_SmallBlocks) {
  M3_REQUIRE_GPU();
  for (Dist d : {Dist::Normal, Dist::Narrow, Dist::SignedZeros, Dist::NanInf})
    run_case({1, 1, 200001, {16, 1, 16}, {1, 16, 16, 16, 1, 0}}, d);
  for (Dist d : {Dist::Normal, Dist::SmallInts}) run_case({2, 1, 3001, {4, 2, 16}, {2, 16, 16, 4, 1, 0}}, d);
}

// Forced-block layouts (init blocks: the chunks start after them; several local blocks), budget =
// forced (nothing to choose), no forced block; budgets above 16 slots (40, 64) get more than 16
// splits at batch 1, past the largest cluster: they never fuse, and must still match.
TEST(MsaSelectAttention, ForcedLayoutsAndBudgets) {
  M3_REQUIRE_GPU();
  const MsaDims layouts[] = {{4, 128, 128, 16, 1, 2}, {4, 128, 128, 64, 3, 2}, {4, 128, 128, 2, 1, 1},
                             {4, 128, 128, 5, 0, 0}, {4, 128, 64, 40, 2, 1}, {4, 128, 64, 12, 4, 3}};
  for (const MsaDims& m : layouts)
    for (int N : {129, 9000, 40001})
      for (Dist d : {Dist::Normal, Dist::ThreeValues}) run_case({1, 1, N, kM3Attn, m, {}, false, m.K_blk <= 16}, d);
}

// Batches of uneven sequences, several queries a sequence, contiguous and paged (pages permuted,
// spare pages NaN), D 64 with two m-tiles a group. Grids of more than half a wave take the merge
// kernel in Auto mode; forced to 8-warp clusters here, so that they fuse.
TEST(MsaSelectAttention, Batches_Paged_SeveralQueries) {
  M3_REQUIRE_GPU();
  ForceMerge force(gpu::detail::SparseMerge::Cluster);
  for (Dist d : {Dist::Normal, Dist::Specials}) {
    run_case({3, 1, 5000, kM3Attn, kM3Msa, {5000, 2048, 129}}, d);
    run_case({3, 1, 5000, kM3Attn, kM3Msa, {5000, 2048, 129}, true}, d);
    run_case({2, 3, 3000, {48, 2, 64}, {2, 16, 16, 8, 1, 1}, {3000, 700}, true}, d);
    run_case({1, 4, 70000, kM3Attn, kM3Msa}, d);
  }
}

// Budgets above 16 slots fuse where the batch spreads the budget over at most 16 splits (forced
// clusters; on a 132-SM H100 / H200): several slots a CTA (a chosen id goes to CTA rank / chunk),
// the rank loop over several groups of 16 candidates, hundreds of candidates a row; E = 4 keys a
// thread with k > 16 (chunks of 500-1024 scores); and one fused case at D 32.
TEST(MsaSelectAttention, WideBudgets_SeveralSlotsPerCta) {
  M3_REQUIRE_GPU();
  ForceMerge force(gpu::detail::SparseMerge::Cluster);
  for (Dist d : kAllDists) run_case({4, 1, 20000, kM3Attn, {4, 128, 64, 64, 1, 0}}, d);
  for (Dist d : {Dist::Normal, Dist::Narrow, Dist::SignedZeros})
    run_case({1, 16, 140000, {16, 1, 128}, {1, 16, 16, 64, 2, 1}}, d);  // 16 splits at D 128: 547 scores a CTA
  run_case({1, 1, 5000, {8, 2, 32}, {2, 16, 64, 8, 1, 0}}, Dist::SmallInts);
}

// The forced merge modes (attention_dense.h's SparseMerge): Cluster fuses even where the clusters
// do not all fit at once (batch 16: waves of clusters); Cluster4 and Kernel never fuse (the 4-warp
// cluster and the merge kernel have no selection stage) and must still equal the two launches.
TEST(MsaSelectAttention, ForcedMergeModes) {
  M3_REQUIRE_GPU();
  using M = gpu::detail::SparseMerge;
  for (M mode : {M::Cluster, M::Cluster4, M::Kernel}) {
    SCOPED_TRACE(mode == M::Cluster ? "cluster, 8 warps" : mode == M::Cluster4 ? "cluster, 4 warps" : "merge kernel");
    ForceMerge force(mode);
    const bool fuses = mode == M::Cluster;
    run_case({16, 1, 3000, kM3Attn, kM3Msa, {}, false, fuses}, Dist::Normal);
    run_case({1, 1, 5000, kM3Attn, kM3Msa, {}, true, fuses}, Dist::SmallInts);
  }
}

// Positions outside the cache: p < 0 and p / BLK >= NB give an all -1 selection row and NaN
// outputs; p >= N with p / BLK < NB (the selection is made, msa_select does not know N) a selection
// and NaN outputs. Fused and separate agree bit for bit (NaN payloads included). Four sequences
// are over half a wave of CTAs: forced to clusters.
TEST(MsaSelectAttention, PositionsOutsideTheCache) {
  M3_REQUIRE_GPU();
  ForceMerge force(gpu::detail::SparseMerge::Cluster);
  const Case c{4, 1, 1000, kM3Attn, kM3Msa};
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  Inputs in = make_inputs(c, Dist::Normal, g);
  in.NB = 9;  // blocks 0..8: positions up to 1151 have a score column
  in.scores = m3::test::draw_scores(static_cast<Eigen::Index>(c.B) * c.m.Hi, in.NB, Dist::Normal, g);
  in.pos = {-1, 1100, 5000, 999};  // invalid everywhere; p >= N with a column; past the columns; valid
  const Result fused = run(c, in, true, nullptr), two = run(c, in, false, nullptr);
  EXPECT_TRUE(fused.fused);
  EXPECT_TRUE(fused.sel == two.sel);
  EXPECT_EQ(std::memcmp(fused.out.data(), two.out.data(), fused.out.size() * 2), 0);
  const int Kb = c.m.K_blk, Hi = c.m.Hi;
  for (int b : {0, 2})
    for (int j = 0; j < Hi * Kb; ++j) EXPECT_EQ(fused.sel[static_cast<std::size_t>(b * Hi * Kb + j)], -1) << "b " << b;
  EXPECT_NE(fused.sel[static_cast<std::size_t>(1 * Hi * Kb)], -1) << "p >= N with a score column is still selected";
  const std::size_t row = static_cast<std::size_t>(c.a.Hq) * c.a.D;
  for (int b = 0; b < 4; ++b) {
    long nan = 0;
    for (std::size_t i = 0; i < row; ++i) nan += std::isnan(__bfloat162float(fused.out[b * row + i]));
    EXPECT_EQ(nan, b == 3 ? 0L : static_cast<long>(row)) << "sequence " << b;
  }
}

TEST(MsaSelectAttention, RejectsBadArguments) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<gpu::bf16> buf(1 << 16);
  gpu::DeviceBuffer<float> sc(1 << 12);
  gpu::DeviceBuffer<std::int64_t> pos(4);
  gpu::DeviceBuffer<std::int32_t> sel(64);
  gpu::DeviceBuffer<unsigned char> ws(1 << 20);
  auto* p = buf.data();
  const MsaDims m{2, 16, 16, 4, 1, 0};
  // Hkv != Hi; a head dim not compiled; K_blk below the forced blocks; workspace too small; q misaligned.
  EXPECT_THROW(gpu::msa_select_attention(sc.data(), 8, m, p, p, p, pos.data(), 1, 64, {4, 1, 64}, sel.data(), p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  EXPECT_THROW(gpu::msa_select_attention(sc.data(), 8, m, p, p, p, pos.data(), 1, 64, {4, 2, 96}, sel.data(), p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  EXPECT_THROW(gpu::msa_select_attention(sc.data(), 8, {2, 16, 16, 1, 1, 1}, p, p, p, pos.data(), 1, 64, {4, 2, 64}, sel.data(), p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  EXPECT_THROW(gpu::msa_select_attention(sc.data(), 8, m, p, p, p, pos.data(), 1, 64, {4, 2, 64}, sel.data(), p, nullptr, ws.data(), 16), gpu::GpuError);
  EXPECT_THROW(gpu::msa_select_attention(sc.data(), 8, m, p + 3, p, p, pos.data(), 1, 64, {4, 2, 64}, sel.data(), p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  // A misaligned workspace and a null output: refused whichever path would run, before any launch.
  EXPECT_THROW(gpu::msa_select_attention(sc.data(), 8, m, p, p, p, pos.data(), 1, 64, {4, 2, 64}, sel.data(), p, nullptr, ws.data() + 8, 1 << 19), gpu::GpuError);
  EXPECT_THROW(gpu::msa_select_attention(sc.data(), 8, m, p, p, p, pos.data(), 1, 64, {4, 2, 64}, sel.data(), nullptr, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  EXPECT_NO_THROW(gpu::msa_select_attention(sc.data(), 8, m, p, p, p, pos.data(), 0, 64, {4, 2, 64}, sel.data(), p, nullptr, nullptr, 0));
}
