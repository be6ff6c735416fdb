// CPU reference benchmarks (Google Benchmark; medians over repetitions, single thread).
//   bench_reference --benchmark_filter=Tiny          the tiny model: prefill 320 + 32 decode steps
//   bench_reference --benchmark_filter=Linear        Eigen GEMM-shaped projections, GFLOP/s
//   bench_reference --benchmark_filter=Decode1M      one real-dimension decode token at 1M context,
//                                                    dense GQA vs MSA (synthetic caches, ~5 GiB)
// Counters: GFLOP/s from the counted multiply-adds (2 FLOPs each), extra_MiB = peak resident memory
// beyond the caches during the op.
#include "reference/model.h"
#include "reference/ops/attention_dense.h"
#include "reference/ops/linear.h"
#include "reference/ops/msa_attention.h"
#include "reference/ops/msa_index.h"
#include "reference/ops/msa_select.h"
#include "reference/rng.h"

#include <benchmark/benchmark.h>

#include <sys/resource.h>

#include <fstream>
#include <random>
#include <string>

namespace {

// Current and peak resident set in MiB (Linux /proc/self/status).
double status_mib(const char* key) {
  std::ifstream f("/proc/self/status");
  for (std::string line; std::getline(f, line);)
    if (line.rfind(key, 0) == 0) return std::stod(line.substr(std::string(key).size())) / 1024.0;
  return 0;
}

// Resets the peak-RSS mark (VmHWM) to the current RSS, so a later read measures this op alone.
void reset_peak_rss() { std::ofstream("/proc/self/clear_refs") << "5"; }

void BM_TinyPrefill320Decode32(benchmark::State& state) {
  const auto cfg = m3::preset("tiny");
  m3::Model model(cfg, m3::generate_weights(cfg, 0), m3::Precision::FP32);
  std::vector<std::int32_t> prompt(320);
  m3::CounterRng rng(0, "prompt");
  for (int i = 0; i < 320; ++i) prompt[i] = static_cast<std::int32_t>(rng.bits(i) % cfg.vocab_size);
  for (auto _ : state) {
    auto gen = m3::generate_greedy(model, prompt, 32);
    benchmark::DoNotOptimize(gen.data());
  }
}
BENCHMARK(BM_TinyPrefill320Decode32)->Unit(benchmark::kMillisecond)->Repetitions(5)->ReportAggregatesOnly(true);

// y [M, N] = x [M, K] W^T, W [N, K]: the projection shape of every layer.
void BM_Linear_f32(benchmark::State& state) {
  const auto M = state.range(0), N = state.range(1), K = state.range(2);
  m3::MatF x = m3::MatF::Random(M, K), w = m3::MatF::Random(N, K), y;
  for (auto _ : state) {
    m3::ref::linear(x, w, y);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * M * N * K * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Linear_f32)
    ->Args({512, 512, 512})
    ->Args({320, 2048, 512})   // small-preset q_proj on a 320-token chunk
    ->Args({1024, 1024, 1024})
    ->Args({256, 6144, 6144})  // an M3 projection on a 256-token chunk
    ->Unit(benchmark::kMillisecond)
    ->Repetitions(3)
    ->ReportAggregatesOnly(true);

// One decode token at context N = range(0) with M3's real attention geometry. Caches are random
// (synthetic), fp32: K, V [N, Hkv*D] and index-K [N, Di].
struct DecodeCaches {
  m3::AttnDims a{64, 4, 128};
  m3::MsaDims m{4, 128, 128, 16, 1, 0};
  m3::MatF k, v, ik, q, iq;
  explicit DecodeCaches(std::int64_t n) {
    std::mt19937 g(1);
    std::normal_distribution<float> nd;
    auto fill = [&](m3::MatF& x, std::int64_t r, std::int64_t c) {
      x.resize(r, c);
      for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = nd(g);
    };
    fill(k, n, a.Hkv * a.D);
    fill(v, n, a.Hkv * a.D);
    fill(ik, n, m.Di);
    fill(q, 1, a.Hq * a.D);
    fill(iq, 1, m.Hi * m.Di);
  }
};

void BM_Decode1M_Msa(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  DecodeCaches c(n);
  const std::vector<std::int64_t> pos{n - 1};
  reset_peak_rss();
  const double rss0 = status_mib("VmRSS:");
  m3::MatF scores, out;
  m3::MatI sel;
  m3::AttnCounter cnt;
  for (auto _ : state) {
    cnt.reset();
    m3::ref::msa_index(c.iq, c.ik, pos, c.m, scores, &cnt);
    m3::ref::msa_select(scores, pos, c.m, sel, &cnt);
    m3::ref::msa_attention(c.q, c.k, c.v, pos, sel, c.m.BLK, c.a, out, &cnt);
    benchmark::DoNotOptimize(out.data());
  }
  const double macs = double(cnt.qk_macs + cnt.pv_macs + cnt.index_macs);
  state.counters["GFLOP/s"] = benchmark::Counter(2 * macs * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP"] = 2 * macs * 1e-9;
  state.counters["extra_MiB"] = status_mib("VmHWM:") - rss0;
}
BENCHMARK(BM_Decode1M_Msa)->Arg(1 << 20)->Unit(benchmark::kMillisecond)->Iterations(3)->Repetitions(1);

void BM_Decode1M_Dense(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  DecodeCaches c(n);
  const std::vector<std::int64_t> pos{n - 1};
  reset_peak_rss();
  const double rss0 = status_mib("VmRSS:");
  m3::MatF out;
  m3::AttnCounter cnt;
  for (auto _ : state) {
    cnt.reset();
    m3::ref::attention_dense(c.q, c.k, c.v, pos, c.a, out, &cnt);
    benchmark::DoNotOptimize(out.data());
  }
  const double macs = double(cnt.qk_macs + cnt.pv_macs);
  state.counters["GFLOP/s"] = benchmark::Counter(2 * macs * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP"] = 2 * macs * 1e-9;
  state.counters["extra_MiB"] = status_mib("VmHWM:") - rss0;
}
BENCHMARK(BM_Decode1M_Dense)->Arg(1 << 20)->Unit(benchmark::kMillisecond)->Iterations(1)->Repetitions(1);

}  // namespace

BENCHMARK_MAIN();
