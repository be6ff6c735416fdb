// linear: y = x W^T (nn.Linear without bias) as one Eigen GEMM. The checkpoint layout w [out, in]
// is kept as is: the product reads W^T through Eigen's transpose view, no copy.
#include "reference/ops/linear.h"

#include <fmt/format.h>

#include <stdexcept>

namespace m3::ref {

template <class T>
void linear(const Mat<T>& x, const Mat<T>& w, Mat<T>& y) {
  if (x.cols() != w.cols())
    throw std::invalid_argument(fmt::format(
        "linear: x has {} columns, expected w.cols() = in = {} (w is [out, in] = [{}, {}])",
        x.cols(), w.cols(), w.rows(), w.cols()));
  // noalias() skips Eigen's temporary, which is only correct when y is neither operand; a caller
  // writing y over x (or w) gets the product through a temporary instead of garbage.
  if (&y == &x || &y == &w) {
    Mat<T> tmp(x.rows(), w.rows());  // [R, out]
    tmp.noalias() = x * w.transpose();
    y.swap(tmp);
    return;
  }
  y.resize(x.rows(), w.rows());  // [R, out]
  y.noalias() = x * w.transpose();
}

template void linear<float>(const Mat<float>&, const Mat<float>&, Mat<float>&);
template void linear<double>(const Mat<double>&, const Mat<double>&, Mat<double>&);

}  // namespace m3::ref
