// Read-bandwidth probe; see stream_read.h.
#include "gpu/runtime/stream_read.h"

#include "gpu/runtime/check.h"

#include <cstdint>
#include <string>

namespace m3::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // independent 16-byte loads in flight a thread (Little's law: ~40 KB an SM)

__global__ void __launch_bounds__(kThreads) stream_read_kernel(const uint4* __restrict__ p, std::size_t n16,
                                                                 unsigned* __restrict__ out) {
  unsigned acc = 0;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * kThreads;
  std::size_t i = static_cast<std::size_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < n16; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldg(p + i + u * stride);  // all issued before any use
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) {
    const uint4 v = __ldg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  __shared__ unsigned warp_acc[kThreads / 32];
  if (threadIdx.x % 32 == 0) warp_acc[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned a = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) a ^= warp_acc[w];
    atomicXor(out, a);
  }
}

}  // namespace

void stream_read(const void* d, std::size_t bytes, unsigned* xor_out, cudaStream_t s, bool zero_out) {
  if (bytes % 16 != 0 || reinterpret_cast<std::uintptr_t>(d) % 16 != 0)
    throw GpuError("stream_read: " + std::to_string(bytes) +
                   " bytes at a pointer 16-byte aligned and a multiple of 16 expected");
  if (zero_out) M3_CUDA_CHECK(cudaMemsetAsync(xor_out, 0, sizeof(unsigned), s));
  if (bytes == 0) return;
  int dev = 0, sms = 0, per_sm = 0;
  M3_CUDA_CHECK(cudaGetDevice(&dev));
  M3_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  M3_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, stream_read_kernel, kThreads, 0));
  const std::size_t n16 = bytes / 16;
  const std::size_t need = (n16 + kThreads - 1) / kThreads;  // small buffers: no idle CTAs
  const std::size_t wave = static_cast<std::size_t>(sms) * static_cast<std::size_t>(per_sm > 0 ? per_sm : 1);
  const unsigned grid = static_cast<unsigned>(need < wave ? need : wave);
  stream_read_kernel<<<grid, kThreads, 0, s>>>(static_cast<const uint4*>(d), n16, xor_out);
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace m3::gpu
