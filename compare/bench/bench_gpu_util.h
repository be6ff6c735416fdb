// Helpers shared by the GPU benchmarks (compare/bench/bench_gpu_*.cpp, one binary).
#pragma once

#include "gpu/runtime/buffer.h"
#include "gpu/runtime/device.h"

#include <benchmark/benchmark.h>

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

}  // namespace m3::bench
