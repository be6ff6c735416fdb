// Selection quality of MSA's index branch (issue 5, part 3), on the CPU reference: how much of the
// dense attention's probability mass the selected blocks cover ("recall of attention mass"), and
// how far the MSA output is from dense attention, as context grows.
//
// One attention layer at op level (post-RoPE q, k, v and index q / k built directly; the ops are
// m3::ref::msa_index, msa_select, msa_attention, attention_dense), sampled query rows at the end
// of the context. Three synthetic patterns:
//   random     q, k, v, index q / k independent normals: the index branch knows nothing about the
//              main branch, as with random (untrained) weights. Recall is what the forced local
//              block and chance give: it tells that the machinery runs, not how good MSA is.
//   retrieval  a few "needle" blocks far back hold keys aligned with the query in both branches
//              (the index branch sees a noisy copy of the main branch's similarity, as a trained
//              indexer is meant to); everything else is noise. Recall should be near the needles'
//              share of the mass, and the output error small.
//   decay      key similarity to the query decays smoothly with distance (a recency bias in both
//              branches): the mass spreads over many recent blocks, so top-16 covers less of it as
//              the context grows: the honest hard case.
// Planted patterns show what the selection CAN achieve when the index agrees with attention; they
// say nothing about whether M3's trained indexer does (the paper reports > 90% of the mass).
#pragma once

#include "reference/dims.h"

#include <cstdint>
#include <string>
#include <vector>

namespace m3::study {

enum class Pattern { RANDOM, RETRIEVAL, DECAY };
const char* pattern_name(Pattern p);
// "random" | "retrieval" | "decay"; throws std::invalid_argument naming the accepted spellings.
Pattern parse_pattern(const std::string& s);

struct QualityPoint {
  Pattern pattern = Pattern::RANDOM;
  std::int64_t context = 0;    // keys N; queries sit at the last positions
  int queries = 0;             // sampled query rows
  double recall_mean = 0;      // mean over (query, head) of the dense mass on the selected blocks
  double recall_min = 0;
  double recall_p10 = 0;       // 10th percentile
  double local_mass_mean = 0;  // mass on the query's own block alone (what selection adds to)
  double out_rel_l2 = 0;       // ||MSA out - dense out|| / ||dense out|| over the sampled rows
  double ms = 0;               // wall time of the point
};

struct QualityOptions {
  AttnDims attn{64, 4, 128};                 // M3's heads
  MsaDims msa{4, 128, 128, 16, 1, 0};        // M3's index branch
  int queries = 8;
  int needles = 4;                           // retrieval: needle blocks
  double needle_strength = 4.0;              // retrieval: logit gain of a needle key over noise
  double decay_tokens = 4096;                // decay: e-folding distance of the similarity
  std::uint64_t seed = 1;
};

// One point: context N, pattern p. Memory ~ N * (2*Hkv*D + Di) floats.
QualityPoint measure_quality(Pattern p, std::int64_t context, const QualityOptions& o);

}  // namespace m3::study
