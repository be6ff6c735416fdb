// LM head (spec §2.1): logits = W_lm RMSNorm_final(h); the weight is untied from the embedding.
#include "reference/ops/lm_head.h"

#include "reference/ops/linear.h"
#include "reference/ops/rms_norm.h"

#include <fmt/format.h>

#include <stdexcept>

namespace m3::ref {

template <class T>
void lm_head(const Mat<T>& h, const Vec<T>& norm_w, double eps, const Mat<T>& w, Mat<T>& logits) {
  // Checked here so that the messages name lm_head and its arguments, not the inner ops.
  if (norm_w.size() != h.cols())
    throw std::invalid_argument(fmt::format(
        "lm_head: norm_w has {} elements, expected h.cols() = H = {}", norm_w.size(), h.cols()));
  if (w.cols() != h.cols())
    throw std::invalid_argument(fmt::format(
        "lm_head: w has {} columns, expected H = h.cols() = {} (w is [V, H])", w.cols(), h.cols()));
  Mat<T> normed;  // [T, H]
  rms_norm(h, norm_w, eps, normed);
  linear(normed, w, logits);  // [T, V]
}

template void lm_head<float>(const Mat<float>&, const Vec<float>&, double, const Mat<float>&,
                             Mat<float>&);
template void lm_head<double>(const Mat<double>&, const Vec<double>&, double, const Mat<double>&,
                              Mat<double>&);

}  // namespace m3::ref
