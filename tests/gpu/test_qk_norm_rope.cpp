// gpu::qk_norm_rope / qk_norm_rope_to_cache against the bf16-emulating reference twin
// (ref::qk_norm_rope in fp32 on bf16 inputs, output rounded to bf16). Positions always include 0,
// 1 and 2^20 - 1 (where an fp32 angle would be off by ~0.06 rad and fail by hundreds of ulps), R
// from 0 to d, d from 7 to 512, 1 to 64 heads.
#include "gpu/kernels/qk_norm_rope.h"
#include "reference/ops/qk_norm_rope.h"
#include "tests/gpu/gpu_test_util.h"

#include <cmath>
#include <random>
#include <vector>

using namespace m3;
using m3::test::bf16_exact;

namespace {

// Both sides normalize and rotate the same bf16 inputs with the same fp64 angles; they differ by
// fp32 vs fp64 arithmetic (a few 1e-7 relative) before the one bf16 rounding, so an element is
// equal or one ulp apart when the two values straddle a rounding boundary. 2 ulps at 2^-8 covers
// that with a margin.
constexpr double kUlps = 2.0;
// Rotated outputs can cancel (x0 cos - x1 sin ~ 0) to far below the scale of their inputs, whose
// absolute error stays at that scale: normalized channels reach ~5 (unit rms, x (1 + w)), with
// ~1e-6 relative fp32 error (sum of squares, rsqrtf, products) -> ~5e-6; 3e-5 absolute.
constexpr double kAtol = 3e-5;
constexpr double kTheta = 5e6;  // M3 (spec §1.1)
constexpr double kEps = 1e-6;

struct Case {
  int T, n_heads, d, R;
  double theta = kTheta;
};

std::vector<std::int64_t> positions_for(int T, std::mt19937_64& g) {
  std::uniform_int_distribution<std::int64_t> u(0, (std::int64_t{1} << 20) - 1);
  std::vector<std::int64_t> p(T);
  for (auto& v : p) v = u(g);
  const std::int64_t fixed[] = {(std::int64_t{1} << 20) - 1, 0, 1};  // T = 1 gets the largest
  for (int i = 0; i < T && i < 3; ++i) p[i] = fixed[i];
  return p;
}

struct Inputs {
  MatF x;                               // [T, n_heads*d] bf16-exact
  Vec<float> w;                         // [d] bf16-exact
  std::vector<std::int64_t> positions;  // [T]
  MatF ref;                             // [T, n_heads*d] bf16(ref::qk_norm_rope)
};

Inputs make_inputs(const Case& c, std::mt19937_64& g) {
  Inputs in;
  in.x = bf16_exact(test::randn<float>(c.T, static_cast<Eigen::Index>(c.n_heads) * c.d, g, 2.0));
  in.w = test::randn_vec<float>(c.d, g, 0.1);
  for (Eigen::Index i = 0; i < c.d; ++i) in.w[i] = round_bf16(in.w[i]);
  in.positions = positions_for(c.T, g);
  ref::qk_norm_rope(in.x, c.n_heads, c.d, in.w, kEps, c.R, c.theta, in.positions, in.ref);
  in.ref = bf16_exact(in.ref);
  return in;
}

std::string name(const Case& c) {
  return "T=" + std::to_string(c.T) + " n_heads=" + std::to_string(c.n_heads) + " d=" + std::to_string(c.d) +
         " R=" + std::to_string(c.R) + " theta=" + std::to_string(c.theta);
}

void run_case(const Case& c, bool in_place) {
  SCOPED_TRACE(name(c) + (in_place ? " in place" : ""));
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  const Inputs in = make_inputs(c, g);
  const std::int64_t C = static_cast<std::int64_t>(c.n_heads) * c.d;
  auto dx = test::upload_bf16(in.x), dw = test::upload_bf16(in.w);
  gpu::DeviceBuffer<std::int64_t> dpos(c.T);
  dpos.upload(in.positions);
  gpu::DeviceBuffer<gpu::bf16> dy(static_cast<std::size_t>(c.T * C));
  dy.fill_bytes(0xFF);  // NaN poison: every element must be written
  gpu::bf16* y = in_place ? dx.data() : dy.data();
  gpu::qk_norm_rope(dx.data(), c.n_heads, c.d, dw.data(), kEps, c.R, c.theta, dpos.data(), y, c.T, nullptr);
  MatF out = test::download_bf16(in_place ? dx : dy, c.T, C);
  ASSERT_TRUE(out.allFinite());
  ASSERT_GT(in.x.norm(), 0.0);
  ASSERT_GT(in.ref.norm(), 0.0);
  EXPECT_EQ(test::bf16_violations(out, in.ref, kUlps, kAtol), 0);
  EXPECT_LE(test::rel_l2(out, in.ref), 1e-2);  // the bf16 path's global rule (DESIGN §4)
}

}  // namespace

