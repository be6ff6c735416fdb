// gpu::kv_cache_write (bf16 and fp8 E4M3 caches) and the page arithmetic of kv_cache.h. A write is
// a copy (bf16) or one rounding (E4M3), so the checks are exact: every written row equals the
// source row bit for bit (bf16) or the host's __nv_cvt_float_to_fp8(satfinite, E4M3) of it (the
// cuda_fp8.h reference implementation; NaN inputs only need to stay NaN, as the NaN encoding is the
// hardware's), and every cache byte not written (other rows, columns past n, skipped slots) keeps
// its 0xFF poison. The readers of paged caches are tested next to their contiguous cases
// (test_attention_dense, test_msa_attention, test_msa_index, test_attention_prefill).
#include "gpu/kernels/kv_cache.h"
#include "reference/tensor.h"
#include "tests/gpu/gpu_test_util.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

using namespace m3;

namespace {

struct Case {
  int T, n;
  std::int64_t ld_src, cache_ld, n_slots;
  const char* what;
};

// Destination slots: distinct in-range slots for most tokens, a few outside [0, n_slots) (-1,
// n_slots, a huge one) that must be skipped.
std::vector<std::int64_t> draw_slots(int T, std::int64_t n_slots, std::mt19937_64& g) {
  std::vector<std::int64_t> all(static_cast<std::size_t>(n_slots));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), g);
  std::vector<std::int64_t> s(T);
  for (int t = 0; t < T; ++t) s[t] = all[t];
  const std::int64_t bad[] = {-1, n_slots, std::int64_t{1} << 40};
  if (T >= 4)  // (a single token keeps its slot: something must be written)
    for (std::int64_t x : bad) s[std::uniform_int_distribution<int>(0, T - 1)(g)] = x;
  return s;
}

// Source rows [T, ld_src] of bf16: N(0, 1) scaled by up to 2^10 (so some exceed E4M3's 448 and
// saturate, some fall in its subnormal range), plus +-0, +-inf, NaN and the E4M3 rounding edges.
std::vector<gpu::bf16> draw_src(const Case& c, std::mt19937_64& g) {
  std::vector<float> f(static_cast<std::size_t>(c.T) * c.ld_src);
  std::normal_distribution<float> nd;
  std::uniform_int_distribution<int> e(-14, 10);
  for (auto& x : f) x = nd(g) * std::ldexp(1.f, e(g));
  const float special[] = {0.f, -0.f, std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN(), 448.f, 464.f, 480.f, -464.f, 0x1p-9f, 0x1p-10f,
                           0x1.8p-10f, 0x1p-6f, 0x1.1p-6f};
  std::uniform_int_distribution<std::size_t> at(0, f.size() - 1);
  for (float x : special) f[at(g)] = x;
  return gpu::to_bf16(f.data(), f.size());
}

