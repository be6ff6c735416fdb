// Cache writes (kv_cache_write) and the page-table check; see kv_cache.h. One block a token row:
// the row's slot is read once, then the block copies (bf16) or converts (bf16 -> E4M3) the n
// values, by 16-byte source vectors when every row is aligned for them. Memory-bound: one read and
// one write of each element; the E4M3 conversion is the hardware cvt.rn.satfinite (two a cvt).
#include "gpu/kernels/kv_cache.h"

#include <string>

namespace m3::gpu {
namespace {

constexpr int kThreads = 128;

struct WriteArgs {
  const bf16* src;
  std::int64_t ld_src;
  void* cache;  // bf16 or E4M3
  std::int64_t cache_ld;
  const std::int64_t* slots;
  std::int64_t n_slots;
  int n;
};

// kVec: 8 values a thread (16-byte bf16 loads; 16-byte bf16 or 8-byte E4M3 stores).
template <bool kFp8, bool kVec>
__global__ void __launch_bounds__(kThreads) kv_cache_write_kernel(const WriteArgs a) {
  const std::int64_t t = blockIdx.x;
  const std::int64_t slot = a.slots[t];
  if (slot < 0 || slot >= a.n_slots) return;  // skipped: the caller's table had no slot for it
  const bf16* src = a.src + t * a.ld_src;
  if constexpr (kFp8) {
    __nv_fp8_storage_t* dst = static_cast<__nv_fp8_storage_t*>(a.cache) + slot * a.cache_ld;
    if constexpr (kVec) {
      for (int i = threadIdx.x; i < a.n / 8; i += kThreads) {
        const uint4 v = reinterpret_cast<const uint4*>(src)[i];
        const std::uint32_t w[4] = {v.x, v.y, v.z, v.w};
        std::uint16_t o[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          o[e] = __nv_cvt_float2_to_fp8x2(__bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[e])),
                                          __NV_SATFINITE, __NV_E4M3);
        reinterpret_cast<uint2*>(dst)[i] =
            make_uint2(o[0] | (static_cast<std::uint32_t>(o[1]) << 16), o[2] | (static_cast<std::uint32_t>(o[3]) << 16));
      }
    } else {
      for (int i = threadIdx.x; i < a.n; i += kThreads)
        dst[i] = __nv_cvt_float_to_fp8(__bfloat162float(src[i]), __NV_SATFINITE, __NV_E4M3);
    }
  } else {
    bf16* dst = static_cast<bf16*>(a.cache) + slot * a.cache_ld;
    if constexpr (kVec) {
      for (int i = threadIdx.x; i < a.n / 8; i += kThreads)
        reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
    } else {
      for (int i = threadIdx.x; i < a.n; i += kThreads) dst[i] = src[i];
    }
  }
}

bool aligned(const void* p, std::uintptr_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

template <bool kFp8>
void write(const char* op, const bf16* src, std::int64_t ld_src, int n, int T, void* cache, std::int64_t cache_ld,
           const std::int64_t* slots, std::int64_t n_slots, cudaStream_t s) {
  const std::string o = op;
  if (n < 0 || T < 0 || ld_src < n || cache_ld < n || n_slots < 0)
    throw GpuError(o + ": n = " + std::to_string(n) + ", T = " + std::to_string(T) + ", ld_src = " +
                   std::to_string(ld_src) + ", cache_ld = " + std::to_string(cache_ld) + ", n_slots = " +
                   std::to_string(n_slots) + ", expected n, T, n_slots >= 0 and ld_src, cache_ld >= n");
  if (T == 0 || n == 0) return;
  if (!src || !cache || !slots)
    throw GpuError(o + ": a null pointer among src, cache, slots; expected device pointers");
  // Vectors: 8 values (16 source bytes) a thread; destination rows 16 (bf16) or 8 (E4M3) bytes apart.
  const bool vec = n % 8 == 0 && ld_src % 8 == 0 && cache_ld % 8 == 0 && aligned(src, 16) &&
                   aligned(cache, kFp8 ? 8 : 16);
  WriteArgs a{src, ld_src, cache, cache_ld, slots, n_slots, n};
  if (vec) kv_cache_write_kernel<kFp8, true><<<static_cast<unsigned>(T), kThreads, 0, s>>>(a);
  else kv_cache_write_kernel<kFp8, false><<<static_cast<unsigned>(T), kThreads, 0, s>>>(a);
  M3_CUDA_CHECK_LAUNCH();
}

}  // namespace

void kv_cache_write(const bf16* src, std::int64_t ld_src, int n, int T, bf16* cache, std::int64_t cache_ld,
                    const std::int64_t* slots, std::int64_t n_slots, cudaStream_t s) {
  write<false>("kv_cache_write", src, ld_src, n, T, cache, cache_ld, slots, n_slots, s);
}

void kv_cache_write(const bf16* src, std::int64_t ld_src, int n, int T, __nv_fp8_e4m3* cache,
                    std::int64_t cache_ld, const std::int64_t* slots, std::int64_t n_slots, cudaStream_t s) {
  write<true>("kv_cache_write (fp8)", src, ld_src, n, T, cache, cache_ld, slots, n_slots, s);
}

namespace detail {

void check_cache_pages(const char* op, CachePages pg, int N) {
  if (pg.table == nullptr) return;
  const long long have = static_cast<long long>(pg.pages_per_seq) * kPageRows;
  if (pg.pages_per_seq <= 0 || have < N)
    throw GpuError(std::string(op) + ": pages_per_seq = " + std::to_string(pg.pages_per_seq) + " (" +
                   std::to_string(have) + " rows of " + std::to_string(kPageRows) + "-token pages), expected >= " +
                   "ceil(N / " + std::to_string(kPageRows) + ") = " +
                   std::to_string((static_cast<long long>(N) + kPageRows - 1) / kPageRows) + " for N = " +
                   std::to_string(N) + " logical rows a sequence");
  if (!aligned(pg.table, alignof(std::int32_t)))
    throw GpuError(std::string(op) + ": the page table is not 4-byte aligned");
}

}  // namespace detail
}  // namespace m3::gpu
