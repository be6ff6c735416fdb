// Exact top-k block selection; see msa_select.h. Two kernels with bit-identical rows: one CTA of
// 512 threads a (query, head) row (many rows), or a cluster of P <= 8 CTAs of 256 threads a row
// that split the row into chunks (few rows: decode).
#include "gpu/kernels/msa_select.h"

#include "gpu/kernels/attention_dense.h"
#include "gpu/kernels/msa_select_chunk.cuh"

#include <algorithm>
#include <string>

namespace m3::gpu {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct SelLaunch {
  const float* scores = nullptr;
  const std::int64_t* q_pos = nullptr;
  std::int32_t* sel = nullptr;
  int T = 0, NB = 0, Hi = 0, BLK = 0, K_blk = 0, local = 0, init = 0;
};

__global__ void __launch_bounds__(kThreads) msa_select_kernel(const SelLaunch a) {
  detail::pdl_wait();     // the scores come from the index kernel before it
  detail::pdl_trigger();  // the sparse attention may launch: it waits for this grid
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned long long* chosen = reinterpret_cast<unsigned long long*>(smem);  // [K_blk]
  unsigned* keys = reinterpret_cast<unsigned*>(smem + 8 * a.K_blk);         // [NB]
  __shared__ unsigned hist[256];
  __shared__ unsigned whist[kWarps * 256];  // per-warp digit histograms of one radix pass
  __shared__ int s_digit, s_kk, s_h, s_cnt;  // s_h unused here: every pass runs
  __shared__ int warp_tot[kWarps];

  const int tid = threadIdx.x, warp = tid / 32;
  const std::int64_t row = blockIdx.x;
  const int rows_seq = a.Hi * a.T;
  const std::int64_t b = row / rows_seq;
  const int t = static_cast<int>(row % a.T);
  const detail::SelRow g = detail::sel_row(a.q_pos[b * a.T + t], a.BLK, a.NB, a.K_blk, a.local, a.init);
  std::int32_t* out = a.sel + row * a.K_blk;
  if (!g.ok) {
    for (int s = tid; s < a.K_blk; s += kThreads) out[s] = -1;
    return;
  }
  const int init_end = g.init_end, k = g.k, C = g.C;
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
        if (c < C) store(c, detail::sel_key(v[u]));
      }
    }
  };
  int kc = 0;  // chosen non-forced blocks
  if (k > 0 && k >= C) {  // every non-forced block fits the budget (then k == C)
    kc = C;
    load_keys([&](int c, unsigned key) { chosen[c] = detail::sel_compose(key, init_end + c); });
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
      if (warp == 0) detail::sel_find_digit(hist, kk, &s_digit, &s_kk, &s_h);
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
      if (key < tau) chosen[atomicAdd(&s_cnt, 1)] = detail::sel_compose(key, init_end + c);
    }
    // Keys equal to tau in id order: each thread owns a contiguous run of ids.
    const int per = (C + kThreads - 1) / kThreads;
    const int beg = min(C, tid * per), end = min(C, beg + per);
    int cnt = 0;
    for (int c = beg; c < end; ++c) cnt += keys[c] == tau;
    int off = detail::sel_block_exclusive_sum<kThreads>(cnt, warp_tot);
    for (int c = beg; c < end && off < need_eq; ++c)
      if (keys[c] == tau) chosen[n_less + off++] = detail::sel_compose(tau, init_end + c);
  }
  __syncthreads();
  // Rank of each chosen (key, id) among the chosen: all distinct, so the ranks are a permutation.
  for (int i = tid; i < kc; i += kThreads) {
    const unsigned long long ci = chosen[i];
    int rank = 0;
    for (int j = 0; j < kc; ++j) rank += chosen[j] < ci;
    out[rank] = static_cast<std::int32_t>(ci & 0xffffffffu);
  }
  for (int s = kc + tid; s < a.K_blk; s += kThreads) out[s] = detail::sel_forced_slot(g, s);  // kc == k
}


// ---- Split path: a cluster of P CTAs a row -------------------------------------------------
using detail::kSelThreads;
constexpr int kMaxSplitCtas = 8;  // the portable cluster size: no opt-in attribute, schedulable on every GPC

