// The vision tower on the GPU (gpu/vision.h) and its kernels, each against a CPU twin on fresh
// random inputs, outputs NaN-poisoned first (0xFF bytes) so that every element must be written:
//   VisionPatches    gpu::vision_patches vs m3::vision_patches: exact (a gather and one rounding)
//   LayerNorm_bf16   gpu::layer_norm / add_layer_norm vs an fp64 LayerNorm of the same bf16 inputs
//   BiasGelu_bf16    gpu::bias_gelu / bias_add vs fp64
//   VisionRope3d_bf16  gpu::vision_rope3d vs m3::vision_rope3d on (qkv + bias) in fp64
//   VisionAttention_bf16  gpu::vision_attention vs fp64 softmax attention of the same bf16 inputs
//   VisionTower_bf16 the whole tower vs m3::vision_forward on tiny, small and M3's head geometry,
//                    traced tensor by tensor under the two-layer rule (compare/vision_compare.h):
//                    close to the bf16-emulating tower and within 2x its error from the fp64 one;
//                    determinism; bad images
// Tolerances: bf16 keeps 8 significant bits, so one rounding of an O(1) value is <= 2^-8 relative
// (half an ulp of 2^-7) and rel-L2 ~ 2^-8/sqrt(3) = 2.3e-3 over a tensor (compare/tolerance.h).
#include "compare/tolerance.h"
#include "compare/vision_compare.h"
#include "gpu/kernels/gelu.h"
#include "gpu/kernels/layer_norm.h"
#include "gpu/kernels/vision_attention.h"
#include "gpu/kernels/vision_patches.h"
#include "gpu/kernels/vision_rope3d.h"
#include "gpu/vision.h"
#include "reference/vision.h"
#include "tests/gpu/gpu_test_util.h"

#include <cmath>
#include <random>
#include <string>

using namespace m3;
using m3::test::bf16_exact;

namespace {

MatF download_f32(const gpu::DeviceBuffer<float>& d, Eigen::Index rows, Eigen::Index cols) {
  const auto h = d.download();
  MatF m(rows, cols);
  std::copy(h.begin(), h.begin() + rows * cols, m.data());
  return m;
}

gpu::DeviceBuffer<float> upload_f32(const MatF& m) {
  gpu::DeviceBuffer<float> d(static_cast<std::size_t>(m.size()));
  d.upload(m.data(), static_cast<std::size_t>(m.size()));
  return d;
}

MatF round_to_bf16(const MatD& m) { return bf16_exact(m.cast<float>()); }

double gelu(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }

}  // namespace

// ---- patch extraction: a gather, so the GPU must reproduce the reference's rows bit for bit ----

TEST(VisionPatches, ExactInMergeWindowOrder) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  // tiny (patch 4), small (patch 8, 6x10 patches: windows not square), M3's patch 14 with 3 channels.
  for (auto [preset, H, W] : {std::tuple{"tiny", 24, 16}, {"small", 48, 80}, {"m3", 56, 84}}) {
    SCOPED_TRACE(std::string(preset) + " " + std::to_string(H) + "x" + std::to_string(W));
    const VisionConfig vc = vision_preset(preset);
    const MatD img = synthetic_image(vc, H, W, g());
    const VisionPatches ref = vision_patches(vc, img, H, W);
    const auto P = ref.rows.rows(), K = ref.rows.cols();
    const MatF f = img.cast<float>();
    auto dimg = upload_f32(f);
    gpu::DeviceBuffer<gpu::bf16> dp(static_cast<std::size_t>(P * K));
    gpu::DeviceBuffer<std::int32_t> dpos(static_cast<std::size_t>(P) * 3);
    dp.fill_bytes(0xFF), dpos.fill_bytes(0xFF);
    gpu::vision_patches(dimg.data(), gpu::PatchShape{vc.channels, H, W, vc.patch, vc.temporal_patch, vc.merge},
                        dp.data(), dpos.data(), nullptr);
    const MatF got = test::download_bf16(dp, P, K);
    ASSERT_GT(ref.rows.norm(), 0.0);
    EXPECT_TRUE((got.array() == round_to_bf16(ref.rows).array()).all()) << "patch rows differ";
    const auto pos = dpos.download();
    for (Eigen::Index j = 0; j < P; ++j)
      for (int a = 0; a < 3; ++a)
        ASSERT_EQ(pos[static_cast<std::size_t>(j) * 3 + a], ref.pos[static_cast<std::size_t>(j)][a])
            << "patch " << j << " axis " << a;
  }
}

