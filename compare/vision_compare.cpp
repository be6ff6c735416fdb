// The vision tower's two-layer agreement check; see vision_compare.h.
#include "compare/vision_compare.h"

#include "compare/tolerance.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace m3::cmp {

namespace {

std::span<const double> flat(const MatD& m) { return {m.data(), static_cast<std::size_t>(m.size())}; }

const MatD* find(const VisionTrace& t, const std::string& name) {
  for (const auto& [n, m] : t.tensors)
    if (n == name) return &m;
  return nullptr;
}

// The mean over rows of each column: [rows, cols] -> [cols].
Eigen::VectorXd column_means(const MatD& m) { return m.colwise().mean().transpose(); }

std::span<const double> flat(const Eigen::VectorXd& v) { return {v.data(), static_cast<std::size_t>(v.size())}; }

}  // namespace

VisionMeanCheck check_vision_column_means(const std::string& what, const MatD& test, const MatD& ref, const MatD& truth,
                                          std::vector<std::string>& failures) {
  const Eigen::VectorXd mt = column_means(test), mr = column_means(ref), mf = column_means(truth);  // [cols] each
  VisionMeanCheck m;
  m.checked = true;
  m.vs_ref = rel_l2(flat(mt), flat(mr));
  m.err_test = rel_l2(flat(mt), flat(mf));
  m.err_ref = rel_l2(flat(mr), flat(mf));
  m.floor = vision_mean_floor(static_cast<double>(truth.rows()), truth.norm(), mf.norm());
  m.gate = vision_mean_gate(m.err_ref, m.floor);
  m.bound = kAttnErrFactor * m.err_ref + m.floor;
  // (NaN and Inf are left out of the means' rel-L2s as of every rel-L2 here; the stage's own check
  // fails on them.) A truth whose column means are all zero would make the floor infinite.
  if (!(mf.norm() > 0)) {
    m.emulation_ok = m.truth_ok = false;
    failures.push_back(fmt::format("{}column means of the fp64 tower all zero: a vacuous check", what));
    return m;
  }
  m.emulation_ok = m.vs_ref <= m.gate;
  m.truth_ok = m.err_test <= m.bound;
  if (!m.emulation_ok)
    failures.push_back(fmt::format("{}column means over {} rows: rel-L2 {:.3e} vs the bf16 reference's > max({:.1e}, {} "
                                   "x {:.3e})",
                                   what, test.rows(), m.vs_ref, m.floor, kAttnErrFactor, m.err_ref));
  if (!m.truth_ok)
    failures.push_back(fmt::format("{}column means over {} rows: rel-L2 {:.3e} vs fp64's > {} x {:.3e} (the bf16 "
                                   "reference's) + {:.1e}",
                                   what, test.rows(), m.err_test, kAttnErrFactor, m.err_ref, m.floor));
  return m;
}

bool VisionComparison::pass() const {
  return !stages.empty() && std::all_of(stages.begin(), stages.end(), [](const VisionStageCheck& s) { return s.pass(); });
}

VisionStageCheck check_vision_stage(const std::string& name, const MatD& test, const MatD& ref, const MatD& truth) {
  if (test.rows() != ref.rows() || test.cols() != ref.cols() || truth.rows() != ref.rows() || truth.cols() != ref.cols())
    throw std::invalid_argument(fmt::format("check_vision_stage {}: test [{}, {}], bf16 reference [{}, {}], fp64 [{}, {}]: "
                                            "expected one shape",
                                            name, test.rows(), test.cols(), ref.rows(), ref.cols(), truth.rows(),
                                            truth.cols()));
  VisionStageCheck s;
  s.name = name;
  const Tolerance& tol = kVisionTower;
  s.vs_ref = compare_float(flat(test), flat(ref), {ref.rows(), ref.cols()}, tol.atol, tol.rtol);
  s.err_test = rel_l2(flat(test), flat(truth));
  s.err_ref = rel_l2(flat(ref), flat(truth));
  s.gate = vision_emulation_gate(s.err_ref);
  s.bound = kAttnErrFactor * s.err_ref + kAttnFloor;
  auto& f = s.failures;
  if (s.vs_ref.unexpected_nan)
    f.push_back(fmt::format("NaN at {} where the bf16 reference has {:.6g}", coord_str(s.vs_ref.first_nonfinite.at),
                            s.vs_ref.first_nonfinite.want));
  else if (s.vs_ref.nonfinite_mismatches > 0)
    f.push_back(fmt::format("{} non-finite values at other places than the bf16 reference's, first at {}",
                            s.vs_ref.nonfinite_mismatches, coord_str(s.vs_ref.first_nonfinite.at)));
  // The tower's activations are finite for finite pixels: a non-finite reference or truth is a
  // defect of the reference (or an overflow of bf16), never a pass.
  if (!ref.allFinite() || !truth.allFinite())
    f.push_back(fmt::format("the bf16 reference ({}) or the fp64 truth ({}) is not finite",
                            ref.allFinite() ? "finite" : "non-finite", truth.allFinite() ? "finite" : "non-finite"));
  if (!(s.vs_ref.ref_norm > 0)) f.push_back("the bf16 reference is all zero: a vacuous check");
  s.emulation_ok = s.vs_ref.rel_l2 <= s.gate;
  s.truth_ok = s.err_test <= s.bound;
  if (!s.emulation_ok)
    f.push_back(fmt::format("emulation: rel-L2 {:.3e} vs the bf16 reference > max({:.0e}, {} x {:.3e})", s.vs_ref.rel_l2,
                            tol.rel_l2, kAttnErrFactor, s.err_ref));
  if (!s.truth_ok)
    f.push_back(fmt::format("2x-truth: rel-L2 {:.3e} vs fp64 > {} x {:.3e} (the bf16 reference's) + {:.1e}", s.err_test,
                            kAttnErrFactor, s.err_ref, kAttnFloor));
  s.mean = check_vision_column_means("", test, ref, truth, f);
  return s;
}

