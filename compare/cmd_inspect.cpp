// `m3h inspect PATH`: summarizes a checkpoint directory, a safetensors file or an HDF5 dataset
// (golden file, op case, anything else): what it is, its attributes, every dataset's shape and type.
#include "compare/cli_common.h"
#include "datasets/checkpoint.h"
#include "datasets/hdf5.h"
#include "datasets/safetensors.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>

namespace m3::cli {

namespace {

const char* dtype_name(h5::DType d) {
  switch (d) {
    case h5::DType::F32: return "float32";
    case h5::DType::F64: return "float64";
    case h5::DType::I32: return "int32";
    case h5::DType::I64: return "int64";
    case h5::DType::BF16: return "bfloat16";
  }
  return "?";
}

std::string describe_hdf5(const std::string& path) {
  auto f = h5::File::open_read(path);
  std::string out = fmt::format("HDF5 file {}\n", path);
  if (f.has_attr("/", "format")) out += fmt::format("  format {}\n", f.attr_string("/", "format"));
  out += "attributes:\n";
  for (const auto& a : f.attr_names("/")) {
    std::string v;
    try {
      v = f.attr_string("/", a);
    } catch (const h5::H5Error&) {
      try {
        v = std::to_string(f.attr_int("/", a));
      } catch (const h5::H5Error&) {
        v = fmt::format("{}", f.attr_double("/", a));
      }
    }
    if (v.size() > 120) v = v.substr(0, 117) + "...";
    out += fmt::format("  {:<16} {}\n", a, v);
  }
  const auto sets = f.datasets();
  out += fmt::format("datasets ({}):\n", sets.size());
  for (const auto& d : sets) {
    std::string type;
    try {
      type = dtype_name(f.dtype(d));
    } catch (const h5::H5Error&) {
      type = "other";
    }
    out += fmt::format("  {:<40} {:<9} [{}]\n", d, type, fmt::join(f.shape(d), ", "));
  }
  return out;
}

int inspect(const std::string& path) {
  namespace fs = std::filesystem;
  if (!fs::exists(path)) throw std::invalid_argument(fmt::format("inspect: '{}' does not exist", path));
  if (fs::is_directory(path)) {
    fmt::print("{}", describe_checkpoint(path));
  } else if (path.size() > 12 && path.substr(path.size() - 12) == ".safetensors") {
    fmt::print("{}", describe_safetensors(path));
  } else if (H5Fis_hdf5(path.c_str()) > 0) {
    fmt::print("{}", describe_hdf5(path));
  } else {
    throw std::invalid_argument(fmt::format(
        "inspect: '{}' is neither a checkpoint directory, a .safetensors file nor an HDF5 file", path));
  }
  return kExitOk;
}

}  // namespace

CLI::App* register_inspect(CLI::App& app, int* exit_code) {
  auto path = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "inspect", "Summarize a checkpoint directory (config, layout, dtypes, missing / unknown tensors), a "
                 ".safetensors file, or an HDF5 dataset (golden file, op case: attributes and every dataset's "
                 "shape and type). Reads headers and metadata only.");
  cmd->add_option("path", *path, "Checkpoint directory, .safetensors file or .h5 file")->required();
  cmd->callback([path, exit_code] { *exit_code = inspect(*path); });
  return cmd;
}

}  // namespace m3::cli
