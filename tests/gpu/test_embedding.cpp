// gpu::embedding against ref::embedding: a gather copies bf16 bits, so the GPU rows must equal the
// reference's rows of the bf16-rounded table exactly. Out-of-range ids (which the reference
// rejects with std::out_of_range before writing) must produce NaN rows on the GPU without reading
// outside the table (compute-sanitizer memcheck in scripts/gpu-suite checks the "without reading").
#include "gpu/kernels/embedding.h"
#include "reference/ops/embedding.h"
#include "tests/gpu/gpu_test_util.h"

#include <climits>
#include <cmath>
#include <random>
#include <vector>

using namespace m3;
using m3::test::bf16_exact;

namespace {

std::vector<std::int32_t> random_ids(int T, int V, std::mt19937_64& g) {
  std::uniform_int_distribution<std::int32_t> u(0, V - 1);
  std::vector<std::int32_t> ids(T);
  for (auto& i : ids) i = u(g);
  ids[0] = V - 1;            // the last row: an off-by-one in the bound reads past the table
  if (T > 1) ids[1] = 0;     // the first row
  if (T > 2) ids[2] = ids[0];  // repeated ids are legal
  return ids;
}

// out_offset shifts out by that many elements: 1 makes it 2-byte aligned only (the scalar path
// even when H % 8 == 0).
void run_case(int T, int V, int H, int out_offset = 0) {
  SCOPED_TRACE("T=" + std::to_string(T) + " V=" + std::to_string(V) + " H=" + std::to_string(H) +
               " out_offset=" + std::to_string(out_offset));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  MatF table = bf16_exact(test::randn<float>(V, H, g));
  const auto ids = random_ids(T, V, g);
  MatF ref;
  ref::embedding(table, ids, ref);

  auto dtable = test::upload_bf16(table);
  gpu::DeviceBuffer<std::int32_t> dids(T);
  dids.upload(ids);
  gpu::DeviceBuffer<gpu::bf16> dout(static_cast<std::size_t>(T) * H + out_offset);
  dout.fill_bytes(0xFF);  // NaN poison: every element must be written
  gpu::embedding(dtable.data(), dids.data(), T, V, H, dout.data() + out_offset, nullptr);
  const auto raw = dout.download();
  const auto f = gpu::from_bf16(raw.data() + out_offset, static_cast<std::size_t>(T) * H);
  MatF out = Eigen::Map<const MatF>(f.data(), T, H);
  ASSERT_TRUE(out.allFinite());
  ASSERT_GT(ref.norm(), 0.0);
  EXPECT_TRUE((out.array() == ref.array()).all()) << "a gathered row differs from the table row";
}

}  // namespace

TEST(Embedding_bf16, AwkwardSizes) {
  M3_REQUIRE_GPU();
  run_case(1, 1, 1);
  run_case(3, 5, 7);      // H odd: scalar path
  run_case(257, 33, 8);   // one 16-byte vector a row
  run_case(5, 11, 9);
  run_case(17, 100, 6144);  // M3 width
  run_case(64, 3, 24);
}

TEST(Embedding_bf16, MisalignedOutputUsesScalarPath) {
  M3_REQUIRE_GPU();
  run_case(9, 13, 16, /*out_offset=*/1);
  run_case(4, 7, 6144, /*out_offset=*/1);
}

TEST(Embedding_bf16, OutOfRangeIdsGiveNanRowsAndReadNothing) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  for (int H : {16, 7}) {  // vector and scalar paths
    SCOPED_TRACE("H=" + std::to_string(H));
    const int V = 10;
    MatF table = bf16_exact(test::randn<float>(V, H, g));
    const std::vector<std::int32_t> ids = {3, -1, V, 0, INT_MAX, INT_MIN, V - 1, V + 1000};
    const int T = static_cast<int>(ids.size());
    auto dtable = test::upload_bf16(table);
    gpu::DeviceBuffer<std::int32_t> dids(T);
    dids.upload(ids);
    gpu::DeviceBuffer<gpu::bf16> dout(static_cast<std::size_t>(T) * H);
    dout.fill_bytes(0x00);  // zeros, so that a NaN row can only come from the kernel
    gpu::embedding(dtable.data(), dids.data(), T, V, H, dout.data(), nullptr);
    MatF out = test::download_bf16(dout, T, H);
    int bad_rows = 0;
    for (int t = 0; t < T; ++t) {
      if (ids[t] >= 0 && ids[t] < V) {
        EXPECT_TRUE((out.row(t).array() == table.row(ids[t]).array()).all()) << "valid row " << t;
      } else {
        ++bad_rows;
        EXPECT_TRUE(out.row(t).array().isNaN().all()) << "row " << t << " (id " << ids[t] << ") is not all NaN";
      }
    }
    EXPECT_EQ(bad_rows, 5);
    // The reference refuses the same ids, naming the first bad position (1, id -1).
    MatF ref;
    EXPECT_THROW(ref::embedding(table, ids, ref), std::out_of_range);
  }
}

TEST(Embedding_bf16, HostCheckOfTokenIds) {
  M3_REQUIRE_GPU();
  const std::vector<std::int32_t> good = {0, 4, 9}, bad = {0, 10, 2}, neg = {-1};
  EXPECT_NO_THROW(gpu::check_token_ids(good.data(), good.size(), 10));
  EXPECT_THROW(gpu::check_token_ids(bad.data(), bad.size(), 10), std::out_of_range);
  EXPECT_THROW(gpu::check_token_ids(neg.data(), neg.size(), 10), std::out_of_range);
  try {
    gpu::check_token_ids(bad.data(), bad.size(), 10);
  } catch (const std::out_of_range& e) {
    EXPECT_NE(std::string(e.what()).find("position 1 has id 10"), std::string::npos) << e.what();
  }
}

TEST(Embedding_bf16, RejectsBadShapes) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<gpu::bf16> t(8), o(8);
  gpu::DeviceBuffer<std::int32_t> ids(1);
  EXPECT_THROW(gpu::embedding(t.data(), ids.data(), 1, 0, 8, o.data(), nullptr), gpu::GpuError);   // V = 0
  EXPECT_THROW(gpu::embedding(t.data(), ids.data(), 1, 1, 0, o.data(), nullptr), gpu::GpuError);   // H = 0
  EXPECT_THROW(gpu::embedding(t.data(), ids.data(), -1, 1, 8, o.data(), nullptr), gpu::GpuError);  // T < 0
  EXPECT_THROW(gpu::embedding(nullptr, ids.data(), 1, 1, 8, o.data(), nullptr), gpu::GpuError);
  EXPECT_NO_THROW(gpu::embedding(t.data(), ids.data(), 0, 1, 8, o.data(), nullptr));  // T = 0: nothing to do
}
