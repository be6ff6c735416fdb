// Dense causal GQA attention on the GPU, twin of m3::ref::attention_dense
// (reference/ops/attention_dense.h), for any number of query tokens at arbitrary positions
// (query-outer flash-decoding; decode is T = 1 per sequence, a prefill chunk is correct but slow).
//   z_j = q_h . k_g(j) / sqrt(D) for every cache key j <= p_t, g = h / (Hq/Hkv);
//   out = softmax(z) . V, fp32 online softmax (base 2), fp32 accumulation, one bf16 rounding.
// The keys 0..p_t of each (query, KV group) are split into chunks; one CTA scores a chunk for the
// G = Hq/Hkv heads of the group at once with bf16 tensor-core MMAs (each K/V element is read once
// per group, not per head), writes a partial (o, m, l) to a caller-owned workspace, and a merge
// kernel combines the chunks by their log-sum-exp.
//
// Batching: B sequences of T queries each, sequence b owning cache rows [b*N, b*N + N) of k and v
// and query rows [b*T, b*T + T) of q / q_pos / out. B = 1 is exactly the reference's layout.
// Paged caches (kv_cache.h): with pages.table set, k and v are page pools and sequence b's key j is
// physical row table[b*pages_per_seq + j/128]*128 + j%128 (N = the logical capacity a sequence);
// the pages holding keys 0..p_t must have ids >= 0, and a query that would read a negative id gets
// a NaN output row. The arithmetic does not depend on the layout: the outputs are bit-identical.
// Requirements (checked, GpuError otherwise): D in {16, 32, 64, 128}; Hq % Hkv == 0; 16-byte aligned
// q, k, v and workspace. Positions are on the device and cannot be checked by the launcher: a
// query whose position is outside [0, N) gets a NaN output row (never an out-of-bounds read).
#pragma once

