// GPU small ops and projections at M3 width (T = 4096 tokens), compared with the peaks of
// bench_gpu_peaks.cpp in the same bench_gpu run:
//   BM_gpu_rms_norm, BM_gpu_add_rms_norm   T 4096, H 6144                       -> GB/s
//   BM_gpu_qk_norm_rope                    T 4096, 64 heads x 128, R 64          -> GB/s
//   BM_gpu_swiglu_oai(_fused)              T 4096, I 3072*4 = 12288              -> GB/s
//   BM_gpu_moe_router                      T 4096, H 6144, E 128, top-4          -> GB/s and TFLOP/s (fp32)
//   BM_gpu_embedding                       T 4096 rows of 6144 from V 200064     -> GB/s
//   BM_gpu_linear                          T 4096 through gpu::linear: q|k|v|idx_q|idx_k fused
//                                          (6144 -> 8192+512+512+512+128 = 9856), o (8192 -> 6144),
//                                          shared expert gate|up (6144 -> 6144) and down (3072 -> 6144)
//                                                                                -> TFLOP/s
// GB/s counts necessary bytes only: each input element read once, each output written once.
// Before every timed iteration the L2 is flushed (a memset of 2x its size, outside the timed span)
// so the memory-bound ops are measured from HBM, not from a warm 50-60 MB L2.
//   build/gpu/compare/bench/bench_gpu --benchmark_filter='rms_norm|qk_norm|swiglu|router|embedding|linear'
#include "gpu/kernels/embedding.h"
#include "gpu/kernels/linear.h"
#include "gpu/kernels/moe_router.h"
#include "gpu/kernels/qk_norm_rope.h"
#include "gpu/kernels/rms_norm.h"
#include "gpu/kernels/swiglu_oai.h"
#include "compare/bench/bench_gpu_util.h"
#include "gpu/runtime/buffer.h"
#include "gpu/runtime/device.h"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using m3::bench::have_gpu;

using m3::gpu::bf16;
using m3::gpu::DeviceBuffer;

constexpr int kT = 4096;
constexpr int kH = 6144;
constexpr double kEps = 1e-6;
constexpr double kTheta = 5e6;

// Times op once per iteration between events on its own stream; flushes the L2 before each
// iteration when `flush` (memory-bound ops). Returns the summed seconds.
class Timer {
 public:
  explicit Timer(bool flush) {
    if (flush) l2_ = DeviceBuffer<unsigned char>(2 * std::max<std::size_t>(m3::gpu::device_info().l2_bytes, 1 << 20));
  }
  cudaStream_t stream() const { return s_.get(); }
  template <class Op>
  double run(benchmark::State& state, Op&& op) {
    for (int i = 0; i < 3; ++i) op();  // warm-up (also any lazy cuBLAS or attribute setup)
    s_.sync();
    double total = 0;
    for (auto _ : state) {
      l2_.fill_bytes(0, s_.get());
      start_.record(s_.get());
      op();
      stop_.record(s_.get());
      const double sec = stop_.since(start_) * 1e-3;
      state.SetIterationTime(sec);
      total += sec;
    }
    return total;
  }

 private:
  m3::gpu::Stream s_;
  m3::gpu::Event start_, stop_;
  DeviceBuffer<unsigned char> l2_;
};

void set_gbps(benchmark::State& state, double bytes, double sec) {
  state.counters["GB/s"] = bytes * static_cast<double>(state.iterations()) / sec * 1e-9;
}

