// MSA top-k block selection on the GPU, twin of m3::ref::msa_select (reference/ops/msa_select.h),
// bit-exact: per (query, index head) row with L = floor(p_t/BLK) the own block,
//   forced F = {0 .. init_blocks-1} u {L-local_blocks+1 .. L}, clipped to [0, L];
//   the K_blk - |F| best non-forced visible blocks under score descending, then block id
//   ascending, NaN as -inf (and -0 == +0, as the reference's float comparison has it);
//   row = chosen non-forced in that order, then F ascending, then -1 padding.
// One CTA per row: the scores become 32-bit keys whose unsigned order is the tie rule's score
// order; a 4-pass radix select (8 bits a pass) finds the k-th key tau; the keys below tau and the
// first (by block id) of those equal to tau are the chosen set, which is then ranked exactly on
// (key, id). Only blocks 0..L of a row are read.
//
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
// Limit: 4*NB + 8*K_blk bytes of shared memory a CTA (NB <= ~56K blocks on Hopper), else GpuError.
void msa_select(const float* scores, const std::int64_t* q_pos, int T, int NB, const MsaDims& dims,
                std::int32_t* sel, cudaStream_t s, int B = 1);

}  // namespace m3::gpu
