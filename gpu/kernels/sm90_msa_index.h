// MSA index block scores of a prompt chunk on Hopper (sm_90a): wgmma with operands in shared memory,
// loaded by TMA. The same contract as gpu::msa_index (msa_index.h), the twin of m3::ref::msa_index,
// for one sequence whose T queries sit at positions p0..p0+T-1:
//   s_i(t, j) = qI_i(t) . kI(j)   (bf16 products, fp32 accumulation; no scale)
//   S_i(t, b) = max over j in block b with j <= p0+t of s_i(t, j), NaN-propagating;
//               -inf for the blocks b > (p0+t)/BLK, up to column NB - 1 (every column is written).
// Why a second kernel: msa_index scores 16 (query, head) rows a CTA, which suits decode (a few rows
// against a long cache, bound by the cache read) but re-reads each index-K tile from L2 for every 16
// rows in prefill, where the work is a [Hi*T, Di] x [Di, N] GEMM with a block-max epilogue: it ran
// at ~64 TFLOP/s on an H200 at 1M tokens (2026-11-29), 8.7 of MSA's 10.7 s of prefill attention.
// Here a CTA holds 64 queries x 4 index heads (256 rows) against each 128-key tile (= one block, so
// the block max is a row max of one accumulator tile), 4 consumer warpgroups (one head each) and a
// TMA producer.
//
// Short chunks (few query tiles) split the key blocks over several CTAs: a block max needs no merge,
// each CTA writes its own columns.
// Measured (bench_gpu, H200): see reports/gpu/README.md.
#pragma once

#include "gpu/runtime/buffer.h"
#include "reference/dims.h"

#include <cstdint>

namespace m3::gpu {

// True when the current device can run sm90_msa_index (compute capability 9.0, sm_90a build).
bool sm90_msa_index_available();

// idx_q [T, Hi*Di] bf16 (query t at position p0 + t), idx_k [N, Di] bf16 (row j = position j,
// contiguous) -> scores [Hi*T, NB] fp32, row i*T + t. Requires Di = 128, BLK = 128, Hi >= 1,
// p0 >= 0, T >= 0, p0 + T <= N, NB >= ceil(N / BLK), 16-byte aligned idx_q and idx_k, and
// sm90_msa_index_available(); throws GpuError otherwise. Only keys 0..p0+T-1 are read. T = 0
// launches nothing.
void sm90_msa_index(const bf16* idx_q, const bf16* idx_k, std::int64_t p0, int T, int N, int NB, const MsaDims& dims,
                    float* scores, cudaStream_t s);

}  // namespace m3::gpu
