// gpu::msa_select against ref::msa_select on the SAME fp32 scores: the selection must match
// exactly, slot by slot (chosen blocks in tie-rule order, forced blocks ascending, -1 padding).
// Inputs are built to stress the tie rule: continuous scores, small integers and three values
// (massive exact ties), a constant row, rows sprinkled with NaN, +-inf and +-0, rows of mostly
// +-0 or mostly NaN / -inf with a few real scores (the budget is filled by ties broken by id),
// and a narrow band (keys sharing 20+ leading bits: every radix pass runs); forced-block layouts
// with and without init blocks; NB up to 20000; positions at and around block edges. Both kernels
// (single CTA a row; a cluster of CTAs a row for few rows) are forced in turn and must agree bit
// for bit with each other and with the reference.
#include "gpu/kernels/msa_select.h"
#include "reference/ops/msa_select.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/score_test_util.h"

#include <algorithm>
#include <limits>
#include <random>
#include <vector>

using namespace m3;
using m3::test::Dist;
using m3::test::dist_name;
using m3::test::draw_scores;

namespace {

using gpu::detail::SelectPath;

const char* path_name(SelectPath p) {
  switch (p) {
    case SelectPath::Auto: return "auto";
    case SelectPath::SingleCta: return "single-cta";
    case SelectPath::Split: return "split";
  }
  return "?";
}

// msa_select's own choice, then each kernel forced (the split one where its limits allow it).
std::vector<SelectPath> paths_for(const MsaDims& dims, int NB) {
  std::vector<SelectPath> p{SelectPath::Auto, SelectPath::SingleCta};
  if (dims.K_blk <= 64 && NB <= 32768) p.push_back(SelectPath::Split);
  return p;
}

// Runs B sequences of the given positions (pos.size() = B*T) on every path: each must match the
// reference slot by slot, and all paths must return the same bytes.
void run_case(const MsaDims& dims, int B, const std::vector<std::int64_t>& pos, int NB, Dist d) {
  const int T = static_cast<int>(pos.size()) / B;
  SCOPED_TRACE("Hi=" + std::to_string(dims.Hi) + " BLK=" + std::to_string(dims.BLK) + " K_blk=" +
               std::to_string(dims.K_blk) + " local=" + std::to_string(dims.local_blocks) + " init=" +
               std::to_string(dims.init_blocks) + " B=" + std::to_string(B) + " T=" + std::to_string(T) +
               " NB=" + std::to_string(NB) + " p[0]=" + std::to_string(pos[0]) + " " + dist_name(d));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const Eigen::Index rows_seq = static_cast<Eigen::Index>(dims.Hi) * T;
  MatF s = draw_scores(rows_seq * B, NB, d, g);  // [B*Hi*T, NB]
  std::vector<MatI> refs(static_cast<std::size_t>(B));  // [Hi*T, K_blk] each
  for (int b = 0; b < B; ++b) {
    const MatF sb = s.middleRows(rows_seq * b, rows_seq);
    std::vector<std::int64_t> pb(pos.begin() + b * T, pos.begin() + (b + 1) * T);
    ref::msa_select<float>(sb, pb, dims, refs[static_cast<std::size_t>(b)]);
  }

  gpu::DeviceBuffer<float> ds(static_cast<std::size_t>(s.size()));
  ds.upload(s.data(), static_cast<std::size_t>(s.size()));
  gpu::DeviceBuffer<std::int64_t> dpos(pos.size());
  dpos.upload(pos);
  gpu::DeviceBuffer<std::int32_t> dsel(static_cast<std::size_t>(rows_seq) * B * dims.K_blk);
  std::vector<std::int32_t> first;
  for (SelectPath path : paths_for(dims, NB)) {
    SCOPED_TRACE(std::string("path ") + path_name(path));
    dsel.fill_bytes(0x80);  // large negative ints: every slot must be written
    gpu::detail::msa_select_path(ds.data(), dpos.data(), T, NB, dims, dsel.data(), nullptr, B, path);
    const auto got = dsel.download();
    long mismatched_rows = 0;
    for (int b = 0; b < B; ++b) {
      const MatI& ref = refs[static_cast<std::size_t>(b)];
      for (Eigen::Index r = 0; r < rows_seq; ++r) {
        bool same = true;
        for (int j = 0; j < dims.K_blk; ++j)
          same = same && got[static_cast<std::size_t>((rows_seq * b + r) * dims.K_blk + j)] == ref(r, j);
        if (!same && ++mismatched_rows <= 3) {
          std::string gs, rs;
          for (int j = 0; j < dims.K_blk; ++j) {
            gs += std::to_string(got[static_cast<std::size_t>((rows_seq * b + r) * dims.K_blk + j)]) + " ";
            rs += std::to_string(ref(r, j)) + " ";
          }
          ADD_FAILURE() << "b " << b << " row " << r << ":\n  gpu " << gs << "\n  ref " << rs;
        }
      }
    }
    EXPECT_EQ(mismatched_rows, 0);
    if (first.empty()) first = got;
    else EXPECT_TRUE(got == first) << "the paths' outputs differ";
  }
}

const Dist kDists[] = {Dist::Normal, Dist::SmallInts, Dist::Constant, Dist::Specials};
const Dist kAllDists[] = {Dist::Normal,      Dist::SmallInts,   Dist::Constant, Dist::Specials,
                          Dist::ThreeValues, Dist::SignedZeros, Dist::NanInf,   Dist::Narrow};

}  // namespace

