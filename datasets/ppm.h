// Netpbm PPM images (P6 binary and P3 plain; maxval up to 65535) for the vision part: the format a
// user can write from any tool (`convert in.png out.ppm`, PIL `img.save("x.ppm")`) without an image
// library here. PNG would need libpng or a hand-written inflate; it is left out on purpose.
#pragma once

#include "reference/tensor.h"

#include <string>

namespace m3 {

struct PpmImage {
  int height = 0, width = 0;
  // [3, height*width] RGB in [-1, 1] (sample / maxval * 2 - 1), pixels row-major. The release's
  // processor would resize and apply CLIP's per-channel mean / std instead; the harness feeds the
  // tower this plain scaling (a seeded tower has no trained statistics to match).
  MatD pixels;
};

// Reads a PPM file. Throws std::runtime_error naming the file and what is wrong (no such file, not
// P6/P3, a header field missing or not a positive integer, maxval outside 1..65535, a sample above
// maxval, fewer sample bytes than width * height * 3, a side over `max_side` pixels).
PpmImage read_ppm(const std::string& path, int max_side);

// Writes pixels [3, H*W] in [-1, 1] as a P6 file with maxval 255 (rounded; values outside clamp).
void write_ppm(const std::string& path, const MatD& pixels, int height, int width);

}  // namespace m3
