// gpu::msa_attention_prefill (KV-block-outer block-sparse prefill) against ref::msa_attention:
// the fp32 twin on the same bf16-rounded inputs with its output rounded to bf16 (the
// bf16-emulating reference, the gate) and the fp64 twin (the ground truth), queries at positions
// p0..p0+T-1 of a cache of N = p0 + T rows (p0 = 0: a whole prompt; p0 > 0: a later chunk).
// Both sides get the SAME selection, so a selection flip can never hide or fake a kernel error:
//  - realistic: ref::msa_select on random scores (forced local block last, -1 padding where fewer
//    than K_blk blocks are visible);
//  - adversarial: each row's ids in random slot order, one selected block dropped (a -1 hole in
//    the middle), and an invalid id (past the query's own block, possibly past the cache, or
//    negative) in a free slot; the GPU must give those no keys, the reference gets them as -1
//    (it throws on them).
// Also: equal to gpu::msa_attention (the query-outer decode-form kernel) within the bf16 rule;
// bit-identical on a repeat; a paged cache (random page permutation, unused pages NaN) bit-identical
// to the contiguous one; NaN rows where the contract says so; bad arguments throw GpuError.
#include "gpu/kernels/msa_attention.h"
#include "gpu/kernels/msa_attention_prefill.h"
#include "reference/ops/msa_attention.h"
#include "reference/ops/msa_select.h"
#include "tests/gpu/gpu_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace m3;
using m3::test::bf16_exact;

