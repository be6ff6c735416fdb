// PPM reading and writing; see ppm.h.
#include "datasets/ppm.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <vector>

namespace m3 {
namespace {

// Header fields are ASCII integers separated by whitespace, with '#' comments to the end of a line.
struct Reader {
  const std::vector<unsigned char>& b;
  std::size_t at = 0;
  const std::string& path;
  [[noreturn]] void fail(const std::string& what) const { throw std::runtime_error(fmt::format("{}: {}", path, what)); }
  void skip_space() {
    while (at < b.size()) {
      if (b[at] == '#') {
        while (at < b.size() && b[at] != '\n') ++at;
      } else if (std::isspace(b[at])) {
        ++at;
      } else {
        break;
      }
    }
  }
  long field(const char* name) {
    skip_space();
    if (at >= b.size() || !std::isdigit(b[at])) fail(fmt::format("PPM header: {} missing or not a number", name));
    long v = 0;
    while (at < b.size() && std::isdigit(b[at])) {
      v = v * 10 + (b[at++] - '0');
      if (v > 1'000'000'000L) fail(fmt::format("PPM header: {} too large", name));
    }
    return v;
  }
};

}  // namespace

PpmImage read_ppm(const std::string& path, int max_side) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(fmt::format("{}: cannot open the image file", path));
  const std::vector<unsigned char> b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  Reader r{b, 0, path};
  if (b.size() < 2 || b[0] != 'P' || (b[1] != '6' && b[1] != '3'))
    r.fail("not a PPM image (expected the magic P6 or P3; convert other formats, e.g. `convert in.png out.ppm`)");
  const bool binary = b[1] == '6';
  r.at = 2;
  const long w = r.field("width"), h = r.field("height"), maxval = r.field("maxval");
  if (w <= 0 || h <= 0) r.fail(fmt::format("PPM header: {}x{} pixels, expected positive sides", w, h));
  if (w > max_side || h > max_side)
    r.fail(fmt::format("{}x{} pixels: larger than the configured maximum of {} a side", w, h, max_side));
  if (maxval < 1 || maxval > 65535) r.fail(fmt::format("PPM header: maxval {}, expected 1..65535", maxval));
  const std::size_t n = static_cast<std::size_t>(w) * static_cast<std::size_t>(h) * 3;
  std::vector<long> s(n);
  if (binary) {
    if (r.at >= b.size() || !std::isspace(b[r.at])) r.fail("PPM header: no whitespace after maxval");
    ++r.at;  // exactly one whitespace byte, then the samples
    const std::size_t bytes = maxval < 256 ? 1 : 2;
    if (b.size() - r.at < n * bytes)
      r.fail(fmt::format("{} bytes of samples, expected width * height * 3 * {} = {}", b.size() - r.at, bytes, n * bytes));
    for (std::size_t i = 0; i < n; ++i)
      s[i] = bytes == 1 ? b[r.at + i] : (b[r.at + 2 * i] << 8) | b[r.at + 2 * i + 1];
  } else {
    for (std::size_t i = 0; i < n; ++i) s[i] = r.field("sample");
  }
  PpmImage img;
  img.height = static_cast<int>(h);
  img.width = static_cast<int>(w);
  img.pixels.resize(3, static_cast<Eigen::Index>(w) * h);
  for (std::size_t i = 0; i < n; ++i) {
    if (s[i] > maxval) r.fail(fmt::format("sample {} is {}, above maxval {}", i, s[i], maxval));
    img.pixels(static_cast<Eigen::Index>(i % 3), static_cast<Eigen::Index>(i / 3)) =
        static_cast<double>(s[i]) / static_cast<double>(maxval) * 2.0 - 1.0;
  }
  return img;
}

void write_ppm(const std::string& path, const MatD& pixels, int height, int width) {
  if (pixels.rows() != 3 || pixels.cols() != static_cast<Eigen::Index>(height) * width || height <= 0 || width <= 0)
    throw std::invalid_argument(fmt::format("write_ppm: pixels [{}, {}] for {}x{}, expected [3, height*width]",
                                            pixels.rows(), pixels.cols(), height, width));
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(fmt::format("{}: cannot create the image file", path));
  f << "P6\n" << width << " " << height << "\n255\n";
  for (Eigen::Index p = 0; p < pixels.cols(); ++p)
    for (int c = 0; c < 3; ++c) {
      const double v = std::clamp((pixels(c, p) + 1.0) / 2.0 * 255.0, 0.0, 255.0);
      f.put(static_cast<char>(static_cast<unsigned char>(std::lround(v))));
    }
  if (!f) throw std::runtime_error(fmt::format("{}: write failed", path));
}

}  // namespace m3
