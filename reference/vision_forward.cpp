// The vision tower's forward pass and its 3-D RoPE (vision.h), in the three precisions of DESIGN §3:
//   FP64 - everything in double: the ground truth;
//   FP32 - fp32 weights and arithmetic, nothing rounded to bf16;
//   BF16 - the emulation of the GPU tower (gpu/vision.h): fp32 arithmetic, and a bf16 rounding
//          exactly where the GPU stores bf16. Each GPU epilogue (bias, RoPE, GELU, residual add,
//          LayerNorm) works in fp32 on an fp32 GEMM output and rounds its result once, so here:
//     rounded to bf16                          kept fp32 (never stored by the GPU)
//     the pixels (vision_patches' rows)         GEMM accumulators (cuBLAS COMPUTE_32F)
//     weight matrices (fp64 -> fp32 -> bf16)    LayerNorm weights, every bias (fp32 on the GPU)
//     patch_embed, pre_layrnorm, LN1, LN2       LayerNorm mean / variance, GELU's argument
//     q, k, v after bias + RoPE                 attention scores, softmax max and sum
//     P, the softmax weights fed to P.V         the P.V accumulator before the 1 / sum
//     the attention output
//     the residual stream after each add
//     GELU(fc1 + b), the projector's and merger's hidden and output rows
//   P: the flash kernel (gpu/kernels/vision_attention.h) rounds P = exp(s - m) for its bf16 MMA
//   with m the running max of the key tiles seen so far; the emulation rounds relative to the
//   row's final max (tile-independent: style rule 11 keeps the kernel's tiling out of the
//   reference). The two are the same rounding on a shifted grid (same size, other bits): FA's
//   "same-precision emulation, reordered". Both divide by the sum of the unrounded P.
#include "reference/vision.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>
#include <type_traits>

namespace m3 {

namespace {

// The weights in T; in bf16 mode the matrices rounded to bf16 (vectors stay in T = fp32).
template <class T>
VisionWeights<T> tower_weights(const VisionWeights<double>& w, bool bf16) {
  VisionWeights<T> o = vision_weights_cast<T>(w);
  if (!bf16) return o;
  for (Mat<T>* m : {&o.patch_embed, &o.proj1, &o.proj2, &o.merge1, &o.merge2}) round_bf16_inplace(*m);
  for (auto& L : o.layers)
    for (Mat<T>* m : {&L.qkv, &L.out, &L.fc1, &L.fc2}) round_bf16_inplace(*m);
  return o;
}

// y = x W^T + b; x [R, in], W [out, in], b [out].
template <class T>
Mat<T> affine(const Mat<T>& x, const Mat<T>& w, const Vec<T>& b) {
  Mat<T> y = x * w.transpose();
  y.rowwise() += b.transpose();
  return y;
}

// Two-pass statistics, as the GPU kernel: var = mean((x - mean)^2).
template <class T>
Mat<T> layer_norm(const Mat<T>& x, const Vec<T>& w, const Vec<T>& b, double eps) {
  Mat<T> y(x.rows(), x.cols());
  for (Eigen::Index r = 0; r < x.rows(); ++r) {
    const T mean = x.row(r).mean();
    const T var = (x.row(r).array() - mean).square().mean();
    y.row(r) = ((x.row(r).array() - mean) / std::sqrt(var + static_cast<T>(eps))).matrix().cwiseProduct(w.transpose()) +
               b.transpose();
  }
  return y;
}

// The exact (erf) GELU.
template <class T>
Mat<T> gelu(Mat<T> x) {
  x = x.unaryExpr([](T v) { return static_cast<T>(0.5) * v * (static_cast<T>(1) + std::erf(v / std::sqrt(static_cast<T>(2)))); });
  return x;
}

template <class T>
struct Tower {
  const VisionConfig& vc;
  const VisionWeights<T>& w;
  const bool bf16;
  VisionTrace* trace;

  void rnd(Mat<T>& m) const {
    if (bf16) round_bf16_inplace(m);
  }
  void emit(const std::string& name, const Mat<T>& m) const {
    if (trace) trace->tensors.emplace_back(name, m.template cast<double>());
  }

