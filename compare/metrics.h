// Agreement metrics of DESIGN §4, computed in fp64 whatever the tensors' storage:
//  - float outputs: rel-L2 ||a - b|| / ||b||, max abs error with its coordinates and both values,
//    the elementwise rule |a - b| <= atol + rtol |b| with its pass percentage and the first
//    violations, and the NaN / Inf positions (they must match by position and sign);
//  - index outputs (ids, -1 = none): exact-match rate, per-row set agreement (Jaccard), and the
//    near-tie test: a row whose ids differ only where the deciding scores are within rounding.
// a is the tensor under test, b the reference. Tensors are flat row-major with explicit dims;
// coordinates are full multi-indices ([row, col] for the 2-D outputs of the op cases).
#pragma once

#include "reference/tensor.h"

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace m3::cmp {

using Dims = std::vector<std::int64_t>;
using Coord = std::vector<std::int64_t>;

// Multi-index of a flat row-major position; "[3, 17]" formatting.
Coord unravel(std::int64_t flat, const Dims& dims);
std::string coord_str(const Coord& c);

// The first up to kMaxReported disagreements are kept (style guide rule 28: "at most 10 error
// lines, each with its coordinates").
inline constexpr std::size_t kMaxReported = 10;

struct Mismatch {
  Coord at;
  double got = 0;   // a
  double want = 0;  // b
};

struct FloatMetrics {
  std::int64_t count = 0;     // elements
  std::int64_t compared = 0;  // finite on both sides and not masked
  std::int64_t masked = 0;    // skipped because their row follows a near-tie index row
  double ref_norm = 0;        // ||b|| over the compared elements; 0 makes any pass vacuous
  double rel_l2 = 0;          // ||a - b|| / ||b||; +inf when ||b|| = 0 and a != b
  double max_abs = 0;
  Mismatch max_at;            // where max_abs occurs, with both values
  std::int64_t passed = 0;    // compared elements within atol + rtol |b|
  double pass_pct = 100;
  std::int64_t violations = 0;      // compared elements outside atol + rtol |b|
  std::vector<Mismatch> first;      // the first violations and non-finite mismatches, in order
  std::int64_t nonfinite_mismatches = 0;  // NaN / Inf where the other side differs
  bool unexpected_nan = false;            // a NaN in a where b is not NaN: fails at once
  Mismatch first_nonfinite;               // the first non-finite mismatch, when any
};

// row_mask (optional, one flag per leading-dimension row): true rows are not compared.
// atol_extra (optional, one value per element): added to element i's atol (a data-dependent part of
// the bound, e.g. the bf16 rounding of an op's intermediates: compare/tolerance.h).
FloatMetrics compare_float(std::span<const double> a, std::span<const double> b, const Dims& dims,
                           double atol, double rtol, const std::vector<bool>* row_mask = nullptr,
                           std::span<const double> atol_extra = {});

// Scores deciding an index output: scores(r, id) is the score id had in row r (the same rows as
// the ids). Empty = no near-tie test: every difference is a mismatch.
struct TieScores {
  MatD scores;  // [rows, candidates]
  double rtol = 0;
};

struct IndexMetrics {
  std::int64_t count = 0;
  std::int64_t equal = 0;
  double exact_rate = 1;
  double jaccard_mean = 1;     // over rows: |A n B| / |A u B| of the valid (>= 0) ids
  double jaccard_min = 1;
  std::int64_t jaccard_min_row = 0;
  std::int64_t rows = 0;
  std::int64_t rows_differ = 0;     // rows with any element different
  std::int64_t rows_near_tie = 0;   // of those, rows explained by near-ties of the scores
  std::vector<Mismatch> first;      // the first differing elements (ids as doubles)
  std::vector<bool> row_differs;    // [rows]: masks the rows of outputs that follow these ids
  bool exact() const { return rows_differ == 0; }
  bool agree() const { return rows_differ == rows_near_tie; }
};

// a, b: ids of shape dims (rows = dims[0], the rest flattened into one row).
IndexMetrics compare_index(std::span<const std::int64_t> a, std::span<const std::int64_t> b,
                           const Dims& dims, const TieScores* ties = nullptr);

// True when row a differs from row b only by near-ties: no duplicate in a, and at every slot where
// the ids differ both are valid and their deciding scores agree within ties.rtol * the row's
// largest finite |score|. The layouts order ids by score, so a block swapped for a nearly equal
// one sits in the same slot; a clearly worse block, a missing one, or a reordering of clearly
// different scores is a mismatch (the Jaccard still shows whether the sets agree).
bool near_tie_row(std::span<const std::int64_t> a, std::span<const std::int64_t> b,
                  const TieScores& ties, std::int64_t row);

// ||a - b|| / ||b|| over the elements finite on both sides (the attention rule's error measure).
double rel_l2(std::span<const double> a, std::span<const double> b);

}  // namespace m3::cmp
