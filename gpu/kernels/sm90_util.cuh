// Hopper (sm_90a) building blocks shared by the wgmma kernels (sm90_attention_prefill.cu,
// sm90_msa_index.cu): mbarriers, TMA 2D loads, 128-byte-swizzled shared-memory descriptors, the
// m64n128k16 bf16 wgmma with A and B from shared memory or A from registers, register fences; and
// on the host, the sm_90a capability probe and tensor-map encoding. Included by .cu files only.
#pragma once

#include "gpu/runtime/buffer.h"
#include "gpu/runtime/check.h"

#include <cuda.h>          // CUtensorMap and its enums (types only: the driver call goes through the runtime)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <cstdint>

namespace m3::gpu::sm90 {

constexpr int kBoxCols = 64;  // a TMA box row: 64 bf16 = 128 bytes, the swizzle span

// True when the current device has compute capability 9.0 and this library was built with sm_90a
// code (the only target whose machine code has wgmma and setmaxnreg). Cached per device.
bool available();

// Row-major bf16 [rows, cols] in global memory, read as boxes of [box_rows, 64] with the 128-byte
// swizzle; reads outside the matrix return zeros. `op` and `name` label the error.
CUtensorMap make_map(const bf16* p, std::int64_t rows, std::int64_t cols, int box_rows, const char* op,
                     const char* name);

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarriers and TMA ----
__device__ __forceinline__ void mbar_init(std::uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(std::uint32_t bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(std::uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Spins until the phase of the given parity has completed.
__device__ __forceinline__ void mbar_wait(std::uint32_t bar, std::uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "LAB_WAIT:\n"  // a label inside braces is local to them: each inlined copy has its own
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra LAB_WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// One 2D box (64 columns x rows) of a tensor map into shared memory at dst; completes on bar.
__device__ __forceinline__ void tma_load(std::uint32_t dst, const CUtensorMap* map, int col, int row,
                                         std::uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(col), "r"(row), "r"(bar)
      : "memory");
}

// ---- wgmma ----
// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
// offsets (all in 16-byte units), layout type 1 in bits 62-63; base offset 0 (1024-aligned atoms).
__device__ __forceinline__ std::uint64_t desc_sw128(std::uint32_t addr, std::uint32_t lbo, std::uint32_t sbo) {
  return static_cast<std::uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<std::uint64_t>(lbo >> 4) << 16) |
         (static_cast<std::uint64_t>(sbo >> 4) << 32) | (std::uint64_t{1} << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most kPending of this warpgroup's committed wgmma groups are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across wgmma issue / wait
// (the wgmma writes them asynchronously, which the asm operands alone do not express).
// Used before wgmma.fence (so every write of those registers precedes it, as PTX requires) and
// after wgmma.wait_group.
__device__ __forceinline__ void reg_fence(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int kN>
__device__ __forceinline__ void reg_fence(std::uint32_t (&r)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[i][e])::"memory");
}

#define M3_F8(i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define M3_F64 M3_F8(0), M3_F8(8), M3_F8(16), M3_F8(24), M3_F8(32), M3_F8(40), M3_F8(48), M3_F8(56)
#define M3_D64                                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "  \
  "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "  \
  "%62, %63}"

// d [64x128 fp32] (+)= A [64x16 bf16, K-major smem] * B [16x128 bf16, K-major smem]; accumulate
// into d when acc != 0, else overwrite it.
__device__ __forceinline__ void wgmma_ss(float (&d)[64], std::uint64_t da, std::uint64_t db, int acc) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " M3_D64 ", %64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : M3_F64
      : "l"(da), "l"(db), "r"(acc));
}
// d [64x128 fp32] += A [64x16 bf16, registers] * B [16x128 bf16, MN-major smem (transpose bit)].
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const std::uint32_t (&a)[4], std::uint64_t db) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " M3_D64 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n"
      "}\n"
      : M3_F64
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(1));
}
#undef M3_D64
#undef M3_F64
#undef M3_F8

// d [64x128 fp32] (+)= A [64 rows, 128] * B [128 rows, 128]^T with A and B in the 128-byte-swizzled
// two-column-half layout (sm90_attention_prefill.cu explains it): 8 k-steps of 16, steps 0-3 in
// half 0 and 4-7 `a_half` / `b_half` bytes further. accumulate = false: the first step overwrites
// d. Issues the wgmmas only: the caller fences before and commits after.
__device__ __forceinline__ void wgmma_k128_ss(float (&d)[64], std::uint32_t a, std::uint32_t a_half, std::uint32_t b,
                                              std::uint32_t b_half, bool accumulate) {
#pragma unroll
  for (int ks = 0; ks < 8; ++ks) {
    const std::uint32_t aoff = (ks / 4) * a_half + (ks % 4) * 32;
    const std::uint32_t boff = (ks / 4) * b_half + (ks % 4) * 32;
    wgmma_ss(d, desc_sw128(a + aoff, 16, 1024), desc_sw128(b + boff, 16, 1024), accumulate || ks > 0);
  }
}

// 2^x on the SFU (relative error ~2^-22, far below a bf16 rounding); 2^-inf = +0.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
// Orders this thread's generic-proxy shared-memory accesses (stores, cp.async data it has waited
// for) before later async-proxy ones (wgmma, TMA) of the CTA, and async-proxy reads before later
// generic writes; a barrier then publishes the order to the other threads.
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// NaN-propagating max (PTX max.NaN): a NaN operand makes the result NaN, as the reference's
// PropagateNaN reductions do; one instruction where fmaxf would drop the NaN.
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
#endif  // __CUDA_ARCH__

}  // namespace m3::gpu::sm90
