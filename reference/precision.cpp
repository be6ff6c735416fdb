// Precision names (tensor.h).
#include "reference/tensor.h"

#include <stdexcept>
#include <string>

namespace m3 {

std::string_view precision_name(Precision p) {
  switch (p) {
    case Precision::FP32: return "fp32";
    case Precision::FP64: return "fp64";
    case Precision::BF16: return "bf16";
  }
  return "?";
}

Precision parse_precision(std::string_view s) {
  if (s == "fp32") return Precision::FP32;
  if (s == "fp64") return Precision::FP64;
  if (s == "bf16") return Precision::BF16;
  throw std::invalid_argument("unknown precision '" + std::string(s) + "': expected fp32, fp64 or bf16");
}

}  // namespace m3
