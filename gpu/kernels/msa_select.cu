// Exact top-k block selection; see msa_select.h. One CTA of 512 threads per (query, head) row.
#include "gpu/kernels/msa_select.h"

#include "gpu/kernels/attention_dense.h"

#include <string>

namespace m3::gpu {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

struct SelLaunch {
  const float* scores = nullptr;
  const std::int64_t* q_pos = nullptr;
  std::int32_t* sel = nullptr;
  int T = 0, NB = 0, Hi = 0, BLK = 0, K_blk = 0, local = 0, init = 0;
};

// Unsigned key whose ascending order is the tie rule's score order (descending score): NaN -> -inf
// first, -0 -> +0 (equal scores must tie), then the order-preserving image of the float, inverted.
__device__ __forceinline__ unsigned desc_key(float s) {
  if (s != s) s = -INFINITY;
  if (s == 0.f) s = 0.f;
  const unsigned u = __float_as_uint(s);
  const unsigned ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ord;
}
// (key, id) packed so that unsigned 64-bit order = score descending, then id ascending.
__device__ __forceinline__ unsigned long long compose(unsigned key, int id) {
  return (static_cast<unsigned long long>(key) << 32) | static_cast<unsigned>(id);
}

// Exclusive prefix sum over the block (thread order); all threads must call it.
__device__ int block_exclusive_sum(int v, int* warp_tot) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += n;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int t = lane < kWarps ? warp_tot[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(kFull, t, o);
      if (lane >= o) t += n;
    }
    if (lane < kWarps) warp_tot[lane] = t;  // inclusive over warps
  }
  __syncthreads();
  const int base = warp > 0 ? warp_tot[warp - 1] : 0;
  __syncthreads();  // warp_tot may be reused by the caller
  return base + incl - v;
}

__global__ void __launch_bounds__(kThreads) msa_select_kernel(const SelLaunch a) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned long long* chosen = reinterpret_cast<unsigned long long*>(smem);  // [K_blk]
  unsigned* keys = reinterpret_cast<unsigned*>(smem + 8 * a.K_blk);         // [NB]
  __shared__ unsigned hist[256];
  __shared__ unsigned whist[kWarps * 256];  // per-warp digit histograms of one radix pass
  __shared__ int s_digit, s_kk, s_cnt;
  __shared__ int warp_tot[kWarps];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const std::int64_t row = blockIdx.x;
  const int rows_seq = a.Hi * a.T;
  const std::int64_t b = row / rows_seq;
  const int t = static_cast<int>(row % a.T);
  const std::int64_t p = a.q_pos[b * a.T + t];
  std::int32_t* out = a.sel + row * a.K_blk;
  if (p < 0 || p / a.BLK >= a.NB) {
    for (int s = tid; s < a.K_blk; s += kThreads) out[s] = -1;
    return;
  }
  const int L = static_cast<int>(p / a.BLK);
  const int init_end = min(a.init, L + 1);
  const int local_begin = max(L - a.local + 1, 0);
  const int tail_begin = max(local_begin, init_end);
  const int n_forced = init_end + (L + 1 - tail_begin);
  const int n_valid = min(a.K_blk, L + 1);
  const int k = n_valid - n_forced;  // >= 0: K_blk >= local + init >= |F| (checked on the host)
  const int C = tail_begin - init_end;  // non-forced visible blocks init_end .. tail_begin-1
  const float* srow = a.scores + row * a.NB + init_end;

  // Scores -> keys, kLoads loads in flight per thread before the first store: the shared-memory
  // stores could alias the global row as far as the compiler knows, so a plain loop would issue
  // one load at a time (16 DRAM round trips for NB = 8192).
  constexpr int kLoads = 8;
  auto load_keys = [&](auto&& store) {
    for (int base = 0; base < C; base += kThreads * kLoads) {
      float v[kLoads];
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int c = base + u * kThreads + tid;
        v[u] = c < C ? __ldg(srow + c) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        const int c = base + u * kThreads + tid;
        if (c < C) store(c, desc_key(v[u]));
      }
    }
  };
  int kc = 0;  // chosen non-forced blocks
  if (k > 0 && k >= C) {  // every non-forced block fits the budget (then k == C)
    kc = C;
    load_keys([&](int c, unsigned key) { chosen[c] = compose(key, init_end + c); });
  } else if (k > 0) {
    kc = k;
    load_keys([&](int c, unsigned key) { keys[c] = key; });
    // Radix select of the k-th smallest key (1-based), most significant byte first. kk is the
    // rank still sought among the keys that match the digits fixed so far.
    unsigned prefix = 0, mask = 0;
    int kk = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < kWarps * 256; i += kThreads) whist[i] = 0;
      __syncthreads();
      // Per-warp histograms: a warp's equal digits collide only among its own lanes (scores of
      // one row share their top bits), never with the other warps.
      unsigned* wh = whist + warp * 256;
      for (int c = tid; c < C; c += kThreads) {
        const unsigned key = keys[c];
        if ((key & mask) == prefix) atomicAdd(&wh[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      for (int i = tid; i < 256; i += kThreads) {
        unsigned sum = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += whist[w * 256 + i];
        hist[i] = sum;
      }
      __syncthreads();
      if (warp == 0) {
        int h[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          h[j] = static_cast<int>(hist[lane * 8 + j]);
          sum += h[j];
        }
        int incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int n = __shfl_up_sync(kFull, incl, o);
          if (lane >= o) incl += n;
        }
        int before = incl - sum;
        if (before < kk && kk <= incl) {  // exactly one lane holds the bin of rank kk
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (before < kk && kk <= before + h[j]) {
              s_digit = lane * 8 + j;
              s_kk = kk - before;
            }
            before += h[j];
          }
        }
      }
      __syncthreads();
      prefix |= static_cast<unsigned>(s_digit) << shift;
      mask |= 255u << shift;
      kk = s_kk;
    }
    // tau = the k-th key: n_less keys lie below it, the first need_eq (by id) of the keys equal
    // to it complete the set.
    const unsigned tau = prefix;
    const int need_eq = kk, n_less = k - kk;
    if (tid == 0) s_cnt = 0;
    __syncthreads();
    for (int c = tid; c < C; c += kThreads) {
      const unsigned key = keys[c];
      if (key < tau) chosen[atomicAdd(&s_cnt, 1)] = compose(key, init_end + c);
    }
    // Keys equal to tau in id order: each thread owns a contiguous run of ids.
    const int per = (C + kThreads - 1) / kThreads;
    const int beg = min(C, tid * per), end = min(C, beg + per);
    int cnt = 0;
    for (int c = beg; c < end; ++c) cnt += keys[c] == tau;
    int off = block_exclusive_sum(cnt, warp_tot);
    for (int c = beg; c < end && off < need_eq; ++c)
      if (keys[c] == tau) chosen[n_less + off++] = compose(tau, init_end + c);
  }
  __syncthreads();
  // Rank of each chosen (key, id) among the chosen: all distinct, so the ranks are a permutation.
  for (int i = tid; i < kc; i += kThreads) {
    const unsigned long long ci = chosen[i];
    int rank = 0;
    for (int j = 0; j < kc; ++j) rank += chosen[j] < ci;
    out[rank] = static_cast<std::int32_t>(ci & 0xffffffffu);
  }
  for (int f = tid; f < n_forced; f += kThreads)
    out[kc + f] = f < init_end ? f : tail_begin + (f - init_end);
  for (int s = n_valid + tid; s < a.K_blk; s += kThreads) out[s] = -1;
}

}  // namespace

