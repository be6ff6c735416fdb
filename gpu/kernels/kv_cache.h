// The KV and index-K caches on the GPU: their page layout and the writes into them (issue 4).
//
// A cache is [rows, row_elems] row-major, one token a row (K and V: Hkv*D bf16; index-K: Di bf16 or
// fp8 E4M3). Two layouts, read by every cache-reading kernel (attention_dense, msa_attention,
// msa_index, attention_dense_prefill) through the helpers below:
//  - contiguous (CachePages{} / table == nullptr): sequence b owns rows [b*N, b*N + N);
//  - paged: 128-token pages (kPageRows = M3's BLK) from one pool; sequence b's logical row j lives
//    in physical row table[b*pages_per_seq + j/kPageRows]*kPageRows + j%kPageRows.
// N is then the logical capacity per sequence (positions < N); only the pages a kernel reads
// (those holding rows <= the largest query position of the sequence) need a valid id.
//
// Page ids live in device memory, so no launcher can check them: the caller (the model, which owns
// the page allocator) guarantees that every id a kernel reads is in [0, n_pages). A NEGATIVE id
// (an unallocated page) is caught on the device and never read: attention and prefill give NaN
// output rows for the queries that would read it, msa_index NaN block scores (documented per op).
//
// The writes (kv_cache_write) copy T token rows into cache rows given by slots (int64, device):
// slot = page*kPageRows + offset for a paged cache, b*N + j for a contiguous one; a slot outside
// [0, n_slots) is skipped, as in qk_norm_rope_to_cache (the K and index-K caches' bf16 writer).
#pragma once

#include "gpu/runtime/buffer.h"

#include <cuda_fp8.h>

#include <cstdint>

#if !defined(M3_HOST_DEVICE)
#if defined(__CUDACC__)
#define M3_HOST_DEVICE __host__ __device__
#else
#define M3_HOST_DEVICE
#endif
#endif

namespace m3::gpu {

inline constexpr int kPageRows = 128;  // tokens per cache page (= M3's BLK; any BLK works, pages are rows)

// A batch's page tables on the device: sequence b's logical row j lives in physical row
//   table[b * pages_per_seq + j / kPageRows] * kPageRows + j % kPageRows
// of a cache [n_pages * kPageRows, row_elems]. table == nullptr: the contiguous layout, row b*N + j.
struct CachePages {
  const std::int32_t* table = nullptr;  // [B, pages_per_seq] (device)
  int pages_per_seq = 0;                // >= ceil(N / kPageRows) when table != nullptr
};

// Page id of sequence b's logical page lp (device code; pg.table != nullptr). Kernels that stream
// tiles load it once per tile (a 64-key tile aligned to 64 lies in one page) and then address the
// rows with cache_row_in_page.
M3_HOST_DEVICE inline std::int32_t cache_page(CachePages pg, int b, std::int64_t lp) {
  return pg.table[static_cast<std::int64_t>(b) * pg.pages_per_seq + lp];
}

// Logical row j in page `page` (its id, >= 0): row page*kPageRows + j%kPageRows.
template <class E>
M3_HOST_DEVICE inline const E* cache_row_in_page(const E* base, std::int32_t page, std::int64_t j,
                                                 std::int64_t row_elems) {
  return base + (static_cast<std::int64_t>(page) * kPageRows + j % kPageRows) * row_elems;
}

// Row j of sequence b in a cache of N logical rows a sequence and row_elems elements a row, in
// either layout (the one per-row mapping; device code when pg.table is set). nullptr when the
// row's page id is negative (an unallocated page: the caller must not read it).
template <class E>
M3_HOST_DEVICE inline const E* cache_row(const E* base, int b, std::int64_t j, int N, std::int64_t row_elems,
                                         CachePages pg) {
  if (pg.table == nullptr) return base + (static_cast<std::int64_t>(b) * N + j) * row_elems;
  const std::int32_t page = cache_page(pg, b, j / kPageRows);
  return page < 0 ? nullptr : cache_row_in_page(base, page, j, row_elems);
}

// Writes T rows into cache slots (the V cache; and the fp8 index-K cache from bf16 rows):
//   src row t at src + t*ld_src (n values) -> cache row slots[t] at cache + slots[t]*cache_ld.
// slots (device int64) outside [0, n_slots) are skipped (nothing written), as qk_norm_rope_to_cache
// does. Requires n >= 0, T >= 0, ld_src >= n, cache_ld >= n, n_slots >= 0 (GpuError otherwise); the
// cache rows of different t must not overlap src (no aliasing checks on the device).
void kv_cache_write(const bf16* src, std::int64_t ld_src, int n, int T, bf16* cache, std::int64_t cache_ld,
                    const std::int64_t* slots, std::int64_t n_slots, cudaStream_t s);
// bf16 -> fp8 E4M3 (satfinite, round to nearest even; no scale: the values are post-RMSNorm O(1),
// as the MSA decode path stores them) into an fp8 cache. |x| > 464 saturates to +-448; NaN stays NaN.
void kv_cache_write(const bf16* src, std::int64_t ld_src, int n, int T, __nv_fp8_e4m3* cache,
                    std::int64_t cache_ld, const std::int64_t* slots, std::int64_t n_slots, cudaStream_t s);

namespace detail {
// Launcher check of a page table against N logical rows a sequence (op names the caller): with a
// table, pages_per_seq * kPageRows >= N and a 4-byte aligned table (GpuError otherwise).
void check_cache_pages(const char* op, CachePages pg, int N);
}  // namespace detail

}  // namespace m3::gpu