TEST(VisionPatches, RejectsBadSizes) {
  M3_REQUIRE_GPU();
  EXPECT_THROW(gpu::vision_patches(nullptr, gpu::PatchShape{3, 30, 28, 14, 2, 2}, nullptr, nullptr, nullptr),
               gpu::GpuError);
  EXPECT_THROW(gpu::vision_patches(nullptr, gpu::PatchShape{3, 0, 28, 14, 2, 2}, nullptr, nullptr, nullptr),
               gpu::GpuError);
}

// ---- LayerNorm: fp32 arithmetic on bf16 inputs vs fp64, then one rounding each ----

namespace {

// 2 ulps at 2^-8: the final rounding (half an ulp) plus the fp32 vs fp64 difference pushing a value
// across a rounding boundary (another ulp). atol: an output that cancels (w n + b ~ 0) keeps the
// fp32 error of its terms, ~1e-7 * |w n|, far below 1e-5.
constexpr double kLnUlps = 2.0, kLnAtol = 1e-5;

MatF layer_norm_ref(const MatF& x, const Vec<float>& w, const Vec<float>& b, double eps) {
  MatF y(x.rows(), x.cols());
  for (Eigen::Index r = 0; r < x.rows(); ++r) {
    const Eigen::RowVectorXd row = x.row(r).cast<double>();
    const double mean = row.mean(), var = (row.array() - mean).square().mean();
    for (Eigen::Index c = 0; c < x.cols(); ++c)
      y(r, c) = round_bf16(static_cast<float>((row(c) - mean) / std::sqrt(var + eps) * w[c] + b[c]));
  }
  return y;
}

void layer_norm_case(int R, int C, bool fused) {
  SCOPED_TRACE("R=" + std::to_string(R) + " C=" + std::to_string(C) + (fused ? " fused" : ""));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  // An offset mean (3) makes the two-pass variance matter: E[x^2] - E[x]^2 would lose bits.
  MatF h = bf16_exact((test::randn<float>(R, C, g, 2.0).array() + 3.f).matrix());
  const MatF delta = test::randn<float>(R, C, g);
  const Vec<float> bias = test::randn_vec<float>(C, g, 0.1), w = test::randn_vec<float>(C, g, 0.5),
                   b = test::randn_vec<float>(C, g, 0.5);
  // The GPU's residual sum: fp32 (h + delta) + bias, rounded once; the same order here gives the same bits.
  MatF x = h;
  if (fused)
    for (Eigen::Index i = 0; i < x.size(); ++i)
      x.data()[i] = round_bf16((h.data()[i] + delta.data()[i]) + bias[i % C]);
  const MatF ref = layer_norm_ref(x, w, b, 1e-5);

  auto dh = test::upload_bf16(h);
  auto dd = upload_f32(delta);
  auto dbias = upload_f32(MatF(bias.transpose())), dw = upload_f32(MatF(w.transpose())),
       db = upload_f32(MatF(b.transpose()));
  gpu::DeviceBuffer<gpu::bf16> dy(static_cast<std::size_t>(R) * C);
  dy.fill_bytes(0xFF);
  if (fused) gpu::add_layer_norm(dh.data(), dd.data(), dbias.data(), dw.data(), db.data(), 1e-5, dy.data(), R, C, nullptr);
  else gpu::layer_norm(dh.data(), dw.data(), db.data(), 1e-5, dy.data(), R, C, nullptr);
  const MatF y = test::download_bf16(dy, R, C);
  ASSERT_TRUE(y.allFinite());
  ASSERT_GT(ref.norm(), 0.0);
  EXPECT_EQ(test::bf16_violations(y, ref, kLnUlps, kLnAtol), 0);
  EXPECT_TRUE((test::download_bf16(dh, R, C).array() == x.array()).all()) << "residual stream not bf16(h + delta + b)";
}

}  // namespace

