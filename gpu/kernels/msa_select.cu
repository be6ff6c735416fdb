// Exact top-k block selection; see msa_select.h. Two kernels with bit-identical rows: one CTA of
// 512 threads a (query, head) row (many rows), or a cluster of P <= 8 CTAs of 256 threads a row
// that split the row into chunks (few rows: decode).
#include "gpu/kernels/msa_select.h"

#include "gpu/kernels/attention_dense.h"

#include <algorithm>
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

// Exclusive prefix sum over the block of Threads threads (thread order); all threads must call it.
template <int Threads>
__device__ int block_exclusive_sum(int v, int* warp_tot) {
  constexpr int kW = Threads / 32;
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
    int t = lane < kW ? warp_tot[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(kFull, t, o);
      if (lane >= o) t += n;
    }
    if (lane < kW) warp_tot[lane] = t;  // inclusive over warps
  }
  __syncthreads();
  const int base = warp > 0 ? warp_tot[warp - 1] : 0;
  __syncthreads();  // warp_tot may be reused by the caller
  return base + incl - v;
}

__global__ void __launch_bounds__(kThreads) msa_select_kernel(const SelLaunch a) {
  detail::pdl_wait();     // the scores come from the index kernel before it
  detail::pdl_trigger();  // the sparse attention may launch: it waits for this grid
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
    int off = block_exclusive_sum<kThreads>(cnt, warp_tot);
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


// ---- Split path: a cluster of P CTAs a row -------------------------------------------------
constexpr int kSplitThreads = 256;
constexpr int kSplitWarps = kSplitThreads / 32;
constexpr int kMaxSplitCtas = 8;  // the portable cluster size: no opt-in attribute, schedulable on every GPC
constexpr int kMaxSplitK = 64;    // candidates a CTA hands over (k <= K_blk); beyond, the single-CTA path
// Stop the radix passes once the bin holding the k-th key has at most this many keys and rank
// them directly: one bin entry a thread, kBinCap steps of a shared-memory scan.
constexpr int kBinCap = 64;
static_assert(kSplitThreads == 256, "one histogram bin a thread");
static_assert(kBinCap <= kSplitThreads, "one bin member a thread");

// Appends v to list at *cnt for the lanes where pred holds: one shared atomic a warp. Every lane
// of the warp must call it (ballot / shuffle over the full warp).
__device__ __forceinline__ void warp_push(bool pred, unsigned long long v, unsigned long long* list, int* cnt) {
  const unsigned b = __ballot_sync(kFull, pred);
  if (b == 0) return;
  const int lane = threadIdx.x % 32, leader = __ffs(b) - 1;
  int base = 0;
  if (lane == leader) base = atomicAdd(cnt, __popc(b));
  base = __shfl_sync(kFull, base, leader);
  if (pred) list[base + __popc(b & ((1u << lane) - 1u))] = v;
}

// E keys a thread (chunk <= E * kSplitThreads). Grid: rows * P CTAs, clusters of P along x, so
// CTA rank r of row `row` is blockIdx.x = row * P + r. Every branch before a cluster barrier
// depends on the row only, so all CTAs of a cluster take it together.
template <int E>
__global__ void __launch_bounds__(kSplitThreads) msa_select_split_kernel(const SelLaunch a, const int P) {
  detail::pdl_wait();
  detail::pdl_trigger();
  __shared__ unsigned long long cand[kMaxSplitCtas * kMaxSplitK];  // CTA 0's: [P, kMaxSplitK] each CTA's best
  __shared__ int cand_n[kMaxSplitCtas];
  __shared__ unsigned long long best[kMaxSplitK];  // this CTA's best (key, id), unordered
  __shared__ unsigned long long bin[kBinCap];      // keys of the threshold bin
  __shared__ unsigned hist[256];
  __shared__ int warp_tot[kSplitWarps];
  __shared__ int s_digit, s_kk, s_h, s_cnt, s_bin_n;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int rank = static_cast<int>(blockIdx.x % static_cast<unsigned>(P));
  const std::int64_t row = blockIdx.x / static_cast<unsigned>(P);
  const int rows_seq = a.Hi * a.T;
  const std::int64_t b = row / rows_seq;
  const int t = static_cast<int>(row % a.T);
  const std::int64_t p = a.q_pos[b * a.T + t];
  std::int32_t* out = a.sel + row * a.K_blk;
  if (p < 0 || p / a.BLK >= a.NB) {
    if (rank == 0)
      for (int s = tid; s < a.K_blk; s += kSplitThreads) out[s] = -1;
    return;
  }
  const int L = static_cast<int>(p / a.BLK);
  const int init_end = min(a.init, L + 1);
  const int local_begin = max(L - a.local + 1, 0);
  const int tail_begin = max(local_begin, init_end);
  const int n_forced = init_end + (L + 1 - tail_begin);
  const int n_valid = min(a.K_blk, L + 1);
  const int k = n_valid - n_forced;     // chosen non-forced blocks, 0 <= k <= C, k <= K_blk <= kMaxSplitK
  const int C = tail_begin - init_end;  // non-forced visible blocks init_end .. tail_begin-1

  if (k > 0) {
    // Phase 1 of the cluster barrier: its wait (below, long after) proves that every CTA of the
    // cluster is running, so CTA 0's shared memory may be written.
    __cluster_barrier_arrive_relaxed();
    const int chunk = (C + P - 1) / P;  // <= E * kSplitThreads (checked on the host: C <= NB)
    const int beg = min(C, rank * chunk);
    const int n = min(C - beg, chunk);
    const int want = min(k, n);
    const int id0 = init_end + beg;  // block id of the chunk's element 0
    // Thread tid owns the chunk's elements tid*E .. tid*E+E-1: thread order is block id order.
    unsigned key[E];
    {
      const float* src = a.scores + row * a.NB + id0;
      float v[E];
#pragma unroll
      for (int u = 0; u < E; ++u) v[u] = tid * E + u < n ? __ldg(src + tid * E + u) : 0.f;
#pragma unroll
      for (int u = 0; u < E; ++u) key[u] = desc_key(v[u]);
    }
    if (tid == 0) {
      s_cnt = 0;
      s_bin_n = 0;
    }
    __syncthreads();
    if (want == n) {  // the whole chunk fits the budget
#pragma unroll
      for (int u = 0; u < E; ++u) warp_push(tid * E + u < n, compose(key[u], id0 + tid * E + u), best, &s_cnt);
    } else {
      // Radix select of the want-th smallest key, most significant byte first; kk is the rank
      // still sought among the keys that match the digits fixed so far (prefix under mask).
      unsigned prefix = 0, mask = 0;
      int kk = want, h = 0, shift = 24;
      const unsigned lanes_below = (1u << lane) - 1u;
      for (;;) {
        hist[tid] = 0;
        __syncthreads();
#pragma unroll
        for (int u = 0; u < E; ++u) {
          const bool in = tid * E + u < n && (key[u] & mask) == prefix;
          const unsigned d = (key[u] >> shift) & 255u;
          // Lanes with equal digits add once (the scores of a row share their top bits: without
          // this a warp's atomics would all hit one or two bins); 256 marks lanes outside.
          const unsigned peers = __match_any_sync(kFull, in ? d : 256u);
          if (in && (peers & lanes_below) == 0) atomicAdd(&hist[d], static_cast<unsigned>(__popc(peers)));
        }
        __syncthreads();
        if (warp == 0) {
          int hb[8], sum = 0;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            hb[j] = static_cast<int>(hist[lane * 8 + j]);
            sum += hb[j];
          }
          int incl = sum;
#pragma unroll
          for (int o = 1; o < 32; o <<= 1) {
            const int m = __shfl_up_sync(kFull, incl, o);
            if (lane >= o) incl += m;
          }
          int before = incl - sum;
          if (before < kk && kk <= incl) {  // exactly one lane holds the bin of rank kk
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              if (before < kk && kk <= before + hb[j]) {
                s_digit = lane * 8 + j;
                s_kk = kk - before;
                s_h = hb[j];
              }
              before += hb[j];
            }
          }
        }
        __syncthreads();
        prefix |= static_cast<unsigned>(s_digit) << shift;
        mask |= 255u << shift;
        kk = s_kk;
        h = s_h;
        if (h <= kBinCap || shift == 0) break;
        shift -= 8;
      }
      // The keys below prefix (want - kk of them) are chosen; the bin (keys matching prefix under
      // mask, h of them) supplies its kk best under (key, id).
      const int n_less = want - kk;
      const bool by_rank = h <= kBinCap;
#pragma unroll
      for (int u = 0; u < E; ++u) {
        const int c = tid * E + u;
        const bool ok = c < n;
        const unsigned long long ck = compose(key[u], id0 + c);
        warp_push(ok && key[u] < prefix, ck, best, &s_cnt);
        if (by_rank) warp_push(ok && (key[u] & mask) == prefix, ck, bin, &s_bin_n);
      }
      __syncthreads();
      if (by_rank) {
        if (tid < h) {  // s_bin_n == h
          const unsigned long long x = bin[tid];
          int r = 0;
          for (int j = 0; j < h; ++j) r += bin[j] < x;
          if (r < kk) best[n_less + r] = x;
        }
      } else {
        // shift == 0 and more than kBinCap keys equal tau = prefix: the first kk by id complete
        // the set, in thread order (= id order).
        int cnt = 0;
#pragma unroll
        for (int u = 0; u < E; ++u) cnt += (tid * E + u < n && key[u] == prefix);
        int off = block_exclusive_sum<kSplitThreads>(cnt, warp_tot);
#pragma unroll
        for (int u = 0; u < E; ++u) {
          const int c = tid * E + u;
          if (c < n && key[u] == prefix) {
            if (off < kk) best[n_less + off] = compose(prefix, id0 + c);
            ++off;
          }
        }
      }
    }
    __syncthreads();  // best[0 .. want) complete
    __cluster_barrier_wait();  // phase 1: CTA 0 is running
    unsigned long long* dst = static_cast<unsigned long long*>(__cluster_map_shared_rank(cand, 0)) + rank * kMaxSplitK;
    for (int i = tid; i < want; i += kSplitThreads) dst[i] = best[i];
    if (tid == 0) static_cast<int*>(__cluster_map_shared_rank(cand_n, 0))[rank] = want;
    // Phase 2: arrive releases the writes above, wait acquires every CTA's (CTA 0 reads them
    // next; the others only wait so that no CTA leaves while a barrier phase is open).
    __cluster_barrier_arrive();
    __cluster_barrier_wait();
    if (rank != 0) return;
    // Rank the <= P * k candidates (distinct: ids differ) among themselves; the best k are the
    // row's best k. Candidate i (over the CTAs in order) is thread i's.
    int total = 0;
    for (int c = 0; c < P; ++c) total += cand_n[c];
    for (int i = tid; i < total; i += kSplitThreads) {
      int c = 0, j = i;
      while (j >= cand_n[c]) j -= cand_n[c++];
      const unsigned long long x = cand[c * kMaxSplitK + j];
      int r = 0;
      for (int c2 = 0; c2 < P; ++c2) {
        const unsigned long long* l = cand + c2 * kMaxSplitK;
        const int m = cand_n[c2];
        for (int j2 = 0; j2 < m; ++j2) r += l[j2] < x;
      }
      if (r < k) out[r] = static_cast<std::int32_t>(x & 0xffffffffu);
    }
  } else if (rank != 0) {
    return;
  }
  for (int f = tid; f < n_forced; f += kSplitThreads)
    out[k + f] = f < init_end ? f : tail_begin + (f - init_end);
  for (int s = n_valid + tid; s < a.K_blk; s += kSplitThreads) out[s] = -1;
}

