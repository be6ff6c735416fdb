// GPU MoE experts at M3 shapes (H 6144, E 128, K_e 4, I = Is = 3072: reference/config.cpp's m3
// preset), uniform random routing over T = 512, 4096, 16384 tokens, both GEMM paths (grouped = 1:
// cublasGemmGroupedBatchedEx, 0: the default LOOP, a cublasGemmEx chain per expert on 4 side streams):
//   BM_gpu_moe_expert_gemms  the expert GEMMs alone (gate_up and down over the permuted rows, from
//                            moe_experts_gemms; no SwiGLU, permutation or combine)
//                            -> TFLOP/s = 2 T K_e H (2I + I) / time
//   BM_gpu_moe_experts       the whole moe_experts call (permutation, offsets to the host, shared
//                            expert, expert GEMMs, SwiGLU, combine) -> TFLOP/s of expert + shared GEMMs
// Counters: frac_dense = TFLOP/s over the rate of the same work as two dense GEMMs (all T K_e rows
// through one expert's weights via gpu::linear, measured here: the floor is 0.5 at T 4096);
// frac_gemm_peak = TFLOP/s over an 8192^3 gpu::linear GEMM measured once in this file (the peaks of
// bench_gpu_peaks.cpp are separate benchmarks, not shared values, so this file measures its own).
// Timing: CUDA events around each call (manual time). No L2 flush: compute-bound, and the 14.5 GB of
// expert weights are far beyond the L2 anyway. Random bf16 weights (a 32 MB random pattern tiled over
// the buffers): zeros would run the tensor cores cooler and faster (bench_gpu_peaks.cpp).
// H200, cuBLAS 13.0, 2026-11-28 (expert GEMMs alone, LOOP): T 512 68 TFLOP/s (weight-bandwidth
// bound: 14.5 GB of weights for 16 rows an expert), T 4096 414 TFLOP/s = 0.51 of dense, T 16384
// 590 TFLOP/s = 0.73; GROUPED 60 / 202 / 257 TFLOP/s. Whole call at T 4096: 5.4 ms (LOOP).
//   build/gpu/compare/bench/bench_gpu --benchmark_filter=moe_expert
#include "gpu/kernels/linear.h"
#include "gpu/kernels/moe_experts.h"
#include "compare/bench/bench_gpu_util.h"
#include "gpu/runtime/buffer.h"
#include "gpu/runtime/device.h"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <numeric>
#include <vector>

namespace {

using m3::bench::have_gpu;
using m3::bench::mean_seconds;

using m3::gpu::bf16;
using m3::gpu::DeviceBuffer;

constexpr int kH = 6144, kI = 3072, kIs = 3072, kE = 128, kK = 4;
constexpr double kRoutedScale = 2.5;

// The expert weights (14.5 GB) and the shared expert, made once; the in-process GEMM peak.
struct World {
  DeviceBuffer<bf16> gate_up, down, sgu, sdown;
  m3::gpu::MoeExpertWeights w;
  m3::gpu::CublasHandle h;
  m3::gpu::Stream stream;
  double peak_tflops = 0;
  std::map<int, double> dense_tflops;  // by T

  World()
      : gate_up(static_cast<std::size_t>(kE) * 2 * kI * kH),
        down(static_cast<std::size_t>(kE) * kH * kI),
        sgu(static_cast<std::size_t>(2) * kIs * kH),
        sdown(static_cast<std::size_t>(kH) * kIs) {
    m3::bench::fill_random(gate_up, 1, 0.02f);
    m3::bench::fill_random(down, 2, 0.02f);
    m3::bench::fill_random(sgu, 3, 0.02f);
    m3::bench::fill_random(sdown, 4, 0.02f);
    w = {gate_up.data(), down.data(), kE, kI, sgu.data(), sdown.data(), kIs};
    const int n = 8192;
    DeviceBuffer<bf16> a(static_cast<std::size_t>(n) * n), b(a.size()), c(a.size());
    m3::bench::fill_random(a, 5, 1.f);
    m3::bench::fill_random(b, 6, 1.f);
    const double sec = mean_seconds(stream.get(), 10, [&] {
      m3::gpu::linear(h.get(), a.data(), b.data(), c.data(), n, n, n, stream.get());
    });
    peak_tflops = 2.0 * n * n * n / sec * 1e-12;
  }

