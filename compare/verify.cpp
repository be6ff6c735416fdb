// Checking an op case file (verify.h): run, compare, decide by tolerance.h.
#include "compare/verify.h"

#include <fmt/format.h>

#include <map>
#include <stdexcept>

namespace m3::cmp {

bool VerifyResult::pass() const {
  for (const OutputCheck& o : outputs)
    if (!o.pass()) return false;
  return true;
}

namespace {

// Runs `prec`'s reference; an op that rejects the inputs (ids out of range, ...) is bad input.
cases::Tensors run_or_explain(const cases::OpCase& op, const cases::Case& c, Precision prec) {
  try {
    return cases::run_reference(op, c.params, c.inputs, prec);
  } catch (const std::invalid_argument& e) {
    throw cases::CaseError(fmt::format("the reference rejects the case's inputs: {}", e.what()));
  } catch (const std::out_of_range& e) {
    throw cases::CaseError(fmt::format("the reference rejects the case's inputs: {}", e.what()));
  }
}

void check_index(OutputCheck& o, const cases::OpCase& op, const cases::Case& c, const cases::Tensors& ref) {
  std::optional<TieScores> ties;
  if (auto s = op.tie_scores(o.name, c.params, c.inputs, ref)) ties = TieScores{std::move(*s), o.tol.tie_rtol};
  o.ix = compare_index(c.outputs.at(o.name).i, ref.at(o.name).i, o.dims, ties ? &*ties : nullptr);
  if (!o.ix.agree()) {
    const auto& m = o.ix.first.front();
    o.failures.push_back(fmt::format("{} of {} rows differ ({} explained by near-ties); first at {}: {} vs {}",
                                     o.ix.rows_differ, o.ix.rows, o.ix.rows_near_tie, coord_str(m.at), m.got,
                                     m.want));
  }
}

void check_float(OutputCheck& o, const cases::Case& c, const cases::Tensors& ref, const std::vector<bool>* mask) {
  const auto& a = c.outputs.at(o.name).f;
  const auto& b = ref.at(o.name).f;
  o.f = compare_float(a, b, o.dims, o.tol.atol, o.tol.rtol, mask);
  const FloatMetrics& m = o.f;
  if (m.unexpected_nan)
    o.failures.push_back(fmt::format("unexpected NaN at {} (reference {:.7g})", coord_str(m.first_nonfinite.at),
                                     m.first_nonfinite.want));
  else if (m.nonfinite_mismatches > 0)
    o.failures.push_back(fmt::format("{} NaN/Inf positions differ, first at {}: {:.7g} vs reference {:.7g}",
                                     m.nonfinite_mismatches, coord_str(m.first_nonfinite.at), m.first_nonfinite.got,
                                     m.first_nonfinite.want));
  if (m.ref_norm == 0 && m.masked == 0)  // every row skipped for near-ties is not vacuous, just moot
    o.failures.push_back("vacuous: the reference output has zero norm, nothing would be checked");
  if (!(m.rel_l2 <= o.tol.rel_l2))
    o.failures.push_back(fmt::format("rel-L2 {:.3e} > {:.1e}", m.rel_l2, o.tol.rel_l2));
  if (m.violations > 0) {
    const Mismatch* first = nullptr;  // the first elementwise violation (the list also holds non-finite ones)
    for (const Mismatch& x : m.first)
      if (std::isfinite(x.got) && std::isfinite(x.want)) { first = &x; break; }
    o.failures.push_back(
        first ? fmt::format("{} of {} elements outside atol + rtol|b|, first at {}: {:.7g} vs reference {:.7g}", m.violations,
                            m.compared, coord_str(first->at), first->got, first->want)
              : fmt::format("{} of {} elements outside atol + rtol|b|", m.violations, m.compared));
  }
}

}  // namespace

std::vector<OutputCheck> verify_outputs(const cases::Case& c, Device device) {
  if (device == Device::GPU)
    throw cases::CaseError("the GPU implementation is not built yet (issue 4); use --device cpu");
  const cases::OpCase& op = cases::find_op(c.op);
  const cases::Tensors ref = run_or_explain(op, c, c.precision);
  const auto specs = op.outputs(c.params);

  std::vector<OutputCheck> out;
  std::map<std::string, std::vector<bool>> differing_rows;  // index output -> rows to skip in followers
  // Index outputs first: the float outputs that follow them need their differing rows.
  for (bool index_pass : {true, false})
    for (const cases::TensorSpec& s : specs) {
      const bool is_index = s.kind == cases::Kind::IDS || s.kind == cases::Kind::POS;
      if (is_index != index_pass) continue;
      OutputCheck o;
      o.name = s.name;
      o.is_index = is_index;
      o.dims = s.dims;
      o.tier = cases::tier_of(s.kind, c.precision);
      o.tol = tolerance(c.op, o.tier);
      if (is_index) {
        check_index(o, op, c, ref);
        differing_rows[o.name] = o.ix.row_differs;
      } else {
        o.follows = op.follows(o.name);
        const auto it = differing_rows.find(o.follows);
        check_float(o, c, ref, it != differing_rows.end() && o.follows.size() ? &it->second : nullptr);
      }
      out.push_back(std::move(o));
    }

  // bf16 attention: measure both sides against the fp64 truth on the same (bf16-valued) inputs.
  bool need_fp64 = false;
  for (const OutputCheck& o : out) need_fp64 |= !o.is_index && o.tol.attention_rule;
  if (need_fp64) {
    const cases::Tensors truth = run_or_explain(op, c, Precision::FP64);
    for (OutputCheck& o : out) {
      if (o.is_index || !o.tol.attention_rule) continue;
      o.attn_rule = true;
      o.err_file = rel_l2(c.outputs.at(o.name).f, truth.at(o.name).f);
      o.err_ref = rel_l2(ref.at(o.name).f, truth.at(o.name).f);
      o.attn_bound = kAttnErrFactor * o.err_ref + kAttnFloor;
      if (!(o.err_file <= o.attn_bound))
        o.failures.push_back(fmt::format("attention rule: rel-L2 vs fp64 {:.3e} > {} x {:.3e} (bf16 reference vs fp64) "
                                         "+ {:.1e}", o.err_file, kAttnErrFactor, o.err_ref, kAttnFloor));
    }
  }
  // Report in the op's output order.
  std::vector<OutputCheck> ordered;
  for (const cases::TensorSpec& s : specs)
    for (OutputCheck& o : out)
      if (o.name == s.name) ordered.push_back(std::move(o));
  return ordered;
}

VerifyResult verify_case(const std::string& path, Device device) {
  if (device == Device::GPU)
    throw cases::CaseError("the GPU implementation is not built yet (issue 4); use --device cpu");
  VerifyResult r;
  r.path = path;
  r.c = cases::read_case(path);
  try {
    r.outputs = verify_outputs(r.c, device);
  } catch (const cases::CaseError& e) {
    throw cases::CaseError(fmt::format("{}: {}", path, e.what()));
  }
  return r;
}

}  // namespace m3::cmp