  // Bidirectional softmax attention per head: q, k, v [P, Hv] -> [P, Hv].
  Mat<T> attention(const Mat<T>& q, const Mat<T>& k, const Mat<T>& v) const {
    const int hd = vc.head_dim;
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hd)));
    Mat<T> o(q.rows(), q.cols());  // [P, Hv]
    for (int h = 0; h < vc.heads; ++h) {
      Mat<T> s = q.middleCols(h * hd, hd) * k.middleCols(h * hd, hd).transpose() * scale;  // [P, P]
      for (Eigen::Index r = 0; r < s.rows(); ++r) {
        auto p = s.row(r);
        p.array() -= p.maxCoeff();
        p = p.array().exp().matrix();
        const T sum = p.sum();  // of the unrounded weights, as the kernel's running sum
        if (bf16) round_bf16_inplace(p);
        p /= sum;
      }
      o.middleCols(h * hd, hd) = s * v.middleCols(h * hd, hd);
    }
    return o;
  }

  MatD forward(const VisionPatches& vp) const {
    const int Hv = vc.hidden, P = static_cast<int>(vp.rows.rows());
    Mat<T> patches = vp.rows.template cast<T>();  // [P, C*tp*p*p]
    rnd(patches);
    Mat<T> x = patches * w.patch_embed.transpose();  // [P, Hv]
    rnd(x);
    emit("vis.patch_embed", x);
    x = layer_norm(x, w.pre_ln_w, w.pre_ln_b, vc.ln_eps);
    rnd(x);
    for (int l = 0; l < vc.layers; ++l) {
      const auto& L = w.layers[static_cast<std::size_t>(l)];
      Mat<T> a = layer_norm(x, L.ln1_w, L.ln1_b, vc.ln_eps);  // [P, Hv]
      rnd(a);
      const Mat<T> qkv = affine(a, L.qkv, L.qkv_b);  // [P, 3*Hv]
      Mat<T> q = qkv.leftCols(Hv), k = qkv.middleCols(Hv, Hv), v = qkv.rightCols(Hv);  // [P, Hv] each
      vision_rope3d(q, vc.heads, vc.head_dim, vc.rope_dims, vc.rope_theta, vp.pos);
      vision_rope3d(k, vc.heads, vc.head_dim, vc.rope_dims, vc.rope_theta, vp.pos);
      rnd(q), rnd(k), rnd(v);
      Mat<T> o = attention(q, k, v);  // [P, Hv]
      rnd(o);
      x += affine(o, L.out, L.out_b);
      rnd(x);
      a = layer_norm(x, L.ln2_w, L.ln2_b, vc.ln_eps);
      rnd(a);
      Mat<T> mid = gelu(affine(a, L.fc1, L.fc1_b));  // [P, mlp]
      rnd(mid);
      x += affine(mid, L.fc2, L.fc2_b);
      rnd(x);
      emit(fmt::format("vis.blk.{}.out", l), x);
    }
    Mat<T> y1 = gelu(affine(x, w.proj1, w.proj1_b));  // [P, H]
    rnd(y1);
    Mat<T> y = affine(y1, w.proj2, w.proj2_b);  // [P, H]
    rnd(y);
    emit("vis.proj", y);
    const int m2 = vc.merge * vc.merge, H = vc.text_hidden;
    // A window's patches are consecutive rows: [P, H] viewed as [P/m2, m2*H], row-major per window.
    Mat<T> cat(P / m2, m2 * H);  // [P/4, 4H]
    for (int t = 0; t < P / m2; ++t)
      for (int j = 0; j < m2; ++j) cat.block(t, j * H, 1, H) = y.row(t * m2 + j);
    Mat<T> z1 = gelu(affine(cat, w.merge1, w.merge1_b));  // [P/4, H]
    rnd(z1);
    Mat<T> z = affine(z1, w.merge2, w.merge2_b);  // [P/4, H]
    rnd(z);
    emit("vis.merged", z);
    return z.template cast<double>();
  }
};

}  // namespace