// Split-path geometry: P = ceil(NB / kSplitChunk) CTAs a row, at most kMaxSplitCtas; keys a
// thread E = 4 (chunks <= 1024) or 16 (<= 4096, NB <= kMaxSplitNB = 4M tokens at BLK 128).
// Chunks of 1024 rather than 256 (measured, H200, BM_MsaSelect b 1): 9.3 vs 11.1 us at NB 2048
// (fewer cluster CTAs and candidates), equal at NB 8192 where both give P = 8.
constexpr int kSplitChunk = 4 * kSplitThreads;
constexpr int kMaxSplitNB = kMaxSplitCtas * 16 * kSplitThreads;

void check_args(const float* scores, const std::int64_t* q_pos, int T, int NB, const MsaDims& d,
                const std::int32_t* sel, int B) {
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
}

bool split_fits(int NB, const MsaDims& d) { return d.K_blk <= kMaxSplitK && NB <= kMaxSplitNB; }

void launch_single(const SelLaunch& a, long long rows, int dev, cudaStream_t s) {
  if (rows > 2147483647LL)
    throw GpuError("msa_select: B*Hi*T = " + std::to_string(rows) + " rows exceed the grid limit");
  const std::size_t smem = 8 * static_cast<std::size_t>(a.K_blk) + 4 * static_cast<std::size_t>(a.NB);
  int max_smem = 0;
  M3_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  // The static part (histograms, scan scratch) is under 18 KiB.
  constexpr std::size_t kStatic = 18 * 1024;
  if (smem + kStatic > static_cast<std::size_t>(max_smem))
    throw GpuError("msa_select: NB = " + std::to_string(a.NB) + ", K_blk = " + std::to_string(a.K_blk) + " need " +
                   std::to_string(smem) + " bytes of shared memory a CTA, expected <= " + std::to_string(max_smem - kStatic));
  // Raises the kernel's limit to the device maximum once per device (cached).
  if (smem + kStatic > 48 * 1024) detail::resident_ctas(reinterpret_cast<const void*>(msa_select_kernel), kThreads,
                                                   static_cast<int>(max_smem - kStatic));
  const detail::LaunchConfig lc(static_cast<long>(rows), kThreads, smem, s, /*pdl=*/true);
  M3_CUDA_CHECK(cudaLaunchKernelEx(&lc.cfg, msa_select_kernel, a));
  M3_CUDA_CHECK_LAUNCH();
}

