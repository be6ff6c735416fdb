// Split-K (flash-decoding) attention for attention_dense and msa_attention (attention_dense.h):
// the split plans, the launchers (the sparse cluster forms, launch_clusters) and the kernel that
// merges the splits' partials. The partial kernel itself and the design notes with their
// measurements are in attention_dense_partial.cuh.
#include "gpu/kernels/attention_dense.h"
#include "gpu/kernels/attention_dense_partial.cuh"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace m3::gpu {
namespace detail {
namespace {

int partial_slots(int D, bool sparse);

std::atomic<SparseMerge> g_sparse_merge{SparseMerge::Auto};

constexpr int kMergeThreads = 256;  // 8 split lanes x 32 threads of 4 output dims (D <= 128)

__device__ float block_reduce(float v, bool is_max, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, w) : v + w;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read from the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < kMergeThreads / 32; ++w) v = is_max ? fmaxf(v, scratch[w]) : v + scratch[w];
  return v;
}

// One CTA per (query row, head): out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s. The split
// weights go to shared memory first, so the partial-output loads carry no branch and issue back
// to back.
template <int D>
__global__ void __launch_bounds__(kMergeThreads) attn_merge_kernel(const AttnLaunch a) {
  extern __shared__ float w_s[];  // [splits] weight of each split (0 for an empty one)
  __shared__ float scratch[kMergeThreads / 32];
  __shared__ float4 red[kMergeThreads / 32][32];
  const std::int64_t row = blockIdx.x;  // qrow*Hq + h
  const int qrow = static_cast<int>(row / a.Hq);
  const std::int64_t p = a.q_pos[qrow];
  bf16* out = a.out + row * D;
  if (p < 0 || p >= a.N) {  // precondition violated: a visible NaN instead of garbage
    for (int d = threadIdx.x; d < D; d += kMergeThreads) out[d] = __float2bfloat16_rn(NAN);
    return;
  }
  const float2* ml = a.part_ml + row * a.splits;
  float M = -INFINITY;
  for (int s = threadIdx.x; s < a.splits; s += kMergeThreads) M = fmaxf(M, ml[s].x);
  M = block_reduce(M, true, scratch);
  float L = 0.f;
  for (int s = threadIdx.x; s < a.splits; s += kMergeThreads) {
    const float2 v = ml[s];
    const float w = v.x == -INFINITY ? 0.f : exp2f(v.x - M);  // an empty split weighs nothing
    w_s[s] = w;
    L += w * v.y;
  }
  L = block_reduce(L, false, scratch);  // its barriers also publish w_s

  const int lane = threadIdx.x % 32, sl = threadIdx.x / 32;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (lane < D / 4) {
    const float* po = a.part_o + row * a.splits * D + lane * 4;
#pragma unroll 4
    for (int s = sl; s < a.splits; s += kMergeThreads / 32) {
      const float w = w_s[s];
      const float4 v = *reinterpret_cast<const float4*>(po + static_cast<std::int64_t>(s) * D);
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
  }
  red[sl][lane] = acc;
  __syncthreads();
  if (threadIdx.x < D) {
    const int d = threadIdx.x, ln = d / 4, c = d % 4;
    float sum = 0.f;
    for (int w = 0; w < kMergeThreads / 32; ++w) {
      const float4 v = red[w][ln];
      sum += c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
    }
    // No key at all (an empty sparse selection): 0/0 -> NaN, on purpose.
    out[d] = __float2bfloat16_rn(L > 0.f ? sum / L : NAN);
  }
}

long ceil_div(long a, long b) { return (a + b - 1) / b; }

template <int D, bool kSparse, bool kPaged = false>
int prepare() {
  return resident_ctas(reinterpret_cast<const void*>(attn_partial_kernel<D, kSparse, kPaged>), kThreads,
                       Cfg<D>::kSmemBytes);
}

template <int D, bool kSparse, bool kPaged>
void launch_partial(const AttnLaunch& a, long ctas, cudaStream_t s) {
  prepare<D, kSparse, kPaged>();
  void (*kernel)(const AttnLaunch) = attn_partial_kernel<D, kSparse, kPaged>;
  const LaunchConfig lc(ctas, kThreads, Cfg<D>::kSmemBytes, s, /*pdl=*/kSparse);  // sparse: overlaps msa_select's tail
  M3_CUDA_CHECK(cudaLaunchKernelEx(&lc.cfg, kernel, a));
}

// Sparse, splits <= kMaxCluster: clusters of `splits` CTAs (16 is past the portable 8: allowed
// explicitly; Hopper schedules it) of W warps each. cluster_fits: whether the device holds `need`
// such clusters at once (the device's answer cached per (device, kernel, cluster size)).
// launch_cluster launches where it does and returns false (nothing launched) where not: the caller
// then tries another W or takes the workspace path.
template <int D, bool kPaged, int W, bool kSelect = false>
bool cluster_fits(const AttnLaunch& a, long ctas, long need, cudaStream_t s) {
  using C = Cfg<D, W>;
  void (*kernel)(const AttnLaunch) = attn_partial_kernel<D, true, kPaged, true, W, kSelect>;
  static_assert(C::kRedBytes + kRowsM * (D + 2) * 4 <= C::kSmemBytes, "cluster rows fit the pipeline's smem");
  resident_ctas(reinterpret_cast<const void*>(kernel), C::kThreads, C::kSmemBytes);
  static std::mutex mu;
  static std::map<std::pair<int, int>, int> fits;  // (device, cluster size) -> clusters resident at once
  int dev = 0;
  M3_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  auto it = fits.find({dev, a.splits});
  if (it == fits.end()) {
    const LaunchConfig lc(ctas, C::kThreads, C::kSmemBytes, s, /*pdl=*/true, static_cast<unsigned>(a.splits));
    bool ok = true;
    if (a.splits > 8) ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
    int clusters = 0;
    ok = ok && cudaOccupancyMaxActiveClusters(&clusters, kernel, &lc.cfg) == cudaSuccess;
    (void)cudaGetLastError();  // a refused query leaves no sticky error; clear the last one
    it = fits.emplace(std::make_pair(dev, a.splits), ok ? clusters : 0).first;
  }
  return it->second >= std::max(need, 1L);
}

template <int D, bool kPaged, int W, bool kSelect = false>
bool launch_cluster(const AttnLaunch& a, long ctas, long need, cudaStream_t s) {
  if (!cluster_fits<D, kPaged, W, kSelect>(a, ctas, need, s)) return false;
  using C = Cfg<D, W>;
  // Overlaps the tail of the kernel before it, msa_select or msa_index (PDL).
  const LaunchConfig lc(ctas, C::kThreads, C::kSmemBytes, s, /*pdl=*/true, static_cast<unsigned>(a.splits));
  M3_CUDA_CHECK(cudaLaunchKernelEx(&lc.cfg, attn_partial_kernel<D, true, kPaged, true, W, kSelect>, a));
  return true;
}

// Cluster CTAs of 8 warps (one 128-key tile each; one CTA an SM at D 128) where every cluster of the grid
// is resident at once, else of 4 warps (two 64-key tiles, two CTAs an SM) where one is. A b1
// decode CTA is a chain of dependent instructions, not a bandwidth problem: at M3's shape (16 blocks
// of 128 keys, 4 groups: 64 CTAs) the 4-warp CTA ran ~4,250 instructions a warp at ~6 cycles each
// (ncu, H200, 2026-11-29: 15.5 us, SMs 94% idle); 8 warps halve each warp's tiles and loads.
// Forced modes (tests): Cluster takes 8 warps whenever one cluster fits, Cluster4 never.
template <int D, bool kPaged>
bool launch_clusters(const AttnLaunch& a, long ctas, SparseMerge mode, cudaStream_t s) {
  const long need8 = mode == SparseMerge::Cluster ? 1 : ctas / a.splits;
  return (mode != SparseMerge::Cluster4 && launch_cluster<D, kPaged, 2 * kWarps>(a, ctas, need8, s)) ||
         launch_cluster<D, kPaged, kWarps>(a, ctas, 1, s);
}

template <int D>
void launch(const AttnLaunch& a, cudaStream_t s) {
  const int G = a.Hq / a.Hkv, MT = (G + kRowsM - 1) / kRowsM;
  const long ctas = static_cast<long>(a.B) * a.T * a.Hkv * MT * a.splits;
  const bool paged = a.pages.table != nullptr;
  // Clusters only where the grid is well under one wave: clusters are placed whole inside a GPC,
  // so a grid near a full wave of single CTAs would spill into a second wave (measured, H200,
  // b 8 at 1M: 256 CTAs in clusters of 8 took 45.6 us against 28.8 us with the merge kernel).
  const SparseMerge mode = g_sparse_merge.load(std::memory_order_relaxed);
  const bool small_grid = mode == SparseMerge::Cluster || mode == SparseMerge::Cluster4 ||
                          (mode == SparseMerge::Auto && ctas * 2 <= partial_slots(D, true));
  if (a.sel && a.splits <= kMaxCluster && small_grid &&
      (paged ? launch_clusters<D, true>(a, ctas, mode, s) : launch_clusters<D, false>(a, ctas, mode, s))) {
    M3_CUDA_CHECK_LAUNCH();
    return;
  }
  if (a.sel) paged ? launch_partial<D, true, true>(a, ctas, s) : launch_partial<D, true, false>(a, ctas, s);
  else paged ? launch_partial<D, false, true>(a, ctas, s) : launch_partial<D, false, false>(a, ctas, s);
  M3_CUDA_CHECK_LAUNCH();
  attn_merge_kernel<D><<<static_cast<unsigned>(static_cast<long>(a.B) * a.T * a.Hq), kMergeThreads,
                         a.splits * sizeof(float), s>>>(a);
  M3_CUDA_CHECK_LAUNCH();
}

// Resident CTAs of the partial kernel for head dim D.
int partial_slots(int D, bool sparse) {
  return with_compiled_dim(D, [&](auto d) { return sparse ? prepare<decltype(d)::value, true>() : prepare<decltype(d)::value, false>(); });
}

std::string dims_str(const AttnDims& d) {
  return "Hq = " + std::to_string(d.Hq) + ", Hkv = " + std::to_string(d.Hkv) + ", D = " + std::to_string(d.D);
}

template <int D>
bool select_attention(const AttnLaunch& a, cudaStream_t s) {
  const int G = a.Hq / a.Hkv, MT = (G + kRowsM - 1) / kRowsM;
  const long ctas = static_cast<long>(a.B) * a.T * a.Hkv * MT * a.splits;
  // The conditions under which launch<D> takes 8-warp clusters: the fused kernel is that kernel
  // with the selection in front, so its outputs are the unfused chain's bit for bit.
  const SparseMerge mode = g_sparse_merge.load(std::memory_order_relaxed);
  if (mode == SparseMerge::Kernel || mode == SparseMerge::Cluster4) return false;
  if (mode == SparseMerge::Auto && ctas * 2 > partial_slots(D, true)) return false;
  if (a.splits > kMaxCluster || a.k_blk > kSelMaxK || ceil_div(a.NB, a.splits) > 4 * kSelThreads) return false;
  const long need = mode == SparseMerge::Cluster ? 1 : ctas / a.splits;
  // Only where the unfused 8-warp kernel fits as well (launch_clusters would take it): the fused
  // kernel's extra shared memory and registers never let it fit where that one does not today,
  // but bit identity must not rest on the compiler's register allocation.
  const bool unfused_fits = a.pages.table ? cluster_fits<D, true, 2 * kWarps>(a, ctas, need, s)
                                          : cluster_fits<D, false, 2 * kWarps>(a, ctas, need, s);
  if (!unfused_fits) return false;
  const bool launched = a.pages.table ? launch_cluster<D, true, 2 * kWarps, true>(a, ctas, need, s)
                                      : launch_cluster<D, false, 2 * kWarps, true>(a, ctas, need, s);
  if (launched) M3_CUDA_CHECK_LAUNCH();
  return launched;
}

}  // namespace

