// The vision part's configuration, seeded weights and images, patch extraction and feature
// placement; see vision.h. The forward pass itself is in vision_forward.cpp.
#include "reference/vision.h"

#include "reference/rng.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <stdexcept>

namespace m3 {

void VisionConfig::validate() const {
  auto bad = [&](const std::string& what) { throw std::invalid_argument("vision config '" + name + "': " + what); };
  if (hidden <= 0 || layers < 0 || heads <= 0 || head_dim <= 0 || mlp <= 0 || channels <= 0 || text_hidden <= 0)
    bad("hidden, heads, head_dim, mlp, channels and text_hidden must be > 0, layers >= 0");
  if (hidden != heads * head_dim)
    bad(fmt::format("hidden = {}, expected heads * head_dim = {} * {}", hidden, heads, head_dim));
  if (rope_dims < 0 || rope_dims % 2 != 0 || 3 * rope_dims > head_dim)
    bad(fmt::format("rope_dims = {}, expected even and 3 * rope_dims <= head_dim = {}", rope_dims, head_dim));
  if (patch <= 0 || temporal_patch <= 0 || merge <= 0 || max_image < patch * merge)
    bad(fmt::format("patch = {}, temporal_patch = {}, merge = {}, max_image = {}: expected > 0 and max_image >= "
                    "patch * merge",
                    patch, temporal_patch, merge, max_image));
  if (!(ln_eps > 0) || !(rope_theta > 0)) bad("ln_eps and rope_theta must be > 0");
}

VisionConfig vision_preset(const std::string& text_preset) {
  VisionConfig v;
  if (text_preset == "m3" || text_preset == "m3-layer") {
    v.name = "m3-vision";
  } else if (text_preset == "small") {
    v.name = "small-vision";
    v.hidden = 64, v.layers = 2, v.heads = 4, v.head_dim = 16, v.mlp = 128;
    v.patch = 8, v.rope_dims = 4, v.max_image = 256, v.text_hidden = 512;
    v.image_token_id = 4096 - 12;  // the small vocabulary has no 200025
  } else if (text_preset == "tiny") {
    v.name = "tiny-vision";
    v.hidden = 32, v.layers = 2, v.heads = 2, v.head_dim = 16, v.mlp = 64;
    v.patch = 4, v.rope_dims = 4, v.max_image = 64, v.text_hidden = 64;
    v.image_token_id = 512 - 12;
  } else {
    throw std::invalid_argument(fmt::format("vision_preset: no vision part for '{}': expected m3, m3-layer, small or tiny",
                                            text_preset));
  }
  v.validate();
  return v;
}

namespace {

MatD gen(Eigen::Index r, Eigen::Index c, std::uint64_t seed, const std::string& name, double scale, double shift = 0) {
  const CounterRng rng(seed, name);
  MatD m(r, c);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = shift + scale * rng.normal(static_cast<std::uint64_t>(i));
  return m;
}
Vec<double> genv(Eigen::Index n, std::uint64_t seed, const std::string& name, double scale, double shift = 0) {
  return gen(n, 1, seed, name, scale, shift).col(0);
}

}  // namespace

VisionWeights<double> generate_vision_weights(const VisionConfig& vc, std::uint64_t seed) {
  vc.validate();
  const int Hv = vc.hidden, H = vc.text_hidden, K = vc.channels * vc.temporal_patch * vc.patch * vc.patch;
  // Output projections (out, fc2) carry 1/sqrt(2 L), as the text model's: the residual stream stays O(1).
  const double out_scale = 1.0 / std::sqrt(2.0 * std::max(1, vc.layers));
  constexpr double kLnScale = 0.1, kBias = 0.02;  // LN weights around 1, small biases
  VisionWeights<double> w;
  w.patch_embed = gen(Hv, K, seed, "visual.patch_embed.proj.weight", 1.0 / std::sqrt(K));
  w.pre_ln_w = genv(Hv, seed, "visual.pre_layrnorm.weight", kLnScale, 1.0);
  w.pre_ln_b = genv(Hv, seed, "visual.pre_layrnorm.bias", kBias);
  for (int l = 0; l < vc.layers; ++l) {
    const std::string p = fmt::format("visual.blocks.{}.", l);
    VisionLayerWeights<double> L;
    L.ln1_w = genv(Hv, seed, p + "layer_norm1.weight", kLnScale, 1.0);
    L.ln1_b = genv(Hv, seed, p + "layer_norm1.bias", kBias);
    L.qkv = gen(3 * Hv, Hv, seed, p + "self_attn.qkv_proj.weight", 1.0 / std::sqrt(Hv));
    L.qkv_b = genv(3 * Hv, seed, p + "self_attn.qkv_proj.bias", kBias);
    L.out = gen(Hv, Hv, seed, p + "self_attn.out_proj.weight", out_scale / std::sqrt(Hv));
    L.out_b = genv(Hv, seed, p + "self_attn.out_proj.bias", kBias);
    L.ln2_w = genv(Hv, seed, p + "layer_norm2.weight", kLnScale, 1.0);
    L.ln2_b = genv(Hv, seed, p + "layer_norm2.bias", kBias);
    L.fc1 = gen(vc.mlp, Hv, seed, p + "mlp.fc1.weight", 1.0 / std::sqrt(Hv));
    L.fc1_b = genv(vc.mlp, seed, p + "mlp.fc1.bias", kBias);
    L.fc2 = gen(Hv, vc.mlp, seed, p + "mlp.fc2.weight", out_scale / std::sqrt(vc.mlp));
    L.fc2_b = genv(Hv, seed, p + "mlp.fc2.bias", kBias);
    w.layers.push_back(std::move(L));
  }
  w.proj1 = gen(H, Hv, seed, "multi_modal_projector.linear_1.weight", 1.0 / std::sqrt(Hv));
  w.proj1_b = genv(H, seed, "multi_modal_projector.linear_1.bias", kBias);
  w.proj2 = gen(H, H, seed, "multi_modal_projector.linear_2.weight", 1.0 / std::sqrt(H));
  w.proj2_b = genv(H, seed, "multi_modal_projector.linear_2.bias", kBias);
  const int m2 = vc.merge * vc.merge;
  w.merge1 = gen(H, m2 * H, seed, "patch_merge_mlp.linear_1.weight", 1.0 / std::sqrt(m2 * H));
  w.merge1_b = genv(H, seed, "patch_merge_mlp.linear_1.bias", kBias);
  w.merge2 = gen(H, H, seed, "patch_merge_mlp.linear_2.weight", 1.0 / std::sqrt(H));
  w.merge2_b = genv(H, seed, "patch_merge_mlp.linear_2.bias", kBias);
  return w;
}

MatD synthetic_image(const VisionConfig& vc, int height, int width, std::uint64_t seed) {
  patch_grid(vc, height, width);  // validates the size
  const CounterRng rng(seed, "synthetic_image");
  MatD img(vc.channels, static_cast<Eigen::Index>(height) * width);  // [C, Hpx*Wpx]
  for (int c = 0; c < vc.channels; ++c)
    for (int y = 0; y < height; ++y)
      for (int x = 0; x < width; ++x) {
        const Eigen::Index i = static_cast<Eigen::Index>(y) * width + x;
        const double smooth = std::sin(0.05 * (c + 1) * x + 0.03 * y) * std::cos(0.04 * y - 0.02 * c * x);
        const double noise = 2.0 * rng.uniform(static_cast<std::uint64_t>(c * img.cols() + i)) - 1.0;
        img(c, i) = 0.7 * smooth + 0.3 * noise;
      }
  return img;
}

PatchGrid patch_grid(const VisionConfig& vc, int height, int width) {
  const int unit = vc.patch * vc.merge;
  if (height <= 0 || width <= 0 || height % unit != 0 || width % unit != 0)
    throw std::invalid_argument(fmt::format("image {}x{}: expected a positive multiple of patch * merge = {} on each side",
                                            height, width, unit));
  if (height > vc.max_image || width > vc.max_image)
    throw std::invalid_argument(fmt::format("image {}x{}: larger than the configured maximum of {} pixels a side",
                                            height, width, vc.max_image));
  return PatchGrid{height / vc.patch, width / vc.patch};
}

VisionPatches vision_patches(const VisionConfig& vc, const MatD& image, int height, int width) {
  const PatchGrid g = patch_grid(vc, height, width);
  if (image.rows() != vc.channels || image.cols() != static_cast<Eigen::Index>(height) * width)
    throw std::invalid_argument(fmt::format("vision_patches: image [{}, {}], expected [channels, height*width] = [{}, {}]",
                                            image.rows(), image.cols(), vc.channels,
                                            static_cast<Eigen::Index>(height) * width));
  const int p = vc.patch, tp = vc.temporal_patch, m = vc.merge, P = g.patches();
  const int K = vc.channels * tp * p * p;
  // Patches in merge-window order, flattened as the Conv3d weight [Hv, C, tp, p, p]; the image's
  // 2 frames are the same picture.
  VisionPatches out;
  MatD& patches = out.rows;
  patches.resize(P, K);                            // [P, C*tp*p*p]
  std::vector<std::array<int, 3>>& pos = out.pos;  // [P] (t, h, w)
  int idx = 0;
  for (int wr = 0; wr < g.rows / m; ++wr)
    for (int wc = 0; wc < g.cols / m; ++wc)
      for (int dr = 0; dr < m; ++dr)
        for (int dc = 0; dc < m; ++dc, ++idx) {
          const int r = wr * m + dr, c = wc * m + dc;
          pos.push_back({0, r, c});
          for (int ch = 0; ch < vc.channels; ++ch)
            for (int t = 0; t < tp; ++t)
              for (int ky = 0; ky < p; ++ky)
                for (int kx = 0; kx < p; ++kx)
                  patches(idx, ((ch * tp + t) * p + ky) * p + kx) =
                      image(ch, static_cast<Eigen::Index>(r * p + ky) * width + c * p + kx);
        }
  return out;
}

MatD leading_image_rows(const MatF& embed_tokens, std::span<const std::int32_t> tokens, const MatD& features) {
  const auto T = static_cast<Eigen::Index>(tokens.size());
  if (features.rows() > T || (features.rows() > 0 && features.cols() != embed_tokens.cols()))
    throw std::invalid_argument(fmt::format("leading_image_rows: features [{}, {}] for {} tokens of width {}",
                                            features.rows(), features.cols(), T, embed_tokens.cols()));
  MatD x(T, embed_tokens.cols());  // [T, H]
  for (Eigen::Index i = 0; i < T; ++i) {
    const auto t = tokens[static_cast<std::size_t>(i)];
    if (t < 0 || t >= embed_tokens.rows())
      throw std::out_of_range(fmt::format("leading_image_rows: token {} at {} outside the vocabulary [0, {})", t, i,
                                          embed_tokens.rows()));
    x.row(i) = embed_tokens.row(t).cast<double>();
  }
  x.topRows(features.rows()) = features;
  return x;
}

MatD place_image_features(const MatD& embed_tokens, std::span<const std::int32_t> tokens, std::int32_t image_token_id,
                          const MatD& features) {
  if (features.rows() > 0 && features.cols() != embed_tokens.cols())
    throw std::invalid_argument(fmt::format("place_image_features: features have {} columns, the embedding {}",
                                            features.cols(), embed_tokens.cols()));
  Eigen::Index n_ph = 0;
  for (auto t : tokens) n_ph += t == image_token_id;
  if (n_ph != features.rows())
    throw std::invalid_argument(fmt::format(
        "place_image_features: {} image-placeholder tokens (id {}) but the image gives {} feature rows", n_ph,
        image_token_id, features.rows()));
  MatD x(static_cast<Eigen::Index>(tokens.size()), embed_tokens.cols());  // [T, H]
  Eigen::Index f = 0;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    const auto t = tokens[i];
    if (t < 0 || t >= embed_tokens.rows())
      throw std::out_of_range(fmt::format("place_image_features: token {} at {} outside the vocabulary [0, {})", t, i,
                                          embed_tokens.rows()));
    x.row(static_cast<Eigen::Index>(i)) = t == image_token_id ? features.row(f++) : embed_tokens.row(t);
  }
  return x;
}

}  // namespace m3
