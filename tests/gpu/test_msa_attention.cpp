// gpu::msa_attention against ref::msa_attention: bf16-emulating twin as the gate (elementwise bf16
// rule + rel-L2), fp64 reference for the two-layer rule, as in test_attention_dense.cpp. Both
// sides get the SAME selection (made by ref::msa_select from random scores, then shuffled within
// each row with -1 holes moved around, which the op must accept), so a selection flip can never
// hide or fake a kernel error. Also: with every visible block selected the op equals dense
// attention; a row with no valid block gives NaN (the reference throws there).
// Paged caches (kv_cache.h): the same inputs scattered into a pool of permuted 128-row pages (spare
// and tail rows NaN, pages past a sequence's length unallocated), sequences of different lengths,
// BLK 128 (a block is a page), 16 (blocks inside a page), 48 and 256 (per-row page lookups): the
// output must be bit-identical to the contiguous run's, and a negative page id must give NaN
// exactly for the (query, group) rows whose selection has a visible key in it.
#include "gpu/kernels/attention_dense.h"
#include "gpu/kernels/msa_attention.h"
#include "reference/ops/msa_attention.h"
#include "reference/ops/msa_select.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/paged_test_util.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

using namespace m3;
using m3::test::bf16_exact;
using m3::test::make_pages;
using m3::test::PageTable;
using m3::test::scatter_pages;
using m3::test::scattered_positions;

