// The vision part of M3 (spec §8), reference in fp64 (or fp32, or the GPU tower's bf16 emulation:
// vision_forward's Precision): an image becomes text-model input rows.
//   pixels [C, Hpx, Wpx] (normalized), duplicated to temporal_patch frames
//   -> patches of temporal_patch x patch x patch, in 2x2 merge-window order     [P, C*tp*p*p]
//   -> Conv3d patch embedding (a linear map: stride = kernel, no bias)          [P, Hv]
//   -> pre_layrnorm (LayerNorm), then `layers` pre-LN ViT blocks:
//        x += out(attn(LN1(x)))   full (bidirectional) attention, qkv and out with biases,
//                                 3-D RoPE over (t, h, w) on q and k
//        x += fc2(GELU(fc1(LN2(x))))
//      (no post-norm: the last hidden state is taken)                           [P, Hv]
//   -> per-patch projector: proj2(GELU(proj1(x)))                               [P, H]
//   -> 2x2 patch merger: the 4 patches of a window concatenated,
//      merge2(GELU(merge1([y0 y1 y2 y3])))                                      [P/4, H]
//   -> the rows replace the image-placeholder tokens' embeddings, in order.
// Where spec §8 leaves a choice open, ours (to confirm against a released checkpoint):
//   - 3-D RoPE: the first 3 * rope_dims of a head's dims rotated (M3: 78 of 80, vLLM's 26 an axis;
//     the last 2 pass through), as Qwen2-VL-style vision RoPE does: the angles of the first half
//     are [t: rope_dims/2 | h: rope_dims/2 | w: rope_dims/2] with pos_axis * theta^(-2j/rope_dims),
//     repeated in the second half, and rotate_half pairs dim i with i + 3*rope_dims/2;
//   - GELU is the exact (erf) form; the projector and merger linears carry biases;
//   - patch order: windows row-major, the 4 patches of a window row-major inside it; positions are
//     each patch's own (t = 0, h, w) grid coordinates.
#pragma once

#include "reference/tensor.h"

#include <array>
#include <cstdint>
#include <span>
#include <utility>
#include <string>
#include <vector>

