// `m3h case`: writes an op case file (compare/cases/case.h) whose inputs come from the seed and
// whose outputs come from the CPU reference in the requested precision.
//   m3h case --op msa_attention --out case.h5 [--seed 1] [--precision fp32|bf16|fp64] [T=9 N=300 ...]
//   m3h case --list          (every op with its parameters and their defaults)
#include "compare/cases/case.h"
#include "compare/cli_common.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <memory>

namespace m3::cli {

namespace {

struct CaseArgs {
  std::string op;
  std::string out;
  std::uint64_t seed = 1;
  std::string precision = "fp32";
  std::vector<std::string> params;
  bool list = false;
};

void list_ops() {
  for (const cases::OpCase* op : cases::all_ops()) {
    fmt::print("{:<16} {}\n", op->op(), op->summary());
    for (const cases::ParamSpec& s : op->param_specs())
      fmt::print("  {:<14} {:<10} {}\n", s.name, s.is_int ? fmt::format("{}", static_cast<long long>(s.def))
                                                          : fmt::format("{:g}", s.def), s.help);
  }
}

std::string describe(const std::vector<cases::TensorSpec>& specs, Precision p) {
  std::string s;
  for (const cases::TensorSpec& t : specs)
    s += fmt::format("  {:<12} {:<26} = {:<14} {}\n", t.name, t.dims_expr, cmp::coord_str(t.dims),
                     cases::storage_name(cases::storage_of(t.kind, p)));
  return s;
}

int run_case(const CaseArgs& a) {
  if (a.list) {
    list_ops();
    return kExitOk;
  }
  if (a.op.empty() || a.out.empty())
    throw cases::CaseError("case: give --op OP and --out FILE (--list shows the ops and their parameters)");
  const cases::OpCase& op = cases::find_op(a.op);
  const Precision prec = parse_precision(a.precision);
  const cases::Params p = cases::resolve_params(op, a.params);
  // The generator attribute names the program "m3h" whatever path ran it, so it reads the same
  // from every build folder.
  const std::string& cl = command_line();
  const std::string generator = "m3h" + cl.substr(std::min(cl.find(' '), cl.size()));
  const cases::Case c = cases::make_case(op, p, prec, a.seed, generator);
  cases::write_case(a.out, c);
  fmt::print("# {}\n", command_line());
  fmt::print("wrote {} ({} bytes): op {}, precision {}, seed {}\n", a.out, std::filesystem::file_size(a.out), c.op,
             precision_name(prec), c.seed);
  fmt::print("params {}\ninputs\n{}outputs (CPU reference{})\n{}", cases::params_str(op, p),
             describe(op.inputs(p), prec), prec == Precision::BF16 ? ", bf16-emulating" : "",
             describe(op.outputs(p), prec));
  return kExitOk;
}

}  // namespace

CLI::App* register_case(CLI::App& app, int* exit_code) {
  auto args = std::make_shared<CaseArgs>();
  CLI::App* cmd = app.add_subcommand(
      "case",
      "Write an op case file: seeded inputs and the CPU reference's outputs (check it, or another "
      "engine's kernel, with `m3h verify`).");
  cmd->add_option("--op", args->op, "The op: a stem of reference/ops (see --list)");
  cmd->add_option("--out", args->out, "The case file to write (HDF5)");
  cmd->add_option("--seed", args->seed, "Seed of the inputs (default 1; the same bits on every machine)");
  cmd->add_option("--precision", args->precision,
                  "fp32 (default), fp64, or bf16: bf16-rounded inputs, fp32 math, bf16-rounded outputs")
      ->check(CLI::IsMember({"fp32", "fp64", "bf16"}));
  cmd->add_flag("--list", args->list, "List the ops with their parameters and defaults");
  cmd->add_option("params", args->params, "Parameters as NAME=VALUE (sizes like T=9 N=300; see --list)");
  cmd->footer("Example: m3h case --op attention_dense --out ad.h5 --precision bf16 T=3 N=130 Hq=8 Hkv=2 D=32");
  cmd->callback([args, exit_code] { *exit_code = run_case(*args); });
  return cmd;
}

}  // namespace m3::cli
