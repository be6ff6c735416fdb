// GPU memory plan (memory_plan.h).
#include "gpu/runtime/memory_plan.h"

#include "gpu/runtime/check.h"

#include <algorithm>
#include <cstdio>

namespace m3::gpu {

std::uint64_t MemoryPlan::total() const {
  std::uint64_t t = 0;
  for (const auto& i : items) t += i.bytes;
  return t;
}

std::string MemoryPlan::describe() const {
  std::string s;
  char buf[256];
  const double tot = static_cast<double>(total());
  for (const auto& i : items) {
    std::snprintf(buf, sizeof buf, "  %-28s %12.1f MiB  %5.1f%%\n", i.name.c_str(), i.bytes / 1048576.0,
                  tot > 0 ? 100.0 * i.bytes / tot : 0.0);
    s += buf;
  }
  std::snprintf(buf, sizeof buf, "  %-28s %12.1f MiB\n", "total", tot / 1048576.0);
  return s + buf;
}

MemoryPlan plan_memory(const ModelConfig& c, const PlanRequest& r) {
  using u64 = std::uint64_t;
  const u64 H = c.hidden_size, D = c.head_dim, Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;
  const u64 V = c.vocab_size, Hi = c.index_n_heads, Di = c.index_head_dim;
  const u64 L = c.num_hidden_layers, L_msa = c.num_layers_of(AttnType::MSA);
  const u64 wb = r.weight_bytes;
  MemoryPlan p;
  // Weights (bf16; the router and its bias fp32 as in the checkpoint).
  u64 attn = 0, index = 0, mlp = 0, router = 0, experts = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    attn += (2 * Hq * D * H + 2 * Hkv * D * H + 2 * D + 2 * H) * wb;
    if (c.layer_types[l] == AttnType::MSA) index += ((Hi + 1) * Di * H + 2 * Di) * wb;
    if (c.mlp_layer_types[l] == MlpType::DENSE) {
      mlp += 3 * H * u64(c.dense_intermediate_size) * wb;
    } else {
      router += u64(c.num_local_experts) * (H + 1) * 4;
      if (r.with_experts) experts += u64(c.num_local_experts) * 3 * H * u64(c.intermediate_size) * wb;
      mlp += u64(c.n_shared_experts > 0) * 3 * H * u64(c.shared_intermediate_size) * wb;
    }
  }
  p.items.push_back({"embedding + LM head", (2 * V * H + H) * wb});
  p.items.push_back({"attention weights", attn});
  p.items.push_back({"MSA index weights", index});
  p.items.push_back({"dense MLP + shared experts", mlp});
  p.items.push_back({"router (fp32)", router});
  p.items.push_back({"routed experts", experts});
  // Caches in whole pages of BLK tokens (= one MSA block a page).
  const u64 blk = std::max(1, c.index_block_size);
  const u64 pages = (u64(r.context) + blk - 1) / blk;
  const u64 slots = pages * blk * u64(r.batch);
  p.items.push_back({"KV cache", slots * L * 2 * Hkv * D * u64(r.cache_bytes)});
  p.items.push_back({"index-K cache", slots * L_msa * Di * u64(r.index_cache_bytes)});
  // Activations of one forward call: the widest per-token buffers alive at once (residual, norm,
  // q|k|v|idx_q|idx_k, attention out, MLP intermediates), fp32 block scores of a decode chunk.
  const u64 T = std::max<std::int64_t>(r.chunk_tokens, 1);
  const u64 I_max = std::max<u64>({u64(c.dense_intermediate_size),
                                   u64(c.intermediate_size) * u64(std::max(1, c.num_experts_per_tok)),
                                   u64(c.shared_intermediate_size)});
  const u64 per_token = (3 * H + (Hq + 2 * Hkv) * D + (Hi + 1) * Di + Hq * D + 2 * I_max) * 2 + V * 4;
  p.items.push_back({"activations", T * per_token});
  p.items.push_back({"block scores (fp32)", T * Hi * pages * 4});
  return p;
}

void check_fits(const MemoryPlan& plan, int device, std::uint64_t reserve) {
  size_t free_b = 0, total_b = 0;
  int cur = 0;
  M3_CUDA_CHECK(cudaGetDevice(&cur));
  M3_CUDA_CHECK(cudaSetDevice(device));
  M3_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  M3_CUDA_CHECK(cudaSetDevice(cur));
  const std::uint64_t need = plan.total() + reserve;
  if (need <= free_b) return;
  auto items = plan.items;
  std::sort(items.begin(), items.end(), [](auto& a, auto& b) { return a.bytes > b.bytes; });
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "memory plan needs %.2f GiB (%.2f GiB planned + %.2f GiB reserve), %.2f GiB free on device %d "
                "(of %.2f); largest: %s %.2f GiB, %s %.2f GiB",
                need / 1073741824.0, plan.total() / 1073741824.0, reserve / 1073741824.0, free_b / 1073741824.0,
                device, total_b / 1073741824.0, items[0].name.c_str(), items[0].bytes / 1073741824.0,
                items[1].name.c_str(), items[1].bytes / 1073741824.0);
  throw GpuError(buf);
}

}  // namespace m3::gpu
