// Golden files: the committed ones are reproduced from their seed (the regression test), and a
// damaged file is refused with a message that says what is wrong and how to regenerate it.
#include "datasets/golden.h"
#include "datasets/hdf5.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <limits>

namespace {

const std::string kData = std::string(M3_SOURCE_DIR) + "/datasets/data/";

std::string reproduce(const std::string& file, double tol) {
  const m3::GoldenRun stored = m3::read_golden(file);
  const m3::GoldenRun got = m3::make_golden(stored.config, stored.seed, stored.precision, stored.tokens,
                                            static_cast<int>(stored.decode_tokens.size()), stored.rows,
                                            m3::generate_weights(stored.config, stored.seed));
  return m3::first_difference(got, stored, tol);
}

struct TempDir {
  std::filesystem::path p = std::filesystem::temp_directory_path() /
                            ("m3-golden-" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
                             "-" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
  TempDir() { std::filesystem::create_directories(p); }
  ~TempDir() { std::filesystem::remove_all(p); }
  std::string file(const std::string& n) const { return (p / n).string(); }
};

// A fresh tiny golden file: 70 tokens, 12 sampled rows, 2 decode steps.
std::string make_small_file(const TempDir& d, bool f64 = true) {
  auto cfg = m3::preset("tiny");
  std::vector<std::int32_t> tokens(70);
  for (int i = 0; i < 70; ++i) tokens[i] = (i * 37) % cfg.vocab_size;
  auto rows = m3::sample_rows(70, cfg.index_block_size, cfg.index_topk_blocks, 12, 3);
  auto g = m3::make_golden(cfg, 5, m3::Precision::FP64, tokens, 2, rows, m3::generate_weights(cfg, 5));
  g.generator = "test_golden";
  g.store_f64 = f64;
  const std::string f = d.file("g.h5");
  m3::write_golden(f, g);
  return f;
}

std::string read_error(const std::string& f) {
  try {
    m3::read_golden(f);
  } catch (const m3::GoldenError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

// Tolerances: see compare/cmd_golden.cpp (fp64 recomputation noise ~1e-13; float32 storage 6e-8).
TEST(Golden, CommittedTinyReproduces) { EXPECT_EQ(reproduce(kData + "tiny.h5", 1e-9), ""); }
TEST(Golden, CommittedSmallReproduces) { EXPECT_EQ(reproduce(kData + "small.h5", 1e-6), ""); }

TEST(Golden, SampledRowsCoverTheEdges) {
  auto r = m3::sample_rows(2200, 128, 16, 40, 0);
  EXPECT_EQ(r.size(), 40u);
  for (std::int64_t edge : {0, 127, 128, 129, 2047, 2048, 2049, 2199})
    EXPECT_TRUE(std::binary_search(r.begin(), r.end(), edge)) << edge;
  EXPECT_TRUE(std::is_sorted(r.begin(), r.end()));
  EXPECT_EQ(m3::sample_rows(30, 16, 4, 40, 0).size(), 30u);  // all rows when T <= max
}

TEST(Golden, RoundTripAndFirstDifferenceNamesTensorAndCoordinates) {
  TempDir d;
  const std::string f = make_small_file(d);
  auto a = m3::read_golden(f);
  auto b = a;
  EXPECT_EQ(m3::first_difference(a, b, 1e-9), "");
  b.trace.at("blk.2.attn_out").values[3 * 64 + 5] += 1.0;  // row 3, column 5 of [R, Hq*D = 64]
  b.trace.at("blk.3.out").values[0] += 1.0;                 // later in forward order: not reported first
  const std::string diff = m3::first_difference(b, a, 1e-9);
  EXPECT_NE(diff.find("trace/blk.2.attn_out at [3, 5]"), std::string::npos) << diff;
  auto c = a;
  c.trace.at("blk.1.selection").ids[0] = 5;  // row 0 (position 0) selects only block 0
  EXPECT_NE(m3::first_difference(c, a, 1e-9).find("trace/blk.1.selection at [0, 0, 0]: got 5, stored 0"), std::string::npos);
  auto e = a;
  e.decode_tokens[1] ^= 1;
  EXPECT_NE(m3::first_difference(e, a, 1e-9).find("decode/tokens at [1]"), std::string::npos);
}

TEST(Golden, DamagedFilesAreRefusedWithAHint) {
  TempDir d;
  struct Case {
    const char* expect;
    std::function<void(m3::h5::File&)> damage;
  } cases[] = {
      {"wrong format 'other'", [](auto& f) { f.set_attr("/", "format", std::string("other")); }},
      {"schema_version 7", [](auto& f) { f.set_attr("/", "schema_version", std::int64_t{7}); }},
      {"'/trace/blk.1.selection' is missing", [](auto& f) { H5Ldelete(f.id(), "/trace/blk.1.selection", H5P_DEFAULT); }},
      {"'/logits' has shape [3, 512], expected [12, 512]",
       [](auto& f) {
         H5Ldelete(f.id(), "/logits", H5P_DEFAULT);
         std::vector<double> x(3 * 512, 1.0);
         const std::int64_t dims[] = {3, 512};
         f.write("/logits", x.data(), dims);
       }},
      {"'/trace/blk.0.out' has the wrong element type",
       [](auto& f) {
         H5Ldelete(f.id(), "/trace/blk.0.out", H5P_DEFAULT);
         std::vector<std::int32_t> x(12 * 64, 1);
         const std::int64_t dims[] = {12, 64};
         f.write("/trace/blk.0.out", x.data(), dims);
       }},
      {"'/decode/logits' holds NaN at flat index 7",
       [](auto& f) {
         H5Ldelete(f.id(), "/decode/logits", H5P_DEFAULT);
         std::vector<double> x(2 * 512, 0.5);
         x[7] = std::numeric_limits<double>::quiet_NaN();
         const std::int64_t dims[] = {2, 512};
         f.write("/decode/logits", x.data(), dims);
       }},
  };
  for (const auto& c : cases) {
    const std::string f = make_small_file(d);
    {
      auto h = m3::h5::File::open_rw(f);
      c.damage(h);
    }
    const std::string err = read_error(f);
    EXPECT_NE(err.find(c.expect), std::string::npos) << "want '" << c.expect << "' in: " << err;
    EXPECT_NE(err.find("HINT: regenerate it with"), std::string::npos) << err;
  }
  EXPECT_NE(read_error(d.file("absent.h5")).find("missing or not an HDF5 file"), std::string::npos);
}

TEST(Golden, Float32StorageRoundTrips) {
  TempDir d;
  auto g = m3::read_golden(make_small_file(d, false));
  EXPECT_FALSE(g.store_f64);
  EXPECT_GT(g.logits.norm(), 0.0);
}
