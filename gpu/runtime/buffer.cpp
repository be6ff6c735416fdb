// Host-side bf16 conversion (buffer.h), bit-identical to m3::round_bf16 of the reference.
#include "gpu/runtime/buffer.h"

#include <cstring>

namespace m3::gpu {

std::vector<bf16> to_bf16(const float* x, std::size_t n) {
  std::vector<bf16> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(x[i]);
  return out;
}

std::vector<float> from_bf16(const bf16* x, std::size_t n) {
  std::vector<float> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = __bfloat162float(x[i]);
  return out;
}

}  // namespace m3::gpu
