// Shared pieces of the m3h subcommands (cli_common.h).
#include "compare/cli_common.h"

#include <fmt/core.h>

#include <fstream>
#include <thread>

namespace m3::cli {

void add_format_option(CLI::App* cmd, Format* out) {
  cmd->add_option_function<std::string>(
         "--format",
         [out](const std::string& s) {
           *out = s == "json" ? Format::JSON : s == "csv" ? Format::CSV : Format::TABLE;
         },
         "Output format: table (human, default), json or csv")
      ->check(CLI::IsMember({"table", "json", "csv"}));
}

namespace {
std::string g_command_line;
}

const std::string& command_line() { return g_command_line; }

void set_command_line(int argc, char** argv) {
  g_command_line.clear();
  for (int i = 0; i < argc; ++i) {
    if (i) g_command_line += ' ';
    std::string a = argv[i];
    bool quote = a.empty() || a.find_first_of(" \t\"'$") != std::string::npos;
    g_command_line += quote ? "'" + a + "'" : a;
  }
}

std::string cpu_description() {
  std::string model = "unknown CPU";
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);) {
    if (line.rfind("model name", 0) == 0) {
      auto pos = line.find(':');
      if (pos != std::string::npos) model = line.substr(pos + 2);
      break;
    }
  }
  return fmt::format("cpu: {}, {} hardware threads", model, std::thread::hardware_concurrency());
}

}  // namespace m3::cli
