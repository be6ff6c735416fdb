// MoE experts kernels and the host driver; see moe_experts.h for the steps. Kernels:
//   rank_kernel      one block per expert scans all T*K_e pairs in order: each pair's rank among its
//                    expert's pairs (token order) and the expert's count. Every block reads the ids
//                    (256 KB at T = 16K, K_e = 4, from L2): cheap next to the GEMMs, simple, stable.
//   offsets_kernel   one block: exclusive scan of the counts -> offsets [E+1], and the grouped GEMM's
//                    device pointer arrays for the non-empty experts, compacted in id order.
//   gather_kernel    one block per pair: its slot in the permuted buffer and the copy of its x row.
//   combine_kernel   one block per token: its slots sorted by (expert id, slot), then the weighted
//                    fp32 sum over the permuted outputs plus the shared row, one bf16 rounding.
// The gather and combine move 16-byte vectors when H % 8 == 0 and the row bases are 16-byte aligned,
// else single elements. Host side: the offsets come back through pinned memory (one wait a call),
// then the expert GEMMs go either to cuBLAS's grouped GEMM on s or, per expert, to side streams
// ("lanes") that start right after the permutation and so overlap the shared expert on s.
// ptxas (sm_90a): every kernel <= 32 registers, no spills; shared memory 132 B (scans), 772 B (combine).
#include "gpu/kernels/moe_experts.h"

#include "gpu/kernels/linear.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

namespace m3::gpu {
namespace {

constexpr int kRankThreads = 512;
constexpr int kRankItems = 4;  // consecutive pairs per thread and pass: 2048 pairs a pass
constexpr int kOffsetsThreads = 256;
constexpr int kGatherThreads = 128;
constexpr int kCombineThreads = 256;
constexpr std::size_t kAlign = 256;  // every workspace region: cuBLAS and uint4 access need >= 16
// T * K_e bound: rank_kernel's pass index start + 2048 must not overflow int.
constexpr long long kMaxPairs = 1ll << 30;

constexpr int kPtrArrays = 6;  // gate_up A/B/C then down A/B/C, E entries each

// Exclusive prefix sum of v over the block (blockDim.x a multiple of 32); returns the block total.
// scratch: 33 ints. Ends with a barrier, so it can be called again at once (loops).
__device__ int block_exclusive_scan(int v, int& excl, int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += u;
  }
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    const int s = lane < nwarps ? scratch[lane] : 0;
    int si = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, si, o);
      if (lane >= o) si += u;
    }
    if (lane < nwarps) scratch[lane] = si - s;
    if (lane == 31) scratch[32] = si;
  }
  __syncthreads();
  excl = scratch[warp] + inc - v;
  const int total = scratch[32];
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(kRankThreads)
    rank_kernel(const std::int32_t* __restrict__ experts, int N, std::int32_t* __restrict__ rank,
                std::int32_t* __restrict__ counts) {
  __shared__ int scratch[33];
  const int e = blockIdx.x;
  int base = 0;  // pairs of expert e before this pass
  for (int start = 0; start < N; start += kRankThreads * kRankItems) {
    const int first = start + threadIdx.x * kRankItems;
    int hits = 0;  // bit i: pair first + i belongs to e
#pragma unroll
    for (int i = 0; i < kRankItems; ++i)
      if (first + i < N && experts[first + i] == e) hits |= 1 << i;
    int excl;
    const int total = block_exclusive_scan(__popc(hits), excl, scratch);
    int r = base + excl;
#pragma unroll
    for (int i = 0; i < kRankItems; ++i)
      if (hits >> i & 1) rank[first + i] = r++;
    base += total;
  }
  if (threadIdx.x == 0) counts[e] = base;
}

// Bases and strides from which offsets_kernel writes the grouped GEMMs' pointer arrays.
struct PtrArgs {
  const bf16* gate_up;  // [E, 2I, H]
  const bf16* down;     // [E, H, I]
  const bf16* xp;       // [N, H] permuted rows (GEMM 1's B), then the experts' outputs (GEMM 2's C)
  const bf16* gu;       // [N, 2I]
  const bf16* act;      // [N, I]
  int H, I;
  const void** ptrs;  // [6, E]
};

