// The one dimension vocabulary of m3-harness (DESIGN §1). Every shape comment in reference/, gpu/,
// compare/ and tests/ uses these letters; nothing else defines them.
//
//   T      tokens processed in one call (prefill chunk length, or 1 per sequence in decode)
//   N      context: keys in the cache a query may see (positions 0..N-1)
//   H      hidden size (residual stream width)
//   Hq     query heads                Hkv  key/value heads (GQA groups); G = Hq / Hkv heads a group
//   D      head dim (q, k, v)         R    rotary dims (first R of D rotated, NeoX split-half)
//   Hi     MSA index heads (== Hkv)   Di   MSA index head dim
//   BLK    MSA block size (tokens)    NB   visible blocks = floor(max position / BLK) + 1
//   K_blk  MSA selected blocks per (query, group), the forced local block included
//   E      routed experts             K_e  experts per token
//   I      expert (and shared expert) intermediate width; I_d dense-MLP intermediate width
//   V      vocabulary
#pragma once

#include <cstdint>

namespace m3 {

// Geometry of one attention call. Kept apart from ModelConfig so that ops can be tested on
// shapes no preset has (odd head counts, D = 1, ...).
struct AttnDims {
  int Hq = 0;   // query heads
  int Hkv = 0;  // key/value heads; Hq % Hkv == 0
  int D = 0;    // head dim
};

// Geometry of the MSA index branch and selection.
struct MsaDims {
  int Hi = 0;            // index heads; == Hkv (one selection per GQA group)
  int Di = 0;            // index head dim
  int BLK = 0;           // block size in tokens
  int K_blk = 0;         // blocks selected per (query, group), forced blocks included
  int local_blocks = 1;  // trailing blocks always selected (the query's own block = 1)
  int init_blocks = 0;   // leading blocks always selected (M3: 0)
};

// Multiply-adds an attention op actually executed (DESIGN §5 "counted"). One MAC = 2 FLOPs.
struct AttnCounter {
  std::uint64_t qk_macs = 0;     // main branch q.k products, summed over heads
  std::uint64_t pv_macs = 0;     // main branch p*v products, summed over heads
  std::uint64_t index_macs = 0;  // index branch qI.kI products, summed over index heads
  std::uint64_t select_candidates = 0;  // block scores examined by top-k (kept apart from FLOPs)
  void reset() { *this = AttnCounter{}; }
  AttnCounter& operator+=(const AttnCounter& o) {
    qk_macs += o.qk_macs; pv_macs += o.pv_macs; index_macs += o.index_macs;
    select_candidates += o.select_candidates;
    return *this;
  }
};

}  // namespace m3