template <class E>
void run_case(const Case& c) {
  constexpr bool kFp8 = std::is_same_v<E, __nv_fp8_e4m3>;
  SCOPED_TRACE(std::string(c.what) + (kFp8 ? " fp8" : " bf16") + " T=" + std::to_string(c.T) + " n=" +
               std::to_string(c.n));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const auto src = draw_src(c, g);
  const auto slots = draw_slots(c.T, c.n_slots, g);
  gpu::DeviceBuffer<gpu::bf16> dsrc(src.size());
  dsrc.upload(src);
  gpu::DeviceBuffer<std::int64_t> dslots(slots.size());
  dslots.upload(slots);
  gpu::DeviceBuffer<E> dcache(static_cast<std::size_t>(c.n_slots * c.cache_ld));
  dcache.fill_bytes(0xFF);  // poison: bf16 NaN / E4M3 NaN; must survive wherever nothing is written
  gpu::kv_cache_write(dsrc.data(), c.ld_src, c.n, c.T, dcache.data(), c.cache_ld, dslots.data(), c.n_slots, nullptr);
  const auto hc = dcache.download();

  std::vector<char> written(hc.size(), 0);
  long wrong = 0, copied = 0, wrong_ref = 0;
  for (int t = 0; t < c.T; ++t) {
    const std::int64_t s = slots[t];
    if (s < 0 || s >= c.n_slots) continue;
    for (int i = 0; i < c.n; ++i) {
      const std::size_t at = static_cast<std::size_t>(s * c.cache_ld + i);
      const gpu::bf16 x = src[static_cast<std::size_t>(t * c.ld_src + i)];
      written[at] = 1;
      ++copied;
      bool ok;
      if constexpr (kFp8) {
        const float xf = gpu::from_bf16(&x, 1)[0];
        const auto got = static_cast<unsigned char>(hc[at].__x);
        if (std::isnan(xf)) ok = (got & 0x7F) == 0x7F;  // E4M3's only NaN: S.1111.111
        else {
          ok = got == static_cast<unsigned char>(__nv_cvt_float_to_fp8(xf, __NV_SATFINITE, __NV_E4M3));
          // The reference's emulation of this cache (ReferenceOptions::fp8_index_cache) agrees too.
          const float gotf = static_cast<float>(hc[at]);
          if (gotf != m3::round_e4m3(xf) && ++wrong_ref <= 5)
            ADD_FAILURE() << "round_e4m3(" << xf << ") = " << m3::round_e4m3(xf) << ", the GPU wrote " << gotf;
        }
      } else {
        ok = std::memcmp(&hc[at], &x, sizeof x) == 0;
      }
      if (!ok && ++wrong <= 5) ADD_FAILURE() << "token " << t << " slot " << s << " element " << i;
    }
  }
  long clobbered = 0;
  for (std::size_t i = 0; i < hc.size(); ++i) {
    if (written[i]) continue;
    unsigned char b[sizeof(E)];
    std::memcpy(b, &hc[i], sizeof(E));
    for (unsigned char x : b) clobbered += x != 0xFF;
  }
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(wrong_ref, 0);
  EXPECT_GT(copied, 0);
  EXPECT_EQ(clobbered, 0) << "bytes outside the written rows changed";
}

// Vectorized path (n, strides multiples of 8), strided source rows (a slice of a wider GEMM output),
// padded cache rows; the scalar path (odd n and strides); M3's V row (Hkv*D = 512) and index-K row
// (Di = 128); one token (decode of one sequence).
const Case kCases[] = {
    {37, 128, 128 + 64, 136, 300, "vector, strided"},
    {16, 512, 3 * 512, 512, 40, "M3 V row"},
    {1, 128, 128, 128, 5, "one token"},
    {23, 13, 17, 15, 50, "scalar, odd"},
    {9, 24, 27, 24, 20, "scalar, unaligned source rows"},
};

}  // namespace

TEST(KvCacheWrite_bf16, ExactCopy_SkippedSlotsUntouched) {
  M3_REQUIRE_GPU();
  for (const auto& c : kCases) run_case<gpu::bf16>(c);
}

TEST(KvCacheWrite_fp8, MatchesHostCvtSatfinite_SkippedSlotsUntouched) {
  M3_REQUIRE_GPU();
  for (const auto& c : kCases) run_case<__nv_fp8_e4m3>(c);
}

