// The vision tower on the GPU (gpu/vision.h) at M3's dimensions (vision_preset("m3"): Hv 1280,
// 32 layers, 16 heads of 80, mlp 5120, patch 14, text H 6144), one image a call:
//   BM_gpu_vision_tower/px:448|896|1344     the whole tower: patches, 32 blocks, projector, merger
//                                           (1024, 4096, 9216 patches -> 256, 1024, 2304 tokens)
//   BM_gpu_vision_attention/patches:N       the attention kernel alone, 16 heads of 80, the same N
// Counters: calls/s (images/s for the tower); TFLOP/s from analytic FLOPs (2 m n k per GEMM: patch embedding 2 P K Hv with
// K = 3*2*14*14; per block 2 P Hv (3Hv + Hv + 2 mlp) for qkv, out, fc1, fc2 and 4 P^2 Hv for
// attention (q k^T and p v over all P x P pairs, no masking); projector 2 P (Hv H + H H); merger
// 2 (P/4) (4H H + H H); LayerNorm, RoPE, GELU and bias adds are O(P Hv) and not counted);
// frac_gemm_peak = TFLOP/s over an 8192^3 gpu::linear GEMM on random data measured once in this
// file (the same yardstick as bench_gpu_moe_experts.cpp), peak_TFLOP/s that rate.
// Timing: CUDA events around VisionTower::run on an uploaded image (no host transfers), manual
// time. No L2 flush: the weights (1.7 GB) and activations stream from HBM anyway.
// Weights: generate_vision_weights with one block, copied to all 32 (the fp64 generator would take
// a minute and 7 GB of host memory for 32 distinct blocks; the GPU does the same work either way).
// H200, cuBLAS 13.0, 2026-11-29 (GEMM peak 798 TFLOP/s): tower 448 px 7.4 ms = 136 images/s, 224
// TFLOP/s (0.28 of peak); 896 px 35 ms, 248 TFLOP/s; 1344 px 114 ms, 238 TFLOP/s. Attention alone
// 132 / 192 / 203 TFLOP/s at 1024 / 4096 / 9216 patches: 60% of the tower's time at 1344 px.
//   build/gpu/compare/bench/bench_gpu --benchmark_filter=vision
#include "gpu/kernels/linear.h"
#include "gpu/kernels/vision_attention.h"
#include "compare/bench/bench_gpu_util.h"
#include "gpu/runtime/buffer.h"
#include "gpu/runtime/device.h"
#include "gpu/vision.h"
#include "reference/vision.h"

#include <benchmark/benchmark.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace {

using m3::bench::have_gpu;
using m3::bench::mean_seconds;

using m3::gpu::bf16;
using m3::gpu::DeviceBuffer;

struct World {
  m3::VisionConfig vc = m3::vision_preset("m3");
  std::unique_ptr<m3::gpu::VisionTower> tower;
  double peak_tflops = 0;

  World() {
    m3::VisionConfig one = vc;
    one.layers = 1;
    m3::VisionWeights<double> w = m3::generate_vision_weights(one, 1);
    w.layers.resize(static_cast<std::size_t>(vc.layers), w.layers.front());
    tower = std::make_unique<m3::gpu::VisionTower>(vc, w);
    const int n = 8192;
    DeviceBuffer<bf16> a(static_cast<std::size_t>(n) * n), b(a.size()), c(a.size());
    m3::bench::fill_random(a, 5);
    m3::bench::fill_random(b, 6);
    m3::gpu::CublasHandle h;
    const double sec = mean_seconds(tower->stream(), 10, [&] {
      m3::gpu::linear(h.get(), a.data(), b.data(), c.data(), n, n, n, tower->stream());
    });
    peak_tflops = 2.0 * n * n * n / sec * 1e-12;
  }
};

World& world() {
  static World w;
  return w;
}

double attention_flops(double P, double Hv) { return 4.0 * P * P * Hv; }

// Analytic FLOPs of one image of P patches (see the header).
double tower_flops(const m3::VisionConfig& vc, double P) {
  const double Hv = vc.hidden, H = vc.text_hidden, mlp = vc.mlp;
  const double K = static_cast<double>(vc.channels) * vc.temporal_patch * vc.patch * vc.patch;
  const double m2 = vc.merge * vc.merge;
  const double block = 2.0 * P * Hv * (3 * Hv + Hv + 2 * mlp) + attention_flops(P, Hv);
  return 2.0 * P * K * Hv + vc.layers * block + 2.0 * P * (Hv * H + H * H) + 2.0 * (P / m2) * (m2 * H * H + H * H);
}

void set_counters(benchmark::State& state, double flops, double total_sec, double peak) {
  const double iters = static_cast<double>(state.iterations());
  const double tflops = flops * iters / total_sec * 1e-12;
  state.counters["calls/s"] = iters / total_sec;  // images/s for the tower
  state.counters["TFLOP/s"] = tflops;
  state.counters["frac_gemm_peak"] = tflops / peak;
  state.counters["peak_TFLOP/s"] = peak;
}

void BM_gpu_vision_tower(benchmark::State& state) {
  if (!have_gpu(state)) return;
  World& W = world();
  const int px = static_cast<int>(state.range(0));
  W.tower->upload_image(m3::synthetic_image(W.vc, px, px, 2), px, px);
  cudaStream_t s = W.tower->stream();
  for (int i = 0; i < 2; ++i) W.tower->run();  // warm-up: cuBLAS heuristics, clocks
  M3_CUDA_CHECK(cudaStreamSynchronize(s));
  m3::gpu::Event e0, e1;
  double total = 0;
  for (auto _ : state) {
    e0.record(s);
    W.tower->run();
    e1.record(s);
    const double sec = e1.since(e0) * 1e-3;
    state.SetIterationTime(sec);
    total += sec;
  }
  const double P = static_cast<double>(px / W.vc.patch) * (px / W.vc.patch);
  state.counters["tokens"] = P / (W.vc.merge * W.vc.merge);
  set_counters(state, tower_flops(W.vc, P), total, W.peak_tflops);
}
BENCHMARK(BM_gpu_vision_tower)
    ->ArgName("px")
    ->Arg(448)
    ->Arg(896)
    ->Arg(1344)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

void BM_gpu_vision_attention(benchmark::State& state) {
  if (!have_gpu(state)) return;
  World& W = world();
  const int P = static_cast<int>(state.range(0)), Hv = W.vc.hidden;
  DeviceBuffer<bf16> qkv(static_cast<std::size_t>(P) * 3 * Hv), out(static_cast<std::size_t>(P) * Hv);  // [P, 3Hv], [P, Hv]
  m3::bench::fill_random(qkv, 7);
  cudaStream_t s = W.tower->stream();
  const auto call = [&] {
    m3::gpu::vision_attention(qkv.data(), qkv.data() + Hv, qkv.data() + 2 * Hv, 3 * Hv, P, W.vc.heads, W.vc.head_dim,
                              out.data(), s);
  };
  for (int i = 0; i < 2; ++i) call();
  M3_CUDA_CHECK(cudaStreamSynchronize(s));
  m3::gpu::Event e0, e1;
  double total = 0;
  for (auto _ : state) {
    e0.record(s);
    call();
    e1.record(s);
    const double sec = e1.since(e0) * 1e-3;
    state.SetIterationTime(sec);
    total += sec;
  }
  set_counters(state, attention_flops(P, Hv), total, W.peak_tflops);
}
BENCHMARK(BM_gpu_vision_attention)
    ->ArgName("patches")
    ->Arg(1024)
    ->Arg(4096)
    ->Arg(9216)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
