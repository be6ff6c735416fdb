// Dtype table and the float conversions of safetensors elements (safetensors_dtype.h).
#include "datasets/safetensors_dtype.h"

#include "reference/tensor.h"  // float_to_bf16_bits, bf16_bits_to_float

#include <fmt/format.h>

#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace m3 {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; this reader copies bytes without swapping");

namespace {

struct DtypeInfo {
  Dtype dtype;
  std::string_view name;
  int bytes;
  bool reads_as_float;
};

// The conversion table. "exact" = every stored value has one float with the same value.
constexpr std::array<DtypeInfo, 16> kDtypes{{
    {Dtype::BOOL, "BOOL", 1, false},
    {Dtype::U8, "U8", 1, false},
    {Dtype::I8, "I8", 1, false},
    // OCP E5M2: 1 sign, 5 exponent (bias 15), 2 mantissa; the top byte of an IEEE fp16, with Inf
    // and NaN. Exact.
    {Dtype::F8_E5M2, "F8_E5M2", 1, true},
    // OCP E4M3 ("FN"): 1 sign, 4 exponent (bias 7), 3 mantissa; no Inf; 0x7F and 0xFF are NaN;
    // max 448 = S.1111.110; subnormals m * 2^-9. The format of M3's fp8 release. Exact.
    {Dtype::F8_E4M3, "F8_E4M3", 1, true},
    // OCP E8M0 (MX block scales): 2^(e-127), no sign, no zero, 0xFF = NaN. 2^-127 is a float
    // subnormal, so exact.
    {Dtype::F8_E8M0, "F8_E8M0", 1, true},
    {Dtype::I16, "I16", 2, false},
    {Dtype::U16, "U16", 2, false},
    // IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa, subnormals, Inf, NaN. Exact.
    {Dtype::F16, "F16", 2, true},
    // bfloat16: the top half of an IEEE binary32. Exact.
    {Dtype::BF16, "BF16", 2, true},
    {Dtype::I32, "I32", 4, false},
    {Dtype::U32, "U32", 4, false},
    // IEEE binary32: copied bits. Exact (NaN payloads kept).
    {Dtype::F32, "F32", 4, true},
    // IEEE binary64: rounded to the nearest float (NOT exact; out-of-range values become +-Inf,
    // which the checkpoint loader then reports as non-finite).
    {Dtype::F64, "F64", 8, true},
    {Dtype::I64, "I64", 8, false},
    {Dtype::U64, "U64", 8, false},
}};

const DtypeInfo& info(Dtype d) {
  for (const auto& i : kDtypes)
    if (i.dtype == d) return i;
  throw std::invalid_argument(fmt::format("dtype enum value {} is not in the dtype table", static_cast<int>(d)));
}

// Decoded E4M3 values, one per byte: built once from the bit fields, so reading is a lookup.
std::array<float, 256> make_e4m3_table() {
  std::array<float, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int sign = b >> 7, exp = (b >> 3) & 0xF, man = b & 0x7;
    float v;
    if (exp == 0xF && man == 0x7) v = std::numeric_limits<float>::quiet_NaN();
    else if (exp == 0) v = std::ldexp(static_cast<float>(man), -9);          // subnormal: m/8 * 2^(1-7)
    else v = std::ldexp(1.0f + static_cast<float>(man) / 8.0f, exp - 7);     // normal
    t[b] = sign ? -v : v;
  }
  return t;
}

template <class Bits>
Bits load(const std::uint8_t* p) {
  Bits b;
  std::memcpy(&b, p, sizeof b);  // the data section has no alignment guarantee
  return b;
}

}  // namespace

std::string_view dtype_name(Dtype d) { return info(d).name; }
int dtype_size(Dtype d) { return info(d).bytes; }
bool dtype_reads_as_float(Dtype d) { return info(d).reads_as_float; }

std::optional<Dtype> parse_dtype(std::string_view name) {
  for (const auto& i : kDtypes)
    if (i.name == name) return i.dtype;
  return std::nullopt;
}

float f16_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1F)  // Inf / NaN: all-ones float exponent, payload moved to the top mantissa bits
    return std::bit_cast<float>(sign | 0x7F800000u | (man << 13));
  if (exp == 0) {   // zero / subnormal: man * 2^-24, exact in float
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  return std::bit_cast<float>(sign | ((exp + 127 - 15) << 23) | (man << 13));
}

