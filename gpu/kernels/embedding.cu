// Embedding gather kernel; see embedding.h. One block per token copies one table row; rows whose
// H is a multiple of 8 (and whose bases are 16-byte aligned) move as 16-byte vectors, others as
// single bf16 values. An id outside [0, V) is never dereferenced: its row is written as NaN.
#include "gpu/kernels/embedding.h"

#include <cstdint>
#include <stdexcept>
#include <string>

namespace m3::gpu {
namespace {

constexpr int kThreads = 128;  // M3: H = 6144 = 768 vectors of 8 bf16 -> 6 per thread

template <bool kVec>
__global__ void __launch_bounds__(kThreads) embedding_kernel(const bf16* __restrict__ table,
                                                             const std::int32_t* __restrict__ tokens, int V, int H,
                                                             bf16* __restrict__ out) {
  const std::size_t t = blockIdx.x;
  const std::int32_t id = tokens[t];
  const bool valid = id >= 0 && id < V;
  // Only formed (never dereferenced) for an invalid id.
  const bf16* src = table + (valid ? static_cast<std::size_t>(id) : 0) * H;
  bf16* dst = out + t * H;
  if constexpr (kVec) {
    const int n = H / 8;  // 16-byte vectors in a row
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    const uint4 nan4 = make_uint4(0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu);
    for (int i = threadIdx.x; i < n; i += kThreads) d4[i] = valid ? s4[i] : nan4;
  } else {
    const bf16 nan = __ushort_as_bfloat16(0xFFFFu);
    for (int i = threadIdx.x; i < H; i += kThreads) dst[i] = valid ? src[i] : nan;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace

void embedding(const bf16* table, const std::int32_t* tokens, int T, int V, int H, bf16* out, cudaStream_t s) {
  if (T < 0 || V <= 0 || H <= 0)
    throw GpuError("embedding: T = " + std::to_string(T) + ", V = " + std::to_string(V) + ", H = " +
                   std::to_string(H) + ", expected T >= 0, V > 0 and H > 0");
  if (T == 0) return;
  if (!table || !tokens || !out)
    throw GpuError("embedding: a null device pointer (table, tokens or out); expected all three set");
  // Each token is one block: grid.x allows 2^31 - 1, far beyond any T an int holds usefully.
  if (H % 8 == 0 && aligned16(table) && aligned16(out))
    embedding_kernel<true><<<T, kThreads, 0, s>>>(table, tokens, V, H, out);
  else
    embedding_kernel<false><<<T, kThreads, 0, s>>>(table, tokens, V, H, out);
  M3_CUDA_CHECK_LAUNCH();
}

void check_token_ids(const std::int32_t* tokens, std::size_t T, int V) {
  for (std::size_t t = 0; t < T; ++t)
    if (tokens[t] < 0 || tokens[t] >= V)
      throw std::out_of_range("embedding: token at position " + std::to_string(t) + " has id " +
                              std::to_string(tokens[t]) + ", expected an id in [0, V) = [0, " + std::to_string(V) +
                              ")");
}

}  // namespace m3::gpu
