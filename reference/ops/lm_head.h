// LM head (spec §2.1): logits = W_lm RMSNorm_final(h), untied from the embedding.
#pragma once

#include "reference/tensor.h"

namespace m3::ref {

// h [T, H], norm_w [H], w [V, H] -> logits [T, V].
template <class T>
void lm_head(const Mat<T>& h, const Vec<T>& norm_w, double eps, const Mat<T>& w, Mat<T>& logits);

}  // namespace m3::ref
