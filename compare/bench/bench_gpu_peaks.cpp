// GPU peaks that every other GPU kernel is compared with in the same run (DESIGN §10):
//   BM_gpu_peak_gemm_bf16/m:8192/n:8192/k:8192   cuBLAS bf16 GEMM (gpu::linear: bf16 in and out,
//                                                fp32 accumulation) on random data -> TFLOP/s
//   BM_gpu_peak_copy/MiB:1024                    device-to-device cudaMemcpyAsync of 1 GiB ->
//                                                GB/s counting bytes read + written
//   BM_gpu_peak_read/MiB:256|1024                gpu::stream_read (16-byte loads, nothing written)
//                                                -> GB/s read, and frac_copy against the copy's
//                                                rate measured in the same process: the ceiling of
//                                                the read-only MSA index scan of decode (256 MiB
//                                                at 1M keys: the 256 MiB case, cold in L2)
// Part of bench_gpu (every compare/bench/bench_gpu_*.cpp; scripts/gpu-suite runs it):
//   build/gpu/compare/bench/bench_gpu --benchmark_filter=peak
// Timing: CUDA events around each iteration (Google Benchmark manual time); the counters are
// computed from the summed event time, never from the framework's rate counters.
// Random inputs, not zeros: the tensor cores draw less power on zeros and clock higher (on an H200
// 8192^3 ran at 894 TFLOP/s on zeros against 788 on random data).
#include "gpu/kernels/linear.h"
#include "compare/bench/bench_gpu_util.h"
#include "gpu/runtime/buffer.h"
#include "gpu/runtime/device.h"
#include "gpu/runtime/stream_read.h"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using m3::bench::have_gpu;

using m3::gpu::bf16;

// Runs op once per benchmark iteration between two events on s; returns the summed seconds.
template <class Op>
double time_loop(benchmark::State& state, cudaStream_t s, Op&& op) {
  m3::gpu::Event start, stop;
  double total = 0;
  for (auto _ : state) {
    start.record(s);
    op();
    stop.record(s);
    const double sec = stop.since(start) * 1e-3;
    state.SetIterationTime(sec);
    total += sec;
  }
  return total;
}

// The device line in the JSON context, so every result file names its card.
[[maybe_unused]] const int kContext = [] {
  if (m3::gpu::device_count() > 0)
    benchmark::AddCustomContext("m3_gpu_device", m3::gpu::describe(m3::gpu::device_info()));
  return 0;
}();

void BM_gpu_peak_gemm_bf16(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const int m = static_cast<int>(state.range(0)), n = static_cast<int>(state.range(1)),
            k = static_cast<int>(state.range(2));
  m3::gpu::DeviceBuffer<bf16> x(static_cast<std::size_t>(m) * k);  // [m, k]
  m3::gpu::DeviceBuffer<bf16> w(static_cast<std::size_t>(n) * k);  // [n, k]
  m3::gpu::DeviceBuffer<bf16> y(static_cast<std::size_t>(m) * n);  // [m, n]
  m3::bench::fill_random(x, 1);
  m3::bench::fill_random(w, 2);
  m3::gpu::CublasHandle h;
  m3::gpu::Stream s;
  for (int i = 0; i < 3; ++i)  // warm-up: cuBLAS heuristics, clocks
    m3::gpu::linear(h.get(), x.data(), w.data(), y.data(), m, k, n, s.get());
  s.sync();
  const double sec = time_loop(state, s.get(), [&] {
    m3::gpu::linear(h.get(), x.data(), w.data(), y.data(), m, k, n, s.get());
  });
  state.counters["TFLOP/s"] = 2.0 * m * n * k * static_cast<double>(state.iterations()) / sec * 1e-12;
}
BENCHMARK(BM_gpu_peak_gemm_bf16)
    ->ArgNames({"m", "n", "k"})
    ->Args({8192, 8192, 8192})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

