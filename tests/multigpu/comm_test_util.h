// Helpers of the communicator suites (gpu_test_comm_single, multigpu_test_comm): GPU-count skips and
// the fixture that makes them, integer-valued test data that every collective reproduces exactly
// whatever its reduction order (style guide rule 19), a per-rank mismatch count reported as #wrong
// with the first cases, and the message of a failing team run.
#pragma once

#include "gpu/parallel/collectives.h"
#include "gpu/parallel/comm.h"
#include "gpu/runtime/buffer.h"
#include "gpu/runtime/device.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

// Skips (never fails) where fewer than n CUDA devices are visible.
#define M3_REQUIRE_GPUS(n)                                                                          \
  do {                                                                                              \
    if (::m3::gpu::device_count() < (n))                                                            \
      GTEST_SKIP() << "needs " << (n) << " CUDA devices, " << ::m3::gpu::device_count() << " visible"; \
  } while (0)

namespace m3::test {

using gpu::bf16;
using gpu::DeviceBuffer;
using gpu::Rank;
using gpu::Team;

// A suite's fixture whose tests skip below MinGpus GPUs.
template <int MinGpus>
class RequiresGpus : public ::testing::Test {
 protected:
  void SetUp() override { M3_REQUIRE_GPUS(MinGpus); }
};

// The element types the collective suites are typed over (sums exact in both: input_value).
using ReduceTypes = ::testing::Types<float, bf16>;

// Element counts every collective is tried at: one element, an odd count below any NCCL chunk,
// and a prime above a million (4 MB of fp32: several NCCL chunks and a ragged last one).
inline const std::vector<std::size_t> kCounts = {1, 7, 1000003};

// Rank r's i-th input: an integer in [-30, 30]. Sums over up to 8 ranks stay in [-240, 240], every
// partial sum included, and bf16 holds every integer up to 256 exactly: so sums are exact in fp32
// and bf16 in any reduction order.
inline int input_value(int r, std::size_t i) { return static_cast<int>((i * 7 + static_cast<std::size_t>(r) * 13) % 61) - 30; }

template <class T>
T from_int(std::int64_t v) {
  if constexpr (std::is_same_v<T, gpu::bf16>) return __float2bfloat16_rn(static_cast<float>(v));
  else return static_cast<T>(v);
}
template <class T>
double to_double(T v) {
  if constexpr (std::is_same_v<T, gpu::bf16>) return static_cast<double>(__bfloat162float(v));
  else return static_cast<double>(v);
}

// Bytes of the 0xFF poison the outputs are filled with first (NaN in fp32 and bf16, -1 in integers).
template <class T>
bool is_poison(T v) {
  unsigned char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  for (unsigned char c : b)
    if (c != 0xFF) return false;
  return true;
}

// Mismatches of one rank's output: the count and the first few, with coordinates.
struct Wrong {
  long count = 0;
  std::string first;
  void add(const std::string& where, double got, double want) {
    if (count++ < 5) first += where + ": got " + std::to_string(got) + ", want " + std::to_string(want) + "\n";
  }
};

// "[i]", built by appends: GCC 12 warns (-Wrestrict, a false positive) on "[" + std::string.
inline std::string index_name(std::size_t i) {
  std::string s = "[";
  s += std::to_string(i);
  s += ']';
  return s;
}

template <class T>
Wrong compare(const std::vector<T>& got, const std::vector<double>& want) {
  Wrong w;
  for (std::size_t i = 0; i < want.size(); ++i)
    if (!(to_double(got[i]) == want[i])) w.add(index_name(i), to_double(got[i]), want[i]);
  return w;
}

inline void expect_all_right(const std::vector<Wrong>& per_rank, const std::string& what) {
  for (std::size_t r = 0; r < per_rank.size(); ++r)
    EXPECT_EQ(per_rank[r].count, 0) << what << ", rank " << r << " #wrong " << per_rank[r].count << ":\n"
                                    << per_rank[r].first;
}

// One Team per rank count for the whole binary (communicator setup costs ~1 s), torn down by a
// gtest environment before exit: a static destructor would run after the CUDA runtime's own.
// Tests of failures build their own Team: a failure aborts the team it happens in.
class TeamCache : public ::testing::Environment {
 public:
  static gpu::Team& get(int n) {
    auto& t = teams()[n];
    if (!t || t->broken()) t = std::make_unique<gpu::Team>(n);
    return *t;
  }
  void TearDown() override { teams().clear(); }

 private:
  static std::map<int, std::unique_ptr<gpu::Team>>& teams() {
    static std::map<int, std::unique_ptr<gpu::Team>> m;
    return m;
  }
};
inline ::testing::Environment* const kTeamCacheEnv = ::testing::AddGlobalTestEnvironment(new TeamCache);

// The message of the GpuError that team.run(f) ends in; "(no error)" where it ends normally.
inline std::string run_error(Team& team, const std::function<void(Rank&)>& f) {
  try {
    team.run(f);
  } catch (const gpu::GpuError& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace m3::test
