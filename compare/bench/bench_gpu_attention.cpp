// GPU decode attention with M3's real geometry (Hq 64, Hkv 4, D 128; Hi 4, Di 128, BLK 128,
// K_blk 16), one query token per sequence at position ctx - 1, batch 1 and 8 (8 sequences, each
// with its own caches), contexts 4K..1M in powers of 4:
//   BM_AttentionDense   dense GQA split-K attention
//   BM_MsaIndex[Fp8]    block-max index scores (bf16 / E4M3 index-K cache)
//   BM_MsaIndex[Fp8]Rows16  the same on 16-row tiles (msa_index.h's IndexRowTile; decode takes 8)
//   BM_MsaSelect        exact top-16 block selection
//   BM_MsaAttention     block-sparse attention over the selected blocks
//   BM_MsaTotal[Fp8]    the chain as the model runs it: index, then msa_select_attention (selection
//                       and sparse attention fused into one kernel where the grid is decode-sized)
//   BM_MsaTotalSeparate index + select + sparse attention as three launches (the unfused chain)
//   BM_MsaIndexSelect / BM_MsaIndexSparse  the unfused chain without its sparse attention / its
//                       selection (the selection from a full pass): what each stage adds after the scan
// Time: CUDA events around the op alone (manual time), the L2 flushed before each iteration (a
// decode step reads every layer's caches from HBM); medians over repetitions. M3_BENCH_L2=warm
// skips the flush (a diagnostic: what of a small op's time is DRAM and TLB latency rather than work).
// Counters: GB/s of the necessary bytes (each K/V/index-K element read once: dense K+V of n keys
// a group; MSA index-K n*Di*B_elem + the selected K/V; select the scores), TFLOP/s (dense 4*Hq*D*n;
// MSA 2*Hi*Di*n + 4*Hq*D*keys attended), frac_copy = GB/s over the device-to-device copy rate
// measured in the same process (read + write bytes), the target's yardstick (DESIGN §10).
// Caches are random (a 256 MiB random pattern tiled over them), far larger than L2 from 64K up.
#include "gpu/kernels/attention_dense.h"
#include "gpu/kernels/msa_attention.h"
#include "gpu/kernels/msa_index.h"
#include "gpu/kernels/msa_select.h"
#include "gpu/runtime/buffer.h"
#include "gpu/runtime/device.h"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

namespace {

using m3::gpu::bf16;
using m3::gpu::DeviceBuffer;

const m3::AttnDims kA{64, 4, 128};
const m3::MsaDims kM{4, 128, 128, 16, 1, 0};
constexpr std::int64_t kMaxCtx = 1 << 20;
constexpr int kMaxB = 8;
constexpr std::size_t kPatternBytes = std::size_t{256} << 20;

std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Fills dst with the host pattern, tiled (the first copy uploaded, the rest copied on the device).
void fill_tiled(void* dst, std::size_t bytes, const void* pattern, std::size_t pattern_bytes) {
  auto* d = static_cast<unsigned char*>(dst);
  const std::size_t first = std::min(bytes, pattern_bytes);
  M3_CUDA_CHECK(cudaMemcpy(d, pattern, first, cudaMemcpyHostToDevice));
  for (std::size_t done = first; done < bytes;) {
    const std::size_t n = std::min(done, bytes - done);  // doubling copies
    M3_CUDA_CHECK(cudaMemcpy(d + done, d, n, cudaMemcpyDeviceToDevice));
    done += n;
  }
}

struct World {
  DeviceBuffer<bf16> k, v, ik, q, iq, out;
  DeviceBuffer<__nv_fp8_e4m3> ik8;
  DeviceBuffer<std::int64_t> pos;
  DeviceBuffer<float> scores;
  DeviceBuffer<std::int32_t> sel;
  DeviceBuffer<unsigned char> ws, flush;
  m3::gpu::Stream stream;
  double copy_gbps = 0;