// E keys a thread (chunk <= E * kSelThreads). Grid: rows * P CTAs, clusters of P along x, so
// CTA rank r of row `row` is blockIdx.x = row * P + r. Every branch before a cluster barrier
// depends on the row only, so all CTAs of a cluster take it together.
template <int E>
__global__ void __launch_bounds__(kSelThreads) msa_select_split_kernel(const SelLaunch a, const int P) {
  detail::pdl_wait();
  detail::pdl_trigger();
  __shared__ unsigned long long cand[kMaxSplitCtas * detail::kSelMaxK];  // CTA 0's: [P, kSelMaxK] each CTA's best
  __shared__ int cand_n[kMaxSplitCtas];
  __shared__ detail::SelScratch sh;

  const int tid = threadIdx.x;
  const int rank = static_cast<int>(blockIdx.x % static_cast<unsigned>(P));
  const std::int64_t row = blockIdx.x / static_cast<unsigned>(P);
  const int rows_seq = a.Hi * a.T;
  const std::int64_t b = row / rows_seq;
  const int t = static_cast<int>(row % a.T);
  const detail::SelRow g = detail::sel_row(a.q_pos[b * a.T + t], a.BLK, a.NB, a.K_blk, a.local, a.init);
  std::int32_t* out = a.sel + row * a.K_blk;
  if (!g.ok) {
    if (rank == 0)
      for (int s = tid; s < a.K_blk; s += kSelThreads) out[s] = -1;
    return;
  }
  const int k = g.k;  // chosen non-forced blocks, 0 <= k <= C, k <= K_blk <= kSelMaxK
  if (k > 0) {
    // Phase 1 of the cluster barrier: its wait (below, long after) proves that every CTA of the
    // cluster is running, so CTA 0's shared memory may be written.
    __cluster_barrier_arrive_relaxed();
    const int chunk = (g.C + P - 1) / P;  // <= E * kSelThreads (checked on the host: C <= NB)
    const int beg = min(g.C, rank * chunk);
    const int id0 = g.init_end + beg;  // block id of the chunk's element 0
    const int want = detail::sel_chunk_best<E>(a.scores + row * a.NB + id0, id0, min(g.C - beg, chunk), k, sh);
    __cluster_barrier_wait();  // phase 1: CTA 0 is running
    unsigned long long* dst = static_cast<unsigned long long*>(__cluster_map_shared_rank(cand, 0)) + rank * detail::kSelMaxK;
    for (int i = tid; i < want; i += kSelThreads) dst[i] = sh.best[i];
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
    for (int i = tid; i < total; i += kSelThreads) {
      int c = 0, j = i;
      while (j >= cand_n[c]) j -= cand_n[c++];
      const unsigned long long x = cand[c * detail::kSelMaxK + j];
      int r = 0;
      for (int c2 = 0; c2 < P; ++c2) {
        const unsigned long long* l = cand + c2 * detail::kSelMaxK;
        const int m = cand_n[c2];
        for (int j2 = 0; j2 < m; ++j2) r += l[j2] < x;
      }
      if (r < k) out[r] = static_cast<std::int32_t>(x & 0xffffffffu);
    }
  } else if (rank != 0) {
    return;
  }
  for (int s = k + tid; s < a.K_blk; s += kSelThreads) out[s] = detail::sel_forced_slot(g, s);
}

// Split-path geometry: P = ceil(NB / kSplitChunk) CTAs a row, at most kMaxSplitCtas; keys a
// thread E = 4 (chunks <= 1024) or 16 (<= 4096, NB <= kMaxSplitNB = 4M tokens at BLK 128).
// Chunks of 1024 rather than 256 (measured, H200, BM_MsaSelect b 1): 9.3 vs 11.1 us at NB 2048
// (fewer cluster CTAs and candidates), equal at NB 8192 where both give P = 8.
constexpr int kSplitChunk = 4 * kSelThreads;
constexpr int kMaxSplitNB = kMaxSplitCtas * 16 * kSelThreads;

bool split_fits(int NB, const MsaDims& d) { return d.K_blk <= detail::kSelMaxK && NB <= kMaxSplitNB; }

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
  const detail::LaunchConfig lc(static_cast<long>(rows * P), kSelThreads, 0, s, /*pdl=*/true, static_cast<unsigned>(P));
  if (chunk <= 4 * kSelThreads) M3_CUDA_CHECK(cudaLaunchKernelEx(&lc.cfg, msa_select_split_kernel<4>, a, P));
  else M3_CUDA_CHECK(cudaLaunchKernelEx(&lc.cfg, msa_select_split_kernel<16>, a, P));
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace

void detail::check_select_args(const char* op, const float* scores, const std::int64_t* q_pos, int T, int NB,
                               const MsaDims& d, const std::int32_t* sel, int B) {
  const std::string o = op;
  if (d.Hi <= 0 || d.BLK <= 0 || d.K_blk <= 0 || d.local_blocks < 0 || d.init_blocks < 0)
    throw GpuError(o + ": Hi = " + std::to_string(d.Hi) + ", BLK = " + std::to_string(d.BLK) +
                   ", K_blk = " + std::to_string(d.K_blk) + ", local_blocks = " + std::to_string(d.local_blocks) +
                   ", init_blocks = " + std::to_string(d.init_blocks) +
                   ", expected Hi, BLK, K_blk > 0 and local_blocks, init_blocks >= 0");
  if (static_cast<long>(d.K_blk) < static_cast<long>(d.local_blocks) + d.init_blocks)
    throw GpuError(o + ": K_blk = " + std::to_string(d.K_blk) +
                   " is smaller than the forced blocks local_blocks + init_blocks = " +
                   std::to_string(d.local_blocks) + " + " + std::to_string(d.init_blocks));
  if (T < 0 || NB < 1 || B < 1)
    throw GpuError(o + ": T = " + std::to_string(T) + ", NB = " + std::to_string(NB) + ", B = " +
                   std::to_string(B) + ", expected T >= 0, NB >= 1, B >= 1");
  if (T == 0) return;
  if (scores == nullptr || q_pos == nullptr || sel == nullptr)
    throw GpuError(o + ": a null pointer among scores, q_pos, sel; expected device pointers");
}

namespace detail {

void msa_select_path(const float* scores, const std::int64_t* q_pos, int T, int NB, const MsaDims& d,
                     std::int32_t* sel, cudaStream_t s, int B, SelectPath path) {
  check_select_args("msa_select", scores, q_pos, T, NB, d, sel, B);
  if (T == 0) return;
  if (path == SelectPath::Split && !split_fits(NB, d))
    throw GpuError("msa_select: the split path needs K_blk <= " + std::to_string(detail::kSelMaxK) + " and NB <= " +
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
