// The reference vision part (vision.h): the Conv3d patch embedding and the 2x2 merge-window order
// against a direct convolution, the 3-D RoPE's relative-position property, the projector and merger
// shapes, feature placement, the text model fed an image, and clear errors for bad images.
#include "reference/model.h"
#include "reference/vision.h"
#include "reference/weights.h"
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace {

using m3::MatD;

const MatD& traced(const m3::VisionTrace& t, const std::string& name) {
  for (const auto& [n, m] : t.tensors)
    if (n == name) return m;
  throw std::runtime_error("not traced: " + name);
}

}  // namespace

TEST(Vision, PatchEmbeddingIsTheConv3dInMergeWindowOrder) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const m3::VisionConfig vc = m3::vision_preset("tiny");
  const auto w = m3::generate_vision_weights(vc, g());
  const int H = 24, W = 16;  // 6 x 4 patches of 4: 3 x 2 windows
  const MatD img = m3::synthetic_image(vc, H, W, g());
  m3::VisionTrace tr;
  const MatD f = m3::vision_forward(vc, w, img, H, W, &tr);
  const MatD& pe = traced(tr, "vis.patch_embed");  // [P, Hv]
  const int p = vc.patch, gw = W / p;
  ASSERT_EQ(pe.rows(), (H / p) * gw);
  // Patch (r, c) is row ((r/2)*(gw/2) + c/2)*4 + (r%2)*2 + c%2; its embedding is the convolution
  // sum over (ch, t, ky, kx) of weight[o, ch, t, ky, kx] * pixel(ch, r*p+ky, c*p+kx), both frames
  // the same picture.
  double worst = 0;
  for (int r = 0; r < H / p; ++r)
    for (int c = 0; c < gw; ++c) {
      const int row = ((r / 2) * (gw / 2) + c / 2) * 4 + (r % 2) * 2 + c % 2;
      for (int o = 0; o < vc.hidden; ++o) {
        double acc = 0;
        for (int ch = 0; ch < vc.channels; ++ch)
          for (int t = 0; t < vc.temporal_patch; ++t)
            for (int ky = 0; ky < p; ++ky)
              for (int kx = 0; kx < p; ++kx)
                acc += w.patch_embed(o, ((ch * vc.temporal_patch + t) * p + ky) * p + kx) *
                       img(ch, static_cast<Eigen::Index>(r * p + ky) * W + c * p + kx);
        worst = std::max(worst, std::abs(acc - pe(row, o)));
      }
    }
  EXPECT_LE(worst, 1e-12);
  // 24 patches, 2x2 windows: 6 text tokens of the text width, finite.
  EXPECT_EQ(f.rows(), 6);
  EXPECT_EQ(f.cols(), vc.text_hidden);
  EXPECT_TRUE(f.allFinite());
  EXPECT_EQ(m3::patch_grid(vc, H, W).tokens(vc.merge), 6);
}

// RoPE makes q.k depend on the positions only through their difference, axis by axis: shifting
// every position by the same (dt, dh, dw) leaves all dot products unchanged; the unrotated tail
// dims pass through.
TEST(Vision, Rope3dDependsOnRelativePositionsOnly) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const int heads = 2, hd = 16, rd = 4, P = 9;
  const MatD q0 = m3::test::randn<double>(P, heads * hd, g), k0 = m3::test::randn<double>(P, heads * hd, g);
  std::vector<std::array<int, 3>> pos, shifted;
  for (int i = 0; i < P; ++i) {
    pos.push_back({i % 2, i / 3, i % 3});
    shifted.push_back({i % 2 + 5, i / 3 + 11, i % 3 + 2});
  }
  MatD q = q0, k = k0, qs = q0, ks = k0;
  m3::vision_rope3d(q, heads, hd, rd, 1e4, pos);
  m3::vision_rope3d(k, heads, hd, rd, 1e4, pos);
  m3::vision_rope3d(qs, heads, hd, rd, 1e4, shifted);
  m3::vision_rope3d(ks, heads, hd, rd, 1e4, shifted);
  for (int h = 0; h < heads; ++h) {
    const MatD a = q.middleCols(h * hd, hd) * k.middleCols(h * hd, hd).transpose();
    const MatD b = qs.middleCols(h * hd, hd) * ks.middleCols(h * hd, hd).transpose();
    EXPECT_LE((a - b).cwiseAbs().maxCoeff(), 1e-12 * a.cwiseAbs().maxCoeff());
    EXPECT_EQ(q.middleCols(h * hd + 3 * rd, hd - 3 * rd), q0.middleCols(h * hd + 3 * rd, hd - 3 * rd));
  }
  EXPECT_GT((q - q0).cwiseAbs().maxCoeff(), 0.1) << "positions > 0 must rotate something";
  MatD bad = q0;
  EXPECT_THROW(m3::vision_rope3d(bad, heads, hd, 6, 1e4, pos), std::invalid_argument);  // 3*6 > 16
}