std::uint16_t float_to_f16_bits(float x) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u)  // Inf stays Inf; NaN keeps its top payload bits and is made quiet
    return sign | (a > 0x7F800000u ? static_cast<std::uint16_t>(0x7E00u | ((a >> 13) & 0x3FFu)) : 0x7C00u);
  // 65520 = 0x477FF000 is halfway between 65504 (max half, odd mantissa) and 2^16: ties to even
  // go up, so everything from there on overflows to Inf.
  if (a >= 0x477FF000u) return sign | 0x7C00u;
  if (a >= 0x38800000u) {  // >= 2^-14: a normal half. Rebias 127 -> 15 (112 << 23), keep 10 bits.
    std::uint32_t m = a - (112u << 23);
    m += 0xFFFu + ((m >> 13) & 1u);  // round to nearest even on the 13 dropped bits; a carry
    return sign | static_cast<std::uint16_t>(m >> 13);  // into the exponent is the right result
  }
  // Subnormal half: q = |x| / 2^-24 rounded to nearest even. |x| = mant24 * 2^(e - 150).
  const int e = static_cast<int>(a >> 23);
  if (e < 102) return sign;  // |x| < 2^-25: below half of the smallest subnormal, rounds to 0
  const std::uint32_t mant24 = (a & 0x7FFFFFu) | 0x800000u;
  const int shift = 126 - e;  // 14..24
  std::uint32_t q = mant24 >> shift;
  const std::uint32_t rem = mant24 & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;  // q = 0x400 is the smallest normal: correct
  return sign | static_cast<std::uint16_t>(q);
}

float f8_e4m3_to_float(std::uint8_t b) {
  static const std::array<float, 256> table = make_e4m3_table();
  return table[b];
}

float f8_e5m2_to_float(std::uint8_t b) { return f16_bits_to_float(static_cast<std::uint16_t>(b << 8)); }

float f8_e8m0_to_float(std::uint8_t b) {
  if (b == 0xFF) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(b) - 127);
}

void convert_to_float(Dtype d, const std::uint8_t* src, std::int64_t n, float* dst) {
  switch (d) {
    case Dtype::F32: std::memcpy(dst, src, static_cast<std::size_t>(n) * 4); return;
    case Dtype::BF16:
      for (std::int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(load<std::uint16_t>(src + 2 * i));
      return;
    case Dtype::F16:
      for (std::int64_t i = 0; i < n; ++i) dst[i] = f16_bits_to_float(load<std::uint16_t>(src + 2 * i));
      return;
    case Dtype::F64:
      for (std::int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(load<double>(src + 8 * i));
      return;
    case Dtype::F8_E4M3:
      for (std::int64_t i = 0; i < n; ++i) dst[i] = f8_e4m3_to_float(src[i]);
      return;
    case Dtype::F8_E5M2:
      for (std::int64_t i = 0; i < n; ++i) dst[i] = f8_e5m2_to_float(src[i]);
      return;
    case Dtype::F8_E8M0:
      for (std::int64_t i = 0; i < n; ++i) dst[i] = f8_e8m0_to_float(src[i]);
      return;
    default:
      throw std::invalid_argument(fmt::format("convert_to_float: dtype {} does not read as float", dtype_name(d)));
  }
}

void convert_from_float(Dtype d, const float* src, std::int64_t n, std::uint8_t* dst) {
  switch (d) {
    case Dtype::F32: std::memcpy(dst, src, static_cast<std::size_t>(n) * 4); return;
    case Dtype::BF16:
      for (std::int64_t i = 0; i < n; ++i) {
        const std::uint16_t b = float_to_bf16_bits(src[i]);
        std::memcpy(dst + 2 * i, &b, 2);
      }
      return;
    case Dtype::F16:
      for (std::int64_t i = 0; i < n; ++i) {
        const std::uint16_t b = float_to_f16_bits(src[i]);
        std::memcpy(dst + 2 * i, &b, 2);
      }
      return;
    default:
      throw std::invalid_argument(
          fmt::format("convert_from_float: dtype {} cannot be written, expected F32, BF16 or F16", dtype_name(d)));
  }
}

}  // namespace m3
