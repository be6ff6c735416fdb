// PPM images (datasets/ppm.h): a P6 round trip through write_ppm, P3 and 16-bit samples decoded
// to [-1, 1], and every malformed file refused with a message naming the file and the fault.
#include "datasets/ppm.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <unistd.h>

namespace {

std::string tmp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("m3_test_ppm_" + std::to_string(::getpid()) + "_" + name)).string();
}

std::string write_bytes(const std::string& name, const std::string& bytes) {
  const std::string p = tmp_path(name);
  std::ofstream(p, std::ios::binary) << bytes;
  return p;
}

void expect_error(const std::string& path, const std::string& part) {
  try {
    m3::read_ppm(path, 64);
    ADD_FAILURE() << path << ": accepted, expected an error containing '" << part << "'";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find(part), std::string::npos) << msg;
  }
  std::remove(path.c_str());
}

}  // namespace

TEST(Ppm, RoundTripThroughP6) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const int H = 5, W = 7;  // odd sides: no alignment assumed
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  m3::MatD px(3, H * W);  // [3, H*W] in [-1, 1]
  for (Eigen::Index i = 0; i < px.size(); ++i) px.data()[i] = u(g);
  // Values on the 255-level grid survive exactly.
  px = ((px.array() + 1.0) / 2.0 * 255.0).round() / 255.0 * 2.0 - 1.0;
  const std::string p = tmp_path("rt.ppm");
  m3::write_ppm(p, px, H, W);
  const m3::PpmImage img = m3::read_ppm(p, 64);
  EXPECT_EQ(img.height, H);
  EXPECT_EQ(img.width, W);
  EXPECT_LE((img.pixels - px).cwiseAbs().maxCoeff(), 1e-12);
  std::remove(p.c_str());
}

TEST(Ppm, PlainAndSixteenBitSamples) {
  // P3 with a comment, maxval 4: samples 0, 2, 4 -> -1, 0, 1; pixel order row-major, RGB channels.
  const std::string p3 = write_bytes("p3.ppm", "P3\n# two pixels\n2 1\n4\n0 2 4  4 2 0\n");
  const m3::PpmImage a = m3::read_ppm(p3, 64);
  std::remove(p3.c_str());
  EXPECT_EQ(a.pixels(0, 0), -1.0);
  EXPECT_EQ(a.pixels(1, 0), 0.0);
  EXPECT_EQ(a.pixels(2, 0), 1.0);
  EXPECT_EQ(a.pixels(0, 1), 1.0);
  // P6, maxval 65535: big-endian 2-byte samples.
  std::string p6 = "P6\n1 1\n65535\n";
  for (int v : {0x00, 0x00, 0xFF, 0xFF, 0x80, 0x00}) p6.push_back(static_cast<char>(v));
  const std::string p16 = write_bytes("p16.ppm", p6);
  const m3::PpmImage b = m3::read_ppm(p16, 64);
  std::remove(p16.c_str());
  EXPECT_EQ(b.pixels(0, 0), -1.0);
  EXPECT_EQ(b.pixels(1, 0), 1.0);
  EXPECT_NEAR(b.pixels(2, 0), 32768.0 / 65535.0 * 2 - 1, 1e-15);
}

TEST(Ppm, MalformedFilesAreRefused) {
  expect_error(tmp_path("missing.ppm"), "cannot open");
  expect_error(write_bytes("png.ppm", "\x89PNG\r\n"), "not a PPM image");
  expect_error(write_bytes("nowidth.ppm", "P6\n\n"), "width missing");
  expect_error(write_bytes("zero.ppm", "P6\n0 4\n255\n"), "positive sides");
  expect_error(write_bytes("big.ppm", "P6\n65 4\n255\n"), "larger than the configured maximum of 64");
  expect_error(write_bytes("maxval.ppm", "P6\n1 1\n70000\n"), "maxval 70000");
  expect_error(write_bytes("short.ppm", std::string("P6\n2 2\n255\n") + std::string(5, 'x')), "bytes of samples");
  expect_error(write_bytes("above.ppm", "P3\n1 1\n4\n1 2 9\n"), "above maxval");
  expect_error(write_bytes("p3short.ppm", "P3\n1 1\n4\n1 2\n"), "sample missing");
}