namespace {

// Same reasons as test_attention_dense.cpp: one bf16 flip; fp32 softmax noise; bf16 rel-L2; the
// fp64 layer at twice the twin's own error plus a floor for cases where the twin is exact.
constexpr double kUlps = 2.0;
constexpr double kAtol = 1e-5;
constexpr double kRelL2 = 1e-2;
constexpr double kFp64Factor = 2.0, kFp64Floor = 1e-5;

struct Case {
  int B, T, N, Hq, Hkv, D, BLK, K_blk;
  bool decode;                 // T = 1 at p = len - 1; else scattered positions < len
  std::vector<int> lens = {};  // per-sequence lengths; empty: all N
  bool paged = false;          // also run on a paged copy of the cache: bit-identical output
  int bad_page = -1;           // paged: this logical page of sequence 0 gets id -1
};

std::string name(const Case& c) {
  return "B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) + " N=" + std::to_string(c.N) + " Hq=" +
         std::to_string(c.Hq) + " Hkv=" + std::to_string(c.Hkv) + " D=" + std::to_string(c.D) + " BLK=" +
         std::to_string(c.BLK) + " K_blk=" + std::to_string(c.K_blk) + (c.decode ? " decode" : " scattered") +
         (c.paged ? " paged" : "") + (c.bad_page >= 0 ? " bad page " + std::to_string(c.bad_page) : "");
}

std::vector<int> lens_of(const Case& c) { return c.lens.empty() ? std::vector<int>(c.B, c.N) : c.lens; }

MatD to_d(const MatF& m) { return m.cast<double>(); }

struct Inputs {
  MatF q, k, v;
  std::vector<std::int64_t> pos;
  MatI sel;  // [B*Hkv*T, K_blk]
};

Inputs make_inputs(const Case& c, std::mt19937_64& g, bool shuffle_rows) {
  Inputs in;
  in.q = bf16_exact(test::randn<float>(static_cast<Eigen::Index>(c.B) * c.T, c.Hq * c.D, g, 2.0));
  in.k = bf16_exact(test::randn<float>(static_cast<Eigen::Index>(c.B) * c.N, c.Hkv * c.D, g));
  in.v = bf16_exact(test::randn<float>(static_cast<Eigen::Index>(c.B) * c.N, c.Hkv * c.D, g));
  const MsaDims md{c.Hkv, 16, c.BLK, c.K_blk, 1, 0};
  const int NB = (c.N + c.BLK - 1) / c.BLK;
  in.sel.resize(static_cast<Eigen::Index>(c.B) * c.Hkv * c.T, c.K_blk);
  for (int b = 0; b < c.B; ++b) {
    const int L = lens_of(c)[b];
    auto p = c.decode ? std::vector<std::int64_t>(c.T, L - 1) : scattered_positions(c.T, L, g);
    in.pos.insert(in.pos.end(), p.begin(), p.end());
    const MatF scores = test::randn<float>(static_cast<Eigen::Index>(c.Hkv) * c.T, NB, g);
    MatI sb;
    ref::msa_select<float>(scores, p, md, sb);
    in.sel.middleRows(static_cast<Eigen::Index>(b) * c.Hkv * c.T, sb.rows()) = sb;
  }
  if (shuffle_rows)
    for (Eigen::Index r = 0; r < in.sel.rows(); ++r) {
      std::vector<std::int32_t> row(in.sel.row(r).data(), in.sel.row(r).data() + c.K_blk);
      std::shuffle(row.begin(), row.end(), g);
      std::copy(row.begin(), row.end(), in.sel.row(r).data());
    }
  return in;
}

// pages: run on a paged copy of k and v with this table (else the contiguous layout).
MatF run_gpu(const Case& c, const Inputs& in, const PageTable* pages = nullptr) {
  const AttnDims dims{c.Hq, c.Hkv, c.D};
  auto dq = test::upload_bf16(in.q);
  m3::test::PagedKv paged;
  gpu::DeviceBuffer<gpu::bf16> dk, dv;
  gpu::CachePages cp;
  if (pages) {
    paged = m3::test::upload_paged_kv(in.k, in.v, c.N, static_cast<std::int64_t>(c.Hkv) * c.D, lens_of(c), *pages);
    cp = paged.pages();
  } else {
    dk = test::upload_bf16(in.k);
    dv = test::upload_bf16(in.v);
  }
  const gpu::bf16* kd = pages ? paged.k.data() : dk.data();
  const gpu::bf16* vd = pages ? paged.v.data() : dv.data();
  gpu::DeviceBuffer<std::int64_t> dpos(in.pos.size());
  dpos.upload(in.pos);
  gpu::DeviceBuffer<std::int32_t> dsel(static_cast<std::size_t>(in.sel.size()));
  dsel.upload(in.sel.data(), static_cast<std::size_t>(in.sel.size()));
  gpu::DeviceBuffer<gpu::bf16> dout(static_cast<std::size_t>(in.q.size()));
  dout.fill_bytes(0xFF);
  const std::size_t wsb = gpu::msa_attention_workspace_bytes(c.T, c.K_blk, dims, c.B);
  gpu::DeviceBuffer<unsigned char> ws(std::max<std::size_t>(wsb, 1));
  ws.fill_bytes(0xFF);
  gpu::msa_attention(dq.data(), kd, vd, dpos.data(), dsel.data(), c.T, c.N, c.BLK, c.K_blk, dims, dout.data(), nullptr,
                     ws.data(), wsb, c.B, cp);
  return test::download_bf16(dout, in.q.rows(), in.q.cols());
}

// The paged run against the contiguous output `want`: bit-identical, except that with a bad page
// the (query, group) rows of sequence 0 whose selection holds a visible key of it are all NaN.
void check_paged(const Case& c, const Inputs& in, const MatF& want, std::mt19937_64& g) {
  PageTable t = make_pages(c.N, lens_of(c), 3, g);
  if (c.bad_page >= 0) t.ids[c.bad_page] = -1;  // sequence 0's page
  const MatF got = run_gpu(c, in, &t);
  const std::int64_t lo = std::int64_t{c.bad_page} * gpu::kPageRows, hi = lo + gpu::kPageRows - 1;
  long differ = 0, not_nan = 0;
  for (int r = 0; r < c.B * c.T; ++r)
    for (int grp = 0; grp < c.Hkv; ++grp) {
      bool bad = false;
      const std::int64_t p = in.pos[r];
      if (c.bad_page >= 0 && r < c.T)
        for (int s = 0; s < c.K_blk; ++s) {
          const std::int64_t id = in.sel(static_cast<Eigen::Index>(grp) * c.T + r, s);  // b = 0
          const std::int64_t j0 = id * c.BLK, j1 = std::min(j0 + c.BLK - 1, p);
          bad = bad || (id >= 0 && j0 <= p && std::max(j0, lo) <= std::min(j1, hi));
        }
      const int G = c.Hq / c.Hkv;
      for (Eigen::Index col = static_cast<Eigen::Index>(grp) * G * c.D; col < static_cast<Eigen::Index>(grp + 1) * G * c.D; ++col) {
        if (bad) not_nan += !std::isnan(got(r, col));
        else differ += std::memcmp(&got(r, col), &want(r, col), sizeof(float)) != 0;
      }
    }
  EXPECT_EQ(differ, 0) << "paged output elements that differ from the contiguous run's bits";
  EXPECT_EQ(not_nan, 0) << "outputs of rows that select a key of an unallocated page are not NaN";
}

void run_case(const Case& c, bool shuffle_rows = true) {
  SCOPED_TRACE(name(c) + (shuffle_rows ? " shuffled-sel" : ""));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const AttnDims dims{c.Hq, c.Hkv, c.D};
  const Inputs in = make_inputs(c, g, shuffle_rows);
  MatF ref(in.q.rows(), in.q.cols());
  MatD truth(in.q.rows(), in.q.cols());
  for (int b = 0; b < c.B; ++b) {
    const Eigen::Index t0 = static_cast<Eigen::Index>(b) * c.T, n0 = static_cast<Eigen::Index>(b) * c.N;
    const MatF qb = in.q.middleRows(t0, c.T), kb = in.k.middleRows(n0, c.N), vb = in.v.middleRows(n0, c.N);
    const MatI sb = in.sel.middleRows(static_cast<Eigen::Index>(b) * c.Hkv * c.T, static_cast<Eigen::Index>(c.Hkv) * c.T);
    std::vector<std::int64_t> pb(in.pos.begin() + b * c.T, in.pos.begin() + (b + 1) * c.T);
    MatF rb;
    ref::msa_attention<float>(qb, kb, vb, pb, sb, c.BLK, dims, rb);
    ref.middleRows(t0, c.T) = bf16_exact(rb);
    MatD tb;
    ref::msa_attention<double>(to_d(qb), to_d(kb), to_d(vb), pb, sb, c.BLK, dims, tb);
    truth.middleRows(t0, c.T) = tb;
  }
  const MatF out = run_gpu(c, in);
  if (c.paged) check_paged(c, in, out, g);
  EXPECT_TRUE(out.allFinite()) << "unwritten or NaN output elements";
  EXPECT_GT(in.q.norm(), 0.0);
  EXPECT_GT(ref.norm(), 0.0);
  EXPECT_EQ(test::bf16_violations(out, ref, kUlps, kAtol), 0) << "max |gpu - ref| = " << (out - ref).cwiseAbs().maxCoeff();
  EXPECT_LE(test::rel_l2(out, ref), kRelL2);
  const double e_gpu = test::rel_l2(to_d(out), truth), e_ref = test::rel_l2(to_d(ref), truth);
  EXPECT_LE(e_gpu, kFp64Factor * e_ref + kFp64Floor) << "GPU vs fp64 " << e_gpu << ", twin vs fp64 " << e_ref;
}

const int kAwkwardN[] = {1, 127, 129, 2048, 2049, 5000};

}  // namespace