__global__ void __launch_bounds__(kOffsetsThreads)
    offsets_kernel(const std::int32_t* __restrict__ counts, int E, std::int32_t* __restrict__ offsets, PtrArgs a) {
  __shared__ int scratch[33];
  int base = 0, gbase = 0;  // rows and non-empty experts before this pass
  for (int start = 0; start < E; start += kOffsetsThreads) {
    const int e = start + threadIdx.x;
    const int c = e < E ? counts[e] : 0;
    int excl, gexcl;
    const int total = block_exclusive_scan(c, excl, scratch);
    const int gtotal = block_exclusive_scan(c > 0, gexcl, scratch);
    if (e < E) {
      const int off = base + excl;
      offsets[e] = off;
      if (c > 0) {
        const int g = gbase + gexcl;
        const std::int64_t H = a.H, I = a.I;
        a.ptrs[0 * E + g] = a.gate_up + e * 2 * I * H;
        a.ptrs[1 * E + g] = a.xp + off * H;
        a.ptrs[2 * E + g] = a.gu + off * 2 * I;
        a.ptrs[3 * E + g] = a.down + e * H * I;
        a.ptrs[4 * E + g] = a.act + off * I;
        a.ptrs[5 * E + g] = a.xp + off * H;
      }
    }
    base += total;
    gbase += gtotal;
  }
  if (threadIdx.x == 0) offsets[E] = base;
}

// kWidth elements per access: 8 (uint4) or 1.
template <int kWidth>
__global__ void __launch_bounds__(kGatherThreads)
    gather_kernel(const bf16* __restrict__ x, const std::int32_t* __restrict__ experts,
                  const std::int32_t* __restrict__ rank, const std::int32_t* __restrict__ offsets, int E, int K,
                  int H, std::int32_t* __restrict__ inv, bf16* __restrict__ xp) {
  const int f = blockIdx.x;  // flat pair t * K + j
  const int e = experts[f];
  if (e < 0 || e >= E) {  // joins no expert; the combine turns the token's row into NaN
    if (threadIdx.x == 0) inv[f] = -1;
    return;
  }
  const int pos = offsets[e] + rank[f];
  if (threadIdx.x == 0) inv[f] = pos;
  const bf16* src = x + static_cast<std::int64_t>(f / K) * H;
  bf16* dst = xp + static_cast<std::int64_t>(pos) * H;
  if constexpr (kWidth == 8) {
    for (int c = threadIdx.x; c < H / 8; c += kGatherThreads)
      reinterpret_cast<uint4*>(dst)[c] = reinterpret_cast<const uint4*>(src)[c];
  } else {
    for (int c = threadIdx.x; c < H; c += kGatherThreads) dst[c] = src[c];
  }
}

// 8 bf16 in a 16-byte vector <-> 8 floats.
__device__ __forceinline__ float2 unpack2(unsigned u) {
  return __bfloat1622float2(__halves2bfloat162(__ushort_as_bfloat16(static_cast<unsigned short>(u & 0xffffu)),
                                               __ushort_as_bfloat16(static_cast<unsigned short>(u >> 16))));
}
__device__ __forceinline__ void unpack8(const uint4 v, float* f) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 p = unpack2(w[k]);
    f[2 * k] = p.x;
    f[2 * k + 1] = p.y;
  }
}
__device__ __forceinline__ unsigned pack2(float a, float b) {
  return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(a))) |
         static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(b))) << 16;
}
__device__ __forceinline__ uint4 pack8(const float* f) {
  return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
}

