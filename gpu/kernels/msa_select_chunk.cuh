// Device pieces of the exact top-k block selection (msa_select.h's tie rule) shared by msa_select's
// kernels and the fused selection + sparse attention kernel (attention_dense_partial.cuh):
//  - sel_key / sel_compose: the 32-bit key whose unsigned order is the tie rule's score order, and
//    (key, id) as one 64-bit value, a strict total order (score descending, then id ascending);
//  - SelRow: a row's forced blocks and budget from its position alone;
//  - sel_chunk_best: one CTA of 256 threads finds the best `want` (key, id) of a contiguous chunk
//    of a row's scores (a radix select that stops once the threshold digit's bin holds <= 64 keys,
//    then ranks that bin). The row's best k lie in the union of its chunks' best k, so a cluster
//    of CTAs over the chunks, followed by a rank of the <= P k candidates, selects exactly.
#pragma once

#include "gpu/kernels/attention_dense.h"

#include <cstdint>

namespace m3::gpu::detail {

constexpr unsigned kSelFull = 0xffffffffu;
constexpr int kSelThreads = 256;  // sel_chunk_best's CTA: one histogram bin a thread
constexpr int kSelWarps = kSelThreads / 32;
constexpr int kSelMaxK = 64;      // candidates a chunk hands over (k <= K_blk <= 64)
// Stop the radix passes once the bin holding the k-th key has at most this many keys and rank
// them directly: one bin entry a thread, kSelBinCap steps of a shared-memory scan.
constexpr int kSelBinCap = 64;
static_assert(kSelBinCap <= kSelThreads, "one bin member a thread");

// Unsigned key whose ascending order is the tie rule's score order (descending score): NaN -> -inf
// first, -0 -> +0 (equal scores must tie), then the order-preserving image of the float, inverted.
__device__ __forceinline__ unsigned sel_key(float s) {
  if (s != s) s = -INFINITY;
  if (s == 0.f) s = 0.f;
  const unsigned u = __float_as_uint(s);
  const unsigned ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ord;
}
// (key, id) packed so that unsigned 64-bit order = score descending, then id ascending.
__device__ __forceinline__ unsigned long long sel_compose(unsigned key, int id) {
  return (static_cast<unsigned long long>(key) << 32) | static_cast<unsigned>(id);
}

// One row's geometry from its position p (msa_select.h): L = floor(p/BLK) the own block, forced
// F = {0 .. init-1} u {L-local+1 .. L} clipped to [0, L]; the k = n_valid - n_forced best of the C
// non-forced visible blocks init_end .. tail_begin-1 come first in the row, then F ascending, then
// -1. ok is false for a position the row cannot hold (p < 0 or L >= NB): an all -1 row.
struct SelRow {
  bool ok = false;
  int init_end = 0, tail_begin = 0, n_forced = 0, n_valid = 0, k = 0, C = 0;
};
__device__ __forceinline__ SelRow sel_row(std::int64_t p, int BLK, int NB, int K_blk, int local, int init) {
  SelRow r;
  if (p < 0 || p / BLK >= NB) return r;
  r.ok = true;
  const int L = static_cast<int>(p / BLK);
  r.init_end = min(init, L + 1);
  const int local_begin = max(L - local + 1, 0);
  r.tail_begin = max(local_begin, r.init_end);
  r.n_forced = r.init_end + (L + 1 - r.tail_begin);
  r.n_valid = min(K_blk, L + 1);
  r.k = r.n_valid - r.n_forced;  // >= 0: K_blk >= local + init >= |F| (checked on the host)
  r.C = r.tail_begin - r.init_end;
  return r;
}
// Slot s >= k of a row: the forced blocks ascending, then -1.
__device__ __forceinline__ std::int32_t sel_forced_slot(const SelRow& r, int s) {
  const int f = s - r.k;
  if (f >= r.n_forced) return -1;
  return f < r.init_end ? f : r.tail_begin + (f - r.init_end);
}

// Shared memory of sel_chunk_best.
struct SelScratch {
  unsigned long long best[kSelMaxK];  // the chunk's best (key, id), unordered
  unsigned long long bin[kSelBinCap];  // keys of the threshold bin
  unsigned hist[256];
  int warp_tot[kSelWarps];
  int digit, kk, h, cnt, bin_n;
};

// Exclusive prefix sum over the block of Threads threads (thread order); all threads must call it.
template <int Threads>
__device__ int sel_block_exclusive_sum(int v, int* warp_tot) {
  constexpr int kW = Threads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(kSelFull, incl, o);
    if (lane >= o) incl += n;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int t = lane < kW ? warp_tot[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(kSelFull, t, o);
      if (lane >= o) t += n;
    }
    if (lane < kW) warp_tot[lane] = t;  // inclusive over warps
  }
  __syncthreads();
  const int base = warp > 0 ? warp_tot[warp - 1] : 0;
  __syncthreads();  // warp_tot may be reused by the caller
  return base + incl - v;
}

// One radix pass's digit: the bin of hist[256] holding the kk-th smallest key among those counted
// (1-based), its rank kk inside that bin, and the bin's count, into *digit, *kk_out, *h_out. Called
// by the 32 lanes of one warp; the one lane whose 8 bins hold rank kk writes.
__device__ __forceinline__ void sel_find_digit(const unsigned* hist, int kk, int* digit, int* kk_out, int* h_out) {
  const int lane = threadIdx.x % 32;
  int hb[8], sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    hb[j] = static_cast<int>(hist[lane * 8 + j]);
    sum += hb[j];
  }
  int incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int m = __shfl_up_sync(kSelFull, incl, o);
    if (lane >= o) incl += m;
  }
  int before = incl - sum;
  if (before < kk && kk <= incl) {  // exactly one lane holds the bin of rank kk
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (before < kk && kk <= before + hb[j]) {
        *digit = lane * 8 + j;
        *kk_out = kk - before;
        *h_out = hb[j];
      }
      before += hb[j];
    }
  }
}