TEST(MsaAttention_bf16, Decode_M3_AwkwardN) {
  M3_REQUIRE_GPU();
  for (int N : kAwkwardN) run_case({1, 1, N, 64, 4, 128, 128, 16, true}, false);  // msa_select's own order
  for (int N : kAwkwardN) run_case({1, 1, N, 64, 4, 128, 128, 16, true});
}

// Every split merge (attention_dense.h's SparseMerge): the thread-block cluster of 8-warp CTAs
// and of 4-warp CTAs, and the merge kernel, each against the reference, at decode and prefill
// shapes (Auto picks one cluster form by the grid, so the others need forcing to be covered).
// The last two shapes give clusters whose CTAs hold several tiles (wide budgets: BLK 16 x 64
// slots, BLK 64 x 40; on an H200 ~7 splits of 10 and 6 slots), D 64 with two m-tiles, and D 128
// paged with uneven lengths.
TEST(MsaAttention_bf16, EverySplitMergePath) {
  M3_REQUIRE_GPU();
  struct Reset {
    ~Reset() { gpu::detail::set_sparse_merge(gpu::detail::SparseMerge::Auto); }
  } reset;
  using M = gpu::detail::SparseMerge;
  for (auto m : {M::Kernel, M::Cluster, M::Cluster4}) {
    SCOPED_TRACE(m == M::Kernel ? "merge kernel" : m == M::Cluster ? "cluster, 8 warps" : "cluster, 4 warps");
    gpu::detail::set_sparse_merge(m);
    for (int N : {2049, 5000}) run_case({1, 1, N, 64, 4, 128, 128, 16, true});
    run_case({3, 1, 5000, 16, 1, 128, 128, 16, true});
    run_case({1, 37, 5000, 64, 4, 128, 128, 16, false});
    run_case({2, 9, 300, 48, 2, 64, 16, 64, false});
    run_case({2, 9, 3000, 16, 2, 128, 64, 40, false, {3000, 129}, true});
  }
}