template <int kWidth>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(const std::int32_t* __restrict__ experts, const float* __restrict__ weights,
                   const std::int32_t* __restrict__ inv, const bf16* __restrict__ eout,
                   const bf16* __restrict__ sout, int K, int H, float scale, bf16* __restrict__ y) {
  __shared__ int s_id[kMoeMaxExpertsPerToken], s_pos[kMoeMaxExpertsPerToken];
  __shared__ float s_w[kMoeMaxExpertsPerToken];
  __shared__ int s_bad;
  const std::int64_t t = blockIdx.x;
  if (threadIdx.x == 0) {
    // Insertion sort by (expert id, slot): stable, so equal ids keep slot order (the reference's
    // order: experts ascending, within one expert the pairs in token-then-slot order).
    int bad = 0;
    for (int j = 0; j < K; ++j) {
      const int id = experts[t * K + j], pos = inv[t * K + j];
      const float wj = weights[t * K + j];
      bad |= pos < 0;
      int i = j;
      for (; i > 0 && s_id[i - 1] > id; --i) {
        s_id[i] = s_id[i - 1];
        s_pos[i] = s_pos[i - 1];
        s_w[i] = s_w[i - 1];
      }
      s_id[i] = id;
      s_pos[i] = pos;
      s_w[i] = wj;
    }
    s_bad = bad;
  }
  __syncthreads();
  bf16* yr = y + t * H;
  if (s_bad) {  // an expert id outside [0, E): the documented NaN row
    for (int c = threadIdx.x; c < H; c += kCombineThreads) yr[c] = __float2bfloat16_rn(__int_as_float(0x7fffffff));
    return;
  }
  for (int c = threadIdx.x * kWidth; c < H; c += kCombineThreads * kWidth) {
    float acc[kWidth];
#pragma unroll
    for (int k = 0; k < kWidth; ++k) acc[k] = 0.f;
    for (int i = 0; i < K; ++i) {
      const bf16* row = eout + static_cast<std::int64_t>(s_pos[i]) * H + c;
      const float wi = s_w[i];
      if constexpr (kWidth == 8) {
        float f[8];
        unpack8(*reinterpret_cast<const uint4*>(row), f);
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] += wi * f[k];
      } else {
        acc[0] += wi * __bfloat162float(*row);
      }
    }
    // The routed part is scaled, the shared expert is not (the reference's order of operations).
    float sh[kWidth];
#pragma unroll
    for (int k = 0; k < kWidth; ++k) sh[k] = 0.f;
    if (sout) {
      const bf16* srow = sout + t * H + c;
      if constexpr (kWidth == 8) {
        unpack8(*reinterpret_cast<const uint4*>(srow), sh);
      } else {
        sh[0] = __bfloat162float(*srow);
      }
    }
    if constexpr (kWidth == 8) {
      float o[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) o[k] = acc[k] * scale + sh[k];
      *reinterpret_cast<uint4*>(yr + c) = pack8(o);
    } else {
      yr[c] = __float2bfloat16_rn(acc[0] * scale + sh[0]);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }
std::size_t round_up(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

bool has_shared(const MoeExpertWeights& w) { return w.shared_gate_up != nullptr; }

// Byte offsets of the workspace regions (from the workspace base rounded up to kAlign).
struct Layout {
  std::size_t rank, inv, counts, offsets, ptrs, xp, gu, act, sgu, sact, sout, total;
};

Layout make_layout(int T, int H, int K, const MoeExpertWeights& w) {
  const std::size_t N = static_cast<std::size_t>(T) * K, E = w.E, I = w.I, Is = w.Is, Hs = H, Ts = T;
  Layout L{};
  std::size_t o = 0;
  const auto take = [&o](std::size_t bytes) {
    const std::size_t at = o;
    o += round_up(bytes);
    return at;
  };
  L.rank = take(N * sizeof(std::int32_t));                  // [N] rank of each pair within its expert
  L.inv = take(N * sizeof(std::int32_t));                   // [N] permuted row of each pair, -1 = bad id
  L.counts = take(E * sizeof(std::int32_t));                // [E]
  L.offsets = take((E + 1) * sizeof(std::int32_t));         // [E+1]
  L.ptrs = take(kPtrArrays * E * sizeof(void*));            // [6, E]
  L.xp = take(N * Hs * sizeof(bf16));                       // [N, H] permuted x, then expert outputs
  L.gu = take(N * 2 * I * sizeof(bf16));                    // [N, 2I]
  L.act = take(N * I * sizeof(bf16));                       // [N, I]
  if (has_shared(w)) {
    L.sgu = take(Ts * 2 * Is * sizeof(bf16));               // [T, 2Is]
    L.sact = take(Ts * Is * sizeof(bf16));                  // [T, Is]
    L.sout = take(Ts * Hs * sizeof(bf16));                  // [T, H]
  }
  L.total = o + kAlign;  // slack: a caller's base need not be kAlign-aligned
  return L;
}

struct Views {
  std::int32_t *rank, *inv, *counts, *offsets;
  const void** ptrs;
  bf16 *xp, *gu, *act, *sgu, *sact, *sout;
};

Views make_views(const void* workspace, const Layout& L, bool shared) {
  auto* base = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<std::uintptr_t>(workspace) + kAlign - 1) / kAlign * kAlign);
  Views v{};
  v.rank = reinterpret_cast<std::int32_t*>(base + L.rank);
  v.inv = reinterpret_cast<std::int32_t*>(base + L.inv);
  v.counts = reinterpret_cast<std::int32_t*>(base + L.counts);
  v.offsets = reinterpret_cast<std::int32_t*>(base + L.offsets);
  v.ptrs = reinterpret_cast<const void**>(base + L.ptrs);
  v.xp = reinterpret_cast<bf16*>(base + L.xp);
  v.gu = reinterpret_cast<bf16*>(base + L.gu);
  v.act = reinterpret_cast<bf16*>(base + L.act);
  if (shared) {
    v.sgu = reinterpret_cast<bf16*>(base + L.sgu);
    v.sact = reinterpret_cast<bf16*>(base + L.sact);
    v.sout = reinterpret_cast<bf16*>(base + L.sout);
  }
  return v;
}

