// Embedding gather on the GPU, twin of m3::ref::embedding (reference/ops/embedding.h):
//   out[t, :] = table[tokens[t], :]   (spec §2.1: no sqrt(H) scaling; a bit-exact copy of bf16 rows)
//
// Out-of-range ids. The tokens live on the device, so the launcher cannot check them without a
// synchronizing copy. The design: the model validates ids on the host, where they come from
// (check_token_ids below, the same std::out_of_range as the reference), and the kernel is robust
// on its own: a row whose id lies outside [0, V) is never read; it is written as NaN (bf16 0xFFFF)
// so that the bad token poisons everything downstream instead of silently aliasing another row.
#pragma once

#include "gpu/runtime/buffer.h"

#include <cstddef>
#include <cstdint>

namespace m3::gpu {

// table [V, H], tokens [T] (device, int32) -> out [T, H]. out must not overlap table.
void embedding(const bf16* table, const std::int32_t* tokens, int T, int V, int H, bf16* out, cudaStream_t s);

// Host-side check of token ids before they are uploaded: throws std::out_of_range naming the
// position and the id of the first token outside [0, V) (the reference's message).
// (Pointer + count, not std::span: .cu files are C++17.)
void check_token_ids(const std::int32_t* tokens, std::size_t T, int V);

}  // namespace m3::gpu
