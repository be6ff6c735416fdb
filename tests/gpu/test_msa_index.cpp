// gpu::msa_index / msa_index_fp8 against ref::msa_index in fp32 on the same bf16 (or E4M3-decoded)
// inputs. Both sides sum the same exact bf16 products in fp32 in different orders, so each score
// is within 2 * gamma_Di * ||q_i|| * max_j ||k_j|| of the other (gamma_n = n * 2^-24, the fp32
// dot-product bound, doubled for the two sides). -inf (blocks past the query's own block) and
// NaN / +-inf must match exactly; the GPU's extra columns (NB > the reference's) must be -inf.
// Paged index-K caches (kv_cache.h): the same keys scattered into a pool of permuted 128-row pages
// (spare and tail rows NaN, pages past a sequence's length unallocated), sequences of different
// lengths, BLK 128, 64 and 16 (chunks that start inside a page, tiles that straddle two): the scores
// must be bit-identical to the contiguous run's, and a negative page id must give NaN exactly for
// the blocks with a visible key in it.
#include "gpu/kernels/msa_index.h"
#include "reference/ops/msa_index.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/paged_test_util.h"

#include <algorithm>
#include <cmath>
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

constexpr double kRelL2 = 1e-5;  // fp32 path (DESIGN §4): the scores are fp32 dot products

struct Case {
  int B, T, N, Hi, Di, BLK;
  bool decode;  // T = 1 at p = len - 1; else scattered positions < len
  int extra_nb = 2;  // GPU columns beyond ceil(N/BLK)
  std::vector<int> lens = {};  // per-sequence lengths; empty: all N
  bool paged = false;          // also run on a paged copy of the cache: bit-identical scores
  int bad_page = -1;           // paged: this logical page of sequence 0 gets id -1
  bool nan_past = false;       // keys past every row's position of their sequence are NaN: what a
                               // contiguous CTA reads ahead of its positions must stay masked
};

std::string name(const Case& c) {
  return "B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) + " N=" + std::to_string(c.N) + " Hi=" +
         std::to_string(c.Hi) + " Di=" + std::to_string(c.Di) + " BLK=" + std::to_string(c.BLK) +
         (c.decode ? " decode" : " scattered") + (c.paged ? " paged" : "") +
         (c.bad_page >= 0 ? " bad page " + std::to_string(c.bad_page) : "");
}

std::vector<int> lens_of(const Case& c) { return c.lens.empty() ? std::vector<int>(c.B, c.N) : c.lens; }

// Rounds to E4M3 (round to nearest even, saturating to +-448 as the cache writer would).
float e4m3(float x) { return static_cast<float>(__nv_fp8_e4m3(x)); }

// The E4M3 cache holding k's values (k already E4M3-valued: exact), row-major as k.
std::vector<__nv_fp8_e4m3> to_e4m3(const MatF& k) {
  std::vector<__nv_fp8_e4m3> h(static_cast<std::size_t>(k.size()));
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = __nv_fp8_e4m3(k.data()[i]);
  return h;
}
gpu::DeviceBuffer<__nv_fp8_e4m3> upload_e4m3(const MatF& k) {
  const auto h = to_e4m3(k);
  gpu::DeviceBuffer<__nv_fp8_e4m3> d(h.size());
  d.upload(h);
  return d;
}

