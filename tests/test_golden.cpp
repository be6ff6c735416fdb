// Golden files: the committed ones are reproduced from their seed (the regression test), and a
// damaged file is refused with a message that says what is wrong and how to regenerate it.
#include "datasets/golden.h"
#include "datasets/hdf5.h"
#include "reference/vision.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <limits>

namespace {

const std::string kData = std::string(M3_SOURCE_DIR) + "/datasets/data/";

std::string reproduce(const std::string& file, double tol) {
  const m3::GoldenRun stored = m3::read_golden(file);
  m3::GoldenExtras ex;  // schema 2: the stored image and the MTP draft count
  if (stored.image.size() > 0)
    ex.image = &stored.image, ex.image_h = static_cast<int>(stored.image_h), ex.image_w = static_cast<int>(stored.image_w);
  ex.mtp_k = stored.mtp_k;
  const m3::GoldenRun got = m3::make_golden(stored.config, stored.seed, stored.precision, stored.tokens,
                                            static_cast<int>(stored.decode_tokens.size()), stored.rows,
                                            m3::generate_weights(stored.config, stored.seed), ex);
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
TEST(Golden, CommittedTinyImageReproduces) {
  const m3::GoldenRun g = m3::read_golden(kData + "tiny_image.h5");
  ASSERT_EQ(g.vision_features.rows(), 6);
  EXPECT_EQ(reproduce(kData + "tiny_image.h5", 1e-9), "");
}
TEST(Golden, CommittedTinyMtpReproduces) {
  const m3::GoldenRun g = m3::read_golden(kData + "tiny_mtp.h5");
  ASSERT_EQ(g.mtp_k, 2);
  ASSERT_FALSE(g.mtp_drafts.empty());
  EXPECT_EQ(reproduce(kData + "tiny_mtp.h5", 1e-9), "");
}

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

// Schema 2: an image before the prompt and MTP drafts survive a write and read, recompute from the
// file alone, and a changed feature or draft is named by the first difference; a text-only file
// stays schema 1 (every committed file).
TEST(Golden, ImageAndMtpDraftsRoundTrip) {
  TempDir d;
  const auto cfg = m3::preset("tiny");
  const auto vc = m3::vision_preset("tiny");
  const auto w = m3::generate_weights(cfg, 9);
  const m3::MatD img = m3::synthetic_image(vc, 16, 24, 9);  // 6 image tokens
  std::vector<std::int32_t> tokens(6, vc.image_token_id);
  for (int i = 0; i < 30; ++i) tokens.push_back((i * 53) % cfg.vocab_size);
  const auto rows = m3::sample_rows(36, cfg.index_block_size, cfg.index_topk_blocks, 8, 1);
  m3::GoldenExtras ex;
  ex.image = &img, ex.image_h = 16, ex.image_w = 24;
  auto gi = m3::make_golden(cfg, 9, m3::Precision::FP64, tokens, 3, rows, w, ex);
  ASSERT_EQ(gi.vision_features.rows(), 6);
  m3::GoldenExtras em;
  em.mtp_k = 2;
  std::vector<std::int32_t> text(tokens.begin() + 6, tokens.end());
  auto gm = m3::make_golden(cfg, 9, m3::Precision::FP64, text, 9, m3::sample_rows(30, 16, 4, 8, 1), w, em);
  ASSERT_FALSE(gm.mtp_drafts.empty());
  for (auto* g : {&gi, &gm}) {
    g->generator = "test_golden";
    const std::string f = d.file(g == &gi ? "img.h5" : "mtp.h5");
    m3::write_golden(f, *g);
    const m3::GoldenRun back = m3::read_golden(f);
    EXPECT_EQ(m3::first_difference(*g, back, 0.0), "") << f;
    EXPECT_EQ(back.image_h, g->image_h);
    EXPECT_EQ(back.mtp_k, g->mtp_k);
    m3::h5::File h = m3::h5::File::open_read(f);
    EXPECT_EQ(h.attr_int("/", "schema_version"), m3::kGoldenSchemaVersionExtras);
  }
  // Recomputed from what the file holds (the stored side is always a file's content, as --check has it).
  const m3::GoldenRun gi_file = m3::read_golden(d.file("img.h5")), gm_file = m3::read_golden(d.file("mtp.h5"));
  m3::GoldenExtras ex2;
  ex2.image = &gi_file.image, ex2.image_h = 16, ex2.image_w = 24;
  EXPECT_EQ(m3::first_difference(m3::make_golden(cfg, 9, m3::Precision::FP64, tokens, 3, rows, w, ex2), gi_file, 1e-12),
            "");
  auto bad = gi_file;
  bad.vision_features(2, 5) += 1.0;
  EXPECT_NE(m3::first_difference(gi, bad, 1e-9).find("vision/features at [2, 5]"), std::string::npos)
      << m3::first_difference(gi, bad, 1e-9);
  auto badm = gm_file;
  badm.mtp_drafts[0][0] = (badm.mtp_drafts[0][0] + 1) % cfg.vocab_size;
  EXPECT_NE(m3::first_difference(gm, badm, 1e-9).find("mtp/drafts of round 0"), std::string::npos);
  // Tokens 0..N-1 must be the placeholders when an image is given.
  std::vector<std::int32_t> wrong = tokens;
  wrong[0] = 3;
  EXPECT_THROW(m3::make_golden(cfg, 9, m3::Precision::FP64, wrong, 1, rows, w, ex), std::invalid_argument);
}
