// QK-norm + partial NeoX RoPE (spec §2.3, §3.2): per-head Gemma RMSNorm, then rotation of the first
// R channels of each head by the token's absolute position; channels [R, d) pass through.
//   for i in 0..R/2-1:  a = p * theta^(-2i/R)
//     x[i]     = x[i] cos a - x[i+R/2] sin a
//     x[i+R/2] = x[i+R/2] cos a + x[i] sin a
// Angles, cos and sin are computed in fp64 (p reaches 2^20, where fp32 angles lose ~0.06 rad).
#pragma once

#include "reference/tensor.h"

#include <cstdint>
#include <span>

namespace m3::ref {

// x [T, n_heads*d] rotated in place; positions [T]. R even, 0 <= R <= d.
template <class T>
void rope_neox(Mat<T>& x, int n_heads, int d, int R, double theta,
               std::span<const std::int64_t> positions);

// y = rope_neox(rms_norm_heads(x, w)); x [T, n_heads*d], w [d], positions [T] -> y [T, n_heads*d].
template <class T>
void qk_norm_rope(const Mat<T>& x, int n_heads, int d, const Vec<T>& w, double eps, int R,
                  double theta, std::span<const std::int64_t> positions, Mat<T>& y);

}  // namespace m3::ref