TEST(LayerNorm_bf16, AwkwardSizes) {
  M3_REQUIRE_GPU();
  for (auto [R, C] : {std::pair{1, 1}, {3, 7}, {17, 257}, {64, 1280}, {5, 16384}, {33, 6144}})
    layer_norm_case(R, C, false);
}

TEST(LayerNorm_bf16, FusedResidualAndBias) {
  M3_REQUIRE_GPU();
  for (auto [R, C] : {std::pair{1, 32}, {9, 1280}, {31, 333}}) layer_norm_case(R, C, true);
}

TEST(LayerNorm_bf16, ResidualOnlyWhenNoOutput) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  const int R = 5, C = 100;
  const MatF h = bf16_exact(test::randn<float>(R, C, g)), delta = test::randn<float>(R, C, g);
  auto dh = test::upload_bf16(h);
  auto dd = upload_f32(delta);
  gpu::add_layer_norm(dh.data(), dd.data(), nullptr, nullptr, nullptr, 1e-5, nullptr, R, C, nullptr);
  EXPECT_TRUE((test::download_bf16(dh, R, C).array() == bf16_exact(h + delta).array()).all());
}

TEST(LayerNorm_bf16, RejectsBadShapes) {
  M3_REQUIRE_GPU();
  EXPECT_THROW(gpu::layer_norm(nullptr, nullptr, nullptr, 1e-5, nullptr, 1, 0, nullptr), gpu::GpuError);
  EXPECT_THROW(gpu::layer_norm(nullptr, nullptr, nullptr, 1e-5, nullptr, 1, 20000, nullptr), gpu::GpuError);
  gpu::DeviceBuffer<gpu::bf16> h(8);
  EXPECT_THROW(gpu::add_layer_norm(h.data(), nullptr, nullptr, nullptr, nullptr, 1e-5, h.data(), 1, 8, nullptr),
               gpu::GpuError);
}

// ---- bias + GELU(erf) / bias add: one rounding of an fp32 value whose error is a few fp32 ulps ----

TEST(BiasGelu_bf16, AgainstFp64) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  for (auto [R, C] : {std::pair{1, 1}, {7, 33}, {65, 5120}}) {
    for (int mode = 0; mode < 3; ++mode) {  // 0 gelu with bias, 1 gelu without, 2 bias add
      SCOPED_TRACE("R=" + std::to_string(R) + " C=" + std::to_string(C) + " mode " + std::to_string(mode));
      const MatF x = test::randn<float>(R, C, g, 2.0);
      const Vec<float> b = test::randn_vec<float>(C, g, 0.5);
      MatF ref(R, C);
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) {
          const double v = static_cast<double>(x(r, c)) + (mode == 1 ? 0.0 : b[c]);
          ref(r, c) = round_bf16(static_cast<float>(mode == 2 ? v : gelu(v)));
        }
      auto dx = upload_f32(x), db = upload_f32(MatF(b.transpose()));
      gpu::DeviceBuffer<gpu::bf16> dy(static_cast<std::size_t>(R) * C);
      dy.fill_bytes(0xFF);
      if (mode == 2) gpu::bias_add(dx.data(), db.data(), dy.data(), R, C, nullptr);
      else gpu::bias_gelu(dx.data(), mode == 1 ? nullptr : db.data(), dy.data(), R, C, nullptr);
      const MatF y = test::download_bf16(dy, R, C);
      ASSERT_TRUE(y.allFinite());
      ASSERT_GT(ref.norm(), 0.0);
      // 2 ulps at 2^-8 (a boundary crossing, as for LayerNorm); atol: GELU's deep negative tail
      // (gelu(-5) = -1.4e-6) in fp32 is relatively less accurate, absolutely negligible.
      EXPECT_EQ(test::bf16_violations(y, ref, 2.0, 1e-6), 0);
    }
  }
}

// ---- 3-D RoPE + qkv bias vs the reference's vision_rope3d ----