  World() {
    const std::size_t kv_elems = static_cast<std::size_t>(kMaxB) * kMaxCtx * kA.Hkv * kA.D;
    const std::size_t ik_elems = static_cast<std::size_t>(kMaxB) * kMaxCtx * kM.Di;
    k = DeviceBuffer<bf16>(kv_elems);
    v = DeviceBuffer<bf16>(kv_elems);
    ik = DeviceBuffer<bf16>(ik_elems);
    ik8 = DeviceBuffer<__nv_fp8_e4m3>(ik_elems);
    q = DeviceBuffer<bf16>(static_cast<std::size_t>(kMaxB) * kA.Hq * kA.D);
    iq = DeviceBuffer<bf16>(static_cast<std::size_t>(kMaxB) * kM.Hi * kM.Di);
    out = DeviceBuffer<bf16>(q.size());
    // Random values in [-2, 2): bf16 pattern for K, V, index-K, the queries; E4M3 for fp8 index-K.
    std::uint64_t seed = 1;
    std::vector<bf16> pat(kPatternBytes / sizeof(bf16));
    std::vector<__nv_fp8_e4m3> pat8(kPatternBytes / 2);
    for (std::size_t i = 0; i < pat.size(); ++i) {
      const float u = static_cast<float>(splitmix(seed) >> 40) * 0x1p-24f * 4.f - 2.f;
      pat[i] = __float2bfloat16_rn(u);
      if (i < pat8.size()) pat8[i] = __nv_fp8_e4m3(u);
    }
    fill_tiled(k.data(), k.bytes(), pat.data(), kPatternBytes);
    // V and the queries start elsewhere in the pattern, so they are not copies of K.
    fill_tiled(v.data(), v.bytes(), pat.data() + pat.size() / 3, kPatternBytes / 2);
    fill_tiled(ik.data(), ik.bytes(), pat.data() + pat.size() / 7, kPatternBytes / 2);
    fill_tiled(ik8.data(), ik8.bytes(), pat8.data(), pat8.size());
    fill_tiled(q.data(), q.bytes(), pat.data() + 12345, q.bytes());
    fill_tiled(iq.data(), iq.bytes(), pat.data() + 54321, iq.bytes());
    pos = DeviceBuffer<std::int64_t>(kMaxB);
    scores = DeviceBuffer<float>(static_cast<std::size_t>(kMaxB) * kM.Hi * (kMaxCtx / kM.BLK));
    sel = DeviceBuffer<std::int32_t>(static_cast<std::size_t>(kMaxB) * kM.Hi * kM.K_blk);
    std::size_t wsb = 0;
    for (int b : {1, kMaxB})
      for (std::int64_t n = 4096; n <= kMaxCtx; n *= 4)
        wsb = std::max({wsb, m3::gpu::attention_dense_workspace_bytes(1, static_cast<int>(n), kA, b),
                        m3::gpu::msa_attention_workspace_bytes(1, kM.K_blk, kA, b)});
    ws = DeviceBuffer<unsigned char>(wsb);
    flush = DeviceBuffer<unsigned char>(std::max<std::size_t>(2 * m3::gpu::device_info().l2_bytes, 1 << 20));
    copy_gbps = measure_copy();
  }

  // Device-to-device copy rate, read + write bytes, best of 5 copies of 1 GiB (inside V: its
  // values stay random, only repeated).
  double measure_copy() {
    const std::size_t n = std::size_t{1} << 30;
    m3::gpu::Event e0, e1;
    float best = 1e30f;
    for (int i = 0; i < 5; ++i) {
      e0.record(stream.get());
      M3_CUDA_CHECK(cudaMemcpyAsync(v.data() + v.size() / 2, v.data(), n, cudaMemcpyDeviceToDevice, stream.get()));
      e1.record(stream.get());
      best = std::min(best, e1.since(e0));
    }
    return 2.0 * n / (best * 1e-3) / 1e9;
  }

