// Patch extraction kernel; see vision_patches.h. One thread per output element of the patch
// matrix, consecutive threads along a patch row's kx (consecutive pixels of an image row).
#include "gpu/kernels/vision_patches.h"

#include <algorithm>
#include <string>

namespace m3::gpu {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) vision_patches_kernel(const float* image, PatchShape sh, bf16* patches,
                                                                  std::int32_t* pos, size_t n) {
  const int p = sh.patch, tp = sh.temporal_patch, m = sh.merge;
  const int K = sh.channels * tp * p * p, cols = sh.width / p, wcols = cols / m;
  for (size_t i = blockIdx.x * size_t{kThreads} + threadIdx.x; i < n; i += size_t{gridDim.x} * kThreads) {
    const int j = static_cast<int>(i / K), col = static_cast<int>(i % K);
    // Patch j: window j / m^2 (row-major over the window grid), slot j % m^2 (row-major inside).
    const int win = j / (m * m), slot = j % (m * m);
    const int r = (win / wcols) * m + slot / m, c = (win % wcols) * m + slot % m;
    const int kx = col % p, ky = (col / p) % p, ch = col / (tp * p * p);  // the frame index drops out
    const size_t px = static_cast<size_t>(r * p + ky) * sh.width + c * p + kx;
    patches[i] = __float2bfloat16_rn(image[static_cast<size_t>(ch) * sh.height * sh.width + px]);
    if (col == 0) {
      pos[3 * j] = 0;
      pos[3 * j + 1] = r;
      pos[3 * j + 2] = c;
    }
  }
}

}  // namespace

void vision_patches(const float* image, const PatchShape& sh, bf16* patches, std::int32_t* pos, cudaStream_t s) {
  const int unit = sh.patch * sh.merge;
  if (sh.channels <= 0 || sh.patch <= 0 || sh.temporal_patch <= 0 || sh.merge <= 0 || sh.height <= 0 ||
      sh.width <= 0 || sh.height % unit != 0 || sh.width % unit != 0)
    throw GpuError("vision_patches: image " + std::to_string(sh.height) + "x" + std::to_string(sh.width) + " with " +
                   std::to_string(sh.channels) + " channels, patch " + std::to_string(sh.patch) + ", merge " +
                   std::to_string(sh.merge) + ": expected positive sizes, each side a multiple of patch * merge = " +
                   std::to_string(unit));
  const size_t P = static_cast<size_t>(sh.height / sh.patch) * (sh.width / sh.patch);
  const size_t n = P * sh.channels * sh.temporal_patch * sh.patch * sh.patch;
  const int blocks = static_cast<int>(std::min<size_t>((n + kThreads - 1) / kThreads, 65536));
  vision_patches_kernel<<<blocks, kThreads, 0, s>>>(image, sh, patches, pos, n);
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace m3::gpu