// special: put +inf / NaN into a few index-K rows (the NaN-propagation contract).
void run_case(const Case& c, bool fp8 = false, bool special = false) {
  SCOPED_TRACE(name(c) + (fp8 ? " fp8" : "") + (special ? " non-finite" : ""));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const MsaDims dims{c.Hi, c.Di, c.BLK, 16, 1, 0};
  MatF q = bf16_exact(test::randn<float>(static_cast<Eigen::Index>(c.B) * c.T, c.Hi * c.Di, g));
  MatF k = test::randn<float>(static_cast<Eigen::Index>(c.B) * c.N, c.Di, g);
  for (Eigen::Index i = 0; i < k.size(); ++i) k.data()[i] = fp8 ? e4m3(k.data()[i]) : round_bf16(k.data()[i]);
  if (special) {
    std::uniform_int_distribution<Eigen::Index> row(0, k.rows() - 1), col(0, c.Di - 1);
    for (int s = 0; s < 3; ++s) k(row(g), col(g)) = std::numeric_limits<float>::infinity();
    k(row(g), col(g)) = std::numeric_limits<float>::quiet_NaN();
  }
  std::vector<std::int64_t> pos;
  for (int b = 0; b < c.B; ++b) {
    const int L = lens_of(c)[b];
    auto p = c.decode ? std::vector<std::int64_t>(c.T, L - 1) : scattered_positions(c.T, L, g);
    pos.insert(pos.end(), p.begin(), p.end());
  }
  if (c.nan_past)
    for (int b = 0; b < c.B; ++b) {
      const std::int64_t pmax = *std::max_element(pos.begin() + b * c.T, pos.begin() + (b + 1) * c.T);
      for (std::int64_t j = pmax + 1; j < c.N; ++j) k.row(b * c.N + j).setConstant(std::numeric_limits<float>::quiet_NaN());
    }
  const int NB = (c.N + c.BLK - 1) / c.BLK + c.extra_nb;

  auto dq = test::upload_bf16(q);
  gpu::DeviceBuffer<gpu::bf16> dk16;
  gpu::DeviceBuffer<__nv_fp8_e4m3> dk8;
  if (fp8) dk8 = upload_e4m3(k);
  else dk16 = test::upload_bf16(k);
  gpu::DeviceBuffer<std::int64_t> dpos(pos.size());
  dpos.upload(pos);
  const Eigen::Index rows = static_cast<Eigen::Index>(c.B) * c.Hi * c.T;
  gpu::DeviceBuffer<float> dsc(static_cast<std::size_t>(rows) * NB);
  dsc.fill_bytes(0xFF);  // NaN: every column of every row must be written
  if (fp8) gpu::msa_index_fp8(dq.data(), dk8.data(), dpos.data(), c.T, c.N, NB, dims, dsc.data(), nullptr, c.B);
  else gpu::msa_index(dq.data(), dk16.data(), dpos.data(), c.T, c.N, NB, dims, dsc.data(), nullptr, c.B);
  const auto hs = dsc.download();

  if (c.paged) {
    PageTable t = make_pages(c.N, lens_of(c), 3, g);
    if (c.bad_page >= 0) t.ids[c.bad_page] = -1;  // sequence 0's page
    gpu::DeviceBuffer<std::int32_t> dtab(t.ids.size());
    dtab.upload(t.ids);
    const gpu::CachePages cp{dtab.data(), t.pps};
    dsc.fill_bytes(0xFF);
    gpu::DeviceBuffer<gpu::bf16> pk16;
    gpu::DeviceBuffer<__nv_fp8_e4m3> pk8;
    if (fp8) {
      pk8 = gpu::DeviceBuffer<__nv_fp8_e4m3>(static_cast<std::size_t>(t.n_pages) * gpu::kPageRows * c.Di);
      pk8.upload(scatter_pages(to_e4m3(k), c.N, c.Di, lens_of(c), t));
      gpu::msa_index_fp8(dq.data(), pk8.data(), dpos.data(), c.T, c.N, NB, dims, dsc.data(), nullptr, c.B, cp);
    } else {
      pk16 = gpu::DeviceBuffer<gpu::bf16>(static_cast<std::size_t>(t.n_pages) * gpu::kPageRows * c.Di);
      pk16.upload(scatter_pages(gpu::to_bf16(k.data(), static_cast<std::size_t>(k.size())), c.N, c.Di, lens_of(c), t));
      gpu::msa_index(dq.data(), pk16.data(), dpos.data(), c.T, c.N, NB, dims, dsc.data(), nullptr, c.B, cp);
    }
    const auto ps = dsc.download();
    const std::int64_t lo = std::int64_t{c.bad_page} * gpu::kPageRows, hi = lo + gpu::kPageRows - 1;
    long differ = 0, not_nan = 0;
    for (int b = 0; b < c.B; ++b)
      for (int i = 0; i < c.Hi; ++i)
        for (int tt = 0; tt < c.T; ++tt) {
          const std::int64_t p = pos[static_cast<std::size_t>(b) * c.T + tt];
          for (int col = 0; col < NB; ++col) {
            // The block's visible keys [col*BLK, min(col*BLK + BLK - 1, p)] meet the bad page.
            const std::int64_t j0 = std::int64_t{col} * c.BLK, j1 = std::min(j0 + c.BLK - 1, p);
            const bool bad = c.bad_page >= 0 && b == 0 && std::max(j0, lo) <= std::min(j1, hi);
            const std::size_t at = ((static_cast<std::size_t>(b) * c.Hi + i) * c.T + tt) * NB + col;
            if (bad) not_nan += !std::isnan(ps[at]);
            else differ += std::memcmp(&ps[at], &hs[at], sizeof(float)) != 0;
          }
        }
    EXPECT_EQ(differ, 0) << "paged scores that differ from the contiguous run's bits";
    EXPECT_EQ(not_nan, 0) << "scores of blocks with a visible key in an unallocated page are not NaN";
  }

  double num = 0, den = 0;
  long finite = 0, bad = 0;
  for (int b = 0; b < c.B; ++b) {
    const MatF qb = q.middleRows(static_cast<Eigen::Index>(b) * c.T, c.T);
    const MatF kb = k.middleRows(static_cast<Eigen::Index>(b) * c.N, c.N);
    std::vector<std::int64_t> pb(pos.begin() + b * c.T, pos.begin() + (b + 1) * c.T);
    MatF ref;  // [Hi*T, NBr]
    ref::msa_index<float>(qb, kb, pb, dims, ref);
    float kmax = 0;
    for (Eigen::Index j = 0; j < kb.rows(); ++j)
      if (kb.row(j).allFinite()) kmax = std::max(kmax, kb.row(j).norm());
    for (Eigen::Index r = 0; r < ref.rows(); ++r) {
      const int i = static_cast<int>(r / c.T), t = static_cast<int>(r % c.T);
      const double qn = qb.row(t).segment(static_cast<Eigen::Index>(i) * c.Di, c.Di).norm();
      const double tol = 2.0 * c.Di * 0x1p-24 * qn * kmax;
      for (int col = 0; col < NB; ++col) {
        const float want = col < ref.cols() ? ref(r, col) : -std::numeric_limits<float>::infinity();
        const float got = hs[static_cast<std::size_t>((static_cast<Eigen::Index>(b) * c.Hi * c.T + r) * NB + col)];
        bool ok;
        if (std::isnan(want)) ok = std::isnan(got);
        else if (std::isinf(want)) ok = got == want;
        else {
          ok = std::isfinite(got) && std::abs(got - want) <= tol;
          num += (got - want) * double(got - want);
          den += double(want) * want;
          ++finite;
        }
        if (!ok && ++bad <= 5)
          ADD_FAILURE() << "b " << b << " row " << r << " block " << col << ": gpu " << got << ", ref " << want
                        << " (tol " << tol << ")";
      }
    }
  }
  EXPECT_EQ(bad, 0);
  EXPECT_GT(finite, 0);
  EXPECT_GT(den, 0.0);
  EXPECT_LE(std::sqrt(num / std::max(den, 1e-300)), kRelL2);
}

