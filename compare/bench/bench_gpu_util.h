// Helpers shared by the GPU benchmarks (compare/bench/bench_gpu_*.cpp, one binary).
#pragma once

#include "gpu/runtime/buffer.h"
#include "gpu/runtime/device.h"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <type_traits>
#include <vector>

namespace m3::bench {

// False (and the benchmark marked skipped with the reason) where no CUDA device is visible: the
// binary also runs in CI, which has none.
inline bool have_gpu(benchmark::State& state) {
  if (m3::gpu::device_count() > 0) return true;
  state.SkipWithError("no CUDA device");
  return false;
}

// Mean seconds of `reps` runs of op between events on s, after two warm-ups.
template <class Op>
double mean_seconds(cudaStream_t s, int reps, Op&& op) {
  for (int i = 0; i < 2; ++i) op();
  m3::gpu::Event e0, e1;
  e0.record(s);
  for (int i = 0; i < reps; ++i) op();
  e1.record(s);
  return e1.since(e0) * 1e-3 / reps;
}

// xorshift64 step: the benches' host generator (fast; timing inputs need no statistical quality).
inline std::uint64_t next_random(std::uint64_t& s) {
  s ^= s << 13, s ^= s >> 7, s ^= s << 17;
  return s;
}

enum class Dist { Uniform, Normal };  // U[-scale, scale) or N(0, scale^2)

// Fills d (bf16 or fp32) with random values: one host block of kBlock values, uploaded once and
// tiled over d by doubling device-to-device copies (drawing 2^30 values on the host would take
// longer than the benchmark). The block's length is odd, so the repetition lines up with no row,
// head or page.
template <class T>
void fill_random(gpu::DeviceBuffer<T>& d, std::uint64_t seed, float scale = 1.f, Dist dist = Dist::Uniform) {
  static_assert(std::is_same_v<T, gpu::bf16> || std::is_same_v<T, float>, "bf16 or fp32 buffers");
  constexpr std::size_t kBlock = (std::size_t{1} << 22) + 4099;
  std::vector<float> f(std::min(kBlock, d.size()));
  if (dist == Dist::Normal) {
    std::mt19937_64 g(seed);
    std::normal_distribution<float> nd(0.f, scale);
    for (auto& x : f) x = nd(g);
  } else {
    std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (auto& x : f) x = scale * static_cast<float>(static_cast<double>(next_random(s) >> 11) * 0x1p-52 - 1.0);
  }
  if constexpr (std::is_same_v<T, gpu::bf16>) {
    const auto b = gpu::to_bf16(f.data(), f.size());
    M3_CUDA_CHECK(cudaMemcpy(d.data(), b.data(), b.size() * sizeof(T), cudaMemcpyHostToDevice));
  } else {
    M3_CUDA_CHECK(cudaMemcpy(d.data(), f.data(), f.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  for (std::size_t done = f.size(); done < d.size();) {
    const std::size_t n = std::min(done, d.size() - done);
    M3_CUDA_CHECK(cudaMemcpy(d.data() + done, d.data(), n * sizeof(T), cudaMemcpyDeviceToDevice));
    done += n;
  }
  // A device-to-device cudaMemcpy returns before the copy is done, on the legacy stream, which does
  // not order the benches' non-blocking streams (gpu::Stream): without this their first launches
  // would race the tiling copies (reading half-filled buffers, sharing DRAM with them).
  M3_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace m3::bench