bool select_attention_run(AttnLaunch a, cudaStream_t s) {
  if (a.scores == nullptr || a.sel_out == nullptr || a.T == 0) return false;
  return with_compiled_dim(a.D, [&](auto d) { return select_attention<decltype(d)::value>(a, s); });
}

void set_sparse_merge(SparseMerge m) { g_sparse_merge.store(m, std::memory_order_relaxed); }

int resident_ctas(const void* kernel, int threads, int smem) {
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, int> cache;
  int dev = 0;
  M3_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find({dev, kernel});
  if (it != cache.end()) return it->second;
  M3_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0, sms = 0;
  M3_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  M3_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int slots = std::max(1, per_sm * sms);
  cache[{dev, kernel}] = slots;
  return slots;
}

SplitPlan plan_dense_splits(int B, int T, int N, const AttnDims& dims) {
  const long G = dims.Hq / dims.Hkv, MT = (G + kRowsM - 1) / kRowsM;
  const long work = std::max(1L, static_cast<long>(B) * T * dims.Hkv * MT);
  const long max_splits = std::max(1L, ceil_div(N, kMinChunk));
  const long splits = std::clamp(partial_slots(dims.D, false) / work, 1L, max_splits);
  SplitPlan p;
  p.chunk = static_cast<int>(ceil_div(ceil_div(std::max(N, 1), splits), kTileKeys) * kTileKeys);
  p.splits = static_cast<int>(ceil_div(std::max(N, 1), p.chunk));
  return p;
}

