// NCCL collectives over every visible GPU (gpu/parallel), in the manner of nccl-tests:
//   BM_NcclAllReduce/bytes:B          all_reduce_sum of B bytes of fp32 on every rank
//   BM_NcclAllReduceBf16/bytes:B      the same in bf16 (the tensor-parallel partial sums' dtype)
//   BM_NcclAllToAllV/bytes:B          all_to_all_v of bf16, B bytes sent by each rank, B/n to each
//                                     peer (the expert-parallel token dispatch, evenly loaded)
// B = 1 MiB .. 1 GiB in powers of 4. Time: CUDA events on each rank's stream around the one
// collective (manual time), the maximum over ranks, after a one-element all-reduce that lines the
// ranks up on the devices (the host threads start with some skew; the first collective would
// absorb it). No L2 flush: like nccl-tests, the small sizes measure latency-bound collectives
// whose buffers are cache-resident in real use too.
// Counters, nccl-tests' definitions (its doc/PERFORMANCE.md): algbw = B / time; busbw = algbw x
// 2(n-1)/n for all-reduce (every byte crosses n-1 links twice: reduce-scatter then all-gather) and
// algbw x (n-1)/n for all-to-all (the 1/n kept by the rank itself crosses nothing). busbw is what
// compares with the hardware link bandwidth, whatever n.
// Skips (SkipWithError) with fewer than 2 GPUs. Run:
//   build/gpu/compare/bench/bench_gpu --benchmark_filter=Nccl
#if M3_HAVE_NCCL

#include "gpu/parallel/collectives.h"
#include "gpu/parallel/comm.h"
#include "gpu/runtime/device.h"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

namespace {

using m3::gpu::bf16;
using m3::gpu::DeviceBuffer;
using m3::gpu::Rank;

constexpr std::int64_t kMinBytes = std::int64_t{1} << 20;
constexpr std::int64_t kMaxBytes = std::int64_t{1} << 30;

struct World {
  std::unique_ptr<m3::gpu::Team> team;
  std::vector<DeviceBuffer<unsigned char>> send, recv;  // per rank, [kMaxBytes] each
  std::vector<DeviceBuffer<float>> align;               // per rank, [1]
  std::vector<std::unique_ptr<m3::gpu::Event>> start, stop;  // per rank

  World() : team(std::make_unique<m3::gpu::Team>(m3::gpu::device_count())) {
    const auto n = static_cast<std::size_t>(team->size());
    send.resize(n);
    recv.resize(n);
    align.resize(n);
    start.resize(n);
    stop.resize(n);
    // Allocated by each rank's thread, so on its device; zeros, so bf16 sums never overflow.
    team->run([&](Rank& r) {
      const auto i = static_cast<std::size_t>(r.rank());
      send[i] = DeviceBuffer<unsigned char>(kMaxBytes);
      recv[i] = DeviceBuffer<unsigned char>(kMaxBytes);
      align[i] = DeviceBuffer<float>(1);
      send[i].fill_bytes(0, r.stream());
      align[i].fill_bytes(0, r.stream());
      start[i] = std::make_unique<m3::gpu::Event>();
      stop[i] = std::make_unique<m3::gpu::Event>();
      r.sync();
    });
  }
};

// Never destroyed: at exit the communicators would be torn down after the CUDA runtime.
World& world() {
  static World* w = new World;
  return *w;
}

enum class Op { ALL_REDUCE_F32, ALL_REDUCE_BF16, ALL_TO_ALL_V };

void run_op(Op op, World& w, Rank& r, std::size_t bytes) {
  const auto i = static_cast<std::size_t>(r.rank());
  const auto n = static_cast<std::size_t>(r.size());
  unsigned char* s = w.send[i].data();
  unsigned char* d = w.recv[i].data();
  switch (op) {
    case Op::ALL_REDUCE_F32:
      m3::gpu::all_reduce_sum(r, reinterpret_cast<const float*>(s), reinterpret_cast<float*>(d), bytes / sizeof(float));
      break;
    case Op::ALL_REDUCE_BF16:
      m3::gpu::all_reduce_sum(r, reinterpret_cast<const bf16*>(s), reinterpret_cast<bf16*>(d), bytes / sizeof(bf16));
      break;
    case Op::ALL_TO_ALL_V: {
      const std::size_t per_peer = bytes / sizeof(bf16) / n, elems = kMaxBytes / sizeof(bf16);
      std::vector<std::size_t> counts(n, per_peer), offsets(n);  // [n] each
      for (std::size_t p = 0; p < n; ++p) offsets[p] = p * per_peer;
      m3::gpu::all_to_all_v(r, reinterpret_cast<const bf16*>(s), elems, counts, offsets, reinterpret_cast<bf16*>(d),
                            elems, counts, offsets);
      break;
    }
  }
}

void bench(benchmark::State& state, Op op) {
  if (m3::gpu::device_count() < 2) {
    state.SkipWithError("needs >= 2 CUDA devices (NCCL collectives)");
    return;
  }
  try {
    World& w = world();
    const auto bytes = static_cast<std::size_t>(state.range(0));
    const int n = w.team->size();
    std::vector<float> ms(static_cast<std::size_t>(n));  // [n] this iteration's time per rank
    for (auto _ : state) {
      w.team->run([&](Rank& r) {
        const auto i = static_cast<std::size_t>(r.rank());
        m3::gpu::all_reduce_sum(r, w.align[i].data(), w.align[i].data(), 1);
        w.start[i]->record(r.stream());
        run_op(op, w, r, bytes);
        w.stop[i]->record(r.stream());
        r.sync();
        ms[i] = w.stop[i]->since(*w.start[i]);
      });
      state.SetIterationTime(*std::max_element(ms.begin(), ms.end()) * 1e-3);
    }
    const double nn = n;
    const double bus = op == Op::ALL_TO_ALL_V ? (nn - 1) / nn : 2 * (nn - 1) / nn;
    state.counters["algbw_GB/s"] =
        benchmark::Counter(static_cast<double>(bytes) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["busbw_GB/s"] =
        benchmark::Counter(static_cast<double>(bytes) * 1e-9 * bus, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["ranks"] = nn;
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void BM_NcclAllReduce(benchmark::State& s) { bench(s, Op::ALL_REDUCE_F32); }
void BM_NcclAllReduceBf16(benchmark::State& s) { bench(s, Op::ALL_REDUCE_BF16); }
void BM_NcclAllToAllV(benchmark::State& s) { bench(s, Op::ALL_TO_ALL_V); }

void size_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"bytes"})->RangeMultiplier(4)->Range(kMinBytes, kMaxBytes);
  // Three repetitions, reported as mean / median / stddev / cv (the cv shows a noisy run).
  b->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.05)->Repetitions(3)->ReportAggregatesOnly(true);
}

}  // namespace

BENCHMARK(BM_NcclAllReduce)->Apply(size_args);
BENCHMARK(BM_NcclAllReduceBf16)->Apply(size_args);
BENCHMARK(BM_NcclAllToAllV)->Apply(size_args);

#endif  // M3_HAVE_NCCL