void check_vision_increment(VisionStageCheck& s, const std::string& prev_name, const MatD& test, const MatD& ref,
                            const MatD& truth, const MatD& test_prev, const MatD& ref_prev, const MatD& truth_prev) {
  for (const MatD* m : {&test, &truth, &test_prev, &ref_prev, &truth_prev})
    if (m->rows() != ref.rows() || m->cols() != ref.cols())
      throw std::invalid_argument(fmt::format("check_vision_increment {} over {}: a tensor of [{}, {}], the bf16 "
                                              "reference's is [{}, {}]: expected one shape",
                                              s.name, prev_name, m->rows(), m->cols(), ref.rows(), ref.cols()));
  const MatD dt = test - test_prev, dr = ref - ref_prev, df = truth - truth_prev;  // [P, Hv] each
  s.increment_of = prev_name;
  s.inc_vs_ref = rel_l2(flat(dt), flat(dr));
  s.inc_err_test = rel_l2(flat(dt), flat(df));
  s.inc_err_ref = rel_l2(flat(dr), flat(df));
  s.inc_gate = vision_emulation_gate(s.inc_err_ref);
  s.inc_bound = kAttnErrFactor * s.inc_err_ref + kAttnFloor;
  const bool emu_ok = s.inc_vs_ref <= s.inc_gate, truth_ok = s.inc_err_test <= s.inc_bound;
  s.increment_ok = emu_ok && truth_ok;
  if (!emu_ok)
    s.failures.push_back(fmt::format("increment over {}: rel-L2 {:.3e} vs the bf16 reference's > max({:.0e}, {} x {:.3e})",
                                     prev_name, s.inc_vs_ref, kVisionTower.rel_l2, kAttnErrFactor, s.inc_err_ref));
  if (!truth_ok)
    s.failures.push_back(fmt::format("increment over {}: rel-L2 {:.3e} vs fp64's > {} x {:.3e} (the bf16 reference's) + "
                                     "{:.1e}",
                                     prev_name, s.inc_err_test, kAttnErrFactor, s.inc_err_ref, kAttnFloor));
  s.inc_mean = check_vision_column_means(fmt::format("increment over {}: ", prev_name), dt, dr, df, s.failures);
}

VisionComparison compare_vision(const VisionTrace& test, const VisionTrace& ref, const VisionTrace& truth) {
  VisionComparison c;
  // vis.blk.{l}.out -> l, or -1 for the other stages.
  const auto block_of = [](const std::string& name) {
    int l = -1;
    char tail[8] = {};
    return std::sscanf(name.c_str(), "vis.blk.%d.%7s", &l, tail) == 2 && std::string(tail) == "out" ? l : -1;
  };
  for (const auto& [name, r] : ref.tensors) {
    const MatD* a = find(test, name);
    const MatD* t = find(truth, name);
    const auto shape_ok = [&](const MatD* m) { return m && m->rows() == r.rows() && m->cols() == r.cols(); };
    if (!shape_ok(a) || !shape_ok(t)) {
      VisionStageCheck s;
      s.name = name;
      s.failures.push_back(fmt::format("{} [{}, {}] of the bf16 reference: the {} traced {}", name, r.rows(), r.cols(),
                                       shape_ok(a) ? "fp64 reference" : "engine under test",
                                       (shape_ok(a) ? t : a) ? "another shape" : "no such tensor"));
      c.stages.push_back(std::move(s));
      continue;
    }
    c.stages.push_back(check_vision_stage(name, *a, r, *t));
    // The block's increment, where the previous block is comparable in all three (when it is not,
    // that stage has failed already).
    if (const int l = block_of(name); l >= 1) {
      const std::string prev = fmt::format("vis.blk.{}.out", l - 1);
      const MatD *ap = find(test, prev), *rp = find(ref, prev), *tp = find(truth, prev);
      if (shape_ok(ap) && shape_ok(rp) && shape_ok(tp))
        check_vision_increment(c.stages.back(), prev, *a, r, *t, *ap, *rp, *tp);
    }
  }
  // Stages the reference does not trace (the GPU tower traces what the reference does, name for
  // name: an extra one is a renamed or misplaced stage), and names traced twice (find() sees only
  // the first: the second would go unchecked).
  const auto extras = [&](const VisionTrace& tr, const char* who) {
    for (std::size_t i = 0; i < tr.tensors.size(); ++i) {
      const std::string& name = tr.tensors[i].first;
      std::string why;
      if (!find(ref, name))
        why = fmt::format("traced by the {} but not by the bf16 reference", who);
      else if (find(tr, name) != &tr.tensors[i].second)
        why = fmt::format("traced twice by the {}", who);
      if (why.empty()) continue;
      VisionStageCheck s;
      s.name = name;
      s.failures.push_back(std::move(why));
      c.stages.push_back(std::move(s));
    }
  };
  extras(test, "engine under test");
  extras(truth, "fp64 reference");
  for (std::size_t i = 0; i < ref.tensors.size(); ++i)
    if (find(ref, ref.tensors[i].first) != &ref.tensors[i].second) {
      VisionStageCheck s;
      s.name = ref.tensors[i].first;
      s.failures.push_back("traced twice by the bf16 reference");
      c.stages.push_back(std::move(s));
    }
  return c;
}

}  // namespace m3::cmp