TEST(VisionRope3d_bf16, AgainstReference) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  // (P, heads, head_dim, rope_dims): tiny/small presets, M3 (78 of 80 rotated), odd counts, none.
  for (auto [P, heads, hd, rd] : {std::tuple{1, 2, 16, 4}, {37, 4, 16, 4}, {100, 16, 80, 26}, {13, 3, 48, 14},
                                  {5, 1, 32, 0}, {9, 2, 18, 6}}) {
    SCOPED_TRACE("P=" + std::to_string(P) + " heads=" + std::to_string(heads) + " hd=" + std::to_string(hd) +
                 " rd=" + std::to_string(rd));
    const int Hv = heads * hd;
    const MatF qkv = test::randn<float>(P, 3 * Hv, g);
    const Vec<float> bias = test::randn_vec<float>(3 * Hv, g, 0.1);
    std::vector<std::array<int, 3>> pos(static_cast<std::size_t>(P));
    std::vector<std::int32_t> flat;
    std::uniform_int_distribution<int> coord(0, 143);  // a 2016-pixel side has 144 patches
    for (auto& p : pos) {
      p = {coord(g) % 2, coord(g), coord(g)};  // t too, though an image has t = 0: every axis rotates
      flat.insert(flat.end(), p.begin(), p.end());
    }
    MatD x = qkv.cast<double>();
    x.rowwise() += bias.cast<double>().transpose();
    MatD q = x.leftCols(Hv), k = x.middleCols(Hv, Hv);
    vision_rope3d(q, heads, hd, rd, 1e4, pos);
    vision_rope3d(k, heads, hd, rd, 1e4, pos);
    x.leftCols(Hv) = q, x.middleCols(Hv, Hv) = k;
    const MatF ref = round_to_bf16(x);

    auto dq = upload_f32(qkv), db = upload_f32(MatF(bias.transpose()));
    gpu::DeviceBuffer<std::int32_t> dpos(flat.size());
    dpos.upload(flat);
    gpu::DeviceBuffer<gpu::bf16> dy(static_cast<std::size_t>(P) * 3 * Hv);
    dy.fill_bytes(0xFF);
    gpu::vision_rope3d(dq.data(), db.data(), dpos.data(), gpu::VisionRopeDims{heads, hd, rd, 1e4}, dy.data(), P,
                       nullptr);
    const MatF y = test::download_bf16(dy, P, 3 * Hv);
    ASSERT_TRUE(y.allFinite());
    // 2 ulps at 2^-8 as above; atol: fp32 angles are off by up to 143 * 2^-24 rad ~ 1e-5, an
    // absolute error of ~1e-5 * |x| in a rotated element that cancels; 1e-4 covers |x| up to 10.
    EXPECT_EQ(test::bf16_violations(y, ref, 2.0, 1e-4), 0);
  }
  EXPECT_THROW(gpu::vision_rope3d(nullptr, nullptr, nullptr, gpu::VisionRopeDims{2, 16, 6, 1e4}, nullptr, 1, nullptr),
               gpu::GpuError);  // 3 * 6 > 16
}

// ---- attention: flash kernel vs fp64 softmax attention of the same bf16 values ----