TEST(MsaAttention_bf16, Decode_Batch3_Gqa16over1) {
  M3_REQUIRE_GPU();
  for (int N : {1, 2049, 5000}) run_case({3, 1, N, 16, 1, 128, 128, 16, true});
}

TEST(MsaAttention_bf16, Scattered37_Gqa4over2_16over1_64over4) {
  M3_REQUIRE_GPU();
  for (auto [hq, hkv] : {std::pair{4, 2}, {16, 1}, {64, 4}})
    for (int N : {129, 2049, 5000}) run_case({1, 37, N, hq, hkv, 128, 128, 16, false});
  run_case({2, 37, 5000, 8, 2, 128, 128, 16, false});
}

TEST(MsaAttention_bf16, TinyBlocks_TwoMtiles_D64) {
  M3_REQUIRE_GPU();
  // BLK 16, top-4 (the tiny preset), G = 24 heads a group (two m-tiles), D 64.
  for (int N : {1, 15, 17, 64, 65, 300}) run_case({2, 9, N, 48, 2, 64, 16, 4, false});
  // A wide budget: 520 queries leave 2 splits of 50 slots (800 keys, 13 tiles) a CTA.
  run_case({1, 520, 3000, 8, 1, 64, 16, 100, false});
}

// Sequences of 5000, 2048 (a page multiple) and 129 (a page + 1) keys, N = 5000 the capacity.
// The tiny preset's geometry (D 16, GQA 4 over 2, BLK 16, top-4) and D 32, contiguous and paged.
TEST(MsaAttention_bf16, SmallHeadDims_16_32) {
  M3_REQUIRE_GPU();
  for (int D : {16, 32}) {
    for (int N : {1, 15, 64, 65, 300}) run_case({2, 9, N, 4, 2, D, 16, 4, false});
    run_case({1, 1, 2049, 4, 2, D, 16, 4, true});
    run_case({3, 9, 300, 8, 1, D, 16, 4, false, {300, 129, 64}, true});
  }
}

TEST(MsaAttention_bf16, Paged_M3Blocks_UnevenLengths_BitIdentical) {
  M3_REQUIRE_GPU();
  run_case({3, 1, 5000, 64, 4, 128, 128, 16, true, {5000, 2048, 129}, true});
  run_case({3, 37, 3000, 16, 2, 128, 128, 16, false, {3000, 256, 129}, true});
  run_case({2, 1, 300, 16, 1, 128, 128, 16, true, {1, 300}, true});
}

TEST(MsaAttention_bf16, Paged_BlocksInsideAndAcrossPages) {
  M3_REQUIRE_GPU();
  // BLK 16 and 64: each block inside one page (the per-block page ids). BLK 48 straddles pages
  // and BLK 256 spans two: per-row page lookups.
  run_case({3, 9, 300, 48, 2, 64, 16, 4, false, {300, 256, 129}, true});
  run_case({2, 37, 2000, 8, 2, 128, 64, 8, false, {2000, 129}, true});
  run_case({2, 9, 1000, 8, 2, 64, 48, 6, false, {1000, 129}, true});
  run_case({2, 5, 3000, 16, 2, 128, 256, 4, false, {3000, 257}, true});
}

TEST(MsaAttention_bf16, Paged_NegativePageId_GivesNaNRows) {
  M3_REQUIRE_GPU();
  // Page 5 (keys 640..767) of sequence 0 unallocated: rows whose selection reaches it are NaN.
  run_case({2, 37, 3000, 16, 2, 128, 128, 16, false, {3000, 1000}, true, 5});
  run_case({2, 9, 1000, 8, 2, 64, 16, 4, false, {1000, 700}, true, 5});
  run_case({2, 9, 1000, 8, 2, 64, 48, 6, false, {1000, 700}, true, 5});
}