void BM_gpu_rms_norm(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const int T = static_cast<int>(state.range(0)), H = static_cast<int>(state.range(1));
  DeviceBuffer<bf16> x(static_cast<std::size_t>(T) * H), w(H), y(static_cast<std::size_t>(T) * H);
  m3::bench::fill_random(x, 1, 2.f);
  m3::bench::fill_random(w, 2, 0.1f);
  Timer timer(true);
  const double sec = timer.run(state, [&] { m3::gpu::rms_norm(x.data(), w.data(), kEps, y.data(), T, H, timer.stream()); });
  set_gbps(state, 2.0 * T * H * sizeof(bf16) + H * sizeof(bf16), sec);
}
BENCHMARK(BM_gpu_rms_norm)->ArgNames({"T", "H"})->Args({kT, kH})->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_gpu_add_rms_norm(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const int T = static_cast<int>(state.range(0)), H = static_cast<int>(state.range(1));
  DeviceBuffer<bf16> h(static_cast<std::size_t>(T) * H), d(static_cast<std::size_t>(T) * H), w(H),
      y(static_cast<std::size_t>(T) * H);
  m3::bench::fill_random(h, 1, 2.f);
  m3::bench::fill_random(d, 3, 1e-3f);  // small deltas: the stream stays bounded over the repeats
  m3::bench::fill_random(w, 2, 0.1f);
  Timer timer(true);
  const double sec =
      timer.run(state, [&] { m3::gpu::add_rms_norm(h.data(), d.data(), w.data(), kEps, y.data(), T, H, timer.stream()); });
  // h read + written, delta read, y written.
  set_gbps(state, 4.0 * T * H * sizeof(bf16) + H * sizeof(bf16), sec);
}
BENCHMARK(BM_gpu_add_rms_norm)->ArgNames({"T", "H"})->Args({kT, kH})->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_gpu_qk_norm_rope(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const int T = static_cast<int>(state.range(0)), heads = static_cast<int>(state.range(1)), d = 128, R = 64;
  const std::size_t n = static_cast<std::size_t>(T) * heads * d;
  DeviceBuffer<bf16> x(n), w(d), y(n);
  m3::bench::fill_random(x, 1, 2.f);
  m3::bench::fill_random(w, 2, 0.1f);
  std::vector<std::int64_t> pos(T);
  for (int t = 0; t < T; ++t) pos[t] = (std::int64_t{1} << 20) - T + t;  // the end of a 1M context
  DeviceBuffer<std::int64_t> dpos(T);
  dpos.upload(pos);
  Timer timer(true);
  const double sec = timer.run(state, [&] {
    m3::gpu::qk_norm_rope(x.data(), heads, d, w.data(), kEps, R, kTheta, dpos.data(), y.data(), T, timer.stream());
  });
  set_gbps(state, 2.0 * n * sizeof(bf16) + T * sizeof(std::int64_t) + d * sizeof(bf16), sec);
}
BENCHMARK(BM_gpu_qk_norm_rope)
    ->ArgNames({"T", "heads"})
    ->Args({kT, 64})
    ->Args({kT, 4})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