namespace {

void attention_case(int P, int heads, int D, int ld_pad) {
  SCOPED_TRACE("P=" + std::to_string(P) + " heads=" + std::to_string(heads) + " D=" + std::to_string(D) +
               " ld pad " + std::to_string(ld_pad));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const int Hv = heads * D, ld = 3 * Hv + ld_pad;
  // Scale 1.5 on q and k: logits q.k/sqrt(D) of std ~2.3, peaked enough that a wrong key or a
  // wrong max shows, flat enough that many keys contribute.
  MatF qkv = bf16_exact(test::randn<float>(P, ld, g, 1.5));  // [P, ld]: q | k | v | pad
  qkv.rightCols(Hv + ld_pad) = bf16_exact(test::randn<float>(P, Hv + ld_pad, g));
  MatD ref(P, Hv);  // [P, Hv]
  const MatD x = qkv.cast<double>();
  for (int h = 0; h < heads; ++h) {
    MatD s = x.middleCols(h * D, D) * x.middleCols(Hv + h * D, D).transpose() / std::sqrt(double(D));  // [P, P]
    for (Eigen::Index r = 0; r < P; ++r) {
      s.row(r).array() -= s.row(r).maxCoeff();
      s.row(r) = s.row(r).array().exp().matrix();
      s.row(r) /= s.row(r).sum();
    }
    ref.middleCols(h * D, D) = s * x.middleCols(2 * Hv + h * D, D);
  }
  auto dqkv = test::upload_bf16(qkv);
  gpu::DeviceBuffer<gpu::bf16> dout(static_cast<std::size_t>(P) * Hv);
  dout.fill_bytes(0xFF);
  gpu::vision_attention(dqkv.data(), dqkv.data() + Hv, dqkv.data() + 2 * Hv, ld, P, heads, D, dout.data(), nullptr);
  const MatF y = test::download_bf16(dout, P, Hv);
  ASSERT_TRUE(y.allFinite());
  ASSERT_GT(ref.norm(), 0.0);
  // P rounded to bf16 (<= 2^-9 relative a weight, random in sign: its effect on an output is a
  // weighted average of +-2^-9 |v|, far below 2^-9 max|v|) plus the output's own rounding: 2 ulps
  // at 2^-8 relative, and an absolute 2^-8 (compare/tolerance.h's kAttnFloor) for outputs that
  // average O(1) values of both signs to ~0. A wrong key, mask or max is O(0.1-1) on many elements.
  EXPECT_EQ(test::bf16_violations(y, ref.cast<float>(), 2.0, cmp::kAttnFloor), 0);
  EXPECT_LE(test::rel_l2(y, ref), cmp::kBf16.rel_l2);
}

}  // namespace

TEST(VisionAttention_bf16, AwkwardSizes) {
  M3_REQUIRE_GPU();
  // Lengths around the 64-row tiles (1, 63, 64, 65, 129), every compiled D, a padded row stride.
  for (auto [P, heads, D, pad] : {std::tuple{1, 1, 16, 0}, {63, 2, 32, 0}, {64, 3, 80, 0}, {65, 2, 80, 8},
                                  {129, 1, 128, 0}, {97, 2, 112, 16}, {33, 1, 96, 0}, {17, 2, 64, 0},
                                  {50, 1, 48, 0}, {300, 4, 80, 0}})
    attention_case(P, heads, D, pad);
}

TEST(VisionAttention_bf16, M3Heads1024Patches) {
  M3_REQUIRE_GPU();
  attention_case(1024, 16, 80, 0);  // a 448 x 448 image at M3's geometry
}

TEST(VisionAttention_bf16, RejectsBadShapes) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<gpu::bf16> b(1024);
  EXPECT_THROW(gpu::vision_attention(b.data(), b.data(), b.data(), 72, 1, 3, 24, b.data(), nullptr), gpu::GpuError);
  EXPECT_THROW(gpu::vision_attention(b.data(), b.data(), b.data(), 432, 1, 3, 144, b.data(), nullptr), gpu::GpuError);
  EXPECT_THROW(gpu::vision_attention(b.data(), b.data(), b.data(), 100, 1, 2, 48, b.data(), nullptr), gpu::GpuError);
  EXPECT_THROW(gpu::vision_attention(b.data() + 1, b.data(), b.data(), 96, 1, 2, 48, b.data(), nullptr),
               gpu::GpuError);
}

// ---- the whole tower vs the bf16-emulating and the fp64 reference towers ----

