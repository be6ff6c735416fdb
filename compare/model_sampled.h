// Sampled-row checking of an engine's whole forward pass from its own inputs (DESIGN §4: "at long
// context the reference checks sampled query rows"). Where a reference forward is out of reach on
// the CPU (m3-layer at 32K-1M tokens: the projections alone are ~10^15 FLOPs), every op of every
// layer is recomputed by the bf16-emulating reference for a few query rows only, each from the
// engine's own traced inputs: projections and norms from its attn_norm / ffn_norm rows, block
// scores and attention of those rows against its whole traced K, V and index-K caches, the
// selection from its own block scores, the MoE from its own experts, the residual stream from its
// previous layer's output. An op then differs from its reference only by its own arithmetic, so
// every tensor gets the op's own tier of compare/tolerance.h (no drift allowance is needed), and
// index outputs must be exact or a near-tie.
//
// The rows: the first two and last two, the edges of the first blocks and of the top-k window
// (BLK-1, BLK, K_blk*BLK - 1, K_blk*BLK, +1), the middle, and n_random seeded uniform ones;
// the result records which.
#pragma once

#include "compare/model_compare.h"

#include <cstdint>
#include <vector>

namespace m3::cmp {

struct SampledComparison {
  std::vector<std::int64_t> rows;    // prompt positions checked, ascending
  std::vector<TensorCheck> tensors;  // per op and layer, forward order; vs_ref = engine vs reference rows
  bool pass() const;
};

// Deterministic rows of a T-token prompt (see the file comment); every row < T, ascending, unique.
std::vector<std::int64_t> sample_rows(const ModelConfig& cfg, std::int64_t T, int n_random, std::uint64_t seed);

// Checks `test` (an engine's prefill trace of `prompt`, DESIGN §1 names) on `rows`. fp8_index_cache:
// the engine scored blocks against an E4M3 index-K cache (its traced idx_k stays bf16), so the
// reference rounds the traced keys with round_e4m3 before scoring. Throws std::invalid_argument for
// a row outside the prompt or a trace whose shapes do not fit cfg.
SampledComparison check_sampled_rows(const ModelConfig& cfg, const ModelWeights<float>& w,
                                     const std::vector<std::int32_t>& prompt, const EngineRun& test,
                                     const std::vector<std::int64_t>& rows, bool fp8_index_cache = false);

}  // namespace m3::cmp