TEST(MsaAttention_bf16, AllBlocksSelected_EqualsDense) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  // N <= K_blk*BLK: every visible block is selected, so the op is dense causal attention.
  const Case c{2, 37, 2048, 64, 4, 128, 128, 16, false};
  const Inputs in = make_inputs(c, g, true);
  const MatF sparse = run_gpu(c, in);
  const AttnDims dims{c.Hq, c.Hkv, c.D};
  auto dq = test::upload_bf16(in.q), dk = test::upload_bf16(in.k), dv = test::upload_bf16(in.v);
  gpu::DeviceBuffer<std::int64_t> dpos(in.pos.size());
  dpos.upload(in.pos);
  gpu::DeviceBuffer<gpu::bf16> dout(static_cast<std::size_t>(in.q.size()));
  dout.fill_bytes(0xFF);
  const std::size_t wsb = gpu::attention_dense_workspace_bytes(c.T, c.N, dims, c.B);
  gpu::DeviceBuffer<unsigned char> ws(wsb);
  gpu::attention_dense(dq.data(), dk.data(), dv.data(), dpos.data(), c.T, c.N, dims, dout.data(), nullptr, ws.data(),
                       wsb, c.B);
  const MatF dense = test::download_bf16(dout, in.q.rows(), in.q.cols());
  ASSERT_TRUE(dense.allFinite());
  ASSERT_GT(dense.norm(), 0.0);
  // Two fp32 computations in different split orders, each rounded once: one bf16 flip apart.
  EXPECT_EQ(test::bf16_violations(sparse, dense, kUlps, kAtol), 0);
}

TEST(MsaAttention_bf16, EmptySelectionRowGivesNaN) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  const Case c{1, 2, 500, 8, 2, 64, 16, 4, false};
  Inputs in = make_inputs(c, g, false);
  in.pos = {499, 499};
  // Group 1 of query 0: no valid id (only -1 and an id past the query's block).
  for (int j = 0; j < 4; ++j) in.sel(1 * c.T + 0, j) = j == 0 ? 40 : -1;
  for (int j = 0; j < 4; ++j) in.sel(0 * c.T + 0, j) = j;  // group 0: blocks 0..3
  const MatF out = run_gpu(c, in);
  const int G = c.Hq / c.Hkv;
  for (Eigen::Index col = 0; col < out.cols(); ++col) {
    const bool group1 = col >= static_cast<Eigen::Index>(G) * c.D;
    if (group1) EXPECT_TRUE(std::isnan(out(0, col))) << "col " << col;
    else EXPECT_TRUE(std::isfinite(out(0, col))) << "col " << col;
  }
}

TEST(MsaAttention_bf16, RejectsBadArguments) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<gpu::bf16> buf(1 << 16);
  gpu::DeviceBuffer<std::int64_t> pos(4);
  gpu::DeviceBuffer<std::int32_t> sel(64);
  gpu::DeviceBuffer<unsigned char> ws(1 << 20);
  auto* p = buf.data();
  EXPECT_THROW(gpu::msa_attention(p, p, p, pos.data(), sel.data(), 1, 64, 16, 4, {4, 2, 96}, p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  EXPECT_THROW(gpu::msa_attention(p, p, p, pos.data(), sel.data(), 1, 64, 0, 4, {4, 2, 64}, p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  EXPECT_THROW(gpu::msa_attention(p, p, p, pos.data(), sel.data(), 1, 64, 16, 0, {4, 2, 64}, p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  EXPECT_THROW(gpu::msa_attention(p, p, p, pos.data(), sel.data(), 1, 64, 16, 4, {4, 3, 64}, p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  EXPECT_THROW(gpu::msa_attention(p, p, p, pos.data(), sel.data(), 1, 64, 16, 4, {4, 2, 64}, p, nullptr, ws.data(), 16), gpu::GpuError);
  EXPECT_THROW(gpu::msa_attention(p, p, p + 3, pos.data(), sel.data(), 1, 64, 16, 4, {4, 2, 64}, p, nullptr, ws.data(), 1 << 20), gpu::GpuError);
  EXPECT_NO_THROW(gpu::msa_attention(p, p, p, pos.data(), sel.data(), 0, 64, 16, 4, {4, 2, 64}, p, nullptr, nullptr, 0));
}