const int kAwkwardN[] = {1, 127, 129, 2048, 2049, 5000};

}  // namespace

TEST(MsaIndex_bf16, Decode_M3Dims_AwkwardN) {
  M3_REQUIRE_GPU();
  for (int N : kAwkwardN) run_case({1, 1, N, 4, 128, 128, true});
}

TEST(MsaIndex_bf16, Scattered37_M3Dims_Batch2) {
  M3_REQUIRE_GPU();
  for (int N : kAwkwardN) run_case({2, 37, N, 4, 128, 128, false});
}

TEST(MsaIndex_bf16, OddHeads_SmallBlocks) {
  M3_REQUIRE_GPU();
  // Hi = 3 (16-row tiles straddle queries), Hi = 1, BLK 16 and 64, Di 64.
  for (int N : {1, 15, 17, 300}) run_case({1, 37, N, 3, 128, 16, false});
  for (int N : {63, 65, 1000}) run_case({3, 5, N, 1, 64, 64, false});
  run_case({2, 1, 777, 3, 64, 16, true, 0});  // NB exactly ceil(N/BLK)
}

// The tiny preset's index heads (Di 16, BLK 16) and Di 32, bf16 and fp8 caches, contiguous and paged.
TEST(MsaIndex_bf16, SmallIndexDims_16_32) {
  M3_REQUIRE_GPU();
  for (int Di : {16, 32}) {
    for (int N : {1, 15, 17, 300}) run_case({2, 9, N, 2, Di, 16, false});
    run_case({1, 1, 2049, 2, Di, 16, true});
    run_case({1, 9, 1000, 2, Di, 16, false}, true);  // fp8
    run_case({3, 5, 1000, 2, Di, 16, false, 2, {1000, 129, 64}, true});
  }
}