// Throws GpuError for dims or weights that no call could take.
void check_dims(int T, int H, int K, const MoeExpertWeights& w) {
  const std::string dims = "T = " + std::to_string(T) + ", H = " + std::to_string(H) + ", K_e = " +
                           std::to_string(K) + ", E = " + std::to_string(w.E) + ", I = " + std::to_string(w.I);
  if (T < 0 || H <= 0 || K <= 0 || K > kMoeMaxExpertsPerToken || w.E <= 0 || w.I <= 0)
    throw GpuError("moe_experts: " + dims + ", expected T >= 0, H > 0, 0 < K_e <= " +
                   std::to_string(kMoeMaxExpertsPerToken) + ", E > 0 and I > 0");
  if (static_cast<long long>(T) * K > kMaxPairs)
    throw GpuError("moe_experts: T * K_e = " + std::to_string(static_cast<long long>(T) * K) + " (" + dims +
                   "), expected at most 2^30 pairs");
  if (!w.gate_up || !w.down)
    throw GpuError("moe_experts: null expert weights (gate_up or down); expected both set");
  if (has_shared(w) && (!w.shared_down || w.Is <= 0))
    throw GpuError("moe_experts: shared_gate_up is set but shared_down is null or Is = " + std::to_string(w.Is) +
                   "; expected shared_down set and Is > 0");
  if (!has_shared(w) && (w.shared_down || w.Is != 0))
    throw GpuError("moe_experts: shared_gate_up is null but shared_down is set or Is = " + std::to_string(w.Is) +
                   "; expected no shared expert at all (shared_down null, Is = 0)");
}

#if CUBLAS_VER_MAJOR > 12 || (CUBLAS_VER_MAJOR == 12 && CUBLAS_VER_MINOR >= 5)
constexpr bool kHaveGrouped = true;

// One grouped GEMM: for each group g (non-empty expert), C_g [m, n_g] = A_g^T B_g in column-major
// terms, i.e. row-major out [n_g, m] = in [n_g, k] W_e [m, k]^T (see linear.h's mapping).
void grouped_gemm(cublasHandle_t h, const std::vector<int>& n, int m, int k, const void* const* A,
                  const void* const* B, void* const* C) {
  const int G = static_cast<int>(n.size());
  const std::vector<cublasOperation_t> ta(G, CUBLAS_OP_T), tb(G, CUBLAS_OP_N);
  const std::vector<int> ms(G, m), ks(G, k), one(G, 1);
  const std::vector<float> alpha(G, 1.f), beta(G, 0.f);  // fp32 scalars: CUBLAS_COMPUTE_32F
  M3_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(h, ta.data(), tb.data(), ms.data(), n.data(), ks.data(), alpha.data(),
                                             A, CUDA_R_16BF, ks.data(), B, CUDA_R_16BF, ks.data(), beta.data(), C,
                                             CUDA_R_16BF, ms.data(), G, one.data(), CUBLAS_COMPUTE_32F));
}
#else
constexpr bool kHaveGrouped = false;
#endif