namespace m3 {

struct VisionConfig {
  std::string name = "m3-vision";
  int hidden = 1280;           // Hv
  int layers = 32;
  int heads = 16;
  int head_dim = 80;
  int mlp = 5120;
  int channels = 3;
  int patch = 14;              // pixels a patch side
  int temporal_patch = 2;      // frames a patch (an image is duplicated to 2 frames)
  int merge = 2;               // merge window side (2x2 patches -> one text token)
  int rope_dims = 26;          // rotated dims a RoPE axis (3 axes)
  double rope_theta = 1e4;
  double ln_eps = 1e-5;
  int max_image = 2016;        // pixels a side at most
  int text_hidden = 6144;      // H of the text model the features feed
  std::int32_t image_token_id = 200025;
  // Throws std::invalid_argument naming the field when the fields do not fit together.
  void validate() const;
};

// "m3" (spec §8), "small" (text H 512) and "tiny" (text H 64): the text preset of the same name.
VisionConfig vision_preset(const std::string& text_preset);

template <class T>
struct VisionLayerWeights {
  Vec<T> ln1_w, ln1_b;   // [Hv]
  Mat<T> qkv;            // [3*Hv, Hv] (q rows, then k, then v)
  Vec<T> qkv_b;          // [3*Hv]
  Mat<T> out;            // [Hv, Hv]
  Vec<T> out_b;          // [Hv]
  Vec<T> ln2_w, ln2_b;   // [Hv]
  Mat<T> fc1;            // [mlp, Hv]
  Vec<T> fc1_b;          // [mlp]
  Mat<T> fc2;            // [Hv, mlp]
  Vec<T> fc2_b;          // [Hv]
};

template <class T>
struct VisionWeights {
  Mat<T> patch_embed;    // [Hv, C*tp*p*p] (Conv3d weight [Hv, C, tp, p, p] flattened)
  Vec<T> pre_ln_w, pre_ln_b;  // [Hv]
  std::vector<VisionLayerWeights<T>> layers;
  Mat<T> proj1;          // [H, Hv]
  Vec<T> proj1_b;        // [H]
  Mat<T> proj2;          // [H, H]
  Vec<T> proj2_b;        // [H]
  Mat<T> merge1;         // [H, 4*H]
  Vec<T> merge1_b;       // [H]
  Mat<T> merge2;         // [H, H]
  Vec<T> merge2_b;       // [H]
};

// The same weights in another element type (fp64 generator <-> fp32 checkpoint): every tensor cast,
// rounding to nearest when narrowing.
template <class To, class From>
VisionWeights<To> vision_weights_cast(const VisionWeights<From>& w) {
  VisionWeights<To> o;
  o.patch_embed = w.patch_embed.template cast<To>();
  o.pre_ln_w = w.pre_ln_w.template cast<To>(), o.pre_ln_b = w.pre_ln_b.template cast<To>();
  for (const auto& L : w.layers) {
    VisionLayerWeights<To> M;
    M.ln1_w = L.ln1_w.template cast<To>(), M.ln1_b = L.ln1_b.template cast<To>();
    M.qkv = L.qkv.template cast<To>(), M.qkv_b = L.qkv_b.template cast<To>();
    M.out = L.out.template cast<To>(), M.out_b = L.out_b.template cast<To>();
    M.ln2_w = L.ln2_w.template cast<To>(), M.ln2_b = L.ln2_b.template cast<To>();
    M.fc1 = L.fc1.template cast<To>(), M.fc1_b = L.fc1_b.template cast<To>();
    M.fc2 = L.fc2.template cast<To>(), M.fc2_b = L.fc2_b.template cast<To>();
    o.layers.push_back(std::move(M));
  }
  o.proj1 = w.proj1.template cast<To>(), o.proj1_b = w.proj1_b.template cast<To>();
  o.proj2 = w.proj2.template cast<To>(), o.proj2_b = w.proj2_b.template cast<To>();
  o.merge1 = w.merge1.template cast<To>(), o.merge1_b = w.merge1_b.template cast<To>();
  o.merge2 = w.merge2.template cast<To>(), o.merge2_b = w.merge2_b.template cast<To>();
  return o;
}

// Seeded weights (the generator of weights.h, names visual.* / multi_modal_projector.* /
// patch_merge_mlp.*), scaled so activations stay O(1).
VisionWeights<double> generate_vision_weights(const VisionConfig& vc, std::uint64_t seed);

// A seeded synthetic image [C, Hpx, Wpx] in [-1, 1] (smooth gradients plus noise).
MatD synthetic_image(const VisionConfig& vc, int height, int width, std::uint64_t seed);

// Patch grid of an image: (rows, cols) of patches; Hpx and Wpx must be multiples of patch * merge
// and at most max_image, else std::invalid_argument naming the size.
struct PatchGrid {
  int rows = 0, cols = 0;
  int patches() const { return rows * cols; }
  int tokens(int merge) const { return patches() / (merge * merge); }
};
PatchGrid patch_grid(const VisionConfig& vc, int height, int width);

// The rows the Conv3d patch embedding multiplies: patches [P, C*tp*p*p] in merge-window order
// (column ((ch*tp + t)*p + ky)*p + kx, the image duplicated to tp frames) and each patch's (t, h, w)
// position; the first step of vision_forward, exposed for the GPU twin's test. Throws as
// vision_forward does for a bad size.
struct VisionPatches {
  MatD rows;                             // [P, C*tp*p*p]
  std::vector<std::array<int, 3>> pos;   // [P] (t = 0, h, w)
};
VisionPatches vision_patches(const VisionConfig& vc, const MatD& image, int height, int width);

// The vision tower and projector: image [C, Hpx*Wpx] (channel rows, pixels row-major) with its
// height and width -> features [tokens, H], one row a text token. `trace` (optional) receives
// vis.patch_embed, vis.blk.{l}.out, vis.proj, vis.merged (widened to fp64 in every precision).
// precision (DESIGN §3): FP64 the truth; FP32 fp32 weights and arithmetic; BF16 the emulation of
// the GPU tower (gpu/vision.h): fp32 arithmetic with a bf16 rounding exactly where the GPU stores
// bf16 (the list in vision_forward.cpp), the reference that compare/vision_compare.h gates it by.
struct VisionTrace {
  std::vector<std::pair<std::string, MatD>> tensors;
};
MatD vision_forward(const VisionConfig& vc, const VisionWeights<double>& w, const MatD& image, int height, int width,
                     VisionTrace* trace = nullptr, Precision precision = Precision::FP64);

// vision_forward's engine: arithmetic in T (float or double), bf16 rounding at the GPU's storage
// points on or off. FP64 = <double>(false), FP32 = <float>(false), BF16 = <float>(true);
// <double>(true) rounds where BF16 does but sums in fp64: it differs from the emulation only where
// fp32 roundoff moves a value across a bf16 rounding boundary, as a GPU's own summation order does
// (tests/test_vision.cpp uses it as a CPU stand-in for the GPU tower).
template <class T>
MatD vision_forward_as(const VisionConfig& vc, const VisionWeights<double>& w, const MatD& image, int height, int width,
                       bool emulate_bf16, VisionTrace* trace = nullptr);

// The 3-D RoPE of the tower, in place: x [P, heads*head_dim], pos [P] = (t, h, w) a row (T = float
// or double).
template <class T>
void vision_rope3d(Mat<T>& x, int heads, int head_dim, int rope_dims, double theta,
                   const std::vector<std::array<int, 3>>& pos);

// Input rows of the text model for a prompt that starts with an image: the embeddings of `tokens`
// (embed_tokens [V, H], the model's fp32 table) with rows 0..N-1 replaced by features [N, H], where
// the N leading tokens are the image's placeholders (whatever ids the text after them holds).
// Throws std::invalid_argument for fewer tokens than feature rows, a width mismatch or a token
// outside the vocabulary.
MatD leading_image_rows(const MatF& embed_tokens, std::span<const std::int32_t> tokens, const MatD& features);

// Input rows of the text model: embeddings of `tokens` with the rows of image_token_id replaced,
// in order, by `features` rows. Throws std::invalid_argument when the placeholder count differs
// from features.rows() (naming both).
MatD place_image_features(const MatD& embed_tokens, std::span<const std::int32_t> tokens, std::int32_t image_token_id,
                          const MatD& features);

}  // namespace m3
