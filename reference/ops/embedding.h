// embedding: h0 = Embed[token] (spec §2.1; no sqrt(H) scaling).
#pragma once

#include "reference/tensor.h"

#include <cstdint>
#include <span>

namespace m3::ref {

// table [V, H], tokens [T] -> out [T, H]. Throws std::out_of_range naming the position and the id
// of the first token outside [0, V).
template <class T>
void embedding(const Mat<T>& table, std::span<const std::int32_t> tokens, Mat<T>& out);

}  // namespace m3::ref
