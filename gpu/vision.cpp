// The vision tower on the GPU; see vision.h.
#include "gpu/vision.h"

#include "gpu/kernels/gelu.h"
#include "gpu/kernels/layer_norm.h"
#include "gpu/kernels/linear.h"
#include "gpu/kernels/vision_attention.h"
#include "gpu/kernels/vision_patches.h"
#include "gpu/kernels/vision_rope3d.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace m3::gpu {
namespace {

DeviceBuffer<bf16> upload_bf16(const MatD& m) {
  const MatF f = m.cast<float>();
  DeviceBuffer<bf16> d(static_cast<std::size_t>(f.size()));
  if (f.size()) d.upload(to_bf16(f.data(), static_cast<std::size_t>(f.size())));
  return d;
}

DeviceBuffer<float> upload_f32(const Vec<double>& v) {
  const Vec<float> f = v.cast<float>();
  DeviceBuffer<float> d(static_cast<std::size_t>(f.size()));
  if (f.size()) d.upload(f.data(), static_cast<std::size_t>(f.size()));
  return d;
}

void expect_shape(const char* name, Eigen::Index rows, Eigen::Index cols, Eigen::Index want_rows,
                  Eigen::Index want_cols) {
  if (rows != want_rows || cols != want_cols)
    throw GpuError(fmt::format("VisionTower: weight {} is [{}, {}], expected [{}, {}] for the vision config", name,
                               rows, cols, want_rows, want_cols));
}

template <class T>
void grow(DeviceBuffer<T>& b, std::size_t n) {
  if (b.size() < n) b = DeviceBuffer<T>(n);
}

struct Layer {
  DeviceBuffer<float> ln1_w, ln1_b, qkv_b, out_b, ln2_w, ln2_b, fc1_b, fc2_b;  // [Hv] / [3*Hv] / [mlp]
  DeviceBuffer<bf16> qkv, out, fc1, fc2;  // [3*Hv, Hv], [Hv, Hv], [mlp, Hv], [Hv, mlp]
};

}  // namespace

struct VisionTower::Impl {
  VisionConfig vc;
  int device = 0;
  Stream stream;
  CublasHandle cublas;
  DeviceBuffer<bf16> patch_embed;                   // [Hv, C*tp*p*p]
  DeviceBuffer<float> pre_w, pre_b;                 // [Hv]
  std::vector<Layer> layers;
  DeviceBuffer<bf16> proj1, proj2, merge1, merge2;  // [H, Hv], [H, H], [H, 4H], [H, H]
  DeviceBuffer<float> proj1_b, proj2_b, merge1_b, merge2_b;  // [H]
  std::size_t weight_bytes = 0;

  // The last uploaded image and the activations, grown to the largest image so far.
  int height = 0, width = 0, P = 0;
  DeviceBuffer<float> image;     // [C, Hpx*Wpx]
  DeviceBuffer<bf16> patches;    // [P, C*tp*p*p]
  DeviceBuffer<std::int32_t> pos;  // [P, 3]
  DeviceBuffer<bf16> x, a, o;    // [P, Hv]: residual stream, normed input, attention output
  DeviceBuffer<bf16> qkv;        // [P, 3*Hv]
  DeviceBuffer<bf16> mid;        // [P, mlp]
  DeviceBuffer<bf16> y1, y;      // [P, H]: projector hidden and output (y viewed as [P/4, 4H])
  DeviceBuffer<bf16> z1, z;      // [P/merge^2, H]: merger hidden and output
  DeviceBuffer<float> acc;       // [P, max(3*Hv, mlp, H)]: fp32 GEMM outputs before their epilogue

  void check_image(const MatD& img, int h, int w) const {
    const int unit = vc.patch * vc.merge;
    if (h <= 0 || w <= 0 || h % unit != 0 || w % unit != 0 || h > vc.max_image || w > vc.max_image)
      throw GpuError(fmt::format("VisionTower::forward: image {}x{}, expected each side a positive multiple of "
                                 "patch * merge = {} and at most max_image = {}",
                                 h, w, unit, vc.max_image));
    if (img.rows() != vc.channels || img.cols() != static_cast<Eigen::Index>(h) * w)
      throw GpuError(fmt::format("VisionTower::forward: image [{}, {}], expected [channels, height*width] = [{}, {}]",
                                 img.rows(), img.cols(), vc.channels, static_cast<Eigen::Index>(h) * w));
  }

