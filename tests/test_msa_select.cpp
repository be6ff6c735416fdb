// Tests of msa_select (reference/ops/msa_select.h): the selection rule on many fresh random inputs,
// checked twice: by its properties (count, forced blocks, no duplicates, padding, range, tie-rule
// order, top-k optimality) and row by row against an independent brute force (insertion sort of
// all candidates), also with many exact ties, NaN and +-inf scores; the select_candidates count;
// fixed hand-worked rows; shape checks.
// Run: build/<dir>/tests/test_msa_select  (M3_TEST_SEED=<n> reproduces a failing draw)
#include "reference/ops/msa_select.h"

#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using m3::AttnCounter;
using m3::Mat;
using m3::MatI;
using m3::MsaDims;
using m3::test::poison;

MsaDims select_dims(int hi, int blk, int k_blk, int local, int init) {
  MsaDims d;
  d.Hi = hi;
  d.Di = 8;  // unused by msa_select
  d.BLK = blk;
  d.K_blk = k_blk;
  d.local_blocks = local;
  d.init_blocks = init;
  return d;
}

// How scores are drawn: continuous (ties only by accident), integers from a tiny range (many
// exact ties), or integers with NaN, -inf and +inf sprinkled in.
enum class Draw { NORMAL, TIES, SPECIAL };

template <class T>
T draw_score(Draw kind, std::mt19937_64& g) {
  std::uniform_int_distribution<int> small(-2, 2);
  if (kind == Draw::NORMAL) return static_cast<T>(std::normal_distribution<double>(0, 1)(g));
  if (kind == Draw::TIES) return static_cast<T>(small(g));
  switch (std::uniform_int_distribution<int>(0, 5)(g)) {
    case 0: return std::numeric_limits<T>::quiet_NaN();
    case 1: return -std::numeric_limits<T>::infinity();
    case 2: return std::numeric_limits<T>::infinity();
    default: return static_cast<T>(small(g));
  }
}

bool forced(std::int64_t b, std::int64_t L, const MsaDims& d) {
  return b < d.init_blocks || b > L - d.local_blocks;
}

// The tie rule written independently of the op: a (score, id) ranks before b when its score is
// larger, NaN counting as -inf, or the scores are equal and its id smaller.
double as_key(double s) { return std::isnan(s) ? -std::numeric_limits<double>::infinity() : s; }
bool rule_before(double sa, int ia, double sb, int ib) {
  const double a = as_key(sa), b = as_key(sb);
  return a > b || (a == b && ia < ib);
}

// Brute force for one row: all non-forced visible candidates put in rule order by a plain
// insertion sort, the first K_blk - |F| taken (all of them when L+1 <= K_blk), then the forced
// blocks ascending, then -1.
template <class T>
std::vector<int> brute_force_row(const Mat<T>& s, Eigen::Index row, std::int64_t p,
                                 const MsaDims& d) {
  const std::int64_t L = p / d.BLK;
  std::vector<int> cand, forced_ids;
  for (std::int64_t b = 0; b <= L; ++b) (forced(b, L, d) ? forced_ids : cand).push_back(int(b));
  for (std::size_t a = 1; a < cand.size(); ++a)
    for (std::size_t c = a; c > 0; --c) {
      const int x = cand[c - 1], y = cand[c];
      if (!rule_before(double(s(row, y)), y, double(s(row, x)), x)) break;
      std::swap(cand[c - 1], cand[c]);
    }
  const std::int64_t n_valid = std::min<std::int64_t>(d.K_blk, L + 1);
  std::vector<int> out(cand.begin(), cand.begin() + (n_valid - std::int64_t(forced_ids.size())));
  out.insert(out.end(), forced_ids.begin(), forced_ids.end());
  out.resize(static_cast<std::size_t>(d.K_blk), -1);
  return out;
}