TEST(MsaSelect_f32, Decode_M3_AwkwardContexts) {
  M3_REQUIRE_GPU();
  const MsaDims dims{4, 128, 128, 16, 1, 0};
  // Contexts (p = N - 1): 1 token, BLK-1, BLK, BLK+1, K_blk*BLK - 1 .. + 1, 5000, 1M (NB 8192).
  for (int N : {1, 127, 128, 129, 2047, 2048, 2049, 2177, 5000, 1 << 20})
    for (Dist d : kAllDists) {
      const int NB = (N + 127) / 128;
      run_case(dims, 1, {N - 1}, NB, d);
    }
}

TEST(MsaSelect_f32, Decode_Batch8_1M) {
  M3_REQUIRE_GPU();
  const MsaDims dims{4, 128, 128, 16, 1, 0};
  std::vector<std::int64_t> pos;
  std::mt19937_64 g = test::test_rng();
  std::uniform_int_distribution<std::int64_t> p(0, (1 << 20) - 1);
  for (int b = 0; b < 8; ++b) pos.push_back(b == 0 ? (1 << 20) - 1 : p(g));
  for (Dist d : kAllDists) run_case(dims, 8, pos, 8192, d);
}

// Decode batch 1 (4 rows: msa_select itself takes the split path, a cluster of CTAs a row) over
// long rows, every adversarial distribution, positions at the end of the row, in the middle and
// within the first K_blk blocks (every visible block selected; exactly full; one to spare).
// NB: 1M tokens / BLK (8192: 8 CTAs of 1024 blocks), odd sizes (5001: 5 CTAs, a ragged last
// chunk; 1025: 2 CTAs of ~512), 20000 (8 CTAs, 16 keys a thread). Layouts: M3; init blocks
// (chunks start after them); K_blk 64 (the split path's largest budget); budget = forced
// (nothing to choose); no forced block.
TEST(MsaSelect_f32, FewRows_SplitPath_Adversarial) {
  M3_REQUIRE_GPU();
  const MsaDims layouts[] = {{4, 128, 128, 16, 1, 0}, {4, 128, 128, 16, 1, 2}, {4, 128, 128, 64, 3, 2},
                             {4, 128, 128, 2, 1, 1},  {4, 128, 128, 5, 0, 0}};
  for (const auto& dims : layouts)
    for (int NB : {8192, 5001, 1025, 20000}) {
      const std::int64_t blk = dims.BLK, kb = dims.K_blk;
      const std::int64_t positions[] = {NB * blk - 1, (NB / 2) * blk + 77, 5 * blk + 3, (kb - 1) * blk,
                                        kb * blk + 1};
      for (std::int64_t p : positions)
        for (Dist d : kAllDists) run_case(dims, 1, {p}, NB, d);
    }
}

// The split path at small grids (2 and 3 CTAs a row), M3's budget and the largest one with init
// and local blocks: the racecheck run's subset (gpu-suite), and a quick check of its own.
TEST(MsaSelect_f32, FewRows_SplitPath_SmallGrids) {
  M3_REQUIRE_GPU();
  const MsaDims layouts[] = {{4, 128, 128, 16, 1, 0}, {4, 128, 128, 64, 3, 2}};
  for (const auto& dims : layouts)
    for (int NB : {1025, 2049})
      for (std::int64_t p : {static_cast<std::int64_t>(NB) * dims.BLK - 1, 5 * std::int64_t{dims.BLK} + 3})
        for (Dist d : kAllDists) run_case(dims, 1, {p}, NB, d);
}

// A few queries of one sequence (T = 3, Hi 2: 6 rows, still the split path): rows of different
// lengths in one launch, so the CTAs of a cluster see different chunk sizes per row.
TEST(MsaSelect_f32, FewRows_MixedLengths) {
  M3_REQUIRE_GPU();
  const MsaDims dims{2, 16, 16, 8, 2, 1};
  for (int NB : {3000, 8192})
    for (Dist d : kAllDists) run_case(dims, 1, {static_cast<std::int64_t>(NB) * 16 - 1, 16 * 9 + 2, 16 * 1500}, NB, d);
}

