// embedding: h0 = Embed[token], a row gather from the table (spec §2.1: no sqrt(H) scaling).
// Every id is checked before any row is written, so a bad id leaves out untouched.
#include "reference/ops/embedding.h"

#include <fmt/format.h>

#include <stdexcept>

namespace m3::ref {

template <class T>
void embedding(const Mat<T>& table, std::span<const std::int32_t> tokens, Mat<T>& out) {
  const Eigen::Index V = table.rows();
  for (std::size_t t = 0; t < tokens.size(); ++t)
    if (tokens[t] < 0 || tokens[t] >= V)
      throw std::out_of_range(fmt::format(
          "embedding: token at position {} has id {}, expected an id in [0, V) = [0, {})", t,
          tokens[t], V));
  if (&out == &table)
    throw std::invalid_argument("embedding: out is the table itself; expected a separate matrix");
  out.resize(static_cast<Eigen::Index>(tokens.size()), table.cols());  // [T, H]
  for (std::size_t t = 0; t < tokens.size(); ++t)
    out.row(static_cast<Eigen::Index>(t)) = table.row(tokens[t]);
}

template void embedding<float>(const Mat<float>&, std::span<const std::int32_t>, Mat<float>&);
template void embedding<double>(const Mat<double>&, std::span<const std::int32_t>, Mat<double>&);

}  // namespace m3::ref