// Properties every row must have, checked without reference to the brute force.
template <class T>
void check_row_properties(const Mat<T>& s, const MatI& sel, Eigen::Index row, std::int64_t p,
                          const MsaDims& d) {
  const std::int64_t L = p / d.BLK;
  const std::int64_t n_valid = std::min<std::int64_t>(d.K_blk, L + 1);
  std::int64_t n_forced = 0;
  for (std::int64_t b = 0; b <= L; ++b) n_forced += forced(b, L, d);
  const std::int64_t n_free = n_valid - n_forced;
  ASSERT_GE(n_free, 0);
  std::set<int> ids;
  for (Eigen::Index c = 0; c < sel.cols(); ++c) {
    const int id = sel(row, c);
    if (c < n_valid) {
      ASSERT_GE(id, 0) << "slot " << c;
      ASSERT_LE(id, L) << "slot " << c;
      ASSERT_TRUE(ids.insert(id).second) << "duplicate block " << id;
      // Chosen non-forced blocks first, then the forced ones.
      ASSERT_EQ(forced(id, L, d), c >= n_free) << "slot " << c << " block " << id;
    } else {
      ASSERT_EQ(id, -1) << "padding slot " << c;
    }
  }
  for (std::int64_t b = 0; b <= L; ++b) {
    if (forced(b, L, d)) {
      ASSERT_TRUE(ids.count(int(b))) << "forced block " << b << " missing";
    }
  }
  if (d.local_blocks >= 1) {
    ASSERT_TRUE(ids.count(int(L))) << "local block missing";
  }
  for (std::int64_t c = 1; c < n_free; ++c)  // non-forced in strict tie-rule order
    ASSERT_TRUE(rule_before(s(row, sel(row, c - 1)), sel(row, c - 1), s(row, sel(row, c)),
                            sel(row, c)))
        << "slots " << c - 1 << ", " << c;
  for (std::int64_t c = n_free + 1; c < n_valid; ++c)  // forced ascending
    ASSERT_LT(sel(row, c - 1), sel(row, c));
  // Top-k optimality: no unchosen non-forced block ranks before the last chosen one.
  if (n_free > 0)
    for (std::int64_t b = 0; b <= L; ++b)
      if (!forced(b, L, d) && !ids.count(int(b))) {
        const int last = sel(row, n_free - 1);
        ASSERT_TRUE(rule_before(s(row, last), last, s(row, b), int(b))) << "block " << b;
      }
}