SplitPlan plan_sparse_splits(int B, int T, int k_blk, const AttnDims& dims) {
  const long G = dims.Hq / dims.Hkv, MT = (G + kRowsM - 1) / kRowsM;
  const long work = std::max(1L, static_cast<long>(B) * T * dims.Hkv * MT);
  const long splits = std::clamp(partial_slots(dims.D, true) / work, ceil_div(k_blk, kMaxSlots),
                                 static_cast<long>(k_blk));
  SplitPlan p;
  p.chunk = static_cast<int>(ceil_div(k_blk, splits));
  p.splits = static_cast<int>(ceil_div(k_blk, p.chunk));
  return p;
}

std::size_t attention_workspace_bytes(int B, int T, const AttnDims& dims, int splits) {
  const std::size_t rows = static_cast<std::size_t>(B) * T * dims.Hq * splits;
  const std::size_t o_bytes = (rows * dims.D * sizeof(float) + 255) / 256 * 256;
  return o_bytes + rows * sizeof(float2);
}

void check_attn_workspace(const char* op, const void* workspace, std::size_t workspace_bytes, std::size_t need) {
  const std::string o = op;
  if (workspace_bytes < need || (need > 0 && workspace == nullptr))
    throw GpuError(o + ": workspace of " + std::to_string(workspace_bytes) + " bytes at " +
                   std::to_string(reinterpret_cast<std::uintptr_t>(workspace)) + ", expected >= " +
                   std::to_string(need) + " bytes (the *_workspace_bytes function of the same arguments)");
  if (reinterpret_cast<std::uintptr_t>(workspace) % 16 != 0) throw GpuError(o + ": workspace is not 16-byte aligned");
}