TEST(MsaIndex_bf16, LongContext_ManyChunks) {
  M3_REQUIRE_GPU();
  run_case({1, 1, 300000, 4, 128, 128, true});
  run_case({2, 3, 70000, 4, 128, 128, false});
}

TEST(MsaIndex_bf16, NonFiniteKeysPropagate) {
  M3_REQUIRE_GPU();
  run_case({1, 1, 2049, 4, 128, 128, true}, false, true);
  run_case({1, 37, 5000, 4, 128, 128, false}, false, true);
}

// NaN keys past every position (in the positions' own blocks and beyond): a contiguous CTA issues
// its first tiles before it knows the positions, so it reads them; they must stay masked. Short
// sequences in a long cache (decode at len - 1 < N), scattered rows, both tiles, bf16 and fp8, and
// a paged copy (which never reads them) bit for bit.
TEST(MsaIndex, KeysPastThePositionsAreNeverScored) {
  M3_REQUIRE_GPU();
  for (bool fp8 : {false, true}) {
    run_case({2, 1, 3000, 4, 128, 128, true, 2, {1000, 77}, true, -1, true}, fp8);   // 8-row tiles
    run_case({2, 5, 3000, 4, 128, 128, false, 2, {2999, 300}, true, -1, true}, fp8);  // 16-row tiles
    run_case({1, 3, 700, 2, 32, 16, false, 2, {}, false, -1, true}, fp8);
  }
}

TEST(MsaIndex_fp8, Decode_And_Scattered) {
  M3_REQUIRE_GPU();
  for (int N : {1, 129, 2049}) run_case({1, 1, N, 4, 128, 128, true}, true);
  run_case({2, 37, 5000, 4, 128, 128, false}, true);
  run_case({1, 5, 1000, 3, 64, 16, false}, true);
  run_case({1, 1, 300000, 4, 128, 128, true}, true);
}