#include "gpu/kernels/kv_cache.h"
#include "gpu/runtime/buffer.h"
#include "reference/dims.h"

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace m3::gpu {

// Bytes of workspace attention_dense needs for these arguments (0 when T == 0). The split plan
// behind it is sized to the current device (one wave of CTAs), so call it with that device set.
std::size_t attention_dense_workspace_bytes(int T, int N, const AttnDims& dims, int B = 1);

// q [B*T, Hq*D], k, v [B*N, Hkv*D] (paged: [n_pages*128, Hkv*D]), q_pos [B*T] (device, int64)
// -> out [B*T, Hq*D]. workspace: device memory of at least attention_dense_workspace_bytes(T, N,
// dims, B) bytes (the same for both layouts), 16-byte aligned; its contents need no initialization.
void attention_dense(const bf16* q, const bf16* k, const bf16* v, const std::int64_t* q_pos, int T,
                     int N, const AttnDims& dims, bf16* out, cudaStream_t s, void* workspace,
                     std::size_t workspace_bytes, int B = 1, CachePages pages = {});

namespace detail {

// One launch of the shared split-K attention machinery (used by attention_dense and
// msa_attention). sel == nullptr: dense causal over keys 0..p; else the keys of the selected
// blocks (sel row (b*Hkv + g)*T + t, k_blk slots, -1 = unused), causal inside the local block.
struct AttnLaunch {
  const bf16* q = nullptr;
  const bf16* k = nullptr;
  const bf16* v = nullptr;
  const std::int64_t* q_pos = nullptr;
  const std::int32_t* sel = nullptr;
  int B = 1, T = 0, N = 0, Hq = 0, Hkv = 0, D = 0;
  CachePages pages;        // k / v layout (table == nullptr: contiguous)
  int blk = 0, k_blk = 0;  // sparse only
  // Fused selection (select_attention_run): the index scores [B*Hkv*T, NB] (index head = KV
  // group), the selection's output [B*Hkv*T, k_blk], and msa_select's forced-block counts.
  const float* scores = nullptr;
  std::int32_t* sel_out = nullptr;
  int NB = 0, local = 0, init = 0;
  int splits = 1;          // CTAs per (query, group, m-tile)
  int chunk = 0;           // keys (dense) or selection slots (sparse) per split
  float* part_o = nullptr;   // [B*T*Hq, splits, D] unnormalized partial outputs
  float2* part_ml = nullptr; // [B*T*Hq, splits] (running max in log2 units, sum of weights)
  bf16* out = nullptr;
};

struct SplitPlan {
  int splits = 1;
  int chunk = 0;
};

// CTAs of `kernel` that are resident on the current device at once (occupancy x SMs) at `smem`
// bytes of dynamic shared memory, after raising the kernel's dynamic shared-memory limit to
// `smem` (the most it is ever launched with). Cached per (device, kernel): call it before every
// launch, it costs a map lookup.
int resident_ctas(const void* kernel, int threads, int smem);

// The configuration of a cudaLaunchKernelEx launch of `ctas` CTAs along x with the attributes the
// MSA decode chain uses: programmatic dependent launch (pdl: the kernel may start during the tail
// of the one before it and must call pdl_wait before reading that kernel's output) and a
// thread-block cluster of `cluster` CTAs along x (0: none). cfg.attrs points into the object, so
// it neither copies nor moves.
struct LaunchConfig {
  cudaLaunchAttribute attr[2] = {};
  cudaLaunchConfig_t cfg{};
  LaunchConfig(long ctas, int threads, std::size_t smem, cudaStream_t s, bool pdl, unsigned cluster = 0) {
    cfg.gridDim = dim3(static_cast<unsigned>(ctas));
    cfg.blockDim = dim3(static_cast<unsigned>(threads));
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cfg.attrs = attr;
    if (cluster > 0) {
      attr[cfg.numAttrs].id = cudaLaunchAttributeClusterDimension;
      attr[cfg.numAttrs].val.clusterDim.x = cluster;
      attr[cfg.numAttrs].val.clusterDim.y = 1;
      attr[cfg.numAttrs].val.clusterDim.z = 1;
      ++cfg.numAttrs;
    }
    if (pdl) {
      attr[cfg.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[cfg.numAttrs].val.programmaticStreamSerializationAllowed = 1;
      ++cfg.numAttrs;
    }
  }
  LaunchConfig(const LaunchConfig&) = delete;
  LaunchConfig& operator=(const LaunchConfig&) = delete;
};

// Split plans: one full wave of CTAs on the current device (decode work is uniform, so a single
// wave of equal CTAs finishes together), chunks of whole 64-key tiles.
SplitPlan plan_dense_splits(int B, int T, int N, const AttnDims& dims);
SplitPlan plan_sparse_splits(int B, int T, int k_blk, const AttnDims& dims);

// How sparse launches merge their splits: Auto (a thread-block cluster where the grid is under half
// a wave and splits <= 16, else the merge kernel; the cluster's CTAs have 8 warps where every
// cluster of the grid is resident at once, else 4), or forced, for tests that must run every path:
// Cluster (8-warp CTAs whenever one cluster fits), Cluster4 (4-warp CTAs), Kernel. A forced
// cluster still falls back where the device cannot hold one. Process-wide.
enum class SparseMerge { Auto, Cluster, Cluster4, Kernel };
void set_sparse_merge(SparseMerge m);
std::size_t attention_workspace_bytes(int B, int T, const AttnDims& dims, int splits);
// Throws GpuError unless the dims, sizes, q / k / v pointers and page table suit the kernels (op
// names the caller).
void check_attn_args(const char* op, const bf16* q, const bf16* k, const bf16* v, int T, int N,
                     const AttnDims& dims, int B, CachePages pages = {});
// Throws GpuError unless workspace holds `need` bytes (null allowed where need is 0) and is 16-byte
// aligned (op names the caller).
void check_attn_workspace(const char* op, const void* workspace, std::size_t workspace_bytes, std::size_t need);
// Carves part_o / part_ml out of the workspace, launches the partial and merge kernels.
void attention_run(AttnLaunch a, void* workspace, std::size_t workspace_bytes, cudaStream_t s);
// The MSA selection and sparse attention as one launch (a.scores, a.sel_out, a.NB, a.local,
// a.init set; a.sel unused): where attention_run would take the cluster path with 8-warp CTAs
// (splits <= 16; in Auto mode a small grid with every cluster resident; SparseMerge Auto or
// Cluster), each cluster also selects its (query, group)'s blocks from the scores by msa_select's
// exact tie rule (so the same row), writes that row
// to a.sel_out and attends it: sel_out and out bit-identical to msa_select + attention_run. Needs
// k_blk <= 64 and ceil(NB / splits) <= 1024. Returns false, launching nothing, where any of this
// does not hold. A programmatic dependent (PDL) of the kernel before it, like the sparse kernels.
bool select_attention_run(AttnLaunch a, cudaStream_t s);

}  // namespace detail

#if defined(__CUDACC__)
namespace detail {
// The head dims (D, and Di of the index branch) the split-K attention and MSA index kernels are
// compiled for: 16 and 32 (the tiny preset, tests), 64, 128 (M3). Launchers reject the others
// with is_compiled_dim before dispatching with with_compiled_dim, which calls
// f(std::integral_constant<int, dim>{}) (any other dim falls to 128: never reached).
constexpr bool is_compiled_dim(int d) { return d == 16 || d == 32 || d == 64 || d == 128; }
template <class F>
decltype(auto) with_compiled_dim(int d, F&& f) {
  switch (d) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    default: return f(std::integral_constant<int, 128>{});
  }
}
}  // namespace detail

// PTX wrappers shared by the attention and MSA index kernels (device code only).
namespace detail {
__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte global -> shared copy; valid == false zero-fills the destination and reads nothing.
__device__ __forceinline__ void cp_async16(std::uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Programmatic dependent launch (sm_90): the MSA decode chain index -> select -> sparse attention
// is launched with cudaLaunchAttributeProgrammaticStreamSerialization, so each kernel's launch and
// CTA set-up overlap the tail of the one before. A producer lets its dependents launch
// (pdl_trigger); a consumer waits for the whole preceding grid and its memory (pdl_wait) before
// reading anything that grid wrote. Both are no-ops in a kernel launched without the attribute.
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t& r0, std::uint32_t& r1, std::uint32_t& r2,
                                            std::uint32_t& r3, std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t& r0, std::uint32_t& r1,
                                                  std::uint32_t& r2, std::uint32_t& r3,
                                                  std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
// c [16x8 fp32] += a [16x16 bf16, row] * b [16x8 bf16, col]
__device__ __forceinline__ void mma_bf16(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                         std::uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ std::uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<const std::uint32_t*>(&v);
}
}  // namespace detail
#endif

}  // namespace m3::gpu