void attention_run(AttnLaunch a, void* workspace, std::size_t workspace_bytes, cudaStream_t s) {
  check_attn_workspace("attention", workspace, workspace_bytes,
                       attention_workspace_bytes(a.B, a.T, {a.Hq, a.Hkv, a.D}, a.splits));
  // The merge keeps one weight a split in shared memory (plans give at most a few hundred splits
  // for dense, k_blk for sparse).
  if (a.splits > 8192)
    throw GpuError("attention: " + std::to_string(a.splits) + " splits, expected <= 8192 (k_blk too large)");
  const std::size_t rows = static_cast<std::size_t>(a.B) * a.T * a.Hq * a.splits;
  a.part_o = static_cast<float*>(workspace);
  a.part_ml = reinterpret_cast<float2*>(static_cast<unsigned char*>(workspace) +
                                        (rows * a.D * sizeof(float) + 255) / 256 * 256);
  with_compiled_dim(a.D, [&](auto d) { launch<decltype(d)::value>(a, s); });
}

// Shared argument checks of attention_dense and msa_attention (op names the caller).
void check_attn_args(const char* op, const bf16* q, const bf16* k, const bf16* v, int T, int N,
                     const AttnDims& d, int B, CachePages pages) {
  const std::string o = op;
  if (d.Hq <= 0 || d.Hkv <= 0 || d.D <= 0 || d.Hq % d.Hkv != 0)
    throw GpuError(o + ": dims " + dims_str(d) + ", expected all > 0 and Hq % Hkv == 0");
  if (!is_compiled_dim(d.D))
    throw GpuError(o + ": D = " + std::to_string(d.D) + ", expected 16, 32, 64 or 128 (the compiled head dims)");
  if (T < 0 || B < 1 || N < 1)
    throw GpuError(o + ": T = " + std::to_string(T) + ", N = " + std::to_string(N) + ", B = " +
                   std::to_string(B) + ", expected T >= 0, N >= 1, B >= 1");
  const long G = d.Hq / d.Hkv, MT = (G + kRowsM - 1) / kRowsM;
  const double ctas = static_cast<double>(B) * T * d.Hkv * MT * ceil_div(N, kMinChunk);
  if (static_cast<double>(B) * T * d.Hq > 2147483647.0 || ctas > 2147483647.0 ||
      static_cast<double>(B) * N * d.Hkv * d.D > 9.0e18)
    throw GpuError(o + ": B*T = " + std::to_string(static_cast<long>(B) * T) + " queries against N = " +
                   std::to_string(N) + " keys exceed the grid limits");
  for (auto [name, ptr] : {std::pair{"q", q}, {"k", k}, {"v", v}})
    if (ptr == nullptr || reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0)
      throw GpuError(o + ": " + name + " is null or not 16-byte aligned, expected a 16-byte aligned device pointer");
  check_cache_pages(op, pages, N);
}

}  // namespace detail

