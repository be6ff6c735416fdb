// m3h: the m3-harness command line.
//   m3h cost  --preset m3 --context 1048576 [--format table|json|csv] [--sweep]
//   m3h run   --preset tiny --tokens 320 [--decode 32] [--precision fp32|fp64|bf16] [--out run.h5]
//   m3h run   --device gpu --preset small --tokens 4096 --decode 64  (the CUDA implementation)
//   m3h compare --preset tiny --tokens 300 --decode 16          (GPU vs reference, DESIGN §4 table)
//   m3h study --preset m3-layer --part cpu,quality                (MSA vs GQA: time, counted FLOPs, recall)
//   m3h run   --checkpoint DIR --tokens FILE.h5:/input_ids        (a safetensors checkpoint)
//   m3h golden --preset tiny --tokens 100 --decode 16 --out g.h5   (or --check g.h5)
//   m3h case --op msa_select --out c.h5 ; m3h verify c.h5          (op case files)
//   m3h inspect PATH ; m3h export --preset tiny --out DIR          (datasets and checkpoints)
// `m3h --help` and `m3h <command> --help` explain every option.
#include "compare/cli_common.h"

#include <fmt/core.h>

#include <cstdio>
#include <exception>

int main(int argc, char** argv) {
  using namespace m3::cli;
  set_command_line(argc, argv);
  CLI::App app{
      "m3h - MiniMax-M3 research harness: CPU reference, cost model and comparisons.\n"
      "Exit codes: 0 ok, 1 disagreement or failed gate, 2 bad input or usage."};
  app.require_subcommand(1);
  int exit_code = kExitOk;
  register_cost(app, &exit_code);
  register_run(app, &exit_code);
  register_case(app, &exit_code);
  register_verify(app, &exit_code);
  register_golden(app, &exit_code);
  register_inspect(app, &exit_code);
  register_export(app, &exit_code);
  register_compare(app, &exit_code);
  register_study(app, &exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? kExitOk : kExitBadInput;
  } catch (const std::exception& e) {
    fmt::print(stderr, "m3h: error: {}\n", e.what());
    return kExitBadInput;
  }
  return exit_code;
}
