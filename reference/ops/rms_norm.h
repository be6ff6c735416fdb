// Gemma RMSNorm (spec §2.2): y = x * rsqrt(mean(x^2) + eps) * (1 + w), the mean of squares
// accumulated in fp64 whatever T is.
#pragma once

#include "reference/tensor.h"

namespace m3::ref {

// x [R, C], w [C] -> y [R, C]; one normalization per row. y may alias x.
template <class T>
void rms_norm(const Mat<T>& x, const Vec<T>& w, double eps, Mat<T>& y);

// Per-head variant (QK-norm, index norms): x [R, n_heads*d], w [d] shared by all heads;
// each (row, head) slice of d values is normalized on its own. y may alias x.
template <class T>
void rms_norm_heads(const Mat<T>& x, int n_heads, const Vec<T>& w, double eps, Mat<T>& y);

}  // namespace m3::ref
