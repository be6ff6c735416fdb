// gpu/parallel on one rank (one GPU): the code path of every collective runs in the single-GPU
// suite, where each is the identity (exact: integer-valued inputs, outputs poisoned first), plus
// the host-side checks, the check macro's message and the NVLS setting. The multi-rank tests are
// tests/multigpu/test_comm.cpp.
// Build + run: ninja -C build/gpu gpu_test_comm_single && ctest --test-dir build/gpu -R comm_single
// Skips (GTEST_SKIP) without a GPU, except the tests that need none.
#include "tests/multigpu/comm_test_util.h"

#include <gtest/gtest.h>

#include <cstdlib>

namespace m3::test {
namespace {

template <class T>
class CommSingleRank : public RequiresGpus<1> {};
TYPED_TEST_SUITE(CommSingleRank, ReduceTypes);

// all_reduce, all_gather, reduce_scatter, broadcast and all_to_all_v (its own block only: the
// device-copy path) each copy rank 0's input to a poisoned output.
TYPED_TEST(CommSingleRank, EveryCollectiveIsTheIdentity) {
  using T = TypeParam;
  Team& team = TeamCache::get(1);
  for (std::size_t count : kCounts) {
    std::vector<double> want(count);  // [count]
    std::vector<T> in(count);         // [count]
    for (std::size_t i = 0; i < count; ++i) {
      want[i] = input_value(0, i);
      in[i] = from_int<T>(input_value(0, i));
    }
    for (const char* op : {"all_reduce_sum", "all_gather", "reduce_scatter_sum", "broadcast", "all_to_all_v"}) {
      Wrong wrong;
      team.run([&](Rank& r) {
        // all_to_all_v: the block sits at offset 2 of the send buffer and lands at offset 5 of the
        // receive buffer, so both offsets are honoured (the rest stays poisoned).
        constexpr std::size_t kSendAt = 2, kRecvAt = 5;
        DeviceBuffer<T> x(count + kSendAt), y(count + kRecvAt);  // [count + 2], [count + 5]
        x.fill_bytes(0, r.stream());
        M3_CUDA_CHECK(cudaMemcpyAsync(x.data() + kSendAt, in.data(), count * sizeof(T), cudaMemcpyHostToDevice,
                                      r.stream()));
        y.fill_bytes(0xFF, r.stream());
        const std::string o = op;
        std::size_t at = 0;
        if (o == "all_reduce_sum") gpu::all_reduce_sum(r, x.data() + kSendAt, y.data(), count);
        if (o == "all_gather") gpu::all_gather(r, x.data() + kSendAt, y.data(), count);
        if (o == "reduce_scatter_sum") gpu::reduce_scatter_sum(r, x.data() + kSendAt, y.data(), count);
        if (o == "broadcast") gpu::broadcast(r, x.data() + kSendAt, y.data(), count, 0);
        if (o == "all_to_all_v") {
          const std::vector<std::size_t> counts = {count}, send_off = {kSendAt}, recv_off = {kRecvAt};  // [1] each
          gpu::all_to_all_v(r, x.data(), x.size(), counts, send_off, y.data(), y.size(), counts, recv_off);
          at = kRecvAt;
        }
        r.sync();
        const auto got = y.download(r.stream());
        wrong = compare(std::vector<T>(got.begin() + static_cast<std::ptrdiff_t>(at),
                                       got.begin() + static_cast<std::ptrdiff_t>(at + count)),
                        want);
        for (std::size_t i = 0; i < got.size(); ++i)
          if ((i < at || i >= at + count) && !is_poison(got[i]))
            wrong.add("outside [" + std::to_string(i) + "]", to_double(got[i]), -1);
      });
      EXPECT_EQ(wrong.count, 0) << op << " on 1 rank, " << count << " elements, #wrong " << wrong.count << ":\n"
                                << wrong.first;
    }
  }
}

TEST(CommSingleRankCounts, ExchangeReturnsTheOwnCount) {
  M3_REQUIRE_GPUS(1);
  std::vector<std::size_t> got;
  TeamCache::get(1).run([&](Rank& r) {
    EXPECT_EQ(gpu::check_rank(), 0);
    got = gpu::all_to_all_counts(r, std::vector<std::size_t>{1000003});
  });
  EXPECT_EQ(gpu::check_rank(), -1);
  EXPECT_EQ(got, std::vector<std::size_t>{1000003});
}

// Host-side checks: each breaks its own Team (a failure aborts the team it happens in).
TEST(CommSingleRankErrors, InvalidArgumentsNameTheRankAndTheProblem) {
  M3_REQUIRE_GPUS(1);
  struct Case {
    const char* want;
    std::function<void(Rank&, float*, float*)> call;  // x, y: [8] each
  };
  const std::vector<std::size_t> one = {4}, two = {4, 4}, zero = {0}, at6 = {6};
  const std::vector<Case> cases = {
      {"send_counts has 2 entries, the team has 1 ranks",
       [&](Rank& r, float* x, float* y) { gpu::all_to_all_v<float>(r, x, 8, two, zero, y, 8, one, zero); }},
      {"the block for rank 0 (offset 6, 4 elements) ends past the send buffer of 8 elements",
       [&](Rank& r, float* x, float* y) { gpu::all_to_all_v<float>(r, x, 8, one, at6, y, 8, one, zero); }},
      {"sends itself 4 elements but expects 0 from itself",
       [&](Rank& r, float* x, float* y) { gpu::all_to_all_v<float>(r, x, 8, one, zero, y, 8, zero, zero); }},
      {"the send and recv buffers overlap",
       [&](Rank& r, float* x, float*) { gpu::all_to_all_v<float>(r, x, 8, one, zero, x + 4, 4, one, zero); }},
      {"root 1 is not a rank of 0..0", [&](Rank& r, float* x, float* y) { gpu::broadcast(r, x, y, 8, 1); }},
      {"null buffer for 8 elements", [&](Rank& r, float* x, float*) { gpu::all_reduce_sum<float>(r, x, nullptr, 8); }},
      {"mismatched all-to-all counts: rank 0 sends 4 elements, 5 expected",
       [&](Rank& r, float*, float*) { gpu::check_all_to_all_counts(r, one, std::vector<std::size_t>{5}); }},
  };
  for (const Case& c : cases) {
    Team team(1);
    const std::string msg = run_error(team, [&](Rank& r) {
      DeviceBuffer<float> x(8), y(8);  // [8] each
      c.call(r, x.data(), y.data());
    });
    EXPECT_NE(msg.find("rank 0 (device 0) failed"), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.want), std::string::npos) << "want \"" << c.want << "\" in: " << msg;
    EXPECT_TRUE(team.broken());
  }
}

// M3_NCCL_CHECK names the call, this file and line, the device and the rank.
TEST(CommSingleRankErrors, NcclCheckNamesCallFileLineAndRank) {
  M3_REQUIRE_GPUS(1);
  Team team(1);
  int line = 0;
  const std::string msg = run_error(team, [&](Rank&) {
    int count = 0;
    line = __LINE__ + 1;
    M3_NCCL_CHECK(ncclCommCount(nullptr, &count));
  });
  EXPECT_NE(msg.find("NCCL call ncclCommCount(nullptr, &count) failed"), std::string::npos) << msg;
  EXPECT_NE(msg.find("test_comm_single.cpp:" + std::to_string(line)), std::string::npos) << msg;
  EXPECT_NE(msg.find("(device 0, rank 0)"), std::string::npos) << msg;
}

// Need no GPU: the count is checked before anything else.
TEST(CommSingleRankErrors, TooManyOrTooFewRanks) {
  const int have = gpu::device_count();
  try {
    Team team(have + 1);
    FAIL() << "Team(" << have + 1 << ") did not throw";
  } catch (const gpu::GpuError& e) {
    EXPECT_NE(std::string(e.what()).find(std::to_string(have + 1) + " ranks requested but only " +
                                         std::to_string(have) + " CUDA device"),
              std::string::npos)
        << e.what();
  }
  try {
    Team team(0);
    FAIL() << "Team(0) did not throw";
  } catch (const gpu::GpuError& e) {
    EXPECT_NE(std::string(e.what()).find("ranks must be >= 1, got 0"), std::string::npos) << e.what();
  }
}

// Needs no GPU. The setting stays "0" afterwards: the test never turns multicast on for NCCL
// (it reads the variable when it first initializes, which nccl_nvls_off precedes here).
TEST(CommNvls, ForcedOffEvenWhenSetOtherwise) {
  setenv("NCCL_NVLS_ENABLE", "1", 1);
  gpu::nccl_nvls_off();
  EXPECT_STREQ(std::getenv("NCCL_NVLS_ENABLE"), "0");
}

}  // namespace
}  // namespace m3::test