TEST(QkNormRope_bf16, AwkwardSizes) {
  M3_REQUIRE_GPU();
  for (const Case& c : {Case{1, 1, 16, 16}, Case{3, 4, 128, 64}, Case{5, 64, 128, 64}, Case{7, 4, 16, 0},
                        Case{9, 1, 128, 128}, Case{4, 3, 48, 32}, Case{6, 5, 7, 6}, Case{2, 2, 256, 128},
                        Case{3, 1, 512, 512}, Case{33, 64, 128, 0}, Case{11, 4, 128, 64, 1e4}, Case{2, 1, 2, 2}})
    run_case(c, false);
}

TEST(QkNormRope_bf16, M3QueryAndKeyHeads) {
  M3_REQUIRE_GPU();
  run_case({65, 64, 128, 64}, false);  // q: 64 heads
  run_case({65, 4, 128, 64}, false);   // k: 4 KV heads
  run_case({65, 1, 128, 64}, false);   // idx_k: one index head
}

TEST(QkNormRope_bf16, InPlace) {
  M3_REQUIRE_GPU();
  run_case({17, 64, 128, 64}, true);
  run_case({5, 3, 7, 4}, true);
}

// The cache variant on a strided slice of a fused buffer: y and the cache rows must hold the same
// values as the plain op; slots outside [0, n_slots) write nothing; no byte beyond each row's
// n_heads*d values (stride gaps, untargeted rows) is touched.
TEST(QkNormRope_bf16, ToCacheStridedSlots) {
  M3_REQUIRE_GPU();
  auto g = test::test_rng();
  SCOPED_TRACE(test::seed_note());
  // offset 8 keeps 16-byte alignment (vector path); offset 1 forces the scalar path.
  for (int offset : {8, 1})
    for (bool with_y : {true, false}) {
      const Case c{9, 4, 128, 64};
      SCOPED_TRACE(name(c) + " offset=" + std::to_string(offset) + (with_y ? " with y" : " cache only"));
      const Inputs in = make_inputs(c, g);
      const std::int64_t C = static_cast<std::int64_t>(c.n_heads) * c.d;
      const std::int64_t ldx = 3 * C + 16, ldy = C + 8, cache_ld = C + 24, n_slots = c.T + 5;
      // The fused buffer [T, ldx] holds x at column `offset`; the rest is noise the op must not read.
      MatF fused = bf16_exact(test::randn<float>(c.T, ldx, g));
      fused.block(0, offset, c.T, C) = in.x;
      auto dfused = test::upload_bf16(fused), dw = test::upload_bf16(in.w);
      gpu::DeviceBuffer<std::int64_t> dpos(c.T), dslots(c.T);
      dpos.upload(in.positions);
      std::vector<std::int64_t> slots(c.T);
      for (int t = 0; t < c.T; ++t) slots[t] = (3 * t + 2) % n_slots;  // distinct, scattered
      slots[2] = -1;        // skipped
      slots[5] = n_slots;   // skipped (one past the end)
      dslots.upload(slots);
      gpu::DeviceBuffer<gpu::bf16> dy(static_cast<std::size_t>(c.T * ldy)), dcache(static_cast<std::size_t>(n_slots * cache_ld));
      dy.fill_bytes(0xFF);
      dcache.fill_bytes(0xFF);
      gpu::qk_norm_rope_to_cache(dfused.data() + offset, ldx, c.n_heads, c.d, dw.data(), kEps, c.R, c.theta,
                                 dpos.data(), with_y ? dy.data() : nullptr, ldy, c.T, dcache.data(), cache_ld,
                                 dslots.data(), n_slots, nullptr);
      MatF cache = test::download_bf16(dcache, n_slots, cache_ld);
      std::vector<bool> targeted(n_slots, false);
      for (int t = 0; t < c.T; ++t) {
        if (slots[t] < 0 || slots[t] >= n_slots) continue;
        targeted[slots[t]] = true;
        MatF row = cache.block(slots[t], 0, 1, C);
        MatF ref_row = in.ref.row(t);
        ASSERT_TRUE(row.allFinite()) << "cache row of token " << t;
        EXPECT_EQ(test::bf16_violations(row, ref_row, kUlps, kAtol), 0) << "token " << t;
        EXPECT_TRUE(cache.block(slots[t], C, 1, cache_ld - C).array().isNaN().all()) << "stride gap written";
      }
      for (std::int64_t s = 0; s < n_slots; ++s) {
        if (!targeted[s]) {
          EXPECT_TRUE(cache.row(s).array().isNaN().all()) << "untargeted slot " << s << " written";
        }
      }
      if (with_y) {
        MatF yall = test::download_bf16(dy, c.T, ldy);
        MatF y = yall.leftCols(C);
        ASSERT_TRUE(y.allFinite());
        EXPECT_EQ(test::bf16_violations(y, in.ref, kUlps, kAtol), 0);
        EXPECT_TRUE(yall.rightCols(ldy - C).array().isNaN().all()) << "y stride gap written";
        for (int t = 0; t < c.T; ++t) {
          if (slots[t] >= 0 && slots[t] < n_slots) {
            EXPECT_TRUE((cache.block(slots[t], 0, 1, C).array() == y.row(t).array()).all()) << "cache != y, token " << t;
          }
        }
      }
    }
}

