// gpu::msa_select against ref::msa_select on the SAME fp32 scores: the selection must match
// exactly, slot by slot (chosen blocks in tie-rule order, forced blocks ascending, -1 padding).
// Inputs are built to stress the tie rule: continuous scores, small integers (massive exact ties),
// a constant row, and rows sprinkled with NaN, +-inf and +-0; forced-block layouts with and without
// init blocks; NB up to 8192 (a 1M context at BLK 128); positions at and around block edges.
#include "gpu/kernels/msa_select.h"
#include "reference/ops/msa_select.h"
#include "tests/gpu/gpu_test_util.h"

#include <algorithm>
#include <limits>
#include <random>
#include <vector>

using namespace m3;

namespace {

enum class Dist { Normal, SmallInts, Constant, Specials };

const char* dist_name(Dist d) {
  switch (d) {
    case Dist::Normal: return "normal";
    case Dist::SmallInts: return "small-ints";
    case Dist::Constant: return "constant";
    case Dist::Specials: return "specials";
  }
  return "?";
}

MatF draw_scores(Eigen::Index rows, int NB, Dist d, std::mt19937_64& g) {
  MatF s(rows, NB);
  std::normal_distribution<float> nd;
  std::uniform_int_distribution<int> small(0, 3), pick(0, 9);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (Eigen::Index i = 0; i < s.size(); ++i) {
    float& x = s.data()[i];
    switch (d) {
      case Dist::Normal: x = nd(g); break;
      case Dist::SmallInts: x = static_cast<float>(small(g)); break;
      case Dist::Constant: x = 1.5f; break;
      case Dist::Specials: {
        const int k = pick(g);
        x = k == 0 ? nan : k == 1 ? inf : k == 2 ? -inf : k == 3 ? 0.f : k == 4 ? -0.f
                                                                : static_cast<float>(small(g));
        break;
      }
    }
  }
  return s;
}

// Runs B sequences of the given positions (pos.size() = B*T) and compares every slot.
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

  gpu::DeviceBuffer<float> ds(static_cast<std::size_t>(s.size()));
  ds.upload(s.data(), static_cast<std::size_t>(s.size()));
  gpu::DeviceBuffer<std::int64_t> dpos(pos.size());
  dpos.upload(pos);
  gpu::DeviceBuffer<std::int32_t> dsel(static_cast<std::size_t>(rows_seq) * B * dims.K_blk);
  dsel.fill_bytes(0x80);  // large negative ints: every slot must be written
  gpu::msa_select(ds.data(), dpos.data(), T, NB, dims, dsel.data(), nullptr, B);
  const auto got = dsel.download();

  long mismatched_rows = 0;
  for (int b = 0; b < B; ++b) {
    const MatF sb = s.middleRows(rows_seq * b, rows_seq);
    std::vector<std::int64_t> pb(pos.begin() + b * T, pos.begin() + (b + 1) * T);
    MatI ref;
    ref::msa_select<float>(sb, pb, dims, ref);
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
}

const Dist kDists[] = {Dist::Normal, Dist::SmallInts, Dist::Constant, Dist::Specials};

}  // namespace

TEST(MsaSelect_f32, Decode_M3_AwkwardContexts) {
  M3_REQUIRE_GPU();
  const MsaDims dims{4, 128, 128, 16, 1, 0};
  // Contexts (p = N - 1): 1 token, BLK-1, BLK, BLK+1, K_blk*BLK - 1 .. + 1, 5000, 1M (NB 8192).
  for (int N : {1, 127, 128, 129, 2047, 2048, 2049, 2177, 5000, 1 << 20})
    for (Dist d : kDists) {
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
  for (Dist d : kDists) run_case(dims, 8, pos, 8192, d);
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
  dsel.fill_bytes(0x80);
  gpu::msa_select(ds.data(), dpos.data(), T, NB, dims, dsel.data(), nullptr);
  const auto s = dsel.download();
  for (int i = 0; i < 2; ++i) {
    const std::vector<std::int32_t> row0(s.begin() + (i * T) * 4, s.begin() + (i * T) * 4 + 4);
    EXPECT_EQ(row0, (std::vector<std::int32_t>{0, 1, 2, 3}));  // L = 3: every visible block
    for (int t = 1; t < T; ++t)
      for (int j = 0; j < 4; ++j) EXPECT_EQ(s[(i * T + t) * 4 + j], -1) << "head " << i << " query " << t;
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
}