template <class T>
void vision_rope3d(Mat<T>& x, int heads, int hd, int rd, double theta, const std::vector<std::array<int, 3>>& pos) {
  if (x.cols() != static_cast<Eigen::Index>(heads) * hd || static_cast<Eigen::Index>(pos.size()) != x.rows() ||
      rd % 2 != 0 || 3 * rd > hd)
    throw std::invalid_argument(fmt::format("vision_rope3d: x [{}, {}] with {} positions, heads {}, head_dim {}, rope_dims "
                                            "{}: expected cols = heads * head_dim, a position a row, even rope_dims "
                                            "with 3 * rope_dims <= head_dim",
                                            x.rows(), x.cols(), pos.size(), heads, hd, rd));
  // The 3*rd rotated dims of a head: frequencies [t: rd/2 | h: rd/2 | w: rd/2] in the first half,
  // repeated in the second; rotate_half pairs dim i with i + 3*rd/2 (vision.h). Angles in fp64 in
  // every precision: the GPU's fp32 angles differ by < 1e-5 rad, far below a bf16 rounding.
  const int per_axis = rd / 2, half = 3 * per_axis;
  for (Eigen::Index r = 0; r < x.rows(); ++r)
    for (int h = 0; h < heads; ++h) {
      const int s = h * hd;
      for (int i = 0; i < half; ++i) {
        const int a = i / per_axis, j = i % per_axis;
        const double ang = pos[static_cast<std::size_t>(r)][a] * std::pow(theta, -2.0 * j / rd);
        const T c = static_cast<T>(std::cos(ang)), sn = static_cast<T>(std::sin(ang));
        const T x1 = x(r, s + i), x2 = x(r, s + i + half);
        x(r, s + i) = x1 * c - x2 * sn;
        x(r, s + i + half) = x2 * c + x1 * sn;
      }
    }
}

template void vision_rope3d<float>(Mat<float>&, int, int, int, double, const std::vector<std::array<int, 3>>&);
template void vision_rope3d<double>(Mat<double>&, int, int, int, double, const std::vector<std::array<int, 3>>&);

template <class T>
MatD vision_forward_as(const VisionConfig& vc, const VisionWeights<double>& w, const MatD& image, int height, int width,
                       bool emulate_bf16, VisionTrace* trace) {
  vc.validate();
  patch_grid(vc, height, width);  // validates the size
  if (image.rows() != vc.channels || image.cols() != static_cast<Eigen::Index>(height) * width)
    throw std::invalid_argument(fmt::format("vision_forward: image [{}, {}], expected [channels, height*width] = [{}, {}]",
                                            image.rows(), image.cols(), vc.channels,
                                            static_cast<Eigen::Index>(height) * width));
  if (static_cast<int>(w.layers.size()) != vc.layers || w.patch_embed.rows() != vc.hidden)
    throw std::invalid_argument("vision_forward: weights do not match the vision config");
  const VisionPatches vp = vision_patches(vc, image, height, width);
  if constexpr (std::is_same_v<T, double>)
    if (!emulate_bf16) return Tower<double>{vc, w, false, trace}.forward(vp);  // the truth: no copy of the weights
  const VisionWeights<T> wt = tower_weights<T>(w, emulate_bf16);
  return Tower<T>{vc, wt, emulate_bf16, trace}.forward(vp);
}

template MatD vision_forward_as<float>(const VisionConfig&, const VisionWeights<double>&, const MatD&, int, int, bool,
                                       VisionTrace*);
template MatD vision_forward_as<double>(const VisionConfig&, const VisionWeights<double>&, const MatD&, int, int, bool,
                                        VisionTrace*);

MatD vision_forward(const VisionConfig& vc, const VisionWeights<double>& w, const MatD& image, int height, int width,
                    VisionTrace* trace, Precision precision) {
  switch (precision) {
    case Precision::FP64: return vision_forward_as<double>(vc, w, image, height, width, false, trace);
    case Precision::FP32: return vision_forward_as<float>(vc, w, image, height, width, false, trace);
    case Precision::BF16: return vision_forward_as<float>(vc, w, image, height, width, true, trace);
  }
  throw std::invalid_argument("vision_forward: unknown precision");
}

}  // namespace m3