// Many fresh random problems: BLK in {1, 4, 16}, K_blk in {1, 2, 4, 16}, positions up to 40
// blocks, forced-block settings (local, init) = (1, 0) [M3], (2, 1) and (0, 0).
template <class T>
void run_random(Draw kind) {
  auto g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  const int blks[] = {1, 4, 16}, k_blks[] = {1, 2, 4, 16};
  const int forced_cfg[][2] = {{1, 0}, {2, 1}, {0, 0}};  // {local, init}
  int rows_checked = 0, rows_top_k = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const int blk = blks[g() % 3], k_blk = k_blks[g() % 4];
    const auto& fc = forced_cfg[g() % 3];
    if (k_blk < fc[0] + fc[1]) continue;  // budget too small for the forced blocks: refused
    const MsaDims d = select_dims(1 + int(g() % 3), blk, k_blk, fc[0], fc[1]);
    const std::int64_t n_tok = 1 + std::int64_t(g() % 5);
    // A third of the positions in the first 3 blocks, where forced sets overlap and clip.
    std::uniform_int_distribution<std::int64_t> pick(0, 40 * std::int64_t(blk) - 1);
    std::uniform_int_distribution<std::int64_t> pick_early(0, 3 * std::int64_t(blk) - 1);
    std::vector<std::int64_t> pos(static_cast<std::size_t>(n_tok));
    for (auto& p : pos) p = g() % 3 == 0 ? pick_early(g) : pick(g);
    const std::int64_t nb = *std::max_element(pos.begin(), pos.end()) / blk + 1 + trial % 2;
    Mat<T> s(d.Hi * n_tok, nb);  // [Hi*T, NB]; one extra column on odd trials
    for (Eigen::Index i = 0; i < s.size(); ++i) s.data()[i] = draw_score<T>(kind, g);
    SCOPED_TRACE("trial " + std::to_string(trial) + ": Hi " + std::to_string(d.Hi) + " BLK " +
                 std::to_string(blk) + " K_blk " + std::to_string(k_blk) + " local " +
                 std::to_string(fc[0]) + " init " + std::to_string(fc[1]));

    MatI sel(s.rows(), k_blk);
    poison(sel);
    AttnCounter c;
    m3::ref::msa_select<T>(s, pos, d, sel, &c);
    ASSERT_EQ(sel.rows(), s.rows());
    ASSERT_EQ(sel.cols(), k_blk);
    std::uint64_t candidates = 0;
    for (std::int64_t t = 0; t < n_tok; ++t) {
      const std::int64_t L = pos[t] / blk;
      for (int i = 0; i < d.Hi; ++i) {
        const Eigen::Index row = i * n_tok + t;
        SCOPED_TRACE("row " + std::to_string(row) + " p " + std::to_string(pos[t]));
        ASSERT_NO_FATAL_FAILURE(check_row_properties(s, sel, row, pos[t], d));
        const std::vector<int> want = brute_force_row(s, row, pos[t], d);
        for (int k = 0; k < k_blk; ++k) ASSERT_EQ(sel(row, k), want[k]) << "slot " << k;
        ++rows_checked;
      }
      // cost.h: Hi*(L+1 - init - local) scores compete when L+1 > K_blk, none otherwise.
      if (L + 1 > k_blk) {
        candidates += std::uint64_t(d.Hi) * std::uint64_t(L + 1 - fc[0] - fc[1]);
        rows_top_k += d.Hi;
      }
    }
    EXPECT_EQ(c.select_candidates, candidates);
    EXPECT_EQ(c.qk_macs + c.pv_macs + c.index_macs, 0u);
  }
  // Not vacuous: most rows ran a real top-k, not the all-visible shortcut.
  EXPECT_GT(rows_checked, 500);
  EXPECT_GT(rows_top_k, rows_checked / 2);
}

TEST(MsaSelect_f32, RandomRows_Continuous) { run_random<float>(Draw::NORMAL); }
TEST(MsaSelect_f64, RandomRows_Continuous) { run_random<double>(Draw::NORMAL); }
TEST(MsaSelect_f32, RandomRows_ExactTies) { run_random<float>(Draw::TIES); }
TEST(MsaSelect_f64, RandomRows_ExactTies) { run_random<double>(Draw::TIES); }
TEST(MsaSelect_f32, RandomRows_NanAndInf) { run_random<float>(Draw::SPECIAL); }
TEST(MsaSelect_f64, RandomRows_NanAndInf) { run_random<double>(Draw::SPECIAL); }

// Hand-worked rows (M3 rule: local 1, init 0; BLK 4, K_blk 3).
TEST(MsaSelect_f32, HandWorkedRows_Local1) {
  const MsaDims d = select_dims(1, 4, 3, 1, 0);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  Mat<float> s(5, 6);  // [Hi*T, NB]
  s << 9, 9, 9, 9, 9, 9,             // p = 0: L = 0 -> {0}
      1, 5, 9, 9, 9, 9,              // p = 7: L = 1, all visible -> non-forced {0}, then 1
      1, 5, 3, 9, 9, 9,              // p = 11: L = 2 = K_blk-1, all visible -> 1, 0 (rule), 2
      2, 7, 7, -inf, 9, 9,           // p = 19: L = 4 -> best 2 of {0..3}: tie 7 -> 1 then 2; 4
      nan, -inf, nan, -inf, inf, 0;  // p = 23: L = 5 -> 4 (inf), then NaN/-inf tie by id: 0; 5
  MatI sel;
  AttnCounter c;
  m3::ref::msa_select<float>(s, std::vector<std::int64_t>{0, 7, 11, 19, 23}, d, sel, &c);
  MatI want(5, 3);
  want << 0, -1, -1,
      0, 1, -1,
      1, 0, 2,
      1, 2, 4,
      4, 0, 5;
  EXPECT_EQ(sel, want) << "got\n" << sel;
  EXPECT_EQ(c.select_candidates, 4u + 5u);  // rows p = 19 and 23 only
}

