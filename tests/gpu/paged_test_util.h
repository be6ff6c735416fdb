// Paged KV-cache fixtures shared by the GPU suites of the kernels that read the cache (dense and
// MSA attention, MSA index scoring, dense prefill): a random page table, the contiguous cache
// scattered into a poisoned page pool by it, and scattered query positions.
#pragma once

#include "gpu/kernels/kv_cache.h"
#include "gpu/runtime/buffer.h"
#include "reference/tensor.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

namespace m3::test {

// Paged copy of a contiguous cache: sequence b's logical page lp is physical page ids[b*pps + lp],
// drawn from a random permutation of a pool with `spare` pages more than the sequences use; pps is
// one more than N needs (the table's stride is pps, not ceil(N/128)). Pages past a sequence's
// length get id -1 (unallocated: a kernel that looked one up would give NaN), and every pool row
// that no logical row < len[b] maps to (the spare pages, the tail of a sequence's last page) keeps
// the all-ones poison (bf16 and E4M3 NaN).
struct PageTable {
  std::vector<std::int32_t> ids;  // [B, pps]
  int pps = 0, n_pages = 0;
};

inline PageTable make_pages(int N, const std::vector<int>& len, int spare, std::mt19937_64& g) {
  const int B = static_cast<int>(len.size());
  PageTable t;
  t.pps = (N + gpu::kPageRows - 1) / gpu::kPageRows + 1;
  int used = 0;
  for (int L : len) used += (L + gpu::kPageRows - 1) / gpu::kPageRows;
  t.n_pages = used + spare;
  std::vector<std::int32_t> perm(t.n_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), g);
  t.ids.assign(static_cast<std::size_t>(B) * t.pps, -1);
  int next = 0;
  for (int b = 0; b < B; ++b)
    for (int lp = 0; lp * gpu::kPageRows < len[b]; ++lp) t.ids[b * t.pps + lp] = perm[next++];
  return t;
}

// Rows [0, len[b]) of every sequence of contig [B*N, W] scattered into a pool [n_pages*128, W].
template <class E>
std::vector<E> scatter_pages(const std::vector<E>& contig, int N, std::int64_t W, const std::vector<int>& len,
                             const PageTable& t) {
  std::vector<E> pool(static_cast<std::size_t>(t.n_pages) * gpu::kPageRows * W);
  std::memset(static_cast<void*>(pool.data()), 0xFF, pool.size() * sizeof(E));
  for (std::size_t b = 0; b < len.size(); ++b)
    for (int j = 0; j < len[b]; ++j) {
      const std::int32_t id = t.ids[b * t.pps + j / gpu::kPageRows];
      if (id < 0) continue;  // a page made unallocated on purpose: its rows have nowhere to go
      const std::int64_t row = std::int64_t{id} * gpu::kPageRows + j % gpu::kPageRows;
      std::memcpy(static_cast<void*>(&pool[row * W]), &contig[(static_cast<std::int64_t>(b) * N + j) * W],
                  W * sizeof(E));
    }
  return pool;
}

// A K and V cache pair on the device in the paged layout of t, with its page table: rows [0, len[b])
// of k, v [B*N, W] (bf16 values held as floats) scattered into poisoned pools.
struct PagedKv {
  gpu::DeviceBuffer<gpu::bf16> k, v;      // [n_pages*128, W] each
  gpu::DeviceBuffer<std::int32_t> table;  // [B, pps]
  gpu::CachePages pages() const { return {table.data(), pps}; }
  int pps = 0;
};
inline PagedKv upload_paged_kv(const MatF& k, const MatF& v, int N, std::int64_t W, const std::vector<int>& len,
                               const PageTable& t) {
  PagedKv p;
  p.k = gpu::DeviceBuffer<gpu::bf16>(static_cast<std::size_t>(t.n_pages) * gpu::kPageRows * W);
  p.v = gpu::DeviceBuffer<gpu::bf16>(p.k.size());
  p.k.upload(scatter_pages(gpu::to_bf16(k.data(), static_cast<std::size_t>(k.size())), N, W, len, t));
  p.v.upload(scatter_pages(gpu::to_bf16(v.data(), static_cast<std::size_t>(v.size())), N, W, len, t));
  p.table = gpu::DeviceBuffer<std::int32_t>(t.ids.size());
  p.table.upload(t.ids);
  p.pps = t.pps;
  return p;
}

// T positions in [0, N): distinct where T <= N, unsorted, always including N - 1.
inline std::vector<std::int64_t> scattered_positions(int T, int N, std::mt19937_64& g) {
  std::vector<std::int64_t> all(N);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), g);
  std::vector<std::int64_t> p(T);
  for (int t = 0; t < T; ++t) p[t] = all[t % N];
  p[std::uniform_int_distribution<int>(0, T - 1)(g)] = N - 1;
  return p;
}

}  // namespace m3::test
