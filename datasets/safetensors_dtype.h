// Element types of safetensors files (the dtype strings of the header) and their exact conversions
// to and from float. The table in safetensors_dtype.cpp says, format by format, how the bits are
// read and whether the conversion to float is exact.
//
// Every format is little-endian in the file (the safetensors rule); this code assumes a
// little-endian host and refuses to compile elsewhere.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace m3 {

// The dtype strings of the safetensors format (its Rust `Dtype` enum), names spelled as in files.
// Sub-byte formats (F4, F6_*) are not listed: their byte sizes are not whole and no M3 checkpoint
// uses them; a header naming them is refused as an unknown dtype.
enum class Dtype { BOOL, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

std::string_view dtype_name(Dtype d);   // "F32", "BF16", ...
int dtype_size(Dtype d);                // bytes per element
bool dtype_reads_as_float(Dtype d);     // convert_to_float accepts it
std::optional<Dtype> parse_dtype(std::string_view name);  // exact, case-sensitive spelling

// n elements of packed little-endian `src` stored as `d` -> dst[0, n). Throws std::invalid_argument
// for a dtype that does not read as float (integers, BOOL).
void convert_to_float(Dtype d, const std::uint8_t* src, std::int64_t n, float* dst);
// src[0, n) -> n elements stored as `d`, which must be F32, BF16 or F16 (round to nearest even);
// throws std::invalid_argument for any other dtype.
void convert_from_float(Dtype d, const float* src, std::int64_t n, std::uint8_t* dst);

// IEEE binary16: exact widening; narrowing rounds to nearest even, keeps subnormals, overflows
// to +-Inf (|x| >= 65520), keeps NaN a (quiet) NaN.
float f16_bits_to_float(std::uint16_t h);
std::uint16_t float_to_f16_bits(float x);
// OCP 8-bit floats (OFP8 spec v1.0). E4M3 is the "FN" variant: no Inf, NaN = S.1111.111.
float f8_e4m3_to_float(std::uint8_t b);
float f8_e5m2_to_float(std::uint8_t b);
// OCP MX scale: 2^(b - 127), 0xFF = NaN.
float f8_e8m0_to_float(std::uint8_t b);

}  // namespace m3