constexpr int kSideLanes = 4;  // 4 x ~48 tiles of an M3 expert GEMM at T 4096 fill 132 SMs

// The loop path's streams, cuBLAS handles and events, made once per host thread (and again when the
// thread's current device changes).
struct SideLanes {
  int device = -1;
  cudaStream_t st[kSideLanes] = {};
  cublasHandle_t h[kSideLanes] = {};
  cudaEvent_t fork = nullptr, done[kSideLanes] = {};

  void release() {
    for (int k = 0; k < kSideLanes; ++k) {
      if (h[k]) cublasDestroy(h[k]);
      if (st[k]) cudaStreamDestroy(st[k]);
      if (done[k]) cudaEventDestroy(done[k]);
      h[k] = nullptr, st[k] = nullptr, done[k] = nullptr;
    }
    if (fork) cudaEventDestroy(fork);
    fork = nullptr;
    device = -1;
  }
  void ensure() {
    int d = 0;
    M3_CUDA_CHECK(cudaGetDevice(&d));
    if (d == device) return;
    release();
    for (int k = 0; k < kSideLanes; ++k) {
      M3_CUDA_CHECK(cudaStreamCreateWithFlags(&st[k], cudaStreamNonBlocking));
      M3_CUBLAS_CHECK(cublasCreate(&h[k]));
      M3_CUDA_CHECK(cudaEventCreateWithFlags(&done[k], cudaEventDisableTiming));
    }
    M3_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    device = d;
  }
  ~SideLanes() { release(); }
};

SideLanes& side_lanes() {
  static thread_local SideLanes lanes;
  lanes.ensure();
  return lanes;
}

// Step 3 on the permuted rows; off is the host copy of the offsets [E+1]. The grouped path runs on s;
// the loop path on side lanes that start once `ready` (recorded on s after the permutation; null:
// now) has passed, and s waits for them at the end.
void expert_gemms(cublasHandle_t h, const std::int32_t* off, int H, const MoeExpertWeights& w, const SwigluParams* p,
                  const Views& v, MoeGemmPath path, cudaStream_t s, cudaEvent_t ready) {
  const int E = w.E, I = w.I, R = off[E];
  if (R == 0) return;  // every id was out of range
  // The grouped GEMM reads its matrix pointers on the device, so it cannot check their alignment and
  // assumes the one that k implies (16 bytes when k * 2 % 16 == 0, 4 when k * 2 % 4 == 0; cuBLAS
  // docs). With H and I multiples of 8 and 16-byte aligned weights every pointer here is 16-byte
  // aligned (the workspace regions are 256-byte aligned); other shapes take the loop.
  const bool grouped_ok = kHaveGrouped && H % 8 == 0 && I % 8 == 0 && aligned16(w.gate_up) && aligned16(w.down);
  if (path == MoeGemmPath::GROUPED && grouped_ok) {
#if CUBLAS_VER_MAJOR > 12 || (CUBLAS_VER_MAJOR == 12 && CUBLAS_VER_MINOR >= 5)
    std::vector<int> n;  // rows of each non-empty expert, in id order (offsets_kernel's compaction)
    for (int e = 0; e < E; ++e)
      if (off[e + 1] > off[e]) n.push_back(off[e + 1] - off[e]);
    M3_CUBLAS_CHECK(cublasSetStream(h, s));
    // The scalars below live on the host; the grouped GEMM refuses device pointer mode anyway.
    M3_CUBLAS_CHECK(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST));
    const void* const* P = v.ptrs;
    grouped_gemm(h, n, 2 * I, H, P + 0 * E, P + 1 * E, const_cast<void* const*>(P + 2 * E));
    if (p) swiglu_oai(v.gu, *p, v.act, R, I, s);
    grouped_gemm(h, n, H, I, P + 3 * E, P + 4 * E, const_cast<void* const*>(P + 5 * E));
#endif
    return;
  }
  // The loop: one GEMM of n_e ~ 128 rows covers only ~48 of the 132 SMs (128 x 128 tiles of
  // 6144 outputs), so the experts run on kSideLanes streams at once, each expert's chain (gate_up
  // GEMM, SwiGLU over its rows, down GEMM) on the least-loaded lane, each lane with its own cuBLAS
  // handle (a handle's default workspace must not be shared by concurrent streams).
  SideLanes& lanes = side_lanes();
  if (!ready) {
    M3_CUDA_CHECK(cudaEventRecord(lanes.fork, s));
    ready = lanes.fork;
  }
  for (int k = 0; k < kSideLanes; ++k) M3_CUDA_CHECK(cudaStreamWaitEvent(lanes.st[k], ready, 0));
  std::int64_t load[kSideLanes] = {};
  const std::int64_t Hl = H, Il = I;
  for (int e = 0; e < E; ++e) {
    const int n = off[e + 1] - off[e];
    if (n == 0) continue;
    const int k = static_cast<int>(std::min_element(load, load + kSideLanes) - load);
    load[k] += n;
    const std::int64_t o = off[e];
    linear(lanes.h[k], v.xp + o * Hl, w.gate_up + e * 2 * Il * Hl, v.gu + o * 2 * Il, n, H, 2 * I, lanes.st[k]);
    if (p) swiglu_oai(v.gu + o * 2 * Il, *p, v.act + o * Il, n, I, lanes.st[k]);
    linear(lanes.h[k], v.act + o * Il, w.down + e * Hl * Il, v.xp + o * Hl, n, I, H, lanes.st[k]);
  }
  for (int k = 0; k < kSideLanes; ++k) {
    M3_CUDA_CHECK(cudaEventRecord(lanes.done[k], lanes.st[k]));
    M3_CUDA_CHECK(cudaStreamWaitEvent(s, lanes.done[k], 0));
  }
}