TEST(MsaSelect_f32, Scattered37_ForcedLayouts) {
  M3_REQUIRE_GPU();
  std::mt19937_64 g = test::test_rng();
  // {Hi, Di, BLK, K_blk, local, init}: M3; tiny (BLK 16, top-4); init + local; budget = forced
  // (no free slot); no forced block at all; a wide budget; budget 1.
  const MsaDims layouts[] = {{4, 128, 128, 16, 1, 0}, {2, 16, 16, 4, 1, 0}, {3, 16, 16, 7, 2, 1},
                             {1, 16, 16, 3, 1, 2},    {2, 16, 16, 64, 0, 0}, {4, 16, 128, 100, 3, 2},
                             {1, 16, 16, 1, 1, 0}};
  for (const auto& dims : layouts)
    for (int NB : {1, 3, 70, 8192}) {
      std::uniform_int_distribution<std::int64_t> p(0, static_cast<std::int64_t>(NB) * dims.BLK - 1);
      std::vector<std::int64_t> pos;
      for (int i = 0; i < 2 * 37; ++i) pos.push_back(p(g));
      pos[5] = static_cast<std::int64_t>(NB) * dims.BLK - 1;  // the last visible block
      pos[6] = 0;
      for (Dist d : kDists) run_case(dims, 2, pos, NB, d);
    }
}

TEST(MsaSelect_f32, InvalidPositionGivesEmptyRow) {
  M3_REQUIRE_GPU();
  const MsaDims dims{2, 16, 16, 4, 1, 0};
  const int T = 3, NB = 4;
  const std::vector<std::int64_t> pos{63, 64, -5};  // valid; block 4 has no column; negative
  gpu::DeviceBuffer<float> ds(2 * T * NB);
  ds.fill_bytes(0);
  gpu::DeviceBuffer<std::int64_t> dpos(3);
  dpos.upload(pos);
  gpu::DeviceBuffer<std::int32_t> dsel(2 * T * 4);
  for (SelectPath path : {SelectPath::Auto, SelectPath::SingleCta, SelectPath::Split}) {
    SCOPED_TRACE(std::string("path ") + path_name(path));
    dsel.fill_bytes(0x80);
    gpu::detail::msa_select_path(ds.data(), dpos.data(), T, NB, dims, dsel.data(), nullptr, 1, path);
    const auto s = dsel.download();
    for (int i = 0; i < 2; ++i) {
      const std::vector<std::int32_t> row0(s.begin() + (i * T) * 4, s.begin() + (i * T) * 4 + 4);
      EXPECT_EQ(row0, (std::vector<std::int32_t>{0, 1, 2, 3}));  // L = 3: every visible block
      for (int t = 1; t < T; ++t)
        for (int j = 0; j < 4; ++j) EXPECT_EQ(s[(i * T + t) * 4 + j], -1) << "head " << i << " query " << t;
    }
  }
}

TEST(MsaSelect_f32, RejectsBadArguments) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<float> sc(1024);
  gpu::DeviceBuffer<std::int64_t> pos(4);
  gpu::DeviceBuffer<std::int32_t> sel(1024);
  EXPECT_THROW(gpu::msa_select(sc.data(), pos.data(), 1, 8, {4, 128, 128, 0, 1, 0}, sel.data(), nullptr), gpu::GpuError);
  EXPECT_THROW(gpu::msa_select(sc.data(), pos.data(), 1, 8, {4, 128, 128, 2, 2, 1}, sel.data(), nullptr), gpu::GpuError);
  EXPECT_THROW(gpu::msa_select(sc.data(), pos.data(), 1, 0, {4, 128, 128, 16, 1, 0}, sel.data(), nullptr), gpu::GpuError);
  EXPECT_THROW(gpu::msa_select(sc.data(), pos.data(), 1, 8, {0, 128, 128, 16, 1, 0}, sel.data(), nullptr), gpu::GpuError);
  EXPECT_THROW(gpu::msa_select(sc.data(), pos.data(), 1, 8, {4, 128, 128, 16, -1, 0}, sel.data(), nullptr), gpu::GpuError);
  // A row of 10M blocks does not fit a CTA's shared memory.
  EXPECT_THROW(gpu::msa_select(sc.data(), pos.data(), 1, 10000000, {4, 128, 128, 16, 1, 0}, sel.data(), nullptr),
               gpu::GpuError);
  EXPECT_NO_THROW(gpu::msa_select(sc.data(), pos.data(), 0, 8, {4, 128, 128, 16, 1, 0}, sel.data(), nullptr));
  // The split path's limits, when forced: K_blk <= 64, NB <= 32768.
  EXPECT_THROW(gpu::detail::msa_select_path(sc.data(), pos.data(), 1, 8, {4, 128, 128, 65, 1, 0}, sel.data(), nullptr,
                                            1, SelectPath::Split),
               gpu::GpuError);
  EXPECT_THROW(gpu::detail::msa_select_path(sc.data(), pos.data(), 1, 32769, {4, 128, 128, 16, 1, 0}, sel.data(),
                                            nullptr, 1, SelectPath::Split),
               gpu::GpuError);
}
