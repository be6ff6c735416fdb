// GPU benchmark of the Hopper wgmma prefill attention kernel (gpu::sm90_attention_prefill) on M3's
// heads (Hq 64, Hkv 4, D 128), one sequence, the whole context as one chunk (T = N, p0 = 0): the
// same shapes, timing and counters as BM_attention_prefill (bench_gpu_prefill.cpp), so the portable
// and the sm90 kernel read side by side in one run.
//   bench_gpu --benchmark_filter=attention_prefill
// Time: CUDA events around each launch (UseManualTime), medians over repetitions.
// Counter TFLOP/s: FlashAttention's causal convention, 2 * Hq * D * N^2 (see bench_gpu_prefill.cpp).
#include "compare/bench/bench_gpu_util.h"
#include "gpu/kernels/sm90_attention_prefill.h"
#include "gpu/runtime/buffer.h"
#include "gpu/runtime/device.h"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

namespace {

constexpr m3::AttnDims kM3{64, 4, 128};

void BM_sm90_attention_prefill(benchmark::State& state) {
  if (m3::gpu::device_count() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  if (!m3::gpu::sm90_attention_prefill_available()) {
    state.SkipWithError("sm90_attention_prefill unavailable (needs compute capability 9.0 and an sm_90a build)");
    return;
  }
  const int N = static_cast<int>(state.range(0)), T = N;
  const auto q_elems = static_cast<std::size_t>(T) * kM3.Hq * kM3.D;
  const auto kv_elems = static_cast<std::size_t>(N) * kM3.Hkv * kM3.D;
  m3::gpu::DeviceBuffer<m3::gpu::bf16> q(q_elems), k(kv_elems), v(kv_elems), out(q_elems);  // [T, Hq*D], [N, Hkv*D]
  m3::bench::fill_random(q, 1, 1.f, m3::bench::Dist::Normal);
  m3::bench::fill_random(k, 2, 1.f, m3::bench::Dist::Normal);
  m3::bench::fill_random(v, 3, 1.f, m3::bench::Dist::Normal);
  m3::gpu::Stream stream;
  m3::gpu::Event start, stop;
  auto run = [&] {
    m3::gpu::sm90_attention_prefill(q.data(), k.data(), v.data(), 0, T, N, kM3, out.data(), stream.get());
  };
  run();  // warm-up: module load, the device probe and the shared-memory attribute stay out of the timings
  stream.sync();
  for (auto _ : state) {
    start.record(stream.get());
    run();
    stop.record(stream.get());
    state.SetIterationTime(stop.since(start) * 1e-3);
  }
  const double flops = 2.0 * kM3.Hq * kM3.D * static_cast<double>(N) * static_cast<double>(N);
  state.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel("Hq 64 Hkv 4 D 128, causal, FLOPs = 2*Hq*D*N^2");
}

BENCHMARK(BM_sm90_attention_prefill)
    ->ArgName("ctx")
    ->Arg(8192)
    ->Arg(16384)
    ->Arg(32768)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Repetitions(5)
    ->ReportAggregatesOnly(true);
// 128K: ~0.5 s a launch (measured 507 ms on an H200), so a fixed 2 launches x 3 repetitions.
BENCHMARK(BM_sm90_attention_prefill)
    ->ArgName("ctx")
    ->Arg(131072)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(2)
    ->Repetitions(3)
    ->ReportAggregatesOnly(true);

}  // namespace