  void set_positions(std::int64_t ctx, int b) {
    std::vector<std::int64_t> p(b, ctx - 1);
    pos.upload(p, stream.get());
  }
};

World& world() {
  static World w;
  return w;
}

enum class Op { Dense, Index, IndexFp8, IndexRows16, IndexFp8Rows16, Select, Sparse, Total, TotalFp8, TotalSeparate,
                IndexSelect, IndexSparse };

// Keys the sparse branch attends for a decode query at p = ctx - 1: 15 full blocks + the local
// block's p % BLK + 1 keys, or every key below K_blk blocks.
std::int64_t sparse_keys(std::int64_t ctx) {
  const std::int64_t L = (ctx - 1) / kM.BLK;
  if (L + 1 <= kM.K_blk) return ctx;
  return static_cast<std::int64_t>(kM.K_blk - 1) * kM.BLK + (ctx - 1) % kM.BLK + 1;
}

// Returns whether msa_select_attention fused (Total, TotalFp8), else false.
bool run_op(Op op, World& w, int n, int b, cudaStream_t s) {
  const int nb = n / kM.BLK;
  const auto index = [&](bool fp8) {
    if (fp8) m3::gpu::msa_index_fp8(w.iq.data(), w.ik8.data(), w.pos.data(), 1, n, nb, kM, w.scores.data(), s, b);
    else m3::gpu::msa_index(w.iq.data(), w.ik.data(), w.pos.data(), 1, n, nb, kM, w.scores.data(), s, b);
  };
  const auto select = [&] { m3::gpu::msa_select(w.scores.data(), w.pos.data(), 1, nb, kM, w.sel.data(), s, b); };
  const auto sparse = [&] {
    m3::gpu::msa_attention(w.q.data(), w.k.data(), w.v.data(), w.pos.data(), w.sel.data(), 1, n, kM.BLK, kM.K_blk, kA,
                           w.out.data(), s, w.ws.data(), w.ws.size(), b);
  };
  bool fused = false;
  const auto select_sparse = [&] {
    fused = m3::gpu::msa_select_attention(w.scores.data(), nb, kM, w.q.data(), w.k.data(), w.v.data(), w.pos.data(), 1,
                                          n, kA, w.sel.data(), w.out.data(), s, w.ws.data(), w.ws.size(), b);
  };
  switch (op) {
    case Op::Dense:
      m3::gpu::attention_dense(w.q.data(), w.k.data(), w.v.data(), w.pos.data(), 1, n, kA, w.out.data(), s, w.ws.data(),
                               w.ws.size(), b);
      break;
    case Op::Index: index(false); break;
    case Op::IndexFp8: index(true); break;
    case Op::IndexRows16: index(false); break;  // the row tile is set by bench()
    case Op::IndexFp8Rows16: index(true); break;
    case Op::Select: select(); break;
    case Op::Sparse: sparse(); break;
    case Op::Total: index(false); select_sparse(); break;
    case Op::TotalFp8: index(true); select_sparse(); break;
    case Op::TotalSeparate: index(false); select(); sparse(); break;
    case Op::IndexSelect: index(false); select(); break;
    case Op::IndexSparse: index(false); sparse(); break;
  }
  return fused;
}

void bench(benchmark::State& state, Op op) {
  if (m3::gpu::device_count() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const int n = static_cast<int>(state.range(0)), b = static_cast<int>(state.range(1));
  World& w = world();
  cudaStream_t s = w.stream.get();
  w.set_positions(n, b);
  // Inputs of the later stages (scores, selection) from one full pass.
  const bool fused = run_op(Op::Total, w, n, b, s);
  if (op == Op::Total || op == Op::TotalFp8) state.counters["fused"] = fused ? 1 : 0;
  w.stream.sync();
  m3::gpu::Event e0, e1;
  struct TileReset {  // BM_MsaIndex[Fp8]Rows16 set the row tile for their own iterations only
    ~TileReset() { m3::gpu::detail::set_index_row_tile(m3::gpu::detail::IndexRowTile::Auto); }
  } tile_reset;
  if (op == Op::IndexRows16 || op == Op::IndexFp8Rows16)
    m3::gpu::detail::set_index_row_tile(m3::gpu::detail::IndexRowTile::Rows16);
  const char* l2 = std::getenv("M3_BENCH_L2");
  const bool flush = l2 == nullptr || std::string_view(l2) != "warm";
  if (!flush) state.SetLabel("L2 warm (M3_BENCH_L2=warm)");
  for (auto _ : state) {
    if (flush) M3_CUDA_CHECK(cudaMemsetAsync(w.flush.data(), 0, w.flush.bytes(), s));  // evict the caches from L2
    e0.record(s);
    run_op(op, w, n, b, s);
    e1.record(s);
    state.SetIterationTime(e1.since(e0) * 1e-3);
  }
  const double nn = n, bb = b, keys = static_cast<double>(sparse_keys(n));
  const double dense_bytes = bb * kA.Hkv * 2.0 * kA.D * nn * 2.0;
  const double dense_flops = bb * 4.0 * kA.Hq * kA.D * nn;
  const double index_flops = bb * 2.0 * kM.Hi * kM.Di * nn;
  const double sparse_bytes = bb * kA.Hkv * 2.0 * kA.D * keys * 2.0;
  const double sparse_flops = bb * 4.0 * kA.Hq * kA.D * keys;
  const double select_bytes = bb * kM.Hi * (nn / kM.BLK) * 4.0;
  double bytes = 0, flops = 0;
  switch (op) {
    case Op::Dense: bytes = dense_bytes; flops = dense_flops; break;
    case Op::Index:
    case Op::IndexRows16: bytes = bb * nn * kM.Di * 2.0; flops = index_flops; break;
    case Op::IndexFp8:
    case Op::IndexFp8Rows16: bytes = bb * nn * kM.Di * 1.0; flops = index_flops; break;
    case Op::Select: bytes = select_bytes; break;
    case Op::Sparse: bytes = sparse_bytes; flops = sparse_flops; break;
    case Op::Total:
    case Op::TotalSeparate: bytes = bb * nn * kM.Di * 2.0 + sparse_bytes; flops = index_flops + sparse_flops; break;
    case Op::TotalFp8: bytes = bb * nn * kM.Di * 1.0 + sparse_bytes; flops = index_flops + sparse_flops; break;
    case Op::IndexSelect: bytes = bb * nn * kM.Di * 2.0; flops = index_flops; break;
    case Op::IndexSparse: bytes = bb * nn * kM.Di * 2.0 + sparse_bytes; flops = index_flops + sparse_flops; break;
  }
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  if (flops > 0)
    state.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["frac_copy"] =
      benchmark::Counter(bytes * 1e-9 / w.copy_gbps, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["copy_GB/s"] = w.copy_gbps;
}

void BM_AttentionDense(benchmark::State& s) { bench(s, Op::Dense); }
void BM_MsaIndex(benchmark::State& s) { bench(s, Op::Index); }
void BM_MsaIndexFp8(benchmark::State& s) { bench(s, Op::IndexFp8); }
void BM_MsaIndexRows16(benchmark::State& s) { bench(s, Op::IndexRows16); }
void BM_MsaIndexFp8Rows16(benchmark::State& s) { bench(s, Op::IndexFp8Rows16); }
void BM_MsaSelect(benchmark::State& s) { bench(s, Op::Select); }
void BM_MsaAttention(benchmark::State& s) { bench(s, Op::Sparse); }
void BM_MsaTotal(benchmark::State& s) { bench(s, Op::Total); }
void BM_MsaTotalFp8(benchmark::State& s) { bench(s, Op::TotalFp8); }
void BM_MsaTotalSeparate(benchmark::State& s) { bench(s, Op::TotalSeparate); }
void BM_MsaIndexSelect(benchmark::State& s) { bench(s, Op::IndexSelect); }
void BM_MsaIndexSparse(benchmark::State& s) { bench(s, Op::IndexSparse); }

void decode_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"ctx", "b"});
  for (int batch : {1, 8})
    for (std::int64_t n = 4096; n <= kMaxCtx; n *= 4) b->Args({n, batch});
  b->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.05)->Repetitions(5)->ReportAggregatesOnly(true);
}

}  // namespace

BENCHMARK(BM_AttentionDense)->Apply(decode_args);
BENCHMARK(BM_MsaIndex)->Apply(decode_args);
BENCHMARK(BM_MsaIndexFp8)->Apply(decode_args);
BENCHMARK(BM_MsaIndexRows16)->Apply(decode_args);
BENCHMARK(BM_MsaIndexFp8Rows16)->Apply(decode_args);
BENCHMARK(BM_MsaSelect)->Apply(decode_args);
BENCHMARK(BM_MsaAttention)->Apply(decode_args);
BENCHMARK(BM_MsaTotal)->Apply(decode_args);
BENCHMARK(BM_MsaTotalFp8)->Apply(decode_args);
BENCHMARK(BM_MsaTotalSeparate)->Apply(decode_args);
BENCHMARK(BM_MsaIndexSelect)->Apply(decode_args);
BENCHMARK(BM_MsaIndexSparse)->Apply(decode_args);