void launch_split(const SelLaunch& a, long long rows, cudaStream_t s) {
  const int P = std::min(kMaxSplitCtas, (a.NB + kSplitChunk - 1) / kSplitChunk);
  const int chunk = (a.NB + P - 1) / P;  // >= every row's chunk: C <= NB
  if (rows * P > 2147483647LL)
    throw GpuError("msa_select: B*Hi*T = " + std::to_string(rows) + " rows times " + std::to_string(P) +
                   " CTAs a row exceed the grid limit");
  // A cluster of P CTAs a row; PDL overlaps the index kernel's tail.
  const detail::LaunchConfig lc(static_cast<long>(rows * P), kSplitThreads, 0, s, /*pdl=*/true, static_cast<unsigned>(P));
  if (chunk <= 4 * kSplitThreads) M3_CUDA_CHECK(cudaLaunchKernelEx(&lc.cfg, msa_select_split_kernel<4>, a, P));
  else M3_CUDA_CHECK(cudaLaunchKernelEx(&lc.cfg, msa_select_split_kernel<16>, a, P));
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace

namespace detail {

void msa_select_path(const float* scores, const std::int64_t* q_pos, int T, int NB, const MsaDims& d,
                     std::int32_t* sel, cudaStream_t s, int B, SelectPath path) {
  check_args(scores, q_pos, T, NB, d, sel, B);
  if (T == 0) return;
  if (path == SelectPath::Split && !split_fits(NB, d))
    throw GpuError("msa_select: the split path needs K_blk <= " + std::to_string(kMaxSplitK) + " and NB <= " +
                   std::to_string(kMaxSplitNB) + ", got K_blk = " + std::to_string(d.K_blk) + ", NB = " +
                   std::to_string(NB));
  const long long rows = static_cast<long long>(B) * d.Hi * T;
  int dev = 0;
  M3_CUDA_CHECK(cudaGetDevice(&dev));
  if (path == SelectPath::Auto) {
    int sms = 0;
    M3_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    // Few rows: one CTA a row would leave most SMs idle, so split each row over a cluster.
    // Many rows: the single-CTA kernel already fills the GPU and reads each row once.
    path = split_fits(NB, d) && rows * 4 <= sms ? SelectPath::Split : SelectPath::SingleCta;
  }
  SelLaunch a;
  a.scores = scores; a.q_pos = q_pos; a.sel = sel;
  a.T = T; a.NB = NB; a.Hi = d.Hi; a.BLK = d.BLK; a.K_blk = d.K_blk;
  a.local = d.local_blocks; a.init = d.init_blocks;
  if (path == SelectPath::Split) launch_split(a, rows, s);
  else launch_single(a, rows, dev, s);
}

}  // namespace detail

void msa_select(const float* scores, const std::int64_t* q_pos, int T, int NB, const MsaDims& d,
                std::int32_t* sel, cudaStream_t s, int B) {
  detail::msa_select_path(scores, q_pos, T, NB, d, sel, s, B, detail::SelectPath::Auto);
}

}  // namespace m3::gpu
