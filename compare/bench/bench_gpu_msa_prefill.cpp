// GPU benchmark of MSA block-sparse attention for a prefill chunk with M3's geometry (Hq 64, Hkv 4,
// D 128, BLK 128, top-16): one chunk of T = 4096 queries at the end of a context of N keys
// (positions N-T .. N-1), N in {16K, 64K, 256K, 1M}:
//   BM_MsaPrefill            gpu::msa_attention_prefill (KV-block-outer, gathered queries, LSE merge)
//   BM_MsaPrefillPortableTiles  the same with the portable mma.sync tile kernel forced
//   BM_MsaPrefillDecodeForm  gpu::msa_attention (query-outer split-K decode form) on the same inputs
//   BM_MsaIndexPrefill       the index scores of the same chunk (Hi 4, Di 128): gpu::msa_index
//   BM_MsaIndexPrefillSm90   and gpu::sm90_msa_index (wgmma + TMA; skipped off compute capability 9.0)
//   bench_gpu --benchmark_filter=MsaPrefill (MsaIndexPrefill for the index scores)
// Selections: random but valid, as msa_select would shape them: per (query, group) 15 distinct
// random blocks before the query's own block, then the own block (last slot).
// Time: CUDA events around the call (UseManualTime), medians over repetitions. No L2 flush: in a
// real prefill the chunk's K/V rows were just written, and from 64K on the caches (2*N*Hkv*D*2
// bytes) exceed the L2 anyway.
// Counter TFLOP/s: attended FLOPs, 4 * Hq * D * (keys attended summed over the queries), the keys
// counted with the causal mask (15 full blocks + p % BLK + 1 keys of the own block a query).
#include "compare/bench/bench_gpu_util.h"
#include "gpu/kernels/msa_attention.h"
#include "gpu/kernels/msa_attention_prefill.h"
#include "gpu/kernels/msa_index.h"
#include "gpu/kernels/sm90_msa_index.h"
#include "gpu/runtime/buffer.h"
#include "gpu/runtime/device.h"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

namespace {

using m3::gpu::bf16;
using m3::gpu::DeviceBuffer;

const m3::AttnDims kDims{64, 4, 128};
constexpr int kBlk = 128, kTopK = 16, kT = 4096;
constexpr int kMaxCtx = 1 << 20;

struct World {
  DeviceBuffer<bf16> q, k, v, out;             // [T, Hq*D], [N, Hkv*D] x2, [T, Hq*D]
  DeviceBuffer<std::int64_t> pos;              // [T]
  DeviceBuffer<std::int32_t> sel;              // [Hkv*T, K_blk]
  DeviceBuffer<unsigned char> ws_prefill, ws_decode;
  m3::gpu::Stream stream;
  int sel_ctx = 0;  // the context the uploaded positions and selection belong to
  double keys = 0;  // keys attended, summed over the queries (per group; equal for every group)

  World() {
    const std::size_t kv = static_cast<std::size_t>(kMaxCtx) * kDims.Hkv * kDims.D;
    const std::size_t qe = static_cast<std::size_t>(kT) * kDims.Hq * kDims.D;
    q = DeviceBuffer<bf16>(qe);
    out = DeviceBuffer<bf16>(qe);
    k = DeviceBuffer<bf16>(kv);
    v = DeviceBuffer<bf16>(kv);
    m3::bench::fill_random(q, 1, 1.f, m3::bench::Dist::Normal);
    m3::bench::fill_random(k, 2, 1.f, m3::bench::Dist::Normal);
    m3::bench::fill_random(v, 3, 1.f, m3::bench::Dist::Normal);
    pos = DeviceBuffer<std::int64_t>(kT);
    sel = DeviceBuffer<std::int32_t>(static_cast<std::size_t>(kDims.Hkv) * kT * kTopK);
    std::size_t wp = 0;
    for (int n = 1 << 14; n <= kMaxCtx; n *= 4)
      wp = std::max(wp, m3::gpu::msa_attention_prefill_workspace_bytes(kT, n, kBlk, kTopK, kDims));
    ws_prefill = DeviceBuffer<unsigned char>(wp);
    ws_decode = DeviceBuffer<unsigned char>(m3::gpu::msa_attention_workspace_bytes(kT, kTopK, kDims));
  }