  // The expert GEMMs' work as two dense GEMMs: T K_e rows through expert 0's gate_up, then its down.
  double dense(int T) {
    if (auto it = dense_tflops.find(T); it != dense_tflops.end()) return it->second;
    const std::size_t N = static_cast<std::size_t>(T) * kK;
    DeviceBuffer<bf16> x(N * kH), mid(N * 2 * kI);
    m3::bench::fill_random(x, 7, 1.f);
    const double sec = mean_seconds(stream.get(), 5, [&] {
      m3::gpu::linear(h.get(), x.data(), gate_up.data(), mid.data(), static_cast<int>(N), kH, 2 * kI, stream.get());
      m3::gpu::linear(h.get(), mid.data(), down.data(), x.data(), static_cast<int>(N), kI, kH, stream.get());
    });
    return dense_tflops[T] = 2.0 * N * kH * 3.0 * kI / sec * 1e-12;
  }
};

World& world() {
  static World w;
  return w;
}

// Per-benchmark inputs: x, uniform routing (K_e distinct experts a token), weights, y, workspace.
struct Inputs {
  DeviceBuffer<bf16> x, y;
  DeviceBuffer<std::int32_t> ids;
  DeviceBuffer<float> wts;
  DeviceBuffer<unsigned char> ws;

  Inputs(int T, const m3::gpu::MoeExpertWeights& w)
      : x(static_cast<std::size_t>(T) * kH),
        y(x.size()),
        ids(static_cast<std::size_t>(T) * kK),
        wts(ids.size()),
        ws(m3::gpu::moe_experts_workspace_bytes(T, kH, kK, w)) {
    m3::bench::fill_random(x, 8, 1.f);
    std::uint64_t s = 11;
    std::vector<std::int32_t> hid(ids.size());
    std::vector<float> hw(ids.size());
    std::vector<int> pool(kE);
    std::iota(pool.begin(), pool.end(), 0);
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < kK; ++j) {  // partial Fisher-Yates: distinct experts, as the router picks
        std::swap(pool[j], pool[j + static_cast<int>(m3::bench::next_random(s) % (kE - j))]);
        hid[static_cast<std::size_t>(t) * kK + j] = pool[j];
        hw[static_cast<std::size_t>(t) * kK + j] = 0.25f;
      }
    ids.upload(hid);
    wts.upload(hw);
  }
};

void bench(benchmark::State& state, bool whole_call) {
  if (!have_gpu(state)) return;
  const int T = static_cast<int>(state.range(0));
  const auto path = state.range(1) ? m3::gpu::MoeGemmPath::GROUPED : m3::gpu::MoeGemmPath::LOOP;
  World& W = world();
  Inputs in(T, W.w);
  cudaStream_t s = W.stream.get();
  const m3::gpu::SwigluParams p;
  const auto call = [&] {
    m3::gpu::moe_experts(W.h.get(), in.x.data(), in.ids.data(), in.wts.data(), T, kH, kK, W.w, kRoutedScale, p,
                         in.y.data(), in.ws.data(), in.ws.size(), s, path);
  };
  for (int i = 0; i < 2; ++i) call();  // warm-up: cuBLAS heuristics, clocks, the pinned buffer
  const auto offsets = m3::gpu::moe_experts_offsets(T, kH, kK, W.w, in.ws.data(), s);
  const auto gemms = [&] {
    m3::gpu::moe_experts_gemms(W.h.get(), offsets, T, kH, kK, W.w, nullptr, in.ws.data(), path, s);
  };
  if (!whole_call) gemms();
  W.stream.sync();
  m3::gpu::Event e0, e1;
  double total = 0;
  for (auto _ : state) {
    e0.record(s);
    if (whole_call) call();
    else gemms();
    e1.record(s);
    const double sec = e1.since(e0) * 1e-3;
    state.SetIterationTime(sec);
    total += sec;
  }
  const double expert_flops = 2.0 * T * kK * kH * 3.0 * kI;
  const double flops = expert_flops + (whole_call ? 2.0 * T * kH * 3.0 * kIs : 0.0);
  const double tflops = flops * static_cast<double>(state.iterations()) / total * 1e-12;
  state.counters["TFLOP/s"] = tflops;
  state.counters["frac_gemm_peak"] = tflops / W.peak_tflops;
  state.counters["peak_TFLOP/s"] = W.peak_tflops;
  if (!whole_call) {
    const double dense = W.dense(T);
    state.counters["dense_TFLOP/s"] = dense;
    state.counters["frac_dense"] = tflops / dense;
  }
}

void BM_gpu_moe_expert_gemms(benchmark::State& s) { bench(s, false); }
void BM_gpu_moe_experts(benchmark::State& s) { bench(s, true); }

void moe_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "grouped"});
  for (int T : {512, 4096, 16384})
    for (int grouped : {1, 0}) b->Args({T, grouped});
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
}

}  // namespace

BENCHMARK(BM_gpu_moe_expert_gemms)->Apply(moe_args);
BENCHMARK(BM_gpu_moe_experts)->Apply(moe_args);