TEST(KvCacheWrite_bf16, PagedSlotsRoundTrip) {
  M3_REQUIRE_GPU();
  // Two sequences written at positions 0..L-1 through a page table, slot = table[b][j/128]*128 +
  // j%128: every row lands in its page; cache_row (host side, table in host memory) finds it again.
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const int B = 2, W = 64, pps = 3, n_pages = 7;
  const int L[B] = {256, 129};  // a page multiple and one page + 1
  std::vector<std::int32_t> perm(n_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), g);
  std::vector<std::int32_t> table(B * pps, -1);
  int next = 0;
  for (int b = 0; b < B; ++b)
    for (int lp = 0; lp * gpu::kPageRows < L[b]; ++lp) table[b * pps + lp] = perm[next++];
  const gpu::CachePages host_pages{table.data(), pps};
  std::vector<float> f(static_cast<std::size_t>(L[0] + L[1]) * W);
  std::normal_distribution<float> nd;
  for (auto& x : f) x = nd(g);
  const auto src = gpu::to_bf16(f.data(), f.size());
  std::vector<std::int64_t> slots;
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < L[b]; ++j)
      slots.push_back(static_cast<std::int64_t>(table[b * pps + j / gpu::kPageRows]) * gpu::kPageRows +
                      j % gpu::kPageRows);
  gpu::DeviceBuffer<gpu::bf16> dsrc(src.size()), dcache(static_cast<std::size_t>(n_pages) * gpu::kPageRows * W);
  dsrc.upload(src);
  gpu::DeviceBuffer<std::int64_t> dslots(slots.size());
  dslots.upload(slots);
  dcache.fill_bytes(0xFF);
  gpu::kv_cache_write(dsrc.data(), W, W, static_cast<int>(slots.size()), dcache.data(), W, dslots.data(),
                      static_cast<std::int64_t>(n_pages) * gpu::kPageRows, nullptr);
  const auto hc = dcache.download();
  long wrong = 0;
  int t = 0;
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < L[b]; ++j, ++t) {
      const gpu::bf16* row = gpu::cache_row(hc.data(), b, j, pps * gpu::kPageRows, W, host_pages);
      ASSERT_NE(row, nullptr);
      wrong += std::memcmp(row, &src[static_cast<std::size_t>(t) * W], W * sizeof(gpu::bf16)) != 0;
    }
  EXPECT_EQ(wrong, 0);
  // An unallocated page (id -1) maps to no row.
  EXPECT_EQ(gpu::cache_row(hc.data(), 1, 2 * gpu::kPageRows, pps * gpu::kPageRows, W, host_pages), nullptr);
  // The contiguous layout: row b*N + j.
  EXPECT_EQ(gpu::cache_row(hc.data(), 1, 5, 300, W, gpu::CachePages{}), hc.data() + (300 + 5) * W);
}

TEST(KvCacheWrite_bf16, RejectsBadArguments) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<gpu::bf16> src(1024), cache(1024);
  gpu::DeviceBuffer<__nv_fp8_e4m3> cache8(1024);
  gpu::DeviceBuffer<std::int64_t> slots(8);
  auto* s = src.data();
  EXPECT_THROW(gpu::kv_cache_write(s, 8, 16, 2, cache.data(), 16, slots.data(), 8, nullptr), gpu::GpuError);   // ld_src < n
  EXPECT_THROW(gpu::kv_cache_write(s, 16, 16, 2, cache.data(), 8, slots.data(), 8, nullptr), gpu::GpuError);   // cache_ld < n
  EXPECT_THROW(gpu::kv_cache_write(s, 16, -1, 2, cache.data(), 16, slots.data(), 8, nullptr), gpu::GpuError);  // n < 0
  EXPECT_THROW(gpu::kv_cache_write(s, 16, 16, -1, cache.data(), 16, slots.data(), 8, nullptr), gpu::GpuError); // T < 0
  EXPECT_THROW(gpu::kv_cache_write(s, 16, 16, 2, cache.data(), 16, slots.data(), -1, nullptr), gpu::GpuError); // n_slots
  EXPECT_THROW(gpu::kv_cache_write(s, 16, 16, 2, cache.data(), 16, nullptr, 8, nullptr), gpu::GpuError);       // slots
  EXPECT_THROW(gpu::kv_cache_write(s, 16, 16, 2, cache8.data(), 8, slots.data(), 8, nullptr), gpu::GpuError);  // fp8 ld
  EXPECT_THROW(gpu::kv_cache_write(nullptr, 16, 16, 2, cache8.data(), 16, slots.data(), 8, nullptr), gpu::GpuError);
  // T = 0 and n = 0 write nothing and need no pointers.
  EXPECT_NO_THROW(gpu::kv_cache_write(nullptr, 16, 16, 0, static_cast<gpu::bf16*>(nullptr), 16, nullptr, 0, nullptr));
  EXPECT_NO_THROW(gpu::kv_cache_write(nullptr, 0, 0, 4, static_cast<gpu::bf16*>(nullptr), 0, nullptr, 0, nullptr));
}