  void trace_bf16(VisionTrace* tr, const std::string& name, const bf16* d, int rows, int cols) const {
    if (!tr) return;
    std::vector<bf16> h(static_cast<std::size_t>(rows) * cols);
    M3_CUDA_CHECK(cudaMemcpyAsync(h.data(), d, h.size() * sizeof(bf16), cudaMemcpyDeviceToHost, stream.get()));
    stream.sync();
    const auto f = from_bf16(h.data(), h.size());
    MatD m(rows, cols);
    std::copy(f.begin(), f.end(), m.data());
    tr->tensors.emplace_back(name, std::move(m));
  }
};

VisionTower::VisionTower(const VisionConfig& vc, const VisionWeights<double>& w, int device)
    : p_(std::make_unique<Impl>()) {
  vc.validate();
  if (vc.head_dim % 16 != 0 || vc.head_dim > 128)
    throw std::invalid_argument(fmt::format("VisionTower: head_dim = {}, the GPU attention kernel covers multiples "
                                            "of 16 up to 128",
                                            vc.head_dim));
  M3_CUDA_CHECK(cudaSetDevice(device));
  Impl& P = *p_;
  P.vc = vc;
  P.device = device;
  const int Hv = vc.hidden, H = vc.text_hidden, m2 = vc.merge * vc.merge;
  const int K = vc.channels * vc.temporal_patch * vc.patch * vc.patch;
  if (static_cast<int>(w.layers.size()) != vc.layers)
    throw GpuError(fmt::format("VisionTower: {} layers of weights, expected {}", w.layers.size(), vc.layers));
  expect_shape("patch_embed", w.patch_embed.rows(), w.patch_embed.cols(), Hv, K);
  const auto vec = [&](const char* name, const Vec<double>& v, int n) { expect_shape(name, v.size(), 1, n, 1); };
  vec("pre_ln_w", w.pre_ln_w, Hv), vec("pre_ln_b", w.pre_ln_b, Hv);
  for (const auto& L : w.layers) {
    vec("ln1_w", L.ln1_w, Hv), vec("ln1_b", L.ln1_b, Hv), vec("ln2_w", L.ln2_w, Hv), vec("ln2_b", L.ln2_b, Hv);
    expect_shape("qkv", L.qkv.rows(), L.qkv.cols(), 3 * Hv, Hv), vec("qkv_b", L.qkv_b, 3 * Hv);
    expect_shape("out", L.out.rows(), L.out.cols(), Hv, Hv), vec("out_b", L.out_b, Hv);
    expect_shape("fc1", L.fc1.rows(), L.fc1.cols(), vc.mlp, Hv), vec("fc1_b", L.fc1_b, vc.mlp);
    expect_shape("fc2", L.fc2.rows(), L.fc2.cols(), Hv, vc.mlp), vec("fc2_b", L.fc2_b, Hv);
  }
  expect_shape("proj1", w.proj1.rows(), w.proj1.cols(), H, Hv), vec("proj1_b", w.proj1_b, H);
  expect_shape("proj2", w.proj2.rows(), w.proj2.cols(), H, H), vec("proj2_b", w.proj2_b, H);
  expect_shape("merge1", w.merge1.rows(), w.merge1.cols(), H, m2 * H), vec("merge1_b", w.merge1_b, H);
  expect_shape("merge2", w.merge2.rows(), w.merge2.cols(), H, H), vec("merge2_b", w.merge2_b, H);

  P.patch_embed = upload_bf16(w.patch_embed);
  P.pre_w = upload_f32(w.pre_ln_w), P.pre_b = upload_f32(w.pre_ln_b);
  for (const auto& L : w.layers) {
    Layer d;
    d.ln1_w = upload_f32(L.ln1_w), d.ln1_b = upload_f32(L.ln1_b);
    d.ln2_w = upload_f32(L.ln2_w), d.ln2_b = upload_f32(L.ln2_b);
    d.qkv = upload_bf16(L.qkv), d.qkv_b = upload_f32(L.qkv_b);
    d.out = upload_bf16(L.out), d.out_b = upload_f32(L.out_b);
    d.fc1 = upload_bf16(L.fc1), d.fc1_b = upload_f32(L.fc1_b);
    d.fc2 = upload_bf16(L.fc2), d.fc2_b = upload_f32(L.fc2_b);
    P.weight_bytes += d.qkv.bytes() + d.out.bytes() + d.fc1.bytes() + d.fc2.bytes();
    P.layers.push_back(std::move(d));
  }
  P.proj1 = upload_bf16(w.proj1), P.proj1_b = upload_f32(w.proj1_b);
  P.proj2 = upload_bf16(w.proj2), P.proj2_b = upload_f32(w.proj2_b);
  P.merge1 = upload_bf16(w.merge1), P.merge1_b = upload_f32(w.merge1_b);
  P.merge2 = upload_bf16(w.merge2), P.merge2_b = upload_f32(w.merge2_b);
  P.weight_bytes += P.patch_embed.bytes() + P.proj1.bytes() + P.proj2.bytes() + P.merge1.bytes() + P.merge2.bytes();
}