namespace {

// Tolerances. The kernel is fp32-accurate up to its single bf16 rounding of the output: q.k
// products are exact (bf16 x bf16 in fp32), P enters P.V as bf16 hi + lo (~16 significant bits),
// sums are fp32. Against the emulating reference (fp64 softmax on the same inputs, one bf16
// rounding) the two pre-rounding values differ by fp32 noise (~1e-6 relative), so the rounded
// outputs are equal or one bf16 ulp apart: one ulp is at most 2^-7 relative = 2 x 2^-8 (kUlps);
// kAtol absorbs the fp32 noise of outputs that cancel to near zero (sum |p v| = O(1) times ~1e-6).
constexpr double kUlps = 2.0;
constexpr double kAtol = 1e-5;
// rel-L2 to the emulating reference: the gate of every bf16 path (DESIGN §4); expected ~1e-3 here
// (half of the outputs one ulp apart at most).
constexpr double kRelL2 = 1e-2;
// Against fp64: at most twice the emulating reference's own error (its bf16 rounding of the
// output, ~2^-9 rel-L2) plus a floor for cases where that error is tiny; the fp32 noise of the
// kernel is far below 1e-5.
constexpr double kFp64Factor = 2.0, kFp64Floor = 1e-5;
constexpr double kQScale = 2.0;  // scores of std 2 after 1/sqrt(D): peaked, varied softmaxes

struct Geo {
  int Hq, Hkv, D, BLK, K_blk;
};
const Geo kSmallGroup{16, 1, 128, 128, 16};  // small's (and M3's) group: G 16, D 128, BLK 128, top-16
const Geo kTinyLike{4, 2, 64, 16, 4};        // tiny's blocks (BLK 16, top-4, G 2) at D 64
const Geo kM3{64, 4, 128, 128, 16};          // M3's heads: four groups (per-group cache and head offsets)

enum class SelMode { Realistic, Adversarial };

std::string name(const Geo& g, int T, std::int64_t p0, SelMode m) {
  return "T=" + std::to_string(T) + " p0=" + std::to_string(p0) + " Hq=" + std::to_string(g.Hq) + " Hkv=" +
         std::to_string(g.Hkv) + " D=" + std::to_string(g.D) + " BLK=" + std::to_string(g.BLK) + " K_blk=" +
         std::to_string(g.K_blk) + (m == SelMode::Realistic ? " realistic" : " adversarial");
}

struct Inputs {
  int T = 0, N = 0;
  MatF q, k, v;                   // [T, Hq*D], [N, Hkv*D], [N, Hkv*D]
  std::vector<std::int64_t> pos;  // [T]
  MatI sel_gpu;                   // [Hkv*T, K_blk] what the GPU gets
  MatI sel_ref;                   // [Hkv*T, K_blk] the same with invalid ids as -1
};

bool id_valid(std::int32_t id, std::int64_t p, int blk) { return id >= 0 && static_cast<std::int64_t>(id) * blk <= p; }

Inputs make_inputs(const Geo& g, int T, std::int64_t p0, SelMode mode, std::mt19937_64& rng) {
  Inputs in;
  in.T = T;
  in.N = static_cast<int>(p0) + T;
  in.q = bf16_exact(test::randn<float>(T, g.Hq * g.D, rng, kQScale));
  in.k = bf16_exact(test::randn<float>(in.N, g.Hkv * g.D, rng));
  in.v = bf16_exact(test::randn<float>(in.N, g.Hkv * g.D, rng));
  in.pos.resize(T);
  std::iota(in.pos.begin(), in.pos.end(), p0);
  const int NB = (in.N + g.BLK - 1) / g.BLK;
  const MsaDims md{g.Hkv, 16, g.BLK, g.K_blk, 1, 0};
  const MatF scores = test::randn<float>(static_cast<Eigen::Index>(g.Hkv) * T, NB, rng);  // [Hkv*T, NB]
  ref::msa_select<float>(scores, in.pos, md, in.sel_gpu);
  if (mode == SelMode::Adversarial) {
    for (Eigen::Index r = 0; r < in.sel_gpu.rows(); ++r) {
      const std::int64_t p = in.pos[r % T];
      std::vector<std::int32_t> ids;
      for (int s = 0; s < g.K_blk; ++s)
        if (in.sel_gpu(r, s) >= 0) ids.push_back(in.sel_gpu(r, s));
      std::shuffle(ids.begin(), ids.end(), rng);
      if (ids.size() >= 2) ids.erase(ids.begin() + std::uniform_int_distribution<int>(0, static_cast<int>(ids.size()) - 1)(rng));
      std::vector<std::int32_t> row(ids);
      row.resize(g.K_blk, -1);
      if (static_cast<int>(ids.size()) < g.K_blk) {
        const int L = static_cast<int>(p / g.BLK);
        row[ids.size()] = rng() % 2 ? L + 1 + static_cast<int>(rng() % 3) : -2 - static_cast<int>(rng() % 5);
      }
      std::shuffle(row.begin(), row.end(), rng);
      for (int s = 0; s < g.K_blk; ++s) in.sel_gpu(r, s) = row[s];
    }
  }
  in.sel_ref = in.sel_gpu;
  for (Eigen::Index r = 0; r < in.sel_ref.rows(); ++r)
    for (int s = 0; s < g.K_blk; ++s)
      if (!id_valid(in.sel_ref(r, s), in.pos[r % T], g.BLK)) in.sel_ref(r, s) = -1;
  return in;
}

struct Device {
  gpu::DeviceBuffer<gpu::bf16> q, k, v;
  gpu::DeviceBuffer<std::int64_t> pos;
  gpu::DeviceBuffer<std::int32_t> sel;
  explicit Device(const Inputs& in)
      : q(test::upload_bf16(in.q)), k(test::upload_bf16(in.k)), v(test::upload_bf16(in.v)), pos(in.pos.size()),
        sel(static_cast<std::size_t>(in.sel_gpu.size())) {
    pos.upload(in.pos);
    sel.upload(in.sel_gpu.data(), static_cast<std::size_t>(in.sel_gpu.size()));
  }
};

// One prefill call on a NaN-poisoned output and workspace; returns the output's bits.
std::vector<gpu::bf16> run_prefill(const Geo& g, const Inputs& in, Device& d, const gpu::bf16* k, const gpu::bf16* v,
                                   gpu::CachePages pages = {}) {
  const AttnDims dims{g.Hq, g.Hkv, g.D};
  gpu::DeviceBuffer<gpu::bf16> out(static_cast<std::size_t>(in.q.size()));
  out.fill_bytes(0xFF);
  const std::size_t wsb = gpu::msa_attention_prefill_workspace_bytes(in.T, in.N, g.BLK, g.K_blk, dims);
  EXPECT_GT(wsb, 0u);
  gpu::DeviceBuffer<unsigned char> ws(std::max<std::size_t>(wsb, 1));
  ws.fill_bytes(0xFF);
  gpu::msa_attention_prefill(d.q.data(), k, v, d.pos.data(), d.sel.data(), in.T, in.N, g.BLK, g.K_blk, dims,
                             out.data(), nullptr, ws.data(), wsb, pages);
  M3_CUDA_CHECK(cudaDeviceSynchronize());
  return out.download();
}

MatF to_mat(const std::vector<gpu::bf16>& bits, Eigen::Index rows, Eigen::Index cols) {
  const auto f = gpu::from_bf16(bits.data(), bits.size());
  MatF m(rows, cols);
  std::copy(f.begin(), f.begin() + rows * cols, m.data());
  return m;
}

MatF run_decode_form(const Geo& g, const Inputs& in, Device& d) {
  const AttnDims dims{g.Hq, g.Hkv, g.D};
  gpu::DeviceBuffer<gpu::bf16> out(static_cast<std::size_t>(in.q.size()));
  out.fill_bytes(0xFF);
  const std::size_t wsb = gpu::msa_attention_workspace_bytes(in.T, g.K_blk, dims);
  gpu::DeviceBuffer<unsigned char> ws(std::max<std::size_t>(wsb, 1));
  gpu::msa_attention(d.q.data(), d.k.data(), d.v.data(), d.pos.data(), d.sel.data(), in.T, in.N, g.BLK, g.K_blk, dims,
                     out.data(), nullptr, ws.data(), wsb);
  return test::download_bf16(out, in.q.rows(), in.q.cols());
}

void run_case(const Geo& g, int T, std::int64_t p0, SelMode mode) {
  SCOPED_TRACE(name(g, T, p0, mode));
  auto rng = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const AttnDims dims{g.Hq, g.Hkv, g.D};
  const Inputs in = make_inputs(g, T, p0, mode, rng);
  ASSERT_GT(in.q.norm(), 0.0);
  ASSERT_GT(in.k.norm(), 0.0);
  ASSERT_GT(in.v.norm(), 0.0);
  MatF emu;  // [T, Hq*D]
  ref::msa_attention<float>(in.q, in.k, in.v, in.pos, in.sel_ref, g.BLK, dims, emu);
  emu = bf16_exact(emu);
  MatD exact;  // [T, Hq*D]
  ref::msa_attention<double>(in.q.cast<double>(), in.k.cast<double>(), in.v.cast<double>(), in.pos, in.sel_ref, g.BLK,
                             dims, exact);
  ASSERT_GT(emu.norm(), 0.0);
  ASSERT_GT(exact.norm(), 0.0);

  Device d(in);
  const auto bits = run_prefill(g, in, d, d.k.data(), d.v.data());
  const MatF out = to_mat(bits, in.q.rows(), in.q.cols());
  ASSERT_TRUE(out.allFinite()) << "unwritten or NaN output elements";
  // Same inputs, same bits: a race (a stage reused too early, a missing barrier) or an
  // order-dependent reduction would move them.
  const auto bits2 = run_prefill(g, in, d, d.k.data(), d.v.data());
  EXPECT_EQ(std::memcmp(bits.data(), bits2.data(), bits.size() * sizeof(gpu::bf16)), 0) << "two runs differ";

  EXPECT_EQ(test::bf16_violations(out, emu, kUlps, kAtol), 0) << "max |gpu - emu| = " << (out - emu).cwiseAbs().maxCoeff();
  const double e_vs = test::rel_l2(out, emu);
  EXPECT_LE(e_vs, kRelL2);
  const double e_gpu = test::rel_l2(out.cast<double>(), exact), e_emu = test::rel_l2(emu.cast<double>(), exact);
  EXPECT_LE(e_gpu, kFp64Factor * e_emu + kFp64Floor) << "GPU vs fp64 " << e_gpu << ", emulating twin vs fp64 " << e_emu;

  // The decode-form kernel (D 64 and 128 only) on the same selection: two fp32-accurate
  // computations in different orders, each rounded once: one bf16 ulp apart at most.
  if (g.D == 64 || g.D == 128) {
    const MatF dec = run_decode_form(g, in, d);
    ASSERT_TRUE(dec.allFinite());
    EXPECT_EQ(test::bf16_violations(out, dec, kUlps, kAtol), 0)
        << "vs gpu::msa_attention: max diff " << (out - dec).cwiseAbs().maxCoeff();
  }
  std::cout << "  " << name(g, T, p0, mode) << ": rel-L2 gpu-emu " << e_vs << ", gpu-fp64 " << e_gpu << ", emu-fp64 "
            << e_emu << "\n";
}

// The awkward chunk lengths: 1, around the 128-row block, K_blk*BLK and one past it.
std::vector<int> awkward_T(const Geo& g) {
  return {1, 17, 127, 128, 129, 300, g.K_blk * g.BLK, g.K_blk * g.BLK + 1};
}

// A page pool of n_pages 128-row pages, NaN everywhere, with logical row j of `rows` at physical row
// table[j / 128] * 128 + j % 128.
std::vector<gpu::bf16> scatter_pages(const MatF& rows, const std::vector<std::int32_t>& table, int n_pages) {
  const Eigen::Index w = rows.cols();
  std::vector<gpu::bf16> pool(static_cast<std::size_t>(n_pages) * gpu::kPageRows * w);
  std::memset(static_cast<void*>(pool.data()), 0xFF, pool.size() * sizeof(gpu::bf16));  // bf16 NaN
  const auto b = gpu::to_bf16(rows.data(), static_cast<std::size_t>(rows.size()));
  for (Eigen::Index j = 0; j < rows.rows(); ++j) {
    const std::int32_t page = table[j / gpu::kPageRows];
    if (page < 0) continue;
    const std::int64_t phys = static_cast<std::int64_t>(page) * gpu::kPageRows + j % gpu::kPageRows;
    std::copy(b.begin() + j * w, b.begin() + (j + 1) * w, pool.begin() + phys * w);
  }
  return pool;
}

struct Paged {
  std::vector<std::int32_t> table;
  gpu::DeviceBuffer<gpu::bf16> k, v;
  gpu::DeviceBuffer<std::int32_t> dtable;
  gpu::CachePages pages;
};

// Pages a random permutation of a pool with 3 spare (NaN) pages; entries past the used pages -1.
Paged make_paged(const Inputs& in, std::mt19937_64& rng, int dead_page = -1) {
  Paged pg;
  const int used = (in.N + gpu::kPageRows - 1) / gpu::kPageRows, n_pages = used + 3, per_seq = used + 1;
  std::vector<std::int32_t> perm(n_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  pg.table.assign(per_seq, -1);
  for (int i = 0; i < used; ++i) pg.table[i] = perm[i];
  if (dead_page >= 0) pg.table[dead_page] = -1;
  const auto kp = scatter_pages(in.k, pg.table, n_pages), vp = scatter_pages(in.v, pg.table, n_pages);
  pg.k = gpu::DeviceBuffer<gpu::bf16>(kp.size());
  pg.v = gpu::DeviceBuffer<gpu::bf16>(vp.size());
  pg.k.upload(kp);
  pg.v.upload(vp);
  pg.dtable = gpu::DeviceBuffer<std::int32_t>(pg.table.size());
  pg.dtable.upload(pg.table);
  pg.pages = {pg.dtable.data(), per_seq};
  return pg;
}

}  // namespace

TEST(MsaAttentionPrefill_bf16, SmallGroup_AwkwardT_FromZero) {
  M3_REQUIRE_GPU();
  for (int T : awkward_T(kSmallGroup)) run_case(kSmallGroup, T, 0, SelMode::Realistic);
}

// A later chunk: p0 not a block multiple, the cache far past K_blk*BLK, so selection is sparse.
TEST(MsaAttentionPrefill_bf16, SmallGroup_AwkwardT_SecondChunk) {
  M3_REQUIRE_GPU();
  for (int T : awkward_T(kSmallGroup)) run_case(kSmallGroup, T, 4133, SelMode::Realistic);
}

TEST(MsaAttentionPrefill_bf16, TinyBlocks_AwkwardT_FromZeroAndSecondChunk) {
  M3_REQUIRE_GPU();
  for (std::int64_t p0 : {0, 203})
    for (int T : awkward_T(kTinyLike)) run_case(kTinyLike, T, p0, SelMode::Realistic);
}

TEST(MsaAttentionPrefill_bf16, AdversarialSelections) {
  M3_REQUIRE_GPU();
  for (const Geo& g : {kSmallGroup, kTinyLike})
    for (std::int64_t p0 : {0, 4133})
      for (int T : {1, 129, 300}) run_case(g, T, p0, SelMode::Adversarial);
}

// Group sizes that do not divide the 64 rows of a CTA (3, 24), one query a tile (G 64), 64 queries
// a tile (G 1), blocks that are not powers of two (48: one partial sub-tile; 80: two sub-tiles, the
// second partial), and tiny's real head dim 16.
TEST(MsaAttentionPrefill_bf16, OddGeometries) {
  M3_REQUIRE_GPU();
  run_case({6, 2, 32, 48, 5}, 211, 517, SelMode::Adversarial);
  run_case({48, 2, 64, 80, 3}, 131, 389, SelMode::Realistic);
  run_case({64, 1, 128, 128, 4}, 70, 1000, SelMode::Adversarial);
  run_case({4, 4, 64, 32, 6}, 257, 300, SelMode::Realistic);
  run_case({4, 2, 16, 16, 4}, 300, 203, SelMode::Adversarial);  // the tiny preset's geometry
  run_case({4, 2, 16, 16, 4}, 65, 0, SelMode::Realistic);
}

// Partials for 2048 slots of 64 heads are 9.4 MB a query: the 512 MiB budget gives chunks of 56
// queries, so 130 queries run as 56 + 56 + 18 (the chunk loop, t0 > 0 in every list).
TEST(MsaAttentionPrefill_bf16, ChunkedQueries_ManySlots) {
  M3_REQUIRE_GPU();
  run_case({64, 8, 16, 16, 2048}, 130, 1900, SelMode::Adversarial);
}

// A paged cache gives the same bits as the contiguous one (the arithmetic does not depend on the
// layout); spare pages and rows past N are NaN, so a wrong page or row read shows.
TEST(MsaAttentionPrefill_bf16, PagedCache_BitIdentical) {
  M3_REQUIRE_GPU();
  for (auto [g, p0] : {std::pair{kSmallGroup, 4133}, {kTinyLike, 203}, {kTinyLike, 0}}) {
    const int T = 300;
    SCOPED_TRACE(name(g, T, p0, SelMode::Realistic));
    auto rng = test::test_rng();
    SCOPED_TRACE(test::seed_note());
    const Inputs in = make_inputs(g, T, p0, SelMode::Realistic, rng);
    Device d(in);
    const auto contiguous = run_prefill(g, in, d, d.k.data(), d.v.data());
    Paged pg = make_paged(in, rng);
    const auto paged = run_prefill(g, in, d, pg.k.data(), pg.v.data(), pg.pages);
    ASSERT_TRUE(to_mat(paged, in.q.rows(), in.q.cols()).allFinite());
    EXPECT_EQ(std::memcmp(contiguous.data(), paged.data(), paged.size() * sizeof(gpu::bf16)), 0);
  }
}

// An unallocated page (id -1) is never read: the (query, group) rows that select a block on it get
// NaN, every other row the contiguous result bit for bit.
// The portable mma.sync tile kernel forced for the duration of a scope (on a Hopper card the
// wgmma one serves D = BLK = 128 otherwise, so the portable one would go untested there).
struct ForcePortableTiles {
  ForcePortableTiles() { gpu::detail::set_msa_prefill_tiles(gpu::detail::PrefillTiles::Portable); }
  ~ForcePortableTiles() { gpu::detail::set_msa_prefill_tiles(gpu::detail::PrefillTiles::Auto); }
  ForcePortableTiles(const ForcePortableTiles&) = delete;
  ForcePortableTiles& operator=(const ForcePortableTiles&) = delete;
};

// M3's geometry through the portable tile kernel (the cases above take the wgmma kernel on sm_90).
TEST(MsaAttentionPrefill_bf16, SmallGroup_PortableTiles) {
  M3_REQUIRE_GPU();
  ForcePortableTiles force;
  for (int T : {1, 129, 2049}) run_case(kSmallGroup, T, 4133, SelMode::Realistic);
  run_case(kSmallGroup, 300, 0, SelMode::Adversarial);
}

// M3's four groups through whichever tile kernel the device takes (the wgmma one on sm_90): the
// group's offsets into the cache, the query heads and the output, which one group cannot show.
TEST(MsaAttentionPrefill_bf16, M3Heads_FourGroups) {
  M3_REQUIRE_GPU();
  run_case(kM3, 300, 4133, SelMode::Realistic);
  run_case(kM3, 129, 0, SelMode::Adversarial);
}

// The two tile kernels on the same inputs: the same products summed in different orders, each
// output rounded once: one bf16 ulp apart at most (kUlps), as the decode form above.
TEST(MsaAttentionPrefill_bf16, TileKernelsAgree) {
  M3_REQUIRE_GPU();
  if (!gpu::msa_attention_prefill_uses_wgmma(128, 128))
    GTEST_SKIP() << "no wgmma tile kernel on this device (needs compute capability 9.0 and an sm_90a build)";
  for (const Geo& g : {kSmallGroup, kM3}) {
    SCOPED_TRACE(name(g, 700, 9001, SelMode::Adversarial));
    auto rng = test::test_rng();
    SCOPED_TRACE(test::seed_note());
    const Inputs in = make_inputs(g, 700, 9001, SelMode::Adversarial, rng);
    Device d(in);
    const MatF a = to_mat(run_prefill(g, in, d, d.k.data(), d.v.data()), in.q.rows(), in.q.cols());
    MatF b;
    {
      ForcePortableTiles force;
      ASSERT_FALSE(gpu::msa_attention_prefill_uses_wgmma(128, 128));
      b = to_mat(run_prefill(g, in, d, d.k.data(), d.v.data()), in.q.rows(), in.q.cols());
    }
    ASSERT_TRUE(a.allFinite());
    ASSERT_TRUE(b.allFinite());
    EXPECT_EQ(test::bf16_violations(a, b, kUlps, kAtol), 0) << "max diff " << (a - b).cwiseAbs().maxCoeff();
  }
}

void negative_page_case(const Geo& g, std::int64_t p0) {
  SCOPED_TRACE(name(g, 300, p0, SelMode::Realistic));
  const int T = 300, dead = 1;
  auto rng = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const Inputs in = make_inputs(g, T, p0, SelMode::Realistic, rng);
  Device d(in);
  const MatF contiguous = to_mat(run_prefill(g, in, d, d.k.data(), d.v.data()), in.q.rows(), in.q.cols());
  Paged pg = make_paged(in, rng, dead);
  const MatF paged = to_mat(run_prefill(g, in, d, pg.k.data(), pg.v.data(), pg.pages), in.q.rows(), in.q.cols());
  const int G = g.Hq / g.Hkv, per_page = gpu::kPageRows / g.BLK;
  long nan_rows = 0;
  for (int t = 0; t < T; ++t)
    for (int kv = 0; kv < g.Hkv; ++kv) {
      bool reads_dead = false;
      for (int s = 0; s < g.K_blk; ++s) {
        const std::int32_t id = in.sel_ref(kv * T + t, s);
        reads_dead |= id >= 0 && id / per_page == dead;
      }
      nan_rows += reads_dead;
      for (int c = kv * G * g.D; c < (kv + 1) * G * g.D; ++c) {
        if (reads_dead) ASSERT_TRUE(std::isnan(paged(t, c))) << "t " << t << " col " << c;
        else ASSERT_EQ(paged(t, c), contiguous(t, c)) << "t " << t << " col " << c;
      }
    }
  EXPECT_GT(nan_rows, 0) << "no row selected the dead page: the test checked nothing";
  EXPECT_LT(nan_rows, static_cast<long>(T) * g.Hkv) << "every row read the dead page: no equality was checked";
}

TEST(MsaAttentionPrefill_bf16, NegativePageId_NaNRowsOnlyWhereRead) {
  M3_REQUIRE_GPU();
  negative_page_case(kTinyLike, 203);    // 16-token blocks: 8 blocks a page (the portable tile kernel)
  // One block a page (the wgmma tile kernel on sm_90); 35 blocks, 16 selected: some rows miss it.
  negative_page_case(kSmallGroup, 4133);
}

// Where the reference throws, the GPU gives visible NaN rows: a (query, group) without a valid id
// (only -1 and an id past its block), and a position outside [0, N) (the whole query).
TEST(MsaAttentionPrefill_bf16, NoValidIdOrBadPosition_GiveNaN) {
  M3_REQUIRE_GPU();
  const Geo g = kTinyLike;
  auto rng = test::test_rng();
  Inputs in = make_inputs(g, 3, 100, SelMode::Realistic, rng);  // N = 103, positions 100..102
  for (int s = 0; s < g.K_blk; ++s) in.sel_gpu(1 * 3 + 0, s) = s == 1 ? 40 : -1;  // group 1 of query 0
  for (int s = 0; s < g.K_blk; ++s) in.sel_gpu(0 * 3 + 0, s) = s;                   // group 0: blocks 0..3
  in.pos[2] = 103;  // == N
  Device d(in);
  const MatF out = to_mat(run_prefill(g, in, d, d.k.data(), d.v.data()), in.q.rows(), in.q.cols());
  const int G = g.Hq / g.Hkv;
  for (Eigen::Index c = 0; c < out.cols(); ++c) {
    const bool group1 = c >= static_cast<Eigen::Index>(G) * g.D;
    EXPECT_EQ(std::isnan(out(0, c)), group1) << "query 0 col " << c;
    EXPECT_TRUE(std::isfinite(out(1, c))) << "query 1 col " << c;
    EXPECT_TRUE(std::isnan(out(2, c))) << "query 2 col " << c;
  }
}

TEST(MsaAttentionPrefill_bf16, RejectsBadArguments) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<gpu::bf16> buf(1 << 16);
  gpu::DeviceBuffer<std::int64_t> pos(4);
  gpu::DeviceBuffer<std::int32_t> sel(64), table(4);
  const std::size_t wsb = std::size_t{64} << 20;
  gpu::DeviceBuffer<unsigned char> ws(wsb);
  buf.fill_bytes(0);
  pos.fill_bytes(0);  // positions 0 and ids 0: the one accepted call reads defined data
  sel.fill_bytes(0);
  gpu::bf16* p = buf.data();
  const AttnDims ok{4, 2, 64};
  auto call = [&](const gpu::bf16* q, const gpu::bf16* v, const std::int32_t* s, int T, int N, int blk, int k_blk,
                  AttnDims dims, std::size_t bytes, gpu::CachePages pages = {}) {
    gpu::msa_attention_prefill(q, p, v, pos.data(), s, T, N, blk, k_blk, dims, p, nullptr, ws.data(), bytes, pages);
  };
  EXPECT_NO_THROW(call(p, p, sel.data(), 1, 64, 16, 4, ok, wsb));
  EXPECT_THROW(call(p, p, sel.data(), 1, 64, 16, 4, {4, 2, 96}, wsb), gpu::GpuError);    // D 96
  EXPECT_THROW(call(p, p, sel.data(), 1, 64, 16, 4, {4, 3, 64}, wsb), gpu::GpuError);    // Hq % Hkv
  EXPECT_THROW(call(p, p, sel.data(), 1, 64, 16, 4, {130, 2, 64}, wsb), gpu::GpuError);  // G 65 > 64
  EXPECT_THROW(call(p, p, sel.data(), 1, 64, 0, 4, ok, wsb), gpu::GpuError);             // blk 0
  EXPECT_THROW(call(p, p, sel.data(), 1, 64, 24, 4, ok, wsb), gpu::GpuError);            // blk % 16
  EXPECT_THROW(call(p, p, sel.data(), 1, 64, 144, 4, ok, wsb), gpu::GpuError);           // blk > 128
  EXPECT_THROW(call(p, p, sel.data(), 1, 64, 16, 0, ok, wsb), gpu::GpuError);            // k_blk 0
  EXPECT_THROW(call(p, p, sel.data(), 1, 0, 16, 4, ok, wsb), gpu::GpuError);             // N 0
  EXPECT_THROW(call(p, p, sel.data(), -1, 64, 16, 4, ok, wsb), gpu::GpuError);           // T < 0
  EXPECT_THROW(call(p, p, sel.data(), 1, 64, 16, 4, ok, 16), gpu::GpuError);             // workspace
  EXPECT_THROW(call(p, p + 3, sel.data(), 1, 64, 16, 4, ok, wsb), gpu::GpuError);        // v alignment
  EXPECT_THROW(call(nullptr, p, sel.data(), 1, 64, 16, 4, ok, wsb), gpu::GpuError);      // q null
  EXPECT_THROW(call(p, p, nullptr, 1, 64, 16, 4, ok, wsb), gpu::GpuError);               // sel null
  EXPECT_THROW(call(p, p, sel.data(), 1, 300, 16, 4, ok, wsb, {table.data(), 2}), gpu::GpuError);  // 2 pages < 300 rows
  EXPECT_NO_THROW(gpu::msa_attention_prefill(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 64, 16, 4, ok, nullptr,
                                             nullptr, nullptr, 0));
  EXPECT_EQ(gpu::msa_attention_prefill_workspace_bytes(0, 64, 16, 4, ok), 0u);
  M3_CUDA_CHECK(cudaDeviceSynchronize());
}