namespace {

// The two-layer rule of compare/vision_compare.h per traced stage (tolerances in
// compare/tolerance.h, kVisionTower, with their reasons).
void tower_case(const VisionConfig& vc, int H, int W, std::uint64_t seed) {
  SCOPED_TRACE(vc.name + " " + std::to_string(H) + "x" + std::to_string(W));
  const auto w = generate_vision_weights(vc, seed);
  const MatD img = synthetic_image(vc, H, W, seed + 1);
  VisionTrace emu_tr, truth_tr, gpu_tr;
  const MatD emu = vision_forward(vc, w, img, H, W, &emu_tr, Precision::BF16);
  vision_forward(vc, w, img, H, W, &truth_tr, Precision::FP64);
  gpu::VisionTower tower(vc, w);
  const MatD got = tower.forward(img, H, W, &gpu_tr);
  ASSERT_EQ(got.rows(), emu.rows());
  ASSERT_EQ(got.cols(), emu.cols());
  ASSERT_EQ(gpu_tr.tensors.size(), emu_tr.tensors.size());
  const cmp::VisionComparison c = cmp::compare_vision(gpu_tr, emu_tr, truth_tr);
  ASSERT_EQ(c.stages.size(), emu_tr.tensors.size());
  for (const auto& s : c.stages) {
    ASSERT_GT(s.vs_ref.ref_norm, 0.0) << s.name;
    ASSERT_EQ(s.vs_ref.compared, s.vs_ref.count) << s.name << ": non-finite values";
    std::printf("  %-14s %-16s vs bf16 ref %.3e (gate %.3e, elem %.2f%%) | vs fp64: gpu %.3e, bf16 ref %.3e, bound %.3e\n",
                vc.name.c_str(), s.name.c_str(), s.vs_ref.rel_l2, s.gate, s.vs_ref.pass_pct, s.err_test, s.err_ref,
                s.bound);
    EXPECT_TRUE(s.pass()) << s.name << ": " << (s.failures.empty() ? "" : s.failures.front());
  }
  EXPECT_TRUE(c.pass());
  EXPECT_TRUE(got == gpu_tr.tensors.back().second) << "forward returns the traced vis.merged";
  // Deterministic: no atomics, fixed cuBLAS algorithms for fixed shapes -> the same bits again.
  const MatD again = tower.forward(img, H, W);
  EXPECT_TRUE((again.array() == got.array()).all()) << "a second forward differs";
}

}  // namespace

TEST(VisionTower_bf16, TinyTwoLayerRule) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const VisionConfig vc = vision_preset("tiny");
  tower_case(vc, 24, 16, g());  // 6 x 4 patches: 6 tokens
  tower_case(vc, 64, 64, g());  // max_image: 256 patches, 4 key tiles of the attention kernel
}

TEST(VisionTower_bf16, SmallTwoLayerRule) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  tower_case(vision_preset("small"), 80, 48, g());  // 10 x 6 patches: 60, not a multiple of 64
}

// M3's head geometry (head_dim 80, 78 rotated dims, patch 14, 3 channels) with 2 layers and a
// narrow text width, so that the fp64 reference stays fast.
TEST(VisionTower_bf16, M3GeometryTwoLayers) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  VisionConfig vc = vision_preset("m3");
  vc.layers = 2, vc.text_hidden = 256;
  tower_case(vc, 112, 140, g());  // 8 x 10 patches
}

TEST(VisionTower_bf16, BadImagesAreClearErrors) {
  M3_REQUIRE_GPU();
  const VisionConfig vc = vision_preset("tiny");
  gpu::VisionTower tower(vc, generate_vision_weights(vc, 7));
  const MatD img = synthetic_image(vc, 16, 16, 8);
  const auto expect_error = [&](const MatD& m, int H, int W, const std::string& needle) {
    try {
      tower.forward(m, H, W);
      ADD_FAILURE() << "no error for " << H << "x" << W;
    } catch (const gpu::GpuError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(img, 16, 8, "expected [channels, height*width] = [3, 128]");   // pixels vs size
  expect_error(MatD(img.topRows(2)), 16, 16, "expected [channels, height*width]");  // channels
  expect_error(img, 12, 16, "multiple of patch * merge = 8");                 // not a window multiple
  expect_error(synthetic_image(vc, 64, 64, 9), 64, 72, "at most max_image = 64");
  EXPECT_THROW(tower.run(), gpu::GpuError) << "run without an uploaded image";
}

TEST(VisionTower_bf16, RejectsMismatchedWeights) {
  M3_REQUIRE_GPU();
  const VisionConfig vc = vision_preset("tiny");
  auto w = generate_vision_weights(vc, 3);
  w.layers[1].fc1 = MatD::Zero(vc.mlp + 1, vc.hidden);
  EXPECT_THROW(gpu::VisionTower(vc, w), gpu::GpuError);
  VisionConfig odd = vc;
  odd.heads = 4, odd.head_dim = 8, odd.rope_dims = 2;  // hidden 32 = 4 x 8: head_dim 8 is not covered
  EXPECT_THROW(gpu::VisionTower(odd, generate_vision_weights(odd, 3)), std::invalid_argument);
}