void BM_gpu_peak_copy(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const std::size_t bytes = static_cast<std::size_t>(state.range(0)) << 20;
  m3::gpu::DeviceBuffer<unsigned char> src(bytes), dst(bytes);
  m3::gpu::Stream s;
  src.fill_bytes(0x5A, s.get());  // on s: the legacy stream would not order s's copies after it
  for (int i = 0; i < 3; ++i)
    M3_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, s.get()));
  s.sync();
  const double sec = time_loop(state, s.get(), [&] {
    M3_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, s.get()));
  });
  // Every byte is read once and written once.
  state.counters["GB/s"] = 2.0 * static_cast<double>(bytes) * static_cast<double>(state.iterations()) / sec * 1e-9;
}
BENCHMARK(BM_gpu_peak_copy)->ArgName("MiB")->Arg(1024)->UseManualTime()->Unit(benchmark::kMicrosecond);

// The copy's GB/s (read + write) of 1 GiB, the mean of 5 after a warm-up (as the read's rate is a
// mean: a best-of would bias frac_copy low), for frac_copy of the read probe.
double copy_gbps_once() {
  constexpr std::size_t kBytes = std::size_t{1} << 30;
  constexpr int kReps = 5;
  m3::gpu::DeviceBuffer<unsigned char> src(kBytes), dst(kBytes);  // [kBytes] each
  m3::gpu::Stream s;
  src.fill_bytes(0x5A, s.get());
  double sec = 0;
  for (int i = 0; i <= kReps; ++i) {  // i = 0 is a warm-up
    m3::gpu::Event e0, e1;
    e0.record(s.get());
    M3_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), kBytes, cudaMemcpyDeviceToDevice, s.get()));
    e1.record(s.get());
    s.sync();
    if (i > 0) sec += e1.since(e0) * 1e-3;
  }
  return 2.0 * static_cast<double>(kBytes) * kReps / sec * 1e-9;
}

void BM_gpu_peak_read(benchmark::State& state) {
  if (!have_gpu(state)) return;
  static const double copy = copy_gbps_once();
  const std::size_t bytes = static_cast<std::size_t>(state.range(0)) << 20;
  m3::gpu::DeviceBuffer<float> src(bytes / sizeof(float));  // [bytes / 4] random words
  m3::gpu::DeviceBuffer<unsigned char> flush(2 * m3::gpu::device_info().l2_bytes);  // [2 x L2]: evicts every line
  m3::bench::fill_random(src, 1);
  m3::gpu::DeviceBuffer<unsigned> sink(1);  // [1] the probe's word
  m3::gpu::Stream s;
  for (int i = 0; i < 3; ++i) m3::gpu::stream_read(src.data(), bytes, sink.data(), s.get());
  s.sync();
  double sec = 0;
  for (auto _ : state) {
    // Each iteration starts with the buffer out of L2 (a decode step's index-K is not in it); the
    // flush and the reset of the sink word are outside the timed span, which holds the read alone.
    M3_CUDA_CHECK(cudaMemsetAsync(flush.data(), 0, flush.bytes(), s.get()));
    M3_CUDA_CHECK(cudaMemsetAsync(sink.data(), 0, sizeof(unsigned), s.get()));
    m3::gpu::Event e0, e1;
    e0.record(s.get());
    m3::gpu::stream_read(src.data(), bytes, sink.data(), s.get(), /*zero_out=*/false);
    e1.record(s.get());
    s.sync();
    const double t = e1.since(e0) * 1e-3;
    state.SetIterationTime(t);
    sec += t;
  }
  const double gbps = static_cast<double>(bytes) * static_cast<double>(state.iterations()) / sec * 1e-9;
  state.counters["GB/s"] = gbps;
  state.counters["copy_GB/s"] = copy;
  state.counters["frac_copy"] = gbps / copy;
}
BENCHMARK(BM_gpu_peak_read)->ArgName("MiB")->Arg(256)->Arg(1024)->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
