// The CPU side of the cost study (issue 5, part 2): one decode token of one real-dimension layer's
// attention on the reference, dense GQA vs MSA (index scoring + top-k selection + block-sparse
// attention), at contexts up to 1M over synthetic caches: wall time and the multiply-adds the
// reference counts, next to the analytic model (reference/cost.h) they must equal exactly.
#pragma once

#include "reference/config.h"
#include "reference/cost.h"
#include "reference/dims.h"
#include "reference/tensor.h"

#include <cstdint>
#include <memory>

namespace m3::study {

struct CpuDecodePoint {
  std::int64_t context = 0;  // n keys; the query sits at position n - 1
  double dense_ms = 0;       // medians over the repetitions
  double index_ms = 0, select_ms = 0, sparse_ms = 0, msa_ms = 0;
  int reps = 0;
  AttnCounter dense_counted, msa_counted;  // one repetition's counts
  AttnCost dense_analytic, msa_analytic;   // attn_cost_at(p = n - 1)
  bool counts_match = false;               // counted multiply-adds == analytic, both layers
  double flops_ratio_counted() const;      // dense / MSA, counted (2 FLOPs a multiply-add)
  double time_ratio() const { return dense_ms / msa_ms; }
};

// Owns fp32 caches for up to max_context keys of one layer of cfg (K, V: max_context x Hkv*D; index-K:
// max_context x Di), random normal, filled once: about max_context * (2*Hkv*D + Di) * 4 bytes
// (4.5 GiB at 1M with M3's dimensions).
class CpuDecodeStudy {
 public:
  CpuDecodeStudy(const ModelConfig& cfg, std::int64_t max_context, std::uint64_t seed);
  ~CpuDecodeStudy();
  // One point; repeats each op until min_reps repetitions or budget_ms of wall time per op.
  CpuDecodePoint measure(std::int64_t context, int min_reps = 3, double budget_ms = 3000) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> p_;
};

}  // namespace m3::study
