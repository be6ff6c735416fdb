// linear: y = x W^T, the projection every layer is made of (nn.Linear without bias).
#pragma once

#include "reference/tensor.h"

namespace m3::ref {

// x [R, in], w [out, in] (checkpoint layout) -> y [R, out]. Throws std::invalid_argument when
// x.cols() != w.cols(). y is resized.
template <class T>
void linear(const Mat<T>& x, const Mat<T>& w, Mat<T>& y);

}  // namespace m3::ref