void BM_gpu_swiglu_oai(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const int T = static_cast<int>(state.range(0)), I = static_cast<int>(state.range(1));
  const bool fused = state.range(2) != 0;
  const std::size_t n = static_cast<std::size_t>(T) * I;
  DeviceBuffer<bf16> gate_up(2 * n), act(n);  // separate: gate = first n, up = second n
  m3::bench::fill_random(gate_up, 1, 8.f);
  Timer timer(true);
  const m3::gpu::SwigluParams p;
  const double sec = timer.run(state, [&] {
    if (fused) m3::gpu::swiglu_oai(gate_up.data(), p, act.data(), T, I, timer.stream());
    else m3::gpu::swiglu_oai(gate_up.data(), gate_up.data() + n, p, act.data(), T, I, timer.stream());
  });
  set_gbps(state, 3.0 * n * sizeof(bf16), sec);
}
BENCHMARK(BM_gpu_swiglu_oai)
    ->ArgNames({"T", "I", "fused"})
    ->Args({kT, 3072 * 4, 0})
    ->Args({kT, 3072 * 4, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

void BM_gpu_moe_router(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const int T = static_cast<int>(state.range(0)), E = static_cast<int>(state.range(1)), K = 4, H = kH;
  DeviceBuffer<bf16> x(static_cast<std::size_t>(T) * H);
  DeviceBuffer<float> w(static_cast<std::size_t>(E) * H), bias(E), logits(static_cast<std::size_t>(T) * E),
      weights(static_cast<std::size_t>(T) * K);
  DeviceBuffer<std::int32_t> experts(static_cast<std::size_t>(T) * K);
  m3::bench::fill_random(x, 1, 2.f);
  m3::bench::fill_random(w, 2, 0.02f);
  m3::bench::fill_random(bias, 3, 0.1f);
  Timer timer(true);
  const double sec = timer.run(state, [&] {
    m3::gpu::moe_router(x.data(), w.data(), bias.data(), K, true, logits.data(), experts.data(), weights.data(), T,
                        H, E, timer.stream());
  });
  // x and W_gate read, logits, ids and weights written.
  set_gbps(state,
           static_cast<double>(T) * H * sizeof(bf16) + static_cast<double>(E) * H * sizeof(float) +
               static_cast<double>(T) * E * sizeof(float) + static_cast<double>(T) * K * 8,
           sec);
  state.counters["TFLOP/s"] = 2.0 * T * E * H * static_cast<double>(state.iterations()) / sec * 1e-12;
}
BENCHMARK(BM_gpu_moe_router)->ArgNames({"T", "E"})->Args({kT, 128})->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_gpu_embedding(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const int T = static_cast<int>(state.range(0)), H = static_cast<int>(state.range(1)), V = 200064;
  DeviceBuffer<bf16> table(static_cast<std::size_t>(V) * H), out(static_cast<std::size_t>(T) * H);  // 2.4 GB table
  table.fill_bytes(0x3F);  // the bits do not matter for a copy
  std::vector<std::int32_t> ids(T);
  std::uint64_t s = 7;
  for (auto& id : ids) id = static_cast<std::int32_t>(m3::bench::next_random(s) % V);
  DeviceBuffer<std::int32_t> dids(T);
  dids.upload(ids);
  Timer timer(true);
  const double sec =
      timer.run(state, [&] { m3::gpu::embedding(table.data(), dids.data(), T, V, H, out.data(), timer.stream()); });
  set_gbps(state, 2.0 * T * H * sizeof(bf16) + T * sizeof(std::int32_t), sec);
}
BENCHMARK(BM_gpu_embedding)->ArgNames({"T", "H"})->Args({kT, kH})->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_gpu_linear(benchmark::State& state) {
  if (!have_gpu(state)) return;
  const int T = static_cast<int>(state.range(0)), in = static_cast<int>(state.range(1)),
            out = static_cast<int>(state.range(2));
  DeviceBuffer<bf16> x(static_cast<std::size_t>(T) * in), w(static_cast<std::size_t>(out) * in),
      y(static_cast<std::size_t>(T) * out);
  m3::bench::fill_random(x, 1);
  m3::bench::fill_random(w, 2, 0.02f);
  m3::gpu::CublasHandle h;
  Timer timer(false);  // compute-bound: the operands (~100 MB) exceed the L2 anyway
  const double sec =
      timer.run(state, [&] { m3::gpu::linear(h.get(), x.data(), w.data(), y.data(), T, in, out, timer.stream()); });
  state.counters["TFLOP/s"] = 2.0 * T * in * out * static_cast<double>(state.iterations()) / sec * 1e-12;
}
BENCHMARK(BM_gpu_linear)
    ->ArgNames({"T", "in", "out"})
    ->Args({kT, kH, 8192 + 512 + 512 + 512 + 128})  // q|k|v|idx_q|idx_k
    ->Args({kT, 8192, kH})                          // o
    ->Args({kT, kH, 2 * 3072})                      // shared expert gate|up
    ->Args({kT, 3072, kH})                          // shared expert down
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