// Pinned host memory for the offsets, grown on demand and kept per host thread (a device-to-pageable
// copy would block the host before the shared expert is enqueued).
struct PinnedOffsets {
  std::int32_t* p = nullptr;
  std::size_t n = 0;
  ~PinnedOffsets() {
    if (p) cudaFreeHost(p);
  }
  std::int32_t* get(std::size_t need) {
    if (need > n) {
      if (p) M3_CUDA_CHECK(cudaFreeHost(p));
      p = nullptr;
      n = 0;
      M3_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&p), need * sizeof(std::int32_t)));
      n = need;
    }
    return p;
  }
};

struct EventGuard {
  cudaEvent_t e = nullptr;
  EventGuard() { M3_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming)); }
  ~EventGuard() {
    if (e) cudaEventDestroy(e);
  }
};

}  // namespace

std::size_t moe_experts_workspace_bytes(int T, int H, int K_e, const MoeExpertWeights& w) {
  check_dims(T, H, K_e, w);
  if (T == 0) return 0;
  return make_layout(T, H, K_e, w).total;
}

void moe_experts(cublasHandle_t h, const bf16* x, const std::int32_t* experts, const float* weights, int T, int H,
                 int K_e, const MoeExpertWeights& w, double routed_scale, const SwigluParams& p, bf16* y,
                 void* workspace, std::size_t workspace_bytes, cudaStream_t s, MoeGemmPath path) {
  if (!h) throw GpuError("moe_experts: null cuBLAS handle; expected one made by CublasHandle");
  check_dims(T, H, K_e, w);
  if (T == 0) return;
  if (!x || !experts || !weights || !y)
    throw GpuError("moe_experts: a null device pointer (x, experts, weights or y); expected all four set");
  const Layout L = make_layout(T, H, K_e, w);
  if (!workspace || workspace_bytes < L.total)
    throw GpuError("moe_experts: workspace of " + std::to_string(workspace_bytes) + " bytes" +
                   (workspace ? "" : " (null)") + ", expected " + std::to_string(L.total) +
                   " (moe_experts_workspace_bytes)");
  const Views v = make_views(workspace, L, has_shared(w));
  const int N = T * K_e, E = w.E;

  // 1. Permutation.
  rank_kernel<<<E, kRankThreads, 0, s>>>(experts, N, v.rank, v.counts);
  M3_CUDA_CHECK_LAUNCH();
  offsets_kernel<<<1, kOffsetsThreads, 0, s>>>(v.counts, E, v.offsets,
                                               PtrArgs{w.gate_up, w.down, v.xp, v.gu, v.act, H, w.I, v.ptrs});
  M3_CUDA_CHECK_LAUNCH();
  if (H % 8 == 0 && aligned16(x))
    gather_kernel<8><<<N, kGatherThreads, 0, s>>>(x, experts, v.rank, v.offsets, E, K_e, H, v.inv, v.xp);
  else
    gather_kernel<1><<<N, kGatherThreads, 0, s>>>(x, experts, v.rank, v.offsets, E, K_e, H, v.inv, v.xp);
  M3_CUDA_CHECK_LAUNCH();
  EventGuard permuted;  // the loop path's lanes start here, concurrently with the shared expert
  M3_CUDA_CHECK(cudaEventRecord(permuted.e, s));

  // 2. The offsets to the host; the shared expert runs on the GPU meanwhile.
  static thread_local PinnedOffsets pinned;
  std::int32_t* off = pinned.get(static_cast<std::size_t>(E) + 1);
  EventGuard copied;
  M3_CUDA_CHECK(cudaMemcpyAsync(off, v.offsets, (E + 1) * sizeof(std::int32_t), cudaMemcpyDeviceToHost, s));
  M3_CUDA_CHECK(cudaEventRecord(copied.e, s));
  if (has_shared(w)) {
    linear(h, x, w.shared_gate_up, v.sgu, T, H, 2 * w.Is, s);
    swiglu_oai(v.sgu, p, v.sact, T, w.Is, s);
    linear(h, v.sact, w.shared_down, v.sout, T, w.Is, H, s);
  }
  M3_CUDA_CHECK(cudaEventSynchronize(copied.e));

  // 3. Expert GEMMs (the handle's stream is s from here on, whichever path).
  M3_CUBLAS_CHECK(cublasSetStream(h, s));
  expert_gemms(h, off, H, w, &p, v, path, s, permuted.e);

  // 4. Combine (the expert outputs sit in xp).
  const float scale = static_cast<float>(routed_scale);
  if (H % 8 == 0 && aligned16(y))
    combine_kernel<8><<<T, kCombineThreads, 0, s>>>(experts, weights, v.inv, v.xp, v.sout, K_e, H, scale, y);
  else
    combine_kernel<1><<<T, kCombineThreads, 0, s>>>(experts, weights, v.inv, v.xp, v.sout, K_e, H, scale, y);
  M3_CUDA_CHECK_LAUNCH();
}

