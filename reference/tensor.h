// Tensor vocabulary of the reference: row-major Eigen matrices, the Precision switch and the
// bf16 rounding used to emulate the GPU path (DESIGN §3).
//
// A tensor [A, B, C] is stored as a row-major matrix [A, B*C] unless its comment says otherwise;
// rows are tokens (or keys) everywhere, so a token's vector is one contiguous row.
#pragma once

#include <Eigen/Core>

#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

namespace m3 {

template <class T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
using MatF = Mat<float>;
using MatD = Mat<double>;
using MatI = Mat<std::int32_t>;  // index tensors (token ids, block ids, expert ids); -1 = none

// How the reference computes (DESIGN §3):
//  FP32 - fp32 storage and arithmetic, fp64 for softmax sums and long reductions (the default);
//  FP64 - everything in double: the ground truth that both other modes are measured against;
//  BF16 - fp32 arithmetic, but weights, activations between ops and the KV / index caches are
//         rounded to bf16 at the points where the GPU path stores bf16.
enum class Precision { FP32, FP64, BF16 };

std::string_view precision_name(Precision p);
// Parses "fp32" | "fp64" | "bf16"; throws std::invalid_argument naming the accepted spellings.
Precision parse_precision(std::string_view s);

// Round-to-nearest-even float -> bfloat16 -> float, the rounding CUDA's __float2bfloat16_rn does.
// NaN stays NaN (quiet), +-Inf stay, values past the bf16 range round to +-Inf as in IEEE.
inline float round_bf16(float x) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  if ((u & 0x7f800000u) == 0x7f800000u) {  // Inf or NaN: keep, force NaN quiet
    return (u & 0x007fffffu) ? std::bit_cast<float>(u | 0x00400000u) : x;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return std::bit_cast<float>(u & 0xffff0000u);
}
inline std::uint16_t float_to_bf16_bits(float x) {
  return static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(round_bf16(x)) >> 16);
}
inline float bf16_bits_to_float(std::uint16_t b) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

// Nearest E4M3 value (1 sign, 4 exponent bits with bias 7, 3 mantissa bits: normals from 2^-6,
// subnormals in steps of 2^-9, largest 448, no infinities), ties to even, out-of-range values and
// +-Inf saturated to +-448: the conversion CUDA's __nv_cvt_float_to_fp8(x, __NV_SATFINITE,
// __NV_E4M3) does, which writes the GPU's fp8 index-K cache. NaN stays NaN.
inline float round_e4m3(float x) {
  if (std::isnan(x)) return x;
  const float a = std::fabs(x);
  if (a >= 448.f) return std::copysign(448.f, x);
  int e = 0;
  std::frexp(a, &e);                    // a = m 2^e, m in [0.5, 1): the leading bit is 2^(e-1)
  const int q = e - 4 > -9 ? e - 4 : -9;  // the spacing: 3 bits below the leading one, at least 2^-9
  const float r = std::ldexp(std::nearbyint(std::ldexp(a, -q)), q);  // nearbyint: ties to even
  return std::copysign(r > 448.f ? 448.f : r, x);
}

template <class Derived>
void round_bf16_inplace(Eigen::DenseBase<Derived>& m) {
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j) m(i, j) = round_bf16(static_cast<float>(m(i, j)));
}
template <class Derived>
void round_e4m3_inplace(Eigen::DenseBase<Derived>& m) {
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j) m(i, j) = round_e4m3(static_cast<float>(m(i, j)));
}

}  // namespace m3