TEST(Vision, FeaturesReplaceThePlaceholdersInTheTextModel) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const std::uint64_t seed = g();
  const m3::ModelConfig cfg = m3::preset("tiny");
  const m3::VisionConfig vc = m3::vision_preset("tiny");
  const auto tw = m3::generate_weights(cfg, seed);
  const auto vw = m3::generate_vision_weights(vc, seed);
  const MatD feats = m3::vision_forward(vc, vw, m3::synthetic_image(vc, 16, 16, seed), 16, 16);  // [4, H]
  ASSERT_EQ(feats.rows(), 4);
  std::vector<std::int32_t> tokens{1, 17, 18};
  for (int i = 0; i < 4; ++i) tokens.push_back(vc.image_token_id);
  for (int t : {40, 41, 42}) tokens.push_back(t);
  const MatD emb = tw.embed_tokens.cast<double>();
  const MatD x = m3::place_image_features(emb, tokens, vc.image_token_id, feats);  // [10, H]
  EXPECT_TRUE(x.row(0) == emb.row(1));
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(x.row(3 + i) == feats.row(i)) << "feature row " << i;
  EXPECT_TRUE(x.row(9) == emb.row(42));
  // The text model on those rows: the placeholder's own embedding no longer matters, the image does.
  m3::Model model(cfg, tw, m3::Precision::FP64);
  m3::Sequence s1 = model.new_sequence();
  const MatD l1 = model.prefill_embeds(s1, tokens, x);
  auto tw2 = tw;
  tw2.embed_tokens.row(vc.image_token_id).setConstant(3.0f);
  m3::Model model2(cfg, tw2, m3::Precision::FP64);
  m3::Sequence s2 = model2.new_sequence();
  const MatD x2 = m3::place_image_features(tw2.embed_tokens.cast<double>(), tokens, vc.image_token_id, feats);
  EXPECT_TRUE(model2.prefill_embeds(s2, tokens, x2) == l1) << "the placeholder's embedding row leaked in";
  const MatD other = m3::vision_forward(vc, vw, m3::synthetic_image(vc, 16, 16, seed + 1), 16, 16);
  m3::Sequence s3 = model.new_sequence();
  const MatD l3 = model.prefill_embeds(s3, tokens, m3::place_image_features(emb, tokens, vc.image_token_id, other));
  // Causal: the text before the image cannot see it (equal up to the last bits of fp64 sums whose
  // grouping changes with the other rows, e.g. the tokens an expert's GEMM takes together).
  EXPECT_LE((l3.topRows(3) - l1.topRows(3)).cwiseAbs().maxCoeff(), 1e-12 * l1.cwiseAbs().maxCoeff());
  EXPECT_GT((l3.bottomRows(3) - l1.bottomRows(3)).cwiseAbs().maxCoeff(), 0.0) << "the text after it must";
  // Prefill from the plain embeddings equals prefill (no image).
  const std::vector<std::int32_t> plain{1, 17, 18, 40};
  m3::Sequence a = model.new_sequence(), b = model.new_sequence();
  EXPECT_TRUE(model.prefill_embeds(a, plain, m3::place_image_features(emb, plain, vc.image_token_id, MatD(0, 64))) ==
              model.prefill(b, plain));
}

