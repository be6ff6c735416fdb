// The GPU memory plan (DESIGN §6): every byte the forward pass will allocate, computed from the
// config, the batch and the context before any allocation; printed on request; a plan that does
// not fit fails with needed vs free bytes, naming the largest items.
#pragma once

#include "reference/config.h"

#include <cstdint>
#include <string>
#include <vector>

namespace m3::gpu {

struct MemoryItem {
  std::string name;
  std::uint64_t bytes = 0;
};

struct MemoryPlan {
  std::vector<MemoryItem> items;
  std::uint64_t total() const;
  // One line per item with MiB and share, then the total.
  std::string describe() const;
};

struct PlanRequest {
  int batch = 1;                   // sequences
  std::int64_t context = 0;        // tokens per sequence the caches must hold (pages of BLK)
  std::int64_t chunk_tokens = 0;   // tokens in flight per forward call (prefill chunk x batch)
  int weight_bytes = 2;            // bf16 weights
  int cache_bytes = 2;             // bf16 K/V cache
  int index_cache_bytes = 2;       // bf16 (2) or fp8 E4M3 (1) index-K cache
  bool with_experts = true;        // false: attention-only plans (cost study layers)
};

MemoryPlan plan_memory(const ModelConfig& cfg, const PlanRequest& r);

// Throws GpuError "needs X GiB, Y GiB free on device d: <largest items>" when the plan is larger
// than the device's free memory minus `reserve_bytes` (cuBLAS workspaces, the CUDA context).
void check_fits(const MemoryPlan& plan, int device, std::uint64_t reserve_bytes = std::uint64_t{1} << 30);

}  // namespace m3::gpu