std::vector<std::int32_t> moe_experts_offsets(int T, int H, int K_e, const MoeExpertWeights& w,
                                              const void* workspace, cudaStream_t s) {
  check_dims(T, H, K_e, w);
  if (T == 0) return std::vector<std::int32_t>(static_cast<std::size_t>(w.E) + 1, 0);
  if (!workspace) throw GpuError("moe_experts_offsets: null workspace");
  const Views v = make_views(workspace, make_layout(T, H, K_e, w), has_shared(w));
  std::vector<std::int32_t> off(static_cast<std::size_t>(w.E) + 1);
  M3_CUDA_CHECK(cudaMemcpyAsync(off.data(), v.offsets, off.size() * sizeof(std::int32_t), cudaMemcpyDeviceToHost, s));
  M3_CUDA_CHECK(cudaStreamSynchronize(s));
  return off;
}

void moe_experts_gemms(cublasHandle_t h, const std::vector<std::int32_t>& offsets, int T, int H, int K_e,
                       const MoeExpertWeights& w, const SwigluParams* p, void* workspace, MoeGemmPath path,
                       cudaStream_t s) {
  if (!h) throw GpuError("moe_experts_gemms: null cuBLAS handle");
  check_dims(T, H, K_e, w);
  if (T == 0) return;
  if (!workspace) throw GpuError("moe_experts_gemms: null workspace");
  if (offsets.size() != static_cast<std::size_t>(w.E) + 1 || offsets[w.E] > T * K_e)
    throw GpuError("moe_experts_gemms: " + std::to_string(offsets.size()) + " offsets, expected E + 1 = " +
                   std::to_string(w.E + 1) + " from moe_experts_offsets");
  M3_CUBLAS_CHECK(cublasSetStream(h, s));
  expert_gemms(h, offsets.data(), H, w, p, make_views(workspace, make_layout(T, H, K_e, w), has_shared(w)), path, s,
               nullptr);
}

}  // namespace m3::gpu