// Appends v to list at *cnt for the lanes where pred holds: one shared atomic a warp. Every lane
// of the warp must call it (ballot / shuffle over the full warp).
__device__ __forceinline__ void sel_warp_push(bool pred, unsigned long long v, unsigned long long* list, int* cnt) {
  const unsigned b = __ballot_sync(kSelFull, pred);
  if (b == 0) return;
  const int lane = threadIdx.x % 32, leader = __ffs(b) - 1;
  int base = 0;
  if (lane == leader) base = atomicAdd(cnt, __popc(b));
  base = __shfl_sync(kSelFull, base, leader);
  if (pred) list[base + __popc(b & ((1u << lane) - 1u))] = v;
}

// The best want = min(k, n) (key, id) of the n scores src[0 .. n) (block ids id0 ..), into
// sh.best[0 .. want), unordered; returns want. All kSelThreads threads call it with the same
// arguments; E keys a thread (n <= E * kSelThreads); thread order is block id order. Ends with a
// barrier (sh.best complete).
template <int E>
__device__ int sel_chunk_best(const float* src, int id0, int n, int k, SelScratch& sh) {
  const int tid = threadIdx.x, lane = tid % 32;
  const int want = min(k, n);
  unsigned key[E];
  {
    float v[E];
#pragma unroll
    for (int u = 0; u < E; ++u) v[u] = tid * E + u < n ? __ldg(src + tid * E + u) : 0.f;
#pragma unroll
    for (int u = 0; u < E; ++u) key[u] = sel_key(v[u]);
  }
  if (tid == 0) {
    sh.cnt = 0;
    sh.bin_n = 0;
  }
  __syncthreads();
  if (want == n) {  // the whole chunk fits the budget
#pragma unroll
    for (int u = 0; u < E; ++u) sel_warp_push(tid * E + u < n, sel_compose(key[u], id0 + tid * E + u), sh.best, &sh.cnt);
    __syncthreads();
    return want;
  }
  // Radix select of the want-th smallest key, most significant byte first; kk is the rank still
  // sought among the keys that match the digits fixed so far (prefix under mask).
  unsigned prefix = 0, mask = 0;
  int kk = want, h = 0, shift = 24;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (;;) {
    sh.hist[tid] = 0;
    __syncthreads();
#pragma unroll
    for (int u = 0; u < E; ++u) {
      const bool in = tid * E + u < n && (key[u] & mask) == prefix;
      const unsigned d = (key[u] >> shift) & 255u;
      // Lanes with equal digits add once (the scores of a row share their top bits: without this
      // a warp's atomics would all hit one or two bins); 256 marks lanes outside.
      const unsigned peers = __match_any_sync(kSelFull, in ? d : 256u);
      if (in && (peers & lanes_below) == 0) atomicAdd(&sh.hist[d], static_cast<unsigned>(__popc(peers)));
    }
    __syncthreads();
    if (tid < 32) sel_find_digit(sh.hist, kk, &sh.digit, &sh.kk, &sh.h);
    __syncthreads();
    prefix |= static_cast<unsigned>(sh.digit) << shift;
    mask |= 255u << shift;
    kk = sh.kk;
    h = sh.h;
    if (h <= kSelBinCap || shift == 0) break;
    shift -= 8;
  }
  // The keys below prefix (want - kk of them) are chosen; the bin (keys matching prefix under
  // mask, h of them) supplies its kk best under (key, id).
  const int n_less = want - kk;
  const bool by_rank = h <= kSelBinCap;
#pragma unroll
  for (int u = 0; u < E; ++u) {
    const int c = tid * E + u;
    const bool ok = c < n;
    const unsigned long long ck = sel_compose(key[u], id0 + c);
    sel_warp_push(ok && key[u] < prefix, ck, sh.best, &sh.cnt);
    if (by_rank) sel_warp_push(ok && (key[u] & mask) == prefix, ck, sh.bin, &sh.bin_n);
  }
  __syncthreads();
  if (by_rank) {
    if (tid < h) {  // sh.bin_n == h
      const unsigned long long x = sh.bin[tid];
      int r = 0;
      for (int j = 0; j < h; ++j) r += sh.bin[j] < x;
      if (r < kk) sh.best[n_less + r] = x;
    }
  } else {
    // shift == 0 and more than kSelBinCap keys equal tau = prefix: the first kk by id complete the
    // set, in thread order (= id order).
    int cnt = 0;
#pragma unroll
    for (int u = 0; u < E; ++u) cnt += (tid * E + u < n && key[u] == prefix);
    int off = sel_block_exclusive_sum<kSelThreads>(cnt, sh.warp_tot);
#pragma unroll
    for (int u = 0; u < E; ++u) {
      const int c = tid * E + u;
      if (c < n && key[u] == prefix) {
        if (off < kk) sh.best[n_less + off] = sel_compose(prefix, id0 + c);
        ++off;
      }
    }
  }
  __syncthreads();  // best[0 .. want) complete
  return want;
}

}  // namespace m3::gpu::detail