// Both row tiles (msa_index.h's IndexRowTile): decode rows (<= 8 a sequence) take 8-row tiles
// unless forced to 16; each against the reference at every compiled Di, bf16 and fp8, contiguous
// and paged (each paged run bit for bit against its contiguous one), and the two tiles bit for bit
// on one contiguous shape (rows 0-7 of a 16-row tile run the 8-row tile's MMAs).
TEST(MsaIndex, BothRowTiles_EveryDi_BitIdentical) {
  M3_REQUIRE_GPU();
  struct Reset {
    ~Reset() { gpu::detail::set_index_row_tile(gpu::detail::IndexRowTile::Auto); }
  } reset;
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  for (bool fp8 : {false, true})
    for (int Di : {16, 32, 64, 128}) {
      SCOPED_TRACE(std::string(fp8 ? "fp8" : "bf16") + " Di " + std::to_string(Di));
      for (auto f : {gpu::detail::IndexRowTile::Rows16, gpu::detail::IndexRowTile::Auto}) {
        SCOPED_TRACE(f == gpu::detail::IndexRowTile::Rows16 ? "rows16" : "auto");
        gpu::detail::set_index_row_tile(f);
        run_case({1, 1, 2049, 4, Di, 128, true}, fp8);
        run_case({2, 2, 1000, 3, Di, 16, false}, fp8);  // 6 rows a sequence
        run_case({3, 1, 1000, 2, Di, 16, true, 2, {1000, 129, 64}, true}, fp8);  // paged
      }
      // Bit for bit: B = 3 sequences of 5 (query, head) rows (T 5, Hi 1), scattered positions.
      const int B = 3, T = 5, N = 777, NB = (N + 15) / 16;
      const MsaDims dims{1, Di, 16, 16, 1, 0};
      MatF q = bf16_exact(test::randn<float>(B * T, Di, g));
      MatF k = test::randn<float>(B * N, Di, g);
      for (Eigen::Index i = 0; i < k.size(); ++i) k.data()[i] = fp8 ? e4m3(k.data()[i]) : round_bf16(k.data()[i]);
      std::vector<std::int64_t> pos;
      for (int b = 0; b < B; ++b) {
        const auto p = scattered_positions(T, N, g);
        pos.insert(pos.end(), p.begin(), p.end());
      }
      auto dq = test::upload_bf16(q);
      gpu::DeviceBuffer<gpu::bf16> dk16 = test::upload_bf16(k);
      gpu::DeviceBuffer<__nv_fp8_e4m3> dk8 = upload_e4m3(k);
      gpu::DeviceBuffer<std::int64_t> dpos(pos.size());
      dpos.upload(pos);
      gpu::DeviceBuffer<float> dsc(static_cast<std::size_t>(B) * T * NB);
      std::vector<float> runs[2];
      int i = 0;
      for (auto f : {gpu::detail::IndexRowTile::Rows16, gpu::detail::IndexRowTile::Auto}) {
        gpu::detail::set_index_row_tile(f);
        dsc.fill_bytes(0xFF);
        if (fp8) gpu::msa_index_fp8(dq.data(), dk8.data(), dpos.data(), T, N, NB, dims, dsc.data(), nullptr, B);
        else gpu::msa_index(dq.data(), dk16.data(), dpos.data(), T, N, NB, dims, dsc.data(), nullptr, B);
        runs[i++] = dsc.download();
      }
      EXPECT_EQ(std::memcmp(runs[0].data(), runs[1].data(), runs[0].size() * sizeof(float)), 0)
          << "8-row and 16-row tiles give different score bits";
    }
}

// Sequences of 5000, 2048 (a page multiple) and 129 (a page + 1) keys, N = 5000 the capacity.
TEST(MsaIndex_bf16, Paged_UnevenLengths_BitIdentical) {
  M3_REQUIRE_GPU();
  run_case({3, 1, 5000, 4, 128, 128, true, 2, {5000, 2048, 129}, true});
  run_case({3, 37, 3000, 4, 128, 128, false, 2, {3000, 256, 129}, true});
  run_case({2, 1, 70000, 4, 128, 128, true, 2, {70000, 33025}, true});
}

TEST(MsaIndex_bf16, Paged_SmallBlocks_TilesStraddlePages) {
  M3_REQUIRE_GPU();
  // Chunks of 3 blocks of 16 (48 keys) start inside pages, so 64-key tiles cross page boundaries.
  run_case({2, 37, 1000, 3, 128, 16, false, 2, {1000, 129}, true});
  run_case({3, 5, 1000, 1, 64, 64, false, 2, {1000, 256, 129}, true});
}