TEST(QkNormRope_bf16, RejectsBadArguments) {
  M3_REQUIRE_GPU();
  gpu::DeviceBuffer<gpu::bf16> x(1024), w(512), y(1024);
  gpu::DeviceBuffer<std::int64_t> pos(1);
  auto call = [&](int n_heads, int d, int R, double theta) {
    gpu::qk_norm_rope(x.data(), n_heads, d, w.data(), kEps, R, theta, pos.data(), y.data(), 1, nullptr);
  };
  EXPECT_THROW(call(1, 16, 15, kTheta), gpu::GpuError);   // R odd
  EXPECT_THROW(call(1, 16, 18, kTheta), gpu::GpuError);   // R > d
  EXPECT_THROW(call(1, 16, -2, kTheta), gpu::GpuError);   // R < 0
  EXPECT_THROW(call(1, 513, 0, kTheta), gpu::GpuError);   // d beyond the register tile
  EXPECT_THROW(call(0, 16, 16, kTheta), gpu::GpuError);   // no heads
  EXPECT_THROW(call(1, 16, 16, 0.0), gpu::GpuError);      // theta must be > 0
  EXPECT_THROW(call(1, 16, 16, NAN), gpu::GpuError);
  // In place with another stride would race between blocks.
  EXPECT_THROW(gpu::qk_norm_rope_to_cache(x.data(), 32, 1, 16, w.data(), kEps, 16, kTheta, pos.data(), x.data(), 16,
                                          1, nullptr, 16, nullptr, 0, nullptr),
               gpu::GpuError);
  // Neither y nor a cache: nothing to write.
  EXPECT_THROW(gpu::qk_norm_rope_to_cache(x.data(), 16, 1, 16, w.data(), kEps, 16, kTheta, pos.data(), nullptr, 16, 1,
                                          nullptr, 16, nullptr, 0, nullptr),
               gpu::GpuError);
}
