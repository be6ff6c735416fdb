// Run files: what `m3h run --out run.h5` writes (DESIGN §7 layout, format "m3h-run"):
//   root attributes  format, schema_version, generator (command line), seed, config (JSON), precision
//   /inputs/tokens   [T] int32            the prompt
//   /decode/tokens   [K] int32            the greedy tokens of the decode steps
//   /logits          [T + K, V] float32   prefill rows, then one row per decode step
//   /trace/<name>    the prefill's intermediates under their DESIGN §1 names (model.h), float32
//                    (float64 in fp64 runs) or int32 for index tensors
#pragma once

#include "reference/model.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace m3 {

inline constexpr const char* kRunFormat = "m3h-run";
inline constexpr std::int64_t kRunSchemaVersion = 1;

// Collects traced tensors of sequence 0 (owned copies), keyed by name.
class TraceRecorder {
 public:
  TraceFn fn();
  struct Tensor {
    TraceView::DType dtype;
    std::int64_t rows = 0, cols = 0;
    std::vector<double> f64;        // F64
    std::vector<float> f32;         // F32
    std::vector<std::int32_t> i32;  // I32
  };
  const std::map<std::string, Tensor>& tensors() const { return t_; }

 private:
  std::map<std::string, Tensor> t_;
};

struct RunRecord {
  std::string generator;  // the command line
  std::uint64_t seed = 0;
  std::string config_json;
  std::string precision;
  std::vector<std::int32_t> prompt;
  std::vector<std::int32_t> generated;
  const MatD* logits = nullptr;          // [T + K, V]
  const TraceRecorder* trace = nullptr;  // optional
};

void write_run_file(const std::string& path, const RunRecord& r);

}  // namespace m3
