// Block-score matrices that stress msa_select's tie rule (test_msa_select, test_msa_select_attention):
// continuous scores, small integers and three values (massive exact ties), a constant row, rows
// sprinkled with NaN, +-inf and +-0, rows of mostly +-0 or mostly NaN / -inf with a few real
// scores (the budget is filled by ties broken by id), and a narrow band (keys sharing 20+ leading
// bits: every radix pass runs).
#pragma once

#include "reference/tensor.h"

#include <limits>
#include <random>

namespace m3::test {

enum class Dist { Normal, SmallInts, Constant, Specials, ThreeValues, SignedZeros, NanInf, Narrow };

inline const char* dist_name(Dist d) {
  switch (d) {
    case Dist::Normal: return "normal";
    case Dist::SmallInts: return "small-ints";
    case Dist::Constant: return "constant";
    case Dist::Specials: return "specials";
    case Dist::ThreeValues: return "three-values";
    case Dist::SignedZeros: return "signed-zeros";
    case Dist::NanInf: return "nan-inf";
    case Dist::Narrow: return "narrow";
  }
  return "?";
}

inline MatF draw_scores(Eigen::Index rows, int NB, Dist d, std::mt19937_64& g) {
  MatF s(rows, NB);
  std::normal_distribution<float> nd;
  std::uniform_int_distribution<int> small(0, 3), pick(0, 9), rare(0, 999), fine(0, 4095);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (Eigen::Index i = 0; i < s.size(); ++i) {
    float& x = s.data()[i];
    switch (d) {
      case Dist::Normal: x = nd(g); break;
      case Dist::SmallInts: x = static_cast<float>(small(g)); break;
      case Dist::Constant: x = 1.5f; break;
      case Dist::Specials: {
        const int k = pick(g);
        x = k == 0 ? nan : k == 1 ? inf : k == 2 ? -inf : k == 3 ? 0.f : k == 4 ? -0.f
                                                                : static_cast<float>(small(g));
        break;
      }
      case Dist::ThreeValues: x = small(g) == 0 ? -1.f : small(g) < 2 ? 0.5f : 2.f; break;
      case Dist::SignedZeros: {
        // About 1 in 1000 positive (fewer than K_blk - |F| of a row, so that +0 and -0, tied,
        // fill the budget by id), 1 in 100 NaN (below the zeros), the rest +0 or -0.
        const int r = rare(g);
        x = r == 0 ? 1.f + static_cast<float>(small(g)) : r < 10 ? nan : (r & 1) ? 0.f : -0.f;
        break;
      }
      case Dist::NanInf: {
        // A few finite scores, the rest NaN or -inf (equal under the tie rule: filled by id).
        const int r = rare(g);
        x = r < 3 ? nd(g) : (r & 1) ? nan : -inf;
        break;
      }
      case Dist::Narrow:
        // 1000 + j * 2^-14, j < 4096: 4096 neighbouring floats (2^-14 is their ulp), so the keys
        // share their top 20 bits and the radix passes narrow down over the last digits.
        x = 1000.f + static_cast<float>(fine(g)) * 0x1p-14f;
        break;
    }
  }
  return s;
}

}  // namespace m3::test
