// The NCCL collectives of gpu/parallel on every rank count 2..N (N = visible GPUs), exactly:
// integer-valued inputs (comm_test_util.h), outputs poisoned with 0xFF first, counts 1, 7 and
// 1000003; all-to-all-v with uneven, zero and one large block, gaps between blocks that must stay
// poisoned; the error paths (too many ranks, mismatched and invalid counts, a failing rank) end
// in a GpuError naming the rank, never in a hang.
// Build + run: ninja -C build/gpu multigpu_test_comm && ctest --test-dir build/gpu -L multigpu
// Skips (GTEST_SKIP) below 2 GPUs.
#include "tests/multigpu/comm_test_util.h"

#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <stdexcept>

namespace m3::test {
namespace {

std::string shape(int n, std::size_t count) {
  return std::to_string(n) + " ranks, " + std::to_string(count) + " elements";
}

// body(team, n, count) for every rank count 2..N and every count of kCounts.
template <class F>
void for_each_shape(F body) {
  for (int n = 2; n <= gpu::device_count(); ++n)
    for (std::size_t count : kCounts) body(TeamCache::get(n), n, count);
}

template <class T>
std::vector<T> inputs(int r, std::size_t count) {
  std::vector<T> v(count);  // [count]
  for (std::size_t i = 0; i < count; ++i) v[i] = from_int<T>(input_value(r, i));
  return v;
}

template <class T>
class CommCollective : public RequiresGpus<2> {};
TYPED_TEST_SUITE(CommCollective, ReduceTypes);

TYPED_TEST(CommCollective, AllReduceSum) {
  using T = TypeParam;
  for (bool in_place : {false, true})
    for_each_shape([&](Team& team, int n, std::size_t count) {
      std::vector<double> want(count, 0.0);  // [count]
      for (int q = 0; q < n; ++q)
        for (std::size_t i = 0; i < count; ++i) want[i] += input_value(q, i);
      std::vector<Wrong> wrong(static_cast<std::size_t>(n));
      team.run([&](Rank& r) {
        DeviceBuffer<T> x(count), y(count);  // [count] each
        x.upload(inputs<T>(r.rank(), count), r.stream());
        y.fill_bytes(0xFF, r.stream());
        DeviceBuffer<T>& out = in_place ? x : y;
        gpu::all_reduce_sum(r, x.data(), out.data(), count);
        r.sync();
        wrong[static_cast<std::size_t>(r.rank())] = compare(out.download(r.stream()), want);
      });
      expect_all_right(wrong, "all_reduce_sum " + shape(n, count) + (in_place ? " in place" : ""));
    });
}

TYPED_TEST(CommCollective, AllGather) {
  using T = TypeParam;
  for_each_shape([&](Team& team, int n, std::size_t count) {
    std::vector<double> want(static_cast<std::size_t>(n) * count);  // [n*count]
    for (int q = 0; q < n; ++q)
      for (std::size_t i = 0; i < count; ++i) want[static_cast<std::size_t>(q) * count + i] = input_value(q, i);
    std::vector<Wrong> wrong(static_cast<std::size_t>(n));
    team.run([&](Rank& r) {
      DeviceBuffer<T> x(count), y(want.size());  // [count], [n*count]
      x.upload(inputs<T>(r.rank(), count), r.stream());
      y.fill_bytes(0xFF, r.stream());
      gpu::all_gather(r, x.data(), y.data(), count);
      r.sync();
      wrong[static_cast<std::size_t>(r.rank())] = compare(y.download(r.stream()), want);
    });
    expect_all_right(wrong, "all_gather " + shape(n, count));
  });
}

TYPED_TEST(CommCollective, ReduceScatterSum) {
  using T = TypeParam;
  for_each_shape([&](Team& team, int n, std::size_t count) {
    const std::size_t total = static_cast<std::size_t>(n) * count;
    std::vector<Wrong> wrong(static_cast<std::size_t>(n));
    team.run([&](Rank& r) {
      std::vector<double> want(count, 0.0);  // [count] sums of this rank's slice
      const std::size_t base = static_cast<std::size_t>(r.rank()) * count;
      for (int q = 0; q < n; ++q)
        for (std::size_t i = 0; i < count; ++i) want[i] += input_value(q, base + i);
      DeviceBuffer<T> x(total), y(count);  // [n*count], [count]
      x.upload(inputs<T>(r.rank(), total), r.stream());
      y.fill_bytes(0xFF, r.stream());
      gpu::reduce_scatter_sum(r, x.data(), y.data(), count);
      r.sync();
      wrong[static_cast<std::size_t>(r.rank())] = compare(y.download(r.stream()), want);
    });
    expect_all_right(wrong, "reduce_scatter_sum " + shape(n, count));
  });
}

TYPED_TEST(CommCollective, BroadcastFromEveryRoot) {
  using T = TypeParam;
  for_each_shape([&](Team& team, int n, std::size_t count) {
    for (int root = 0; root < n; ++root) {
      std::vector<double> want(count);  // [count]
      for (std::size_t i = 0; i < count; ++i) want[i] = input_value(root, i);
      std::vector<Wrong> wrong(static_cast<std::size_t>(n));
      team.run([&](Rank& r) {
        // Every rank's send holds its own values: a non-root that kept its own would be caught.
        DeviceBuffer<T> x(count), y(count);  // [count] each
        x.upload(inputs<T>(r.rank(), count), r.stream());
        y.fill_bytes(0xFF, r.stream());
        gpu::broadcast(r, x.data(), y.data(), count, root);
        r.sync();
        wrong[static_cast<std::size_t>(r.rank())] = compare(y.download(r.stream()), want);
      });
      expect_all_right(wrong, "broadcast " + shape(n, count) + " from root " + std::to_string(root));
    }
  });
}

// ---- all-to-all-v ------------------------------------------------------------------------------

// Elements rank s sends rank p: one block of 1000003 (several NCCL chunks), zero blocks for a
// third of the pairs (in both directions, the own block included), 1..7 elsewhere; uneven in
// every direction.
std::size_t pair_count(int s, int p, int n) {
  if (s == 0 && p == n - 1) return 1000003;
  if ((s + p) % 3 == 1) return 0;
  return static_cast<std::size_t>((s * 5 + p * 3) % 7 + 1);
}

// Elements left unused between blocks: offsets are honoured, and the gaps must stay poisoned.
constexpr std::size_t kGap = 3;

// Element k of the block s -> p, exact in T: int64 carries (s, p, k) whole; bf16 an integer in
// [-100, 100] (exact in bf16), still different for neighbouring blocks and elements.
template <class T>
T payload(int s, int p, std::size_t k) {
  if constexpr (std::is_same_v<T, std::int64_t>)
    return (std::int64_t{s} << 40) | (std::int64_t{p} << 32) | static_cast<std::int64_t>(k);
  else
    return from_int<T>(static_cast<std::int64_t>(((static_cast<std::size_t>(s) * 8 + static_cast<std::size_t>(p)) * 5 + k) % 201) - 100);
}

struct A2aLayout {
  std::vector<std::size_t> send_counts, send_offsets, recv_counts, recv_offsets;  // [n] each
  std::size_t send_elems = 0, recv_elems = 0;
};

// Send blocks in peer order, receive blocks in reverse peer order, kGap between neighbours.
A2aLayout a2a_layout(int me, int n, const std::function<std::size_t(int, int)>& count) {
  A2aLayout l;
  const auto un = static_cast<std::size_t>(n);
  l.send_counts.resize(un);
  l.send_offsets.resize(un);
  l.recv_counts.resize(un);
  l.recv_offsets.resize(un);
  for (int p = 0; p < n; ++p) {
    l.send_counts[static_cast<std::size_t>(p)] = count(me, p);
    l.send_offsets[static_cast<std::size_t>(p)] = l.send_elems;
    l.send_elems += count(me, p) + kGap;
  }
  for (int p = n - 1; p >= 0; --p) {
    l.recv_counts[static_cast<std::size_t>(p)] = count(p, me);
    l.recv_offsets[static_cast<std::size_t>(p)] = l.recv_elems;
    l.recv_elems += count(p, me) + kGap;
  }
  return l;
}

// One all_to_all_v on n ranks with `count`, checked exactly; a rank with nothing to send or
// receive passes null buffers (allowed when its counts are all zero).
template <class T>
std::vector<Wrong> run_a2a(Team& team, const std::function<std::size_t(int, int)>& count) {
  const int n = team.size();
  std::vector<Wrong> wrong(static_cast<std::size_t>(n));
  team.run([&](Rank& r) {
    const int me = r.rank();
    const A2aLayout l = a2a_layout(me, n, count);
    gpu::check_all_to_all_counts(r, l.send_counts, l.recv_counts);
    Wrong& w = wrong[static_cast<std::size_t>(me)];
    const auto exchanged = gpu::all_to_all_counts(r, l.send_counts);
    for (int p = 0; p < n; ++p)
      if (exchanged[static_cast<std::size_t>(p)] != l.recv_counts[static_cast<std::size_t>(p)])
        w.add("count from rank " + std::to_string(p), static_cast<double>(exchanged[static_cast<std::size_t>(p)]),
              static_cast<double>(l.recv_counts[static_cast<std::size_t>(p)]));
    const bool idle = l.send_elems == static_cast<std::size_t>(n) * kGap && l.recv_elems == l.send_elems;
    std::vector<T> host(l.send_elems, from_int<T>(0));  // [send_elems]
    for (int p = 0; p < n; ++p)
      for (std::size_t k = 0; k < l.send_counts[static_cast<std::size_t>(p)]; ++k)
        host[l.send_offsets[static_cast<std::size_t>(p)] + k] = payload<T>(me, p, k);
    DeviceBuffer<T> x(l.send_elems), y(l.recv_elems);  // [send_elems], [recv_elems]
    x.upload(host, r.stream());
    y.fill_bytes(0xFF, r.stream());
    gpu::all_to_all_v(r, idle ? nullptr : x.data(), l.send_elems, l.send_counts, l.send_offsets,
                      idle ? nullptr : y.data(), l.recv_elems, l.recv_counts, l.recv_offsets);
    r.sync();
    const auto got = y.download(r.stream());
    std::vector<bool> in_block(l.recv_elems, false);  // [recv_elems]
    for (int p = 0; p < n; ++p)
      for (std::size_t k = 0; k < l.recv_counts[static_cast<std::size_t>(p)]; ++k) {
        const std::size_t at = l.recv_offsets[static_cast<std::size_t>(p)] + k;
        in_block[at] = true;
        const double want = to_double(payload<T>(p, me, k)), have = to_double(got[at]);
        if (!(have == want)) w.add("from rank " + std::to_string(p) + " [" + std::to_string(k) + "]", have, want);
      }
    for (std::size_t i = 0; i < l.recv_elems; ++i)
      if (!in_block[i] && !is_poison(got[i])) w.add("gap [" + std::to_string(i) + "] written", to_double(got[i]), -1);
  });
  return wrong;
}

template <class T>
class CommAllToAllV : public RequiresGpus<2> {};
using MoveTypes = ::testing::Types<bf16, std::int64_t>;
TYPED_TEST_SUITE(CommAllToAllV, MoveTypes);

TYPED_TEST(CommAllToAllV, UnevenAndZeroBlocks) {
  for (int n = 2; n <= gpu::device_count(); ++n)
    expect_all_right(run_a2a<TypeParam>(TeamCache::get(n), [n](int s, int p) { return pair_count(s, p, n); }),
                     "all_to_all_v on " + std::to_string(n) + " ranks");
}

// The last rank sends and receives nothing (null buffers); the others exchange 1..7 elements.
TYPED_TEST(CommAllToAllV, RankWithNothingToMove) {
  for (int n = 2; n <= gpu::device_count(); ++n)
    expect_all_right(run_a2a<TypeParam>(TeamCache::get(n),
                                        [n](int s, int p) {
                                          return s == n - 1 || p == n - 1 ? std::size_t{0}
                                                                          : static_cast<std::size_t>(s + 2 * p + 1);
                                        }),
                     "all_to_all_v with an idle rank on " + std::to_string(n) + " ranks");
}

// ---- error paths -------------------------------------------------------------------------------

// One all-reduce and one all-to-all of 1000003 floats a pair: NCCL connects a pair of ranks on
// the host, inside the first call that needs it, with both ranks taking part. The failure tests
// below are about ranks waiting on the device, so the connections are made first.
void warm_up(Team& team) {
  constexpr std::size_t kN = 1000003;
  team.run([&](Rank& r) {
    const auto n = static_cast<std::size_t>(r.size());
    DeviceBuffer<float> x(kN * n), y(kN * n);  // [n*kN] each
    x.fill_bytes(0, r.stream());
    std::vector<std::size_t> counts(n, kN), offsets(n);  // [n] each
    for (std::size_t p = 0; p < n; ++p) offsets[p] = p * kN;
    gpu::all_reduce_sum(r, x.data(), y.data(), kN);
    gpu::all_to_all_v<float>(r, x.data(), x.size(), counts, offsets, y.data(), y.size(), counts, offsets);
    r.sync();
  });
}

// Needs no GPU: the count is checked before anything else.
TEST(CommErrors, TooManyRanksStatesRequestedAndAvailable) {
  const int have = gpu::device_count();
  try {
    Team team(have + 1);
    FAIL() << "Team(" << have + 1 << ") did not throw";
  } catch (const gpu::GpuError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(std::to_string(have + 1) + " ranks requested"), std::string::npos) << msg;
    EXPECT_NE(msg.find("only " + std::to_string(have) + " CUDA device"), std::string::npos) << msg;
  }
  EXPECT_THROW(Team(0), gpu::GpuError);
  EXPECT_THROW(Team(-1), gpu::GpuError);
}

class CommFailure : public RequiresGpus<2> {};

// Rank 0 expects 4 elements from rank 1, which sends 5: rank 0 throws, naming both counts; the
// team then refuses to run.
TEST_F(CommFailure, MismatchedAllToAllCounts) {
  Team team(2);
  const std::string msg = run_error(team, [](Rank& r) {
    // [2] each: rank 0 sends itself 1 and rank 1 five; rank 1 sends rank 0 five and itself 1.
    const std::vector<std::size_t> send0 = {1, 5}, recv0_bad = {1, 4}, send1 = {5, 1}, recv1 = {5, 1};
    if (r.rank() == 0) gpu::check_all_to_all_counts(r, send0, recv0_bad);
    else gpu::check_all_to_all_counts(r, send1, recv1);
  });
  EXPECT_NE(msg.find("rank 0 (device 0) failed"), std::string::npos) << msg;
  EXPECT_NE(msg.find("rank 1 sends 5 elements, 4 expected"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("rank 1 (device 1) failed"), std::string::npos) << msg;
  EXPECT_TRUE(team.broken());
  EXPECT_NE(run_error(team, [](Rank&) {}).find("aborted by an earlier failure"), std::string::npos);
}

// Every rank passes receive blocks that overlap: each throws on the host, each is named.
TEST_F(CommFailure, OverlappingReceiveBlocks) {
  Team team(2);
  const std::string msg = run_error(team, [](Rank& r) {
    DeviceBuffer<float> x(8), y(8);                                          // [8] each
    const std::vector<std::size_t> counts = {3, 3}, send_off = {0, 4}, recv_off = {0, 2};  // [2] each
    gpu::all_to_all_v<float>(r, x.data(), 8, counts, send_off, y.data(), 8, counts, recv_off);
  });
  EXPECT_NE(msg.find("overlap"), std::string::npos) << msg;
  EXPECT_NE(msg.find("rank 0 (device 0) failed"), std::string::npos) << msg;
  EXPECT_NE(msg.find("rank 1 (device 1) failed"), std::string::npos) << msg;
}

// Rank 1 passes 3 counts on a 2-rank team while rank 0 enqueues a valid all-to-all and waits in
// Rank::sync: rank 0 must stop at once (not after the abort grace), and the error names rank 1.
// The buffers outlive the failed run: a DeviceBuffer freed while rank 0 unwinds would wait in
// cudaFree (it synchronizes the device) behind the all-to-all whose peer never came, until the
// abort after kAbortGrace (comm.h), and this test is about Rank::sync noticing, not about that.
// Measured on 2 H200s (2026-11-29) with the buffers inside the run: 2.54 s.
TEST_F(CommFailure, InvalidCountsOnOneRankDoNotHangItsPeer) {
  Team team(2);
  warm_up(team);
  std::vector<std::unique_ptr<DeviceBuffer<float>>> xs(2), ys(2);  // [2] ranks, [4] floats each
  team.run([&](Rank& r) {
    xs[static_cast<std::size_t>(r.rank())] = std::make_unique<DeviceBuffer<float>>(4);
    ys[static_cast<std::size_t>(r.rank())] = std::make_unique<DeviceBuffer<float>>(4);
  });
  const auto t0 = std::chrono::steady_clock::now();
  const std::string msg = run_error(team, [&](Rank& r) {
    DeviceBuffer<float>& x = *xs[static_cast<std::size_t>(r.rank())];
    DeviceBuffer<float>& y = *ys[static_cast<std::size_t>(r.rank())];
    const std::vector<std::size_t> counts = {2, 2}, offsets = {0, 2}, three = {2, 2, 0};
    if (r.rank() == 1) gpu::all_to_all_v<float>(r, x.data(), 4, three, offsets, y.data(), 4, counts, offsets);
    gpu::all_to_all_v<float>(r, x.data(), 4, counts, offsets, y.data(), 4, counts, offsets);
    r.sync();
  });
  const auto waited = std::chrono::steady_clock::now() - t0;
  EXPECT_NE(msg.find("rank 1 (device 1) failed: all_to_all_v (rank 1 of 2): send_counts has 3 entries"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("1 other rank stopped waiting"), std::string::npos) << msg;
  EXPECT_LT(waited, Team::kAbortGrace) << "rank 0 waited for the abort instead of noticing the failure";
}

// Rank 1 throws before its all-reduce; rank 0 waits for its result in a blocking download
// (cudaStreamSynchronize, not Rank::sync): only the communicator abort can free it.
TEST_F(CommFailure, ThrowingRankWithPeerBlockedOutsideSync) {
  Team team(2);
  warm_up(team);
  const std::string msg = run_error(team, [](Rank& r) {
    DeviceBuffer<float> x(1000003);  // [1000003]
    x.fill_bytes(0, r.stream());
    if (r.rank() == 1) throw std::runtime_error("injected failure");
    gpu::all_reduce_sum(r, x.data(), x.data(), x.size());
    (void)x.download(r.stream());
  });
  EXPECT_NE(msg.find("rank 1 (device 1) failed: injected failure"), std::string::npos) << msg;
  EXPECT_TRUE(team.broken());
}

}  // namespace
}  // namespace m3::test
