// `m3h verify`: checks an op case file (compare/verify.h) and prints the device header, the
// command line, one row of metrics per output, the first mismatches with their coordinates and a
// verdict footer. Exit 0 when every output agrees, 1 on disagreement, 2 on a bad file or a
// request the device cannot serve (--device gpu without CUDA or a GPU, an fp32 case on the GPU).
//   m3h verify case.h5 [--device cpu|gpu] [--format table|json|csv]
// --device cpu: a = the file's outputs, b = the CPU reference run now. --device gpu: a = the GPU
// twin's outputs on the file's inputs, b = the file's outputs (verify.h).
#include "compare/cli_common.h"
#include "compare/verify.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <memory>

namespace m3::cli {

namespace {

struct VerifyArgs {
  std::string path;
  std::string device = "cpu";
  Format format = Format::TABLE;
};

std::string verdict_word(const cmp::OutputCheck& o) {
  return !o.pass() ? "FAIL" : o.near_tie() ? "near-tie" : "ok";
}

nlohmann::json mismatch_json(const cmp::Mismatch& m) { return {{"at", m.at}, {"a", m.got}, {"b", m.want}}; }

nlohmann::json to_json(const cmp::VerifyResult& r) {
  nlohmann::json j;
  j["command"] = command_line();
  j["device"] = r.device == cmp::Device::GPU ? cmp::gpu_description() : cpu_description();
  j["engine"] = r.device == cmp::Device::GPU ? "gpu" : "cpu";
  j["sides"] = r.device == cmp::Device::GPU
                   ? nlohmann::json{{"a", "the GPU twin's outputs"}, {"b", "the file's /outputs (expected)"}}
                   : nlohmann::json{{"a", "the file's /outputs"}, {"b", "the CPU reference run now"}};
  const cases::OpCase& op = cases::find_op(r.c.op);
  j["case"] = {{"path", r.path}, {"op", r.c.op}, {"precision", precision_name(r.c.precision)},
               {"seed", r.c.seed}, {"generator", r.c.generator}};
  for (const cases::ParamSpec& s : op.param_specs()) {
    if (s.is_int) j["case"]["params"][s.name] = cases::pint(r.c.params, s.name);
    else j["case"]["params"][s.name] = cases::preal(r.c.params, s.name);
  }
  for (const cmp::OutputCheck& o : r.outputs) {
    nlohmann::json x = {{"name", o.name}, {"kind", o.is_index ? "index" : "float"},
                        {"tier", precision_name(o.tier)}, {"dims", o.dims},
                        {"tolerance", {{"rel_l2", o.tol.rel_l2}, {"atol", o.tol.atol}, {"rtol", o.tol.rtol},
                                       {"tie_rtol", o.tol.tie_rtol}}},
                        {"verdict", verdict_word(o)}, {"failures", o.failures}};
    nlohmann::json first = nlohmann::json::array();
    if (o.is_index) {
      for (const auto& m : o.ix.first) first.push_back(mismatch_json(m));
      x["exact_match"] = o.ix.exact_rate;
      x["jaccard_mean"] = o.ix.jaccard_mean;
      x["jaccard_min"] = o.ix.jaccard_min;
      x["jaccard_min_row"] = o.ix.jaccard_min_row;
      x["rows_differ"] = o.ix.rows_differ;
      x["rows_near_tie"] = o.ix.rows_near_tie;
    } else {
      for (const auto& m : o.f.first) first.push_back(mismatch_json(m));
      x["rel_l2"] = o.f.rel_l2;
      x["ref_norm"] = o.f.ref_norm;
      x["max_abs"] = {{"value", o.f.max_abs}, {"at", o.f.max_at.at}, {"a", o.f.max_at.got}, {"b", o.f.max_at.want}};
      x["pass_pct"] = o.f.pass_pct;
      x["compared"] = o.f.compared;
      x["violations"] = o.f.violations;
      x["nonfinite_mismatches"] = o.f.nonfinite_mismatches;
      x["unexpected_nan"] = o.f.unexpected_nan;
      if (!o.follows.empty()) x["masked"] = {{"follows", o.follows}, {"elements", o.f.masked}};
      if (o.attn_rule)
        x["attention_rule"] = {{"err_a_vs_fp64", o.err_a}, {"err_ref_vs_fp64", o.err_ref}, {"bound", o.attn_bound}};
    }
    x["first_mismatches"] = first;
    j["outputs"].push_back(x);
  }
  j["verdict"] = r.pass() ? "agree" : "disagree";
  return j;
}

void print_csv(const cmp::VerifyResult& r) {
  // The device column last: the columns before it keep their places for existing readers.
  fmt::print("op,precision,output,kind,tier,elements,rel_l2,max_abs,max_at,pass_pct,exact_match,jaccard_mean,verdict,"
             "device\n");
  for (const cmp::OutputCheck& o : r.outputs)
    fmt::print("{},{},{},{},{},{},{},{},\"{}\",{},{},{},{},{}\n", r.c.op, precision_name(r.c.precision), o.name,
               o.is_index ? "index" : "float", precision_name(o.tier), cases::element_count(o.dims),
               o.is_index ? "" : fmt::format("{:.6e}", o.f.rel_l2), o.is_index ? "" : fmt::format("{:.6e}", o.f.max_abs),
               o.is_index ? "" : cmp::coord_str(o.f.max_at.at), o.is_index ? "" : fmt::format("{:.4f}", o.f.pass_pct),
               o.is_index ? fmt::format("{:.6f}", o.ix.exact_rate) : "",
               o.is_index ? fmt::format("{:.6f}", o.ix.jaccard_mean) : "", verdict_word(o),
               r.device == cmp::Device::GPU ? "gpu" : "cpu");
}

void print_table(const cmp::VerifyResult& r) {
  const cases::OpCase& op = cases::find_op(r.c.op);
  const bool on_gpu = r.device == cmp::Device::GPU;
  fmt::print("# {}\n# {}\n", on_gpu ? cmp::gpu_description() : cpu_description(), command_line());
  fmt::print("case    {}: op {}, precision {}, seed {}\nparams  {}\n", r.path, r.c.op, precision_name(r.c.precision),
             r.c.seed, cases::params_str(op, r.c.params));
  if (!r.c.generator.empty()) fmt::print("written {}\n", r.c.generator);
  const char* emulating = r.c.precision == Precision::BF16 ? " (bf16-emulating: fp32 math on bf16 inputs, bf16 outputs)" : "";
  if (on_gpu)
    fmt::print("a = the GPU twin's outputs on the file's inputs; b = the file's /outputs (expected)\n"
               "(near-tie scores and the attention rule's yardstick: the CPU reference run now{})\n\n", emulating);
  else
    fmt::print("a = the file's /outputs; b = the CPU reference run now{}\n\n", emulating);
  constexpr auto kHead = "{:<14} {:<5} {:<4} {:>7}  {:>13} {:>8}  {:>10} {:<12} {:>13} {:>13} {:>8}  {}\n";
  fmt::print(kHead, "output", "kind", "tier", "elems", "rel-L2", "gate", "max|a-b|", "at", "a", "b", "pass", "verdict");
  fmt::print("{:<14} {:<5} {:<4} {:>7}  {:>13} {:>8}  {:>10} {:<12} {:>13} {:>13} {:>8}\n", "", "", "", "", "||a-b||/||b||",
             "(<=)", "(abs)", "[row, col]", on_gpu ? "(gpu)" : "(file)", on_gpu ? "(file)" : "(reference)", "(% elem)");
  for (const cmp::OutputCheck& o : r.outputs) {
    if (o.is_index) {
      fmt::print("{:<14} {:<5} {:<4} {:>7}  exact-match {:6.2f} %, Jaccard mean {:.4f} min {:.4f} (row {}), "
                 "rows differing {} (near-tie {})  {}\n",
                 o.name, "index", "-", cases::element_count(o.dims), 100 * o.ix.exact_rate, o.ix.jaccard_mean,
                 o.ix.jaccard_min, o.ix.jaccard_min_row, o.ix.rows_differ, o.ix.rows_near_tie, verdict_word(o));
      continue;
    }
    fmt::print("{:<14} {:<5} {:<4} {:>7}  {:>13.3e} {:>8.1e}  {:>10.3e} {:<12} {:>13.6g} {:>13.6g} {:>8.2f}  {}\n", o.name,
               "float", precision_name(o.tier), cases::element_count(o.dims), o.f.rel_l2, o.tol.rel_l2, o.f.max_abs,
               cmp::coord_str(o.f.max_at.at), o.f.max_at.got, o.f.max_at.want, o.f.pass_pct, verdict_word(o));
  }
  fmt::print("\n");
  for (const cmp::OutputCheck& o : r.outputs) {
    if (!o.is_index)
      fmt::print("{}: elementwise |a-b| <= {:.3g} + {:.3g}|b|{}\n", o.name, o.tol.atol, o.tol.rtol,
                 o.f.masked ? fmt::format(" ({} elements skipped: their rows follow near-tie rows of {})", o.f.masked,
                                          o.follows)
                            : "");
    if (o.attn_rule)
      fmt::print("{}: attention rule: rel-L2 vs fp64 {:.3e} <= {} x {:.3e} (bf16 reference vs fp64) + {:.1e} = {:.3e}: "
                 "{}\n", o.name, o.err_a, cmp::kAttnErrFactor, o.err_ref, cmp::kAttnFloor, o.attn_bound,
                 o.err_a <= o.attn_bound ? "ok" : "FAIL");
    if (o.near_tie())
      fmt::print("{}: near-tie: ids differ in {} rows only between blocks/experts whose scores are within {:.3g} of the "
                 "row's scale; compared as sets (Jaccard mean {:.4f})\n", o.name, o.ix.rows_differ, o.tol.tie_rtol,
                 o.ix.jaccard_mean);
    const auto& first = o.is_index ? o.ix.first : o.f.first;
    if (first.empty() || (o.pass() && !o.near_tie())) continue;
    fmt::print("first mismatches of {} (at most {}):\n", o.name, cmp::kMaxReported);
    for (const cmp::Mismatch& m : first) {
      if (o.is_index) {
        fmt::print("  {:<12} a = {:>6}  b = {:>6}\n", cmp::coord_str(m.at), m.got, m.want);
      } else {
        const bool finite = std::isfinite(m.got) && std::isfinite(m.want);
        fmt::print("  {:<12} a = {:>14.7g}  b = {:>14.7g}  |a-b| = {:<11.4g} allowed {:.4g}{}\n", cmp::coord_str(m.at),
                   m.got, m.want, std::abs(m.got - m.want), o.tol.atol + o.tol.rtol * std::abs(m.want),
                   finite ? "" : "  (NaN/Inf position differs)");
      }
    }
  }
  std::vector<std::string> bad;
  for (const cmp::OutputCheck& o : r.outputs)
    for (const std::string& f : o.failures) bad.push_back(o.name + ": " + f);
  if (bad.empty()) {
    std::string ties;
    for (const cmp::OutputCheck& o : r.outputs)
      if (o.near_tie()) ties += fmt::format("; near-tie in {} rows of {}", o.ix.rows_differ, o.name);
    fmt::print("# verdict: AGREE ({} output{} within their tiers' tolerances, compare/tolerance.h{})\n",
               r.outputs.size(), r.outputs.size() == 1 ? "" : "s", ties);
  } else {
    fmt::print("# verdict: DISAGREE\n");
    for (const std::string& b : bad) fmt::print("#   {}\n", b);
  }
}

int run_verify(const VerifyArgs& a) {
  const cmp::Device device = a.device == "gpu" ? cmp::Device::GPU : cmp::Device::CPU;
  const cmp::VerifyResult r = cmp::verify_case(a.path, device);
  if (a.format == Format::JSON) fmt::print("{}\n", to_json(r).dump(2));
  else if (a.format == Format::CSV) print_csv(r);
  else print_table(r);
  return r.pass() ? kExitOk : kExitDisagree;
}

}  // namespace

CLI::App* register_verify(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<VerifyArgs>();
  CLI::App* cmd = app.add_subcommand(
      "verify",
      "Check an op case file: run the op on its inputs and compare with its outputs under the "
      "tolerance policy (compare/tolerance.h). Exit 0 agree, 1 disagree, 2 bad file.");
  cmd->add_option("case", args->path, "The case file (HDF5, format m3h-case)")->required();
  cmd->add_option("--device", args->device,
                  "cpu: the file's outputs against the CPU reference run now; gpu: the GPU twin's outputs (bf16 "
                  "cases) against the file's outputs")
      ->check(CLI::IsMember({"cpu", "gpu"}));
  add_format_option(cmd, &args->format);
  cmd->footer(
      "Float outputs: rel-L2 ||a-b||/||b||, max |a-b| with its coordinates and both values, the share of\n"
      "elements within atol + rtol|b|; NaN/Inf must sit at the same positions. Index outputs: exact\n"
      "match, or near-tie where the deciding scores are within rounding (then compared as sets, Jaccard).\n"
      "bf16 attention also: rel-L2 vs fp64 <= 2 x the bf16 reference's own + 2^-8.\n"
      "--device gpu: each GPU kernel of the op (e.g. out and out@prefill) against the file's outputs;\n"
      "bf16 cases only (fp32 for msa_select); exit 2 without CUDA or a visible GPU.\n"
      "Write cases with `m3h case` or datasets/tools/dump_case.py.");
  cmd->callback([args, exit_code] { *exit_code = run_verify(*args); });
  return cmd;
}

}  // namespace m3::cli