  // Positions N-T .. N-1 and, per (group, query), 15 distinct random earlier blocks + the own block.
  void set_context(int n) {
    if (sel_ctx == n) return;
    std::mt19937_64 g(static_cast<std::uint64_t>(n));
    std::vector<std::int64_t> p(kT);
    std::vector<std::int32_t> s(sel.size());
    keys = 0;
    for (int t = 0; t < kT; ++t) {
      p[t] = n - kT + t;
      keys += (kTopK - 1) * kBlk + p[t] % kBlk + 1;
    }
    for (int kv = 0; kv < kDims.Hkv; ++kv)
      for (int t = 0; t < kT; ++t) {
        const int L = static_cast<int>(p[t] / kBlk);  // >= 96 > 15 at n >= 16K
        std::int32_t* row = s.data() + (static_cast<std::size_t>(kv) * kT + t) * kTopK;
        std::uniform_int_distribution<int> pick(0, L - 1);
        for (int j = 0; j < kTopK - 1;) {
          const int b = pick(g);
          if (std::find(row, row + j, b) == row + j) row[j++] = b;
        }
        row[kTopK - 1] = L;
      }
    pos.upload(p);
    sel.upload(s);
    sel_ctx = n;
  }
};

// One warm-up call (module load, shared-memory attributes and occupancy queries stay out of the
// timings), then each iteration's CUDA-event time on the stream as the manual time.
template <class F>
void time_iterations(benchmark::State& state, m3::gpu::Stream& stream, F&& run) {
  run();
  stream.sync();
  cudaStream_t s = stream.get();
  m3::gpu::Event e0, e1;
  for (auto _ : state) {
    e0.record(s);
    run();
    e1.record(s);
    state.SetIterationTime(e1.since(e0) * 1e-3);
  }
}

World& world() {
  static World w;
  return w;
}

void bench(benchmark::State& state, bool prefill_form) {
  if (m3::gpu::device_count() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const int n = static_cast<int>(state.range(0));
  World& w = world();
  w.set_context(n);
  cudaStream_t s = w.stream.get();
  auto run = [&] {
    if (prefill_form)
      m3::gpu::msa_attention_prefill(w.q.data(), w.k.data(), w.v.data(), w.pos.data(), w.sel.data(), kT, n, kBlk,
                                     kTopK, kDims, w.out.data(), s, w.ws_prefill.data(), w.ws_prefill.size());
    else
      m3::gpu::msa_attention(w.q.data(), w.k.data(), w.v.data(), w.pos.data(), w.sel.data(), kT, n, kBlk, kTopK, kDims,
                             w.out.data(), s, w.ws_decode.data(), w.ws_decode.size());
  };
  time_iterations(state, w.stream, run);
  if (prefill_form)
    state.SetLabel(m3::gpu::msa_attention_prefill_uses_wgmma(kDims.D, kBlk) ? "wgmma tiles" : "mma.sync tiles");
  const double flops = 4.0 * kDims.Hq * kDims.D * w.keys;
  state.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["keys/query"] = w.keys / kT;
}

// The index branch of the same chunk: iq [T, Hi*Di], the index-K cache [N, Di], scores [Hi*T, NB].
struct IndexWorld {
  static constexpr m3::MsaDims kMsa{4, 128, kBlk, kTopK, 1, 0};
  DeviceBuffer<bf16> iq, ik;
  DeviceBuffer<float> scores;
  DeviceBuffer<std::int64_t> pos;
  m3::gpu::Stream stream;
  int pos_ctx = 0;
  IndexWorld() {
    iq = DeviceBuffer<bf16>(static_cast<std::size_t>(kT) * kMsa.Hi * kMsa.Di);
    ik = DeviceBuffer<bf16>(static_cast<std::size_t>(kMaxCtx) * kMsa.Di);
    m3::bench::fill_random(iq, 4, 1.f, m3::bench::Dist::Normal);
    m3::bench::fill_random(ik, 5, 1.f, m3::bench::Dist::Normal);
    scores = DeviceBuffer<float>(static_cast<std::size_t>(kMsa.Hi) * kT * (kMaxCtx / kBlk));
    pos = DeviceBuffer<std::int64_t>(kT);
  }
};

void bench_index(benchmark::State& state, bool sm90) {
  if (m3::gpu::device_count() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  if (sm90 && !m3::gpu::sm90_msa_index_available()) {
    state.SkipWithError("sm90_msa_index needs compute capability 9.0 and an sm_90a build");
    return;
  }
  static IndexWorld w;
  const int n = static_cast<int>(state.range(0));
  const int nb = n / kBlk;
  if (w.pos_ctx != n) {
    std::vector<std::int64_t> p(kT);
    for (int t = 0; t < kT; ++t) p[t] = n - kT + t;
    w.pos.upload(p);
    w.pos_ctx = n;
  }
  cudaStream_t s = w.stream.get();
  const auto& d = IndexWorld::kMsa;
  auto run = [&] {
    if (sm90) m3::gpu::sm90_msa_index(w.iq.data(), w.ik.data(), n - kT, kT, n, nb, d, w.scores.data(), s);
    else m3::gpu::msa_index(w.iq.data(), w.ik.data(), w.pos.data(), kT, n, nb, d, w.scores.data(), s);
  };
  time_iterations(state, w.stream, run);
  // Useful FLOPs: 2 * Hi * Di per visible (query, key) pair, keys 0..p a query.
  const double pairs = static_cast<double>(kT) * (n - kT) + 0.5 * static_cast<double>(kT) * (kT + 1);
  state.counters["TFLOP/s"] =
      benchmark::Counter(2.0 * d.Hi * d.Di * pairs * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_MsaIndexPrefill(benchmark::State& s) { bench_index(s, false); }
void BM_MsaIndexPrefillSm90(benchmark::State& s) { bench_index(s, true); }
void BM_MsaPrefill(benchmark::State& s) { bench(s, true); }
// The portable mma.sync tile kernel on the same work (BM_MsaPrefill takes the wgmma one on sm_90).
void BM_MsaPrefillPortableTiles(benchmark::State& s) {
  m3::gpu::detail::set_msa_prefill_tiles(m3::gpu::detail::PrefillTiles::Portable);
  bench(s, true);
  m3::gpu::detail::set_msa_prefill_tiles(m3::gpu::detail::PrefillTiles::Auto);
}
void BM_MsaPrefillDecodeForm(benchmark::State& s) { bench(s, false); }

void ctx_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"ctx"});
  for (int n = 1 << 14; n <= kMaxCtx; n *= 4) b->Arg(n);
  b->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.05)->Repetitions(5)->ReportAggregatesOnly(true);
}

}  // namespace

BENCHMARK(BM_MsaPrefill)->Apply(ctx_args);
BENCHMARK(BM_MsaPrefillPortableTiles)->Apply(ctx_args);
BENCHMARK(BM_MsaPrefillDecodeForm)->Apply(ctx_args);
BENCHMARK(BM_MsaIndexPrefill)->Apply(ctx_args);
BENCHMARK(BM_MsaIndexPrefillSm90)->Apply(ctx_args);