std::size_t attention_dense_workspace_bytes(int T, int N, const AttnDims& dims, int B) {
  if (T <= 0 || B <= 0 || dims.Hkv <= 0 || dims.Hq <= 0) return 0;
  const auto plan = detail::plan_dense_splits(B, T, N, dims);
  return detail::attention_workspace_bytes(B, T, dims, plan.splits);
}

void attention_dense(const bf16* q, const bf16* k, const bf16* v, const std::int64_t* q_pos, int T,
                     int N, const AttnDims& dims, bf16* out, cudaStream_t s, void* workspace,
                     std::size_t workspace_bytes, int B, CachePages pages) {
  detail::check_attn_args("attention_dense", q, k, v, T, N, dims, B, pages);
  if (T == 0) return;
  if (q_pos == nullptr || out == nullptr)
    throw GpuError("attention_dense: q_pos or out is null, expected device pointers");
  const auto plan = detail::plan_dense_splits(B, T, N, dims);
  detail::AttnLaunch a;
  a.q = q; a.k = k; a.v = v; a.q_pos = q_pos; a.out = out;
  a.pages = pages;
  a.B = B; a.T = T; a.N = N; a.Hq = dims.Hq; a.Hkv = dims.Hkv; a.D = dims.D;
  a.splits = plan.splits;
  a.chunk = plan.chunk;
  detail::attention_run(a, workspace, workspace_bytes, s);
}

}  // namespace m3::gpu
