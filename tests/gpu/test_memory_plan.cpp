// The GPU memory plan: its arithmetic against the spec's sizes (no GPU needed for those), and the
// refusal message on a real device when the plan cannot fit.
#include "gpu/runtime/memory_plan.h"
#include "tests/gpu/gpu_test_util.h"

using namespace m3;

namespace {
std::uint64_t item(const gpu::MemoryPlan& p, const std::string& name) {
  for (const auto& i : p.items)
    if (i.name == name) return i.bytes;
  ADD_FAILURE() << "no item " << name;
  return 0;
}
}  // namespace

TEST(MemoryPlan, M3SizesMatchTheSpec) {
  const auto cfg = preset("m3");
  gpu::PlanRequest r;
  r.context = 1 << 20;
  const auto p = gpu::plan_memory(cfg, r);
  // spec §3.7: 137472 bytes of K/V + index-K per token in bf16 -> 134.25 GiB at 2^20 tokens.
  EXPECT_EQ(item(p, "KV cache") + item(p, "index-K cache"), std::uint64_t{137472} << 20);
  // spec §1.3: 426.2B text parameters -> ~852 GB of bf16 weights (the router in fp32 adds 0.03 GB).
  std::uint64_t weights = 0;
  for (const char* n : {"embedding + LM head", "attention weights", "MSA index weights", "dense MLP + shared experts",
                        "router (fp32)", "routed experts"})
    weights += item(p, n);
  EXPECT_NEAR(weights / 1e9, 852.5, 0.5);
  r.index_cache_bytes = 1;  // fp8 index-K halves that cache
  EXPECT_EQ(item(gpu::plan_memory(cfg, r), "index-K cache") * 2, item(p, "index-K cache"));
  EXPECT_NE(p.describe().find("total"), std::string::npos);
}

TEST(MemoryPlan, RefusesWhatDoesNotFitBeforeAllocating) {
  M3_REQUIRE_GPU();
  gpu::PlanRequest r;
  r.context = 1 << 20;
  const auto p = gpu::plan_memory(preset("m3"), r);
  try {
    gpu::check_fits(p, 0);
    FAIL() << "the whole m3 model fit one card?";
  } catch (const gpu::GpuError& e) {
    const std::string s = e.what();
    EXPECT_NE(s.find("needs"), std::string::npos) << s;
    EXPECT_NE(s.find("free on device 0"), std::string::npos) << s;
    EXPECT_NE(s.find("routed experts"), std::string::npos) << s;
  }
  gpu::PlanRequest small;
  small.context = 4096;
  EXPECT_NO_THROW(gpu::check_fits(gpu::plan_memory(preset("tiny"), small), 0));
}