TEST(MsaIndex_fp8, Paged_UnevenLengths_BitIdentical) {
  M3_REQUIRE_GPU();
  run_case({3, 1, 5000, 4, 128, 128, true, 2, {5000, 2048, 129}, true}, true);
  run_case({2, 37, 1000, 3, 64, 16, false, 2, {1000, 129}, true}, true);  // 128-key tiles straddle pages
  run_case({2, 1, 70000, 4, 128, 128, true, 2, {70000, 33025}, true}, true);
}

TEST(MsaIndex_bf16, Paged_NegativePageId_GivesNaNBlocks) {
  M3_REQUIRE_GPU();
  run_case({2, 37, 3000, 4, 128, 128, false, 2, {3000, 1000}, true, 5});
  run_case({2, 37, 1000, 3, 128, 16, false, 2, {1000, 700}, true, 2});
  run_case({2, 37, 1000, 3, 64, 16, false, 2, {1000, 700}, true, 2}, true);
}

TEST(MsaIndex_bf16, OutOfRangePositionGivesNaNRow) {
  M3_REQUIRE_GPU();
  const MsaDims dims{2, 64, 16, 4, 1, 0};
  const int T = 2, N = 100, NB = 7;
  auto dq = test::upload_bf16(MatF(MatF::Ones(T, 2 * 64)));
  auto dk = test::upload_bf16(MatF(MatF::Ones(N, 64)));
  const std::vector<std::int64_t> pos{99, 100};
  gpu::DeviceBuffer<std::int64_t> dpos(2);
  dpos.upload(pos);
  gpu::DeviceBuffer<float> dsc(2 * T * NB);
  dsc.fill_bytes(0);
  gpu::msa_index(dq.data(), dk.data(), dpos.data(), T, N, NB, dims, dsc.data(), nullptr);
  const auto s = dsc.download();
  for (int i = 0; i < 2; ++i)
    for (int b = 0; b < NB; ++b) {
      EXPECT_EQ(s[(i * T + 0) * NB + b], 64.f) << "valid row, head " << i << " block " << b;
      EXPECT_TRUE(std::isnan(s[(i * T + 1) * NB + b])) << "invalid row, head " << i << " block " << b;
    }
}

TEST(MsaIndex_bf16, RejectsBadArguments) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<gpu::bf16> buf(1 << 16);
  gpu::DeviceBuffer<std::int64_t> pos(4);
  gpu::DeviceBuffer<float> sc(1 << 16);
  auto* p = buf.data();
  EXPECT_THROW(gpu::msa_index(p, p, pos.data(), 1, 256, 2, {4, 96, 128, 16}, sc.data(), nullptr), gpu::GpuError);  // Di
  EXPECT_THROW(gpu::msa_index(p, p, pos.data(), 1, 256, 11, {4, 128, 24, 16}, sc.data(), nullptr), gpu::GpuError);  // BLK % 16
  EXPECT_THROW(gpu::msa_index(p, p, pos.data(), 1, 257, 2, {4, 128, 128, 16}, sc.data(), nullptr), gpu::GpuError);  // NB < ceil(N/BLK)
  EXPECT_THROW(gpu::msa_index(p, p, pos.data(), 1, 0, 2, {4, 128, 128, 16}, sc.data(), nullptr), gpu::GpuError);    // N = 0
  EXPECT_THROW(gpu::msa_index(p, p + 1, pos.data(), 1, 256, 2, {4, 128, 128, 16}, sc.data(), nullptr), gpu::GpuError);  // align
  EXPECT_THROW(gpu::msa_index(p, p, pos.data(), 1, 256, 2, {0, 128, 128, 16}, sc.data(), nullptr), gpu::GpuError);  // Hi
  gpu::DeviceBuffer<std::int32_t> tab(8);  // a page table of 1 page for N = 256
  EXPECT_THROW(gpu::msa_index(p, p, pos.data(), 1, 256, 2, {4, 128, 128, 16}, sc.data(), nullptr, 1,
                              gpu::CachePages{tab.data(), 1}),
               gpu::GpuError);
  EXPECT_NO_THROW(gpu::msa_index(p, p, pos.data(), 0, 256, 2, {4, 128, 128, 16}, sc.data(), nullptr));
}