VisionTower::~VisionTower() = default;

const VisionConfig& VisionTower::config() const { return p_->vc; }
cudaStream_t VisionTower::stream() const { return p_->stream.get(); }
std::size_t VisionTower::weight_bytes() const { return p_->weight_bytes; }

void VisionTower::upload_image(const MatD& image, int height, int width) {
  Impl& S = *p_;
  S.check_image(image, height, width);
  M3_CUDA_CHECK(cudaSetDevice(S.device));
  const VisionConfig& vc = S.vc;
  const int P = (height / vc.patch) * (width / vc.patch);
  const std::size_t Pz = static_cast<std::size_t>(P), Hv = vc.hidden, H = vc.text_hidden;
  const std::size_t K = static_cast<std::size_t>(vc.channels) * vc.temporal_patch * vc.patch * vc.patch;
  const MatF f = image.cast<float>();
  grow(S.image, static_cast<std::size_t>(f.size()));
  S.image.upload(f.data(), static_cast<std::size_t>(f.size()), S.stream.get());
  grow(S.patches, Pz * K);
  grow(S.pos, Pz * 3);
  grow(S.x, Pz * Hv), grow(S.a, Pz * Hv), grow(S.o, Pz * Hv);
  grow(S.qkv, Pz * 3 * Hv);
  grow(S.mid, Pz * vc.mlp);
  grow(S.y1, Pz * H), grow(S.y, Pz * H);
  const std::size_t Tz = Pz / static_cast<std::size_t>(vc.merge * vc.merge);  // merged tokens
  grow(S.z1, Tz * H), grow(S.z, Tz * H);
  grow(S.acc, Pz * std::max({3 * Hv, static_cast<std::size_t>(vc.mlp), H}));
  S.height = height, S.width = width, S.P = P;
}

