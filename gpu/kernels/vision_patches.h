// Patch extraction of the vision tower on the GPU, twin of m3::vision_patches (reference/vision.h):
// an image becomes the rows the Conv3d patch embedding (a GEMM) multiplies, in 2x2 merge-window
// order, and each patch's (t, h, w) RoPE position:
//   image [C, Hpx*Wpx] (fp32, channel rows, pixels row-major)
//   -> patches [P, C*tp*p*p] (bf16: the one rounding of the pixels), row j = the patch at grid
//      (r, c) with windows row-major and the merge*merge patches of a window row-major inside it;
//      column ((ch*tp + t)*p + ky)*p + kx = pixel (ch, r*p + ky, c*p + kx) for every frame t (the
//      image is duplicated to tp frames)
//   -> pos [P, 3] (int32) = (0, r, c)
// On the device, not the host: the patch matrix of a 2016^2 image is 48 MB of bf16, a gather the
// GPU does in tens of microseconds while the host would take tens of milliseconds and an upload.
#pragma once

#include "gpu/runtime/buffer.h"

#include <cstdint>

namespace m3::gpu {

struct PatchShape {
  int channels = 3, height = 0, width = 0;  // the image, pixels
  int patch = 14, temporal_patch = 2, merge = 2;
};

// image [C, Hpx*Wpx] -> patches [P, C*tp*p*p], pos [P, 3] with P = (Hpx/p)*(Wpx/p). Hpx and Wpx
// must be positive multiples of patch * merge (GpuError otherwise, naming the size).
void vision_patches(const float* image, const PatchShape& shape, bf16* patches, std::int32_t* pos, cudaStream_t s);

}  // namespace m3::gpu