// init 1, local 2, K_blk 4: blocks 0 and L-1, L forced, one free slot.
TEST(MsaSelect_f64, HandWorkedRows_Init1_Local2) {
  const MsaDims d = select_dims(2, 1, 4, 2, 1);  // BLK 1: block id = position
  // [Hi*T, NB]; rows: (head 0, p 7), (head 0, p 2), (head 1, p 7), (head 1, p 2)
  Mat<double> s(4, 8);
  s << 0, 1, 2, 3, 4, 5, 6, 7,   // free blocks 1..5: best 5
      9, 9, 9, 9, 9, 9, 9, 9,    // L = 2: forced {0} u {1, 2} is every visible block
      7, 6, 5, 4, 3, 2, 1, 0,    // free blocks 1..5: best 1 (block 0 is forced, not free)
      0, 0, 0, 0, 0, 0, 0, 0;
  MatI sel;
  AttnCounter c;
  m3::ref::msa_select<double>(s, std::vector<std::int64_t>{7, 2}, d, sel, &c);
  MatI want(4, 4);
  want << 5, 0, 6, 7,
      0, 1, 2, -1,
      1, 0, 6, 7,
      0, 1, 2, -1;
  EXPECT_EQ(sel, want) << "got\n" << sel;
  EXPECT_EQ(c.select_candidates, 2u * 5u);  // p 7 on both heads: 8 - 1 - 2 free blocks

  // L = 0 and 1: init {0} and local {L-1, L} overlap and clip to [0, L].
  m3::ref::msa_select<double>(s, std::vector<std::int64_t>{0, 1}, d, sel, &c);
  want << 0, -1, -1, -1,
      0, 1, -1, -1,
      0, -1, -1, -1,
      0, 1, -1, -1;
  EXPECT_EQ(sel, want) << "got\n" << sel;
}

TEST(MsaSelect_f32, ZeroTokens) {
  Mat<float> s(0, 0);
  MatI sel;
  m3::ref::msa_select<float>(s, std::vector<std::int64_t>{}, select_dims(4, 16, 4, 1, 0), sel);
  EXPECT_EQ(sel.rows(), 0);
  EXPECT_EQ(sel.cols(), 4);
}

TEST(MsaSelect_f32, BadInputThrows) {
  const std::vector<std::int64_t> pos = {3, 17};  // NB = floor(17/4)+1 = 5
  const MsaDims d = select_dims(2, 4, 3, 1, 0);
  Mat<float> s = Mat<float>::Zero(4, 5);
  MatI sel;
  EXPECT_NO_THROW(m3::ref::msa_select<float>(s, pos, d, sel));
  EXPECT_THROW(m3::ref::msa_select<float>(Mat<float>::Zero(3, 5), pos, d, sel),
               std::invalid_argument);  // rows != Hi*T
  EXPECT_THROW(m3::ref::msa_select<float>(Mat<float>::Zero(4, 4), pos, d, sel),
               std::invalid_argument);  // cols < NB
  EXPECT_THROW(m3::ref::msa_select<float>(s, std::vector<std::int64_t>{3, -1}, d, sel),
               std::out_of_range);  // negative position
  EXPECT_THROW(m3::ref::msa_select<float>(s, pos, select_dims(2, 4, 2, 2, 1), sel),
               std::invalid_argument);  // K_blk < local + init
  EXPECT_THROW(m3::ref::msa_select<float>(s, pos, select_dims(2, 0, 3, 1, 0), sel),
               std::invalid_argument);  // BLK = 0
  EXPECT_THROW(m3::ref::msa_select<float>(s, pos, select_dims(2, 4, 0, 0, 0), sel),
               std::invalid_argument);  // K_blk = 0
  EXPECT_THROW(m3::ref::msa_select<float>(s, pos, select_dims(2, 4, 3, -1, 0), sel),
               std::invalid_argument);  // negative local_blocks
}

}  // namespace
