// MoE experts + shared expert on the GPU, twin of m3::ref::moe_experts (reference/ops/moe_experts.h):
//   y [T, H] = bf16( routed_scale * sum_j weights[t, j] * Expert_{experts[t, j]}(x_t) + Shared(x_t) )
// every expert (and the shared one) a SwiGLU-OAI MLP. bf16 storage, fp32 accumulation.
//
// Steps (on the call's stream s, except the LOOP path's side streams, forked from and joined to s):
//  1. Permutation: a counting sort of the T*K_e (token, slot) pairs by expert on the device (per-expert
//     ranks in token order -> exclusive scan of the counts -> scatter), gathering x's rows into a
//     permuted [T*K_e, H] buffer where expert e's rows sit at [off[e], off[e+1]), in token order (the
//     reference's order).
//  2. One cudaMemcpyAsync of the E+1 offsets to pinned host memory and a host wait on it: cuBLAS takes
//     the per-expert row counts on the host. The shared expert is enqueued between the copy and the
//     wait, so the GPU runs it while the host waits and then enqueues the expert GEMMs: no idle gap.
//     A device-side grouped GEMM (row counts read on the device) would remove the wait; it also
//     makes this call unusable inside CUDA graph capture.
//  3. Expert GEMMs over the non-empty experts only: [n_e, H] x [2I, H]^T -> gate_up [n_e, 2I] bf16,
//     SwiGLU-OAI -> act [n_e, I] bf16, [n_e, I] x [H, I]^T -> [n_e, H] bf16 (written over the
//     permuted x rows, dead by then: the workspace holds one [T*K_e, H] buffer), through a loop of
//     cublasGemmEx (gpu::linear) per expert spread over 4 side streams (the default: faster) or
//     cublasGemmGroupedBatchedEx (one call per GEMM, one group per expert): MoeGemmPath.
//  4. Combine: y[t] = bf16(routed_scale * sum_j w_j * out_row_j + shared_row) in fp32, the slots taken
//     in ascending expert id (ties: slot order), as the reference; each token gathers its K_e rows
//     through the inverse permutation (no atomics): bitwise deterministic across calls.
// Rounding: gate_up, act and each expert's (and the shared expert's) output rows are stored in bf16;
// the reference rounds at the same points with ref::Rounding::BF16 (its bf16-emulating mode, as the
// model and the op cases run it). Against the unrounded reference (Rounding::NONE) results differ by
// a few bf16 roundings relative to the output's scale (tests/gpu/test_moe_experts.cpp states the bound).
//
// An expert id outside [0, E) cannot throw on the device: its (token, slot) pair joins no expert,
// nothing is read or written out of bounds, and that token's whole output row is NaN (the other
// tokens are untouched), so the fault is visible downstream.
#pragma once

#include "gpu/kernels/swiglu_oai.h"
#include "gpu/runtime/buffer.h"

#include <cstddef>
#include <cstdint>
#include <vector>

namespace m3::gpu {

// Expert weights on the device, stacked for grouped GEMMs.
struct MoeExpertWeights {
  const bf16* gate_up = nullptr;         // [E, 2I, H]: expert e's gate rows [I, H] then up rows [I, H]
  const bf16* down = nullptr;            // [E, H, I]
  int E = 0, I = 0;
  const bf16* shared_gate_up = nullptr;  // [2*Is, H] gate then up; nullptr = no shared expert
  const bf16* shared_down = nullptr;     // [H, Is]
  int Is = 0;
};

// How the expert GEMMs are issued. LOOP: per non-empty expert a cublasGemmEx chain (gate_up, SwiGLU,
// down) on one of 4 side streams (own cuBLAS handles, forked from and joined back to s; they overlap
// the shared expert). GROUPED: one cublasGemmGroupedBatchedEx per projection on s; it falls back to
// LOOP where it cannot run: cuBLAS < 12.5, H or I not a multiple of 8, or weights not 16-byte
// aligned (it cannot check the alignment of pointers that live on the device). Measured on an H200
// (cuBLAS 13.0, M3 shapes, E 128, K_e 4, uniform routing; the expert GEMMs alone): LOOP 3.4 / 4.5 /
// 12.6 ms at T = 512 / 4096 / 16384, GROUPED 3.9 / 9.2 / 28.9 ms: LOOP is the default.
enum class MoeGemmPath { GROUPED, LOOP };

// The largest K_e the combine handles (its per-token slot list lives in shared memory). M3: 4.
inline constexpr int kMoeMaxExpertsPerToken = 64;

// Workspace bytes for T tokens (permuted rows [T*K_e, H], reused for the expert outputs, [.., 2I]
// gate_up, [.., I] act, ranks/inverse permutation/counts/offsets, the grouped GEMM's pointer arrays,
// the shared expert's scratch; ~2 * T*K_e * (H + 1.5 I) bytes). 0 when T == 0. Throws GpuError for bad dims.
std::size_t moe_experts_workspace_bytes(int T, int H, int K_e, const MoeExpertWeights& w);

// x [T, H] bf16, experts [T, K_e] int32 (device), weights [T, K_e] fp32 (device)
//   -> y [T, H] bf16 = bf16( routed_scale * sum_j weights[t,j] * Expert_{experts[t,j]}(x_t) + Shared(x_t) )
// y may alias x (x is last read before y is first written). Blocks the host until the offsets are
// on the host (step 2 above). Sets the handle's stream to s. Throws GpuError for bad dims / null
// pointers / short workspace.
void moe_experts(cublasHandle_t h, const bf16* x, const std::int32_t* experts, const float* weights,
                 int T, int H, int K_e, const MoeExpertWeights& w, double routed_scale,
                 const SwigluParams& p, bf16* y, void* workspace, std::size_t workspace_bytes,
                 cudaStream_t s, MoeGemmPath path = MoeGemmPath::LOOP);

// The steps apart, for the benchmark (the expert GEMMs timed alone) and tests. After a moe_experts
// call with this workspace and these dims, moe_experts_offsets returns the E+1 expert offsets
// (synchronizing s), and moe_experts_gemms re-runs step 3 on the workspace's [T*K_e, H] row buffer:
// both GEMMs, and the SwiGLU between them when p is not null (with p null, act keeps its contents).
// After a full call that buffer holds the expert outputs, not x's rows: right for timing, not values.
std::vector<std::int32_t> moe_experts_offsets(int T, int H, int K_e, const MoeExpertWeights& w,
                                              const void* workspace, cudaStream_t s);
void moe_experts_gemms(cublasHandle_t h, const std::vector<std::int32_t>& offsets, int T, int H, int K_e,
                       const MoeExpertWeights& w, const SwigluParams* p, void* workspace, MoeGemmPath path,
                       cudaStream_t s);

}  // namespace m3::gpu
