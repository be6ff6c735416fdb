// Checking an op case file (verify.h): run, compare, decide by tolerance.h.
#include "compare/verify.h"

#include <fmt/format.h>

#include <cmath>
#include <map>
#include <optional>
#include <span>
#include <stdexcept>

#if M3_HAVE_GPU
#include "gpu/runtime/device.h"
#endif

namespace m3::cmp {

bool VerifyResult::pass() const {
  for (const OutputCheck& o : outputs)
    if (!o.pass()) return false;
  return true;
}

void require_gpu() {
#if M3_HAVE_GPU
  if (gpu::device_count() == 0)
    throw cases::CaseError("--device gpu: no CUDA device is visible on this machine; use --device cpu");
#else
  throw cases::CaseError("--device gpu: this m3h is built without CUDA (configure with -DM3_WITH_CUDA=ON); "
                         "use --device cpu");
#endif
}

std::string gpu_description() {
#if M3_HAVE_GPU
  return gpu::describe(gpu::device_info(0));
#else
  return "gpu: none (built without CUDA)";
#endif
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

// "out@prefill" -> "out".
std::string base_name(const std::string& name) { return name.substr(0, name.find('@')); }

// The GPU twin's outputs, each of the shape of its output spec. What the kernels reject (head
// dims, block sizes, ...) is a request this device cannot serve: a CaseError carrying their message.
cases::Tensors run_gpu_or_explain(const cases::OpCase& op, const cases::Case& c) {
  cases::Tensors out;
#if M3_HAVE_GPU
  try {
    out = op.run_gpu(c.params, c.inputs);
  } catch (const gpu::GpuError& e) {
    throw cases::CaseError(fmt::format("the GPU twin of {} cannot run this case: {}", c.op, e.what()));
  }
#else
  out = op.run_gpu(c.params, c.inputs);  // the CaseError "no GPU twin" (require_gpu comes first)
#endif
  for (const cases::TensorSpec& s : op.outputs(c.params)) {
    auto it = out.find(s.name);
    if (it == out.end() || it->second.dims != s.dims)
      throw std::logic_error(fmt::format("{}: the GPU twin returned no output '{}' of shape {}", c.op, s.name,
                                         coord_str(s.dims)));
  }
  return out;
}

void check_index(OutputCheck& o, const cases::Tensor& a, const cases::Tensor& b, const std::optional<MatD>& scores) {
  std::optional<TieScores> ties;
  if (scores) ties = TieScores{*scores, o.tol.tie_rtol};
  o.ix = compare_index(a.i, b.i, o.dims, ties ? &*ties : nullptr);
  if (!o.ix.agree()) {
    const auto& m = o.ix.first.front();
    o.failures.push_back(fmt::format("{} of {} rows differ ({} explained by near-ties); first at {}: {} vs {}",
                                     o.ix.rows_differ, o.ix.rows, o.ix.rows_near_tie, coord_str(m.at), m.got,
                                     m.want));
  }
}

// extra: per-element atol terms (empty: none).
void check_float(OutputCheck& o, const cases::Tensor& a, const cases::Tensor& b, const std::vector<bool>* mask,
                 std::span<const double> extra = {}) {
  o.f = compare_float(a.f, b.f, o.dims, o.tol.atol, o.tol.rtol, mask, extra);
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
  if (device == Device::GPU) require_gpu();
  const cases::OpCase& op = cases::find_op(c.op);
  if (device == Device::GPU && !op.gpu_precision_ok(c.precision))
    throw cases::CaseError(fmt::format("the GPU computes in bf16; write the case with --precision bf16 (this {} case "
                                       "is {})", c.op, precision_name(c.precision)));
  const cases::Tensors ref = run_or_explain(op, c, c.precision);  // the CPU reference, now
  // a: the side under test; b: the expected values (verify.h). Keys of a: every output, plus
  // "<output>@<kernel>" for extra GPU kernels; b is looked up by the output's own name.
  const cases::Tensors gpu_out = device == Device::GPU ? run_gpu_or_explain(op, c) : cases::Tensors{};
  const cases::Tensors& a = device == Device::GPU ? gpu_out : c.outputs;
  const cases::Tensors& b = device == Device::GPU ? c.outputs : ref;
  const auto specs = op.outputs(c.params);
  // bf16 outputs of ops with large rounded intermediates: their per-element allowance (tolerance.h).
  std::map<std::string, std::vector<double>> extra;
  if (c.precision == Precision::BF16)
    for (auto& [name, t] : op.rounding_scale(c.params, c.inputs)) {
      std::vector<double>& e = extra[name];
      for (double v : t.f) e.push_back(kBf16RoundingFactor * v);
    }

  std::vector<OutputCheck> out;
  std::map<std::string, std::vector<bool>> differing_rows;  // index check -> rows to skip in followers
  // Index outputs first: the float outputs that follow them need their differing rows.
  for (bool index_pass : {true, false})
    for (const cases::TensorSpec& s : specs) {
      const bool is_index = s.kind == cases::Kind::IDS || s.kind == cases::Kind::POS;
      if (is_index != index_pass) continue;
      for (const auto& [name, got] : a) {
        if (base_name(name) != s.name) continue;
        OutputCheck o;
        o.name = name;
        o.is_index = is_index;
        o.dims = s.dims;
        o.tier = cases::tier_of(s.kind, c.precision);
        o.tol = tolerance(c.op, o.tier);
        if (got.dims != s.dims)
          throw std::logic_error(fmt::format("{}: output '{}' has shape {}, expected {}", c.op, name,
                                             coord_str(got.dims), coord_str(s.dims)));
        if (is_index) {
          check_index(o, got, b.at(s.name), op.tie_scores(s.name, c.params, c.inputs, ref));
          differing_rows[name] = o.ix.row_differs;
        } else {
          o.follows = op.follows(s.name);
          // The same kernel's index output when there is one ("experts@k" for "weights@k"), else the main one.
          const std::string suffix = name.substr(s.name.size());
          auto it = differing_rows.find(o.follows + suffix);
          if (it == differing_rows.end()) it = differing_rows.find(o.follows);
          const auto ex = extra.find(s.name);
          check_float(o, got, b.at(s.name), !o.follows.empty() && it != differing_rows.end() ? &it->second : nullptr,
                      ex == extra.end() || o.tier != Precision::BF16 ? std::span<const double>{} : std::span<const double>(ex->second));
        }
        out.push_back(std::move(o));
      }
    }

  // bf16 attention: measure a and the bf16-emulating reference against the fp64 truth on the same
  // (bf16-valued) inputs.
  bool need_fp64 = false;
  for (const OutputCheck& o : out) need_fp64 |= !o.is_index && o.tol.attention_rule;
  if (need_fp64) {
    const cases::Tensors truth = run_or_explain(op, c, Precision::FP64);
    for (OutputCheck& o : out) {
      if (o.is_index || !o.tol.attention_rule) continue;
      const std::string base = base_name(o.name);
      o.attn_rule = true;
      o.err_a = rel_l2(a.at(o.name).f, truth.at(base).f);
      o.err_ref = rel_l2(ref.at(base).f, truth.at(base).f);
      o.attn_bound = kAttnErrFactor * o.err_ref + kAttnFloor;
      if (!(o.err_a <= o.attn_bound))
        o.failures.push_back(fmt::format("attention rule: rel-L2 vs fp64 {:.3e} > {} x {:.3e} (bf16 reference vs fp64) "
                                         "+ {:.1e}", o.err_a, kAttnErrFactor, o.err_ref, kAttnFloor));
    }
  }
  // Report in the op's output order; an output's extra GPU kernels right after it (a's key order).
  std::vector<OutputCheck> ordered;
  for (const cases::TensorSpec& s : specs)
    for (bool main_kernel : {true, false})
      for (const OutputCheck& o : out)
        if (base_name(o.name) == s.name && (o.name == s.name) == main_kernel) ordered.push_back(o);
  return ordered;
}

VerifyResult verify_case(const std::string& path, Device device) {
  if (device == Device::GPU) require_gpu();
  VerifyResult r;
  r.path = path;
  r.device = device;
  r.c = cases::read_case(path);
  try {
    r.outputs = verify_outputs(r.c, device);
  } catch (const cases::CaseError& e) {
    throw cases::CaseError(fmt::format("{}: {}", path, e.what()));
  }
  return r;
}

}  // namespace m3::cmp
