// MSA top-k block selection on the GPU, twin of m3::ref::msa_select (reference/ops/msa_select.h),
// bit-exact: per (query, index head) row with L = floor(p_t/BLK) the own block,
//   forced F = {0 .. init_blocks-1} u {L-local_blocks+1 .. L}, clipped to [0, L];
//   the K_blk - |F| best non-forced visible blocks under score descending, then block id
//   ascending, NaN as -inf (and -0 == +0, as the reference's float comparison has it);
//   row = chosen non-forced in that order, then F ascending, then -1 padding.
// The scores become 32-bit keys whose unsigned order is the tie rule's score order; (key, id) as
// one 64-bit value is then a strict total order, the one both paths rank on. Only blocks 0..L of
// a row are read. Two kernels, bit-identical results:
// - single CTA a row (many rows: prefill, large batches): a 4-pass radix select (8 bits a pass)
//   finds the k-th key tau; the keys below tau and the first (by block id) of those equal to tau
//   are the chosen set, which is then ranked exactly on (key, id).
// - split (few rows, rows * 4 <= SMs, e.g. decode batch 1 to 8: a handful of CTAs would leave the
//   GPU idle): P <= 8 CTAs a row, one thread-block cluster. Each CTA takes a contiguous chunk of
//   the row's non-forced visible blocks and finds the chunk's best k under (key, id) (a radix
//   select that stops once the threshold digit's bin holds <= 64 keys, then ranks that bin); it
//   writes them into the shared memory of the cluster's CTA 0, which ranks the <= P*k candidates
//   and writes the row. Exact: the row's best k lie in the union of the chunks' best k. No global
//   workspace and no state between launches (distributed shared memory + cluster barriers), so
//   concurrent launches on any streams and devices are safe. Needs K_blk <= 64, NB <= 32768.
//
// Both are launched as programmatic dependents (PDL) of the kernel before them (msa_index lets
// them launch early) and wait for that grid before reading the scores.
// Batching: B sequences of T queries; q_pos rows b*T + t; scores and sel rows (b*Hi + i)*T + t
// (the reference's layouts per sequence). A position < 0 or with floor(p/BLK) >= NB (its own
// block has no score column) is a precondition violation the device cannot throw on: its rows
// are all -1 (msa_attention then writes NaN for them).
#pragma once

#include "gpu/runtime/buffer.h"
#include "reference/dims.h"

#include <cstdint>

namespace m3::gpu {

// scores [B*Hi*T, NB] fp32, q_pos [B*T] -> sel [B*Hi*T, K_blk] int32.
// Limit: 4*NB + 8*K_blk bytes of shared memory a CTA (NB <= ~56K blocks on Hopper) where the
// single-CTA path runs, else GpuError.
void msa_select(const float* scores, const std::int64_t* q_pos, int T, int NB, const MsaDims& dims,
                std::int32_t* sel, cudaStream_t s, int B = 1);

namespace detail {

// Throws GpuError unless the dims, sizes and pointers suit msa_select (op names the caller).
void check_select_args(const char* op, const float* scores, const std::int64_t* q_pos, int T, int NB,
                       const MsaDims& d, const std::int32_t* sel, int B);

// Which kernel msa_select runs; Auto is msa_select's own choice. Tests force each path to check
// that they agree bit for bit. Split throws GpuError unless K_blk <= 64 and NB <= 32768.
enum class SelectPath { Auto, SingleCta, Split };
void msa_select_path(const float* scores, const std::int64_t* q_pos, int T, int NB, const MsaDims& dims,
                     std::int32_t* sel, cudaStream_t s, int B, SelectPath path);

}  // namespace detail

}  // namespace m3::gpu
