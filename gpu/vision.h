// The vision tower, projector and patch merger on the GPU, twin of m3::vision_forward
// (reference/vision.h): an image becomes text-model input rows [tokens, H].
//
//   m3::gpu::VisionTower tower(vc, m3::generate_vision_weights(vc, seed));
//   m3::MatD features = tower.forward(image, height, width);   // [tokens, H], bf16 values
//
// Per image (P patches, all rows of one op in one launch; kernels in gpu/kernels/):
//   vision_patches                      image (fp32) -> patches [P, C*tp*p*p] bf16, pos [P, 3]
//   linear                              patch embedding (Conv3d as a GEMM)        -> x [P, Hv]
//   layer_norm                          pre_layrnorm, in place
//   per block:  layer_norm (block 0) | add_layer_norm (fused into the previous block's end) -> a
//               linear fp32 -> vision_rope3d (qkv bias + 3-D RoPE)  -> qkv [P, 3*Hv] bf16
//               vision_attention (bidirectional flash attention)     -> o [P, Hv]
//               linear fp32 -> add_layer_norm (x += o W^T + b, LN2)   -> a
//               linear fp32 -> bias_gelu                             -> m [P, mlp]
//               linear fp32 -> add_layer_norm (x += fc2 + b, next block's LN1, or none at the end)
//   linear fp32 -> bias_gelu, linear fp32 -> bias_add                projector -> y [P, H]
//   the same on y viewed as [P/4, 4H] (a window's patches are consecutive rows: no copy) -> [P/4, H]
// Numerics (DESIGN §3, like the text model): bf16 weight matrices and activations, fp32
// accumulation (cuBLAS, CUBLAS_COMPUTE_32F) and fp32 softmax/LayerNorm arithmetic. Every GEMM whose
// output gets a bias writes fp32, and its epilogue kernel (bias, RoPE, GELU, residual add) rounds
// to bf16 once: one bf16 rounding per op output. LayerNorm weights and all biases stay fp32 (a few
// KB; the reference's fp64 values rounded once to fp32, exactly representable for a bf16
// checkpoint). Weight matrices are rounded fp64 -> fp32 -> bf16 (the double rounding can differ
// from a direct fp64 -> bf16 rounding only on exact ties of the fp32 value: irrelevant here).
// Trace: vis.patch_embed, vis.blk.{l}.out, vis.proj, vis.merged (bf16 values widened to fp64), the
// reference's names and shapes.
#pragma once

#include "gpu/runtime/buffer.h"
#include "reference/vision.h"

#include <memory>

namespace m3::gpu {

class VisionTower {
 public:
  // Validates vc (std::invalid_argument from VisionConfig::validate, or naming head_dim when the
  // attention kernel does not cover it: a multiple of 16 up to 128) and the weights' shapes against
  // it (GpuError naming the tensor), then uploads the weights to `device`.
  VisionTower(const VisionConfig& vc, const VisionWeights<double>& w, int device = 0);
  ~VisionTower();
  VisionTower(const VisionTower&) = delete;
  VisionTower& operator=(const VisionTower&) = delete;

  // image [C, height*width] (channel rows, pixels row-major) -> features [tokens, H]. Throws
  // GpuError naming the expected size for an image whose shape does not match height x width, or
  // whose sides are not multiples of patch * merge up to max_image pixels.
  MatD forward(const MatD& image, int height, int width, VisionTrace* trace = nullptr);

  // The two halves of forward, for benchmarks: upload_image validates and copies the image to the
  // device (activation buffers grow to its size); run enqueues the whole tower on stream() for the
  // last uploaded image and returns the device features [tokens, H] (valid until the next run).
  // Without a trace, run does not synchronize.
  void upload_image(const MatD& image, int height, int width);
  const bf16* run(VisionTrace* trace = nullptr);

  const VisionConfig& config() const;
  cudaStream_t stream() const;
  std::size_t weight_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> p_;
};

}  // namespace m3::gpu