void msa_select(const float* scores, const std::int64_t* q_pos, int T, int NB, const MsaDims& d,
                std::int32_t* sel, cudaStream_t s, int B) {
  if (d.Hi <= 0 || d.BLK <= 0 || d.K_blk <= 0 || d.local_blocks < 0 || d.init_blocks < 0)
    throw GpuError("msa_select: Hi = " + std::to_string(d.Hi) + ", BLK = " + std::to_string(d.BLK) +
                   ", K_blk = " + std::to_string(d.K_blk) + ", local_blocks = " + std::to_string(d.local_blocks) +
                   ", init_blocks = " + std::to_string(d.init_blocks) +
                   ", expected Hi, BLK, K_blk > 0 and local_blocks, init_blocks >= 0");
  if (static_cast<long>(d.K_blk) < static_cast<long>(d.local_blocks) + d.init_blocks)
    throw GpuError("msa_select: K_blk = " + std::to_string(d.K_blk) +
                   " is smaller than the forced blocks local_blocks + init_blocks = " +
                   std::to_string(d.local_blocks) + " + " + std::to_string(d.init_blocks));
  if (T < 0 || NB < 1 || B < 1)
    throw GpuError("msa_select: T = " + std::to_string(T) + ", NB = " + std::to_string(NB) + ", B = " +
                   std::to_string(B) + ", expected T >= 0, NB >= 1, B >= 1");
  if (T == 0) return;
  if (scores == nullptr || q_pos == nullptr || sel == nullptr)
    throw GpuError("msa_select: a null pointer among scores, q_pos, sel; expected device pointers");
  const double rows = static_cast<double>(B) * d.Hi * T;
  if (rows > 2147483647.0)
    throw GpuError("msa_select: B*Hi*T = " + std::to_string(static_cast<long long>(rows)) + " rows exceed the grid limit");
  const std::size_t smem = 8 * static_cast<std::size_t>(d.K_blk) + 4 * static_cast<std::size_t>(NB);
  int dev = 0, max_smem = 0;
  M3_CUDA_CHECK(cudaGetDevice(&dev));
  M3_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  // The static part (histograms, scan scratch) is under 18 KiB.
  constexpr std::size_t kStatic = 18 * 1024;
  if (smem + kStatic > static_cast<std::size_t>(max_smem))
    throw GpuError("msa_select: NB = " + std::to_string(NB) + ", K_blk = " + std::to_string(d.K_blk) + " need " +
                   std::to_string(smem) + " bytes of shared memory a CTA, expected <= " + std::to_string(max_smem - kStatic));
  // Raises the kernel's limit to the device maximum once per device (cached).
  if (smem + kStatic > 48 * 1024) detail::resident_ctas(reinterpret_cast<const void*>(msa_select_kernel), kThreads,
                                                   static_cast<int>(max_smem - kStatic));
  SelLaunch a;
  a.scores = scores; a.q_pos = q_pos; a.sel = sel;
  a.T = T; a.NB = NB; a.Hi = d.Hi; a.BLK = d.BLK; a.K_blk = d.K_blk;
  a.local = d.local_blocks; a.init = d.init_blocks;
  msa_select_kernel<<<static_cast<unsigned>(rows), kThreads, smem, s>>>(a);
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace m3::gpu