TEST(Vision, BadImagesAndPlaceholderCountsGiveClearErrors) {
  const m3::VisionConfig vc = m3::vision_preset("tiny");
  const auto w = m3::generate_vision_weights(vc, 1);
  EXPECT_THROW(m3::patch_grid(vc, 20, 16), std::invalid_argument);   // 20 not a multiple of 8
  EXPECT_THROW(m3::patch_grid(vc, 72, 16), std::invalid_argument);   // over max_image 64
  EXPECT_THROW(m3::patch_grid(vc, 0, 16), std::invalid_argument);
  EXPECT_THROW(m3::synthetic_image(vc, 10, 10, 1), std::invalid_argument);
  const MatD img = m3::synthetic_image(vc, 16, 16, 1);
  EXPECT_THROW(m3::vision_forward(vc, w, img, 16, 8, nullptr), std::invalid_argument);  // size vs pixels
  EXPECT_THROW(m3::vision_forward(vc, w, MatD(img.topRows(2)), 16, 16, nullptr), std::invalid_argument);  // channels
  const MatD emb = MatD::Zero(512, 64), feats = MatD::Ones(4, 64);
  const std::vector<std::int32_t> three{1, vc.image_token_id, vc.image_token_id, vc.image_token_id};
  try {
    m3::place_image_features(emb, three, vc.image_token_id, feats);
    ADD_FAILURE() << "3 placeholders for 4 feature rows were accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("3 image-placeholder tokens"), std::string::npos) << e.what();
  }
  EXPECT_THROW(m3::vision_preset("nope"), std::invalid_argument);
  m3::VisionConfig broken = vc;
  broken.hidden = 33;
  EXPECT_THROW(broken.validate(), std::invalid_argument);
  m3::Model model(m3::preset("tiny"), m3::generate_weights(m3::preset("tiny"), 1), m3::Precision::FP32);
  m3::Sequence s = model.new_sequence();
  EXPECT_THROW(model.prefill_embeds(s, three, MatD::Zero(3, 64)), std::invalid_argument);  // rows vs tokens
  EXPECT_EQ(s.length(), 0);
}

TEST(Vision, WeightsAreDeterministicAndTheM3PresetHasSpecDimensions) {
  const m3::VisionConfig vc = m3::vision_preset("tiny");
  const auto a = m3::generate_vision_weights(vc, 5), b = m3::generate_vision_weights(vc, 5),
             c = m3::generate_vision_weights(vc, 6);
  EXPECT_EQ(a.layers[1].qkv, b.layers[1].qkv);
  EXPECT_NE(a.layers[1].qkv, c.layers[1].qkv);
  const m3::VisionConfig m3v = m3::vision_preset("m3");
  EXPECT_EQ(m3v.hidden, 1280);
  EXPECT_EQ(m3v.layers, 32);
  EXPECT_EQ(m3v.heads * m3v.head_dim, 1280);
  EXPECT_EQ(3 * m3v.rope_dims, 78);
  EXPECT_EQ(m3v.text_hidden, 6144);
  // Tokens per image = T * H * W / 4 in patches of 14 (T = 1 after the 2-frame temporal patch).
  EXPECT_EQ(m3::patch_grid(m3v, 2016, 2016).tokens(m3v.merge), 144 * 144 / 4);
}

// The prompt-leading placement the CLI, golden files and comparisons use: features at rows 0..N-1,
// every later row its token's embedding, even a token equal to the placeholder id.
TEST(Vision, LeadingImageRowsKeepTheTextsOwnIds) {
  const m3::VisionConfig vc = m3::vision_preset("tiny");
  const m3::MatF emb = m3::MatF::Random(512, 64);
  const MatD feats = MatD::Constant(2, 64, 7.0);
  const std::vector<std::int32_t> t{vc.image_token_id, vc.image_token_id, 5, vc.image_token_id};
  const MatD x = m3::leading_image_rows(emb, t, feats);
  EXPECT_TRUE(x.topRows(2) == feats);
  EXPECT_TRUE(x.row(2) == emb.row(5).cast<double>());
  EXPECT_TRUE(x.row(3) == emb.row(vc.image_token_id).cast<double>());
  EXPECT_THROW(m3::leading_image_rows(emb, std::vector<std::int32_t>{1}, feats), std::invalid_argument);
  EXPECT_THROW(m3::leading_image_rows(emb, std::vector<std::int32_t>{1, 2, 600}, feats), std::out_of_range);
}