const bf16* VisionTower::run(VisionTrace* tr) {
  Impl& S = *p_;
  if (S.P == 0) throw GpuError("VisionTower::run: no image uploaded (call upload_image first)");
  M3_CUDA_CHECK(cudaSetDevice(S.device));
  const VisionConfig& vc = S.vc;
  const cudaStream_t st = S.stream.get();
  const cublasHandle_t cb = S.cublas.get();
  const int P = S.P, Hv = vc.hidden, H = vc.text_hidden, mlp = vc.mlp, m2 = vc.merge * vc.merge;
  const int K = vc.channels * vc.temporal_patch * vc.patch * vc.patch;
  const double eps = vc.ln_eps;
  float* acc = S.acc.data();

  vision_patches(S.image.data(), PatchShape{vc.channels, S.height, S.width, vc.patch, vc.temporal_patch, vc.merge},
                 S.patches.data(), S.pos.data(), st);
  linear(cb, S.patches.data(), S.patch_embed.data(), S.x.data(), P, K, Hv, st);  // [P, Hv], no bias
  S.trace_bf16(tr, "vis.patch_embed", S.x.data(), P, Hv);
  layer_norm(S.x.data(), S.pre_w.data(), S.pre_b.data(), eps, S.x.data(), P, Hv, st);

  const VisionRopeDims rope{vc.heads, vc.head_dim, vc.rope_dims, vc.rope_theta};
  for (int l = 0; l < vc.layers; ++l) {
    const Layer& L = S.layers[static_cast<std::size_t>(l)];
    if (l == 0) layer_norm(S.x.data(), L.ln1_w.data(), L.ln1_b.data(), eps, S.a.data(), P, Hv, st);
    linear(cb, S.a.data(), L.qkv.data(), acc, P, Hv, 3 * Hv, st);                    // [P, 3*Hv] fp32
    vision_rope3d(acc, L.qkv_b.data(), S.pos.data(), rope, S.qkv.data(), P, st);      // [P, 3*Hv] bf16
    vision_attention(S.qkv.data(), S.qkv.data() + Hv, S.qkv.data() + 2 * Hv, 3 * Hv, P, vc.heads, vc.head_dim,
                     S.o.data(), st);                                                 // [P, Hv]
    linear(cb, S.o.data(), L.out.data(), acc, P, Hv, Hv, st);                        // [P, Hv] fp32
    add_layer_norm(S.x.data(), acc, L.out_b.data(), L.ln2_w.data(), L.ln2_b.data(), eps, S.a.data(), P, Hv, st);
    linear(cb, S.a.data(), L.fc1.data(), acc, P, Hv, mlp, st);                       // [P, mlp] fp32
    bias_gelu(acc, L.fc1_b.data(), S.mid.data(), P, mlp, st);                         // [P, mlp]
    linear(cb, S.mid.data(), L.fc2.data(), acc, P, mlp, Hv, st);                     // [P, Hv] fp32
    // The residual add closes this block; the next block's LN1 rides along (none after the last).
    const bool last = l + 1 == vc.layers;
    const Layer* next = last ? nullptr : &S.layers[static_cast<std::size_t>(l) + 1];
    add_layer_norm(S.x.data(), acc, L.fc2_b.data(), next ? next->ln1_w.data() : nullptr,
                   next ? next->ln1_b.data() : nullptr, eps, next ? S.a.data() : nullptr, P, Hv, st);
    S.trace_bf16(tr, fmt::format("vis.blk.{}.out", l), S.x.data(), P, Hv);
  }

  linear(cb, S.x.data(), S.proj1.data(), acc, P, Hv, H, st);  // [P, H] fp32
  bias_gelu(acc, S.proj1_b.data(), S.y1.data(), P, H, st);
  linear(cb, S.y1.data(), S.proj2.data(), acc, P, H, H, st);
  bias_add(acc, S.proj2_b.data(), S.y.data(), P, H, st);      // [P, H]
  S.trace_bf16(tr, "vis.proj", S.y.data(), P, H);
  const int T = P / m2;
  linear(cb, S.y.data(), S.merge1.data(), acc, T, m2 * H, H, st);  // y as [T, 4H] -> [T, H] fp32
  bias_gelu(acc, S.merge1_b.data(), S.z1.data(), T, H, st);
  linear(cb, S.z1.data(), S.merge2.data(), acc, T, H, H, st);
  bias_add(acc, S.merge2_b.data(), S.z.data(), T, H, st);          // [T, H]
  S.trace_bf16(tr, "vis.merged", S.z.data(), T, H);
  return S.z.data();
}

MatD VisionTower::forward(const MatD& image, int height, int width, VisionTrace* trace) {
  upload_image(image, height, width);
  const bf16* z = run(trace);
  const Impl& S = *p_;
  const int T = S.P / (S.vc.merge * S.vc.merge), H = S.vc.text_hidden;
  std::vector<bf16> h(static_cast<std::size_t>(T) * H);
  M3_CUDA_CHECK(cudaMemcpyAsync(h.data(), z, h.size() * sizeof(bf16), cudaMemcpyDeviceToHost, S.stream.get()));
  S.stream.sync();
  const auto f = from_bf16(h.data(), h.size());
  MatD out(T, H);  // [tokens, H]
  std::copy(f.begin(), f.end(), out.data());
  return out;
}

}  // namespace m3::gpu
