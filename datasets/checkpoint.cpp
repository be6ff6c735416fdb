// Checkpoint loading and its summary (checkpoint.h). Saving is in checkpoint_save.cpp.
//
// Order of work: config.json; the entry file (model.safetensors or the index) and every header;
// the index's promises (shard exists, tensor in its shard); the layout, by which table of names
// (checkpoint_layout.h) the files match best; MTP modules and the vision tower present (the latter
// with config.json's vision_config, checkpoint_vision.h); missing tensors, shapes, dtypes and fp8
// scales, all from the headers; only then allocation and reading, one tensor at a time, NaN/Inf
// checked.
#include "datasets/checkpoint.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

namespace m3 {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw CheckpointError(msg); }

std::string shape_str(const std::vector<std::int64_t>& s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

// The headers of a checkpoint: every tensor by name, with the reader holding it.
struct Scan {
  std::string dir;
  std::string config_path;  // dir/config.json
  ModelConfig config;
  std::vector<SafetensorsReader> readers;
  std::vector<std::string> files;  // relative to dir, parallel to readers
  struct Source {
    std::size_t reader;
    const TensorInfo* info;
  };
  std::map<std::string, Source> tensors;

  const Source* find(const std::string& name) const {
    const auto it = tensors.find(name);
    return it == tensors.end() ? nullptr : &it->second;
  }
};

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) fail(fmt::format("cannot open '{}'", p.string()));
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// weight_map of an index file: tensor -> shard file name.
std::map<std::string, std::string> read_index(const fs::path& path) {
  const std::string where = path.string();
  json j;
  try {
    j = json::parse(read_text(path));
  } catch (const json::exception& e) {
    fail(fmt::format("'{}' is not valid JSON: {}", where, e.what()));
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    fail(fmt::format("'{}' must be an object with a 'weight_map' object {{tensor: shard file}}", where));
  std::map<std::string, std::string> map;
  for (const auto& [name, file] : j["weight_map"].items()) {
    if (!file.is_string())
      fail(fmt::format("'{}': weight_map entry '{}' must be a file name string, found {}", where, name, file.dump()));
    const std::string f = file.get<std::string>();
    // Shards sit beside the index: a path could reach outside the checkpoint.
    if (f.empty() || f == "." || f == ".." || f.find('/') != std::string::npos || f.find('\\') != std::string::npos)
      fail(fmt::format("'{}': weight_map entry '{}' names shard '{}', expected a plain file name", where, name, f));
    map[name] = f;
  }
  return map;
}

Scan scan(const std::string& dir) {
  if (!fs::is_directory(dir)) fail(fmt::format("checkpoint '{}' is not a directory", dir));
  Scan s;
  s.dir = dir;
  s.config_path = (fs::path(dir) / "config.json").string();
  s.config = load_config_file(s.config_path);
  const fs::path single = fs::path(dir) / kSingleFileName, index = fs::path(dir) / kIndexFileName;
  const bool has_single = fs::exists(single), has_index = fs::exists(index);
  if (has_single && has_index)
    fail(fmt::format("checkpoint '{}' holds both {} and {}: ambiguous, remove the stale one", dir, kSingleFileName,
                     kIndexFileName));
  if (!has_single && !has_index)
    fail(fmt::format("checkpoint '{}' holds neither {} nor {}", dir, kSingleFileName, kIndexFileName));
  if (has_single) {
    s.readers.emplace_back(single.string());
    s.files.push_back(kSingleFileName);
    for (const auto& t : s.readers[0].header().tensors) s.tensors[t.name] = {0, &t};
    return s;
  }
  const auto map = read_index(index);
  std::map<std::string, std::string> first_tensor;  // shard -> a tensor mapped to it, shards sorted
  for (const auto& [name, file] : map) first_tensor.emplace(file, name);
  std::map<std::string, std::size_t> shard_reader;
  for (const auto& [file, name] : first_tensor) {
    const fs::path p = fs::path(dir) / file;
    if (!fs::is_regular_file(p))
      fail(fmt::format("{} maps tensor '{}' to shard '{}', which does not exist in '{}'", kIndexFileName, name, file,
                       dir));
    shard_reader[file] = s.readers.size();
    s.readers.emplace_back(p.string());
    s.files.push_back(file);
  }
  for (const auto& [name, file] : map) {
    const std::size_t r = shard_reader.at(file);
    const TensorInfo* t = s.readers[r].header().find(name);
    if (!t)
      fail(fmt::format("{} maps tensor '{}' to shard '{}', but that shard has no such tensor (it holds {})",
                       kIndexFileName, name, file, s.readers[r].header().tensors.size()));
    s.tensors[name] = {r, t};
  }
  return s;
}

// The names table that the files match best; ties go to the official layout under "model.".
LayoutNames detect_layout(const Scan& s) {
  LayoutNames best;
  std::int64_t best_hits = -1;
  for (Layout layout : {Layout::OFFICIAL, Layout::HF})
    for (const char* prefix : {"model.", "language_model.model.", "model.language_model."}) {
      LayoutNames n{layout, prefix, std::string(prefix) == "language_model.model." ? "language_model.lm_head.weight"
                                                                                  : "lm_head.weight"};
      for (const char* lm : {"lm_head.weight", "language_model.lm_head.weight"})
        if (s.find(lm)) n.lm_head = lm;
      std::int64_t hits = 0;
      for (const auto& slot : layout_slots(s.config, n, nullptr)) hits += s.find(slot.name) != nullptr;
      if (hits > best_hits) best = n, best_hits = hits;
    }
  return best;
}

// MTP modules and the vision part belong to the release but not to the text backbone.
bool is_ignored(const std::string& name) {
  static const std::set<std::string> parts{"mtp", "vision_tower", "vision_model", "visual", "multi_modal_projector",
                                           "patch_merge_mlp", "mm_projector"};
  std::size_t start = 0;
  while (start <= name.size()) {
    const std::size_t dot = std::min(name.find('.', start), name.size());
    if (parts.count(name.substr(start, dot - start))) return true;
    start = dot + 1;
  }
  return false;
}

bool weight_dtype_ok(Dtype d) { return d == Dtype::F32 || d == Dtype::BF16 || d == Dtype::F16; }

// Block-scale shape of an fp8 weight: the last two dims (the one dim of a vector) in 128-blocks.
std::vector<std::int64_t> scale_shape(std::vector<std::int64_t> s) {
  const std::size_t k = s.size() >= 2 ? 2 : s.size();
  for (std::size_t i = s.size() - k; i < s.size(); ++i) s[i] = (s[i] + kFp8BlockSize - 1) / kFp8BlockSize;
  return s;
}

// What the headers say about the model, before any data is read.
struct Check {
  LayoutNames names;
  std::vector<TensorSlot> slots;
  int mtp_modules = 0;  // MTP modules 0..mtp_modules-1 found whole (their slots checked like the others)
  // The vision tower: its config when the files hold vision tensors; its slots are slots[vision_begin..).
  std::optional<VisionConfigRead> vision;
  std::size_t vision_begin = 0;
  std::string vision_config_error;  // a ConfigError of vision_config (describe lists it, load throws it)
  std::vector<std::string> vision_missing;  // a partial tower
  std::vector<std::string> vision_extra;    // visual.blocks.{l}.* with l >= the config's blocks
  std::vector<std::string> missing, shape_errors, dtype_errors;
  std::set<std::string> used;  // slot tensors and the fp8 scales they use
  std::vector<std::string> unknown, ignored, fp8;
};

// The vision tower is read when any tensor sits under one of its roots (kVisionRoots), and then
// every tensor of vision_slots must be there: a partial tower is never loaded.
void check_vision(const Scan& s, Check& c) {
  bool any = false;
  for (const auto& [name, src] : s.tensors)
    for (const char* root : kVisionRoots) any = any || name.rfind(root, 0) == 0;
  if (!any) return;
  try {
    c.vision = parse_vision_config(read_text(s.config_path), s.config, s.config_path);
  } catch (const ConfigError& e) {
    c.vision_config_error = e.what();
    return;
  }
  c.vision_begin = c.slots.size();
  for (auto& slot : vision_slots(c.vision->config, nullptr)) c.slots.push_back(std::move(slot));
  // A block the config does not count means the config is wrong, not a tensor to skip.
  const std::string blocks = "visual.blocks.";
  for (const auto& [name, src] : s.tensors) {
    if (name.rfind(blocks, 0) != 0) continue;
    const std::size_t dot = name.find('.', blocks.size());
    const std::string num = name.substr(blocks.size(), dot == std::string::npos ? std::string::npos : dot - blocks.size());
    if (!num.empty() && num.find_first_not_of("0123456789") == std::string::npos && num.size() < 9 &&
        std::stoi(num) >= c.vision->config.layers)
      c.vision_extra.push_back(name);
  }
}

Check check(const Scan& s) {
  Check c;
  c.names = detect_layout(s);
  c.slots = layout_slots(s.config, c.names, nullptr);
  // MTP modules: module i is loaded when any tensor under mtp.layers.{i}. exists, and then all of its
  // tensors must (a module is never half loaded); modules must be 0..k-1 without a gap.
  for (int i = 0; i < s.config.num_mtp_modules; ++i) {
    const std::string p = fmt::format("mtp.layers.{}.", i);
    bool any = false;
    for (const auto& [name, src] : s.tensors) any = any || name.rfind(p, 0) == 0;
    if (!any) break;
    for (auto& slot : mtp_slots(s.config, i, c.names, nullptr)) c.slots.push_back(std::move(slot));
    c.mtp_modules = i + 1;
  }
  check_vision(s, c);
  for (std::size_t i = 0; i < c.slots.size(); ++i) {
    const TensorSlot& slot = c.slots[i];
    const bool vision = c.vision && i >= c.vision_begin;
    const auto* src = s.find(slot.name);
    if (!src) {
      if (!slot.optional) (vision ? c.vision_missing : c.missing).push_back(slot.name);
      continue;
    }
    c.used.insert(slot.name);
    const TensorInfo& t = *src->info;
    const std::string where = fmt::format("tensor '{}' in '{}'", slot.name, s.files[src->reader]);
    if (t.shape != slot.shape && (slot.alt_shape.empty() || t.shape != slot.alt_shape))
      c.shape_errors.push_back(fmt::format("{} has shape {}, expected {}{} from the {} '{}'", where, shape_str(t.shape),
                                           shape_str(slot.shape),
                                           slot.alt_shape.empty() ? "" : " or " + shape_str(slot.alt_shape),
                                           vision ? "vision config" : "config",
                                           vision ? c.vision->config.name : s.config.name));
    if (t.dtype == Dtype::F8_E4M3) {
      const std::string sn = slot.name + "_scale_inv";
      const auto* sc = s.find(sn);
      if (!sc) {
        c.dtype_errors.push_back(fmt::format("{} is F8_E4M3 but has no block-scale tensor '{}'", where, sn));
      } else if (!weight_dtype_ok(sc->info->dtype) || sc->info->shape != scale_shape(t.shape)) {
        c.dtype_errors.push_back(fmt::format("scale tensor '{}' is {} {}, expected F32, BF16 or F16 of shape {} "
                                             "({}x{} blocks of {})",
                                             sn, dtype_name(sc->info->dtype), shape_str(sc->info->shape),
                                             shape_str(scale_shape(t.shape)), kFp8BlockSize, kFp8BlockSize, where));
      } else {
        c.used.insert(sn);
        c.fp8.push_back(slot.name);
      }
    } else if (!weight_dtype_ok(t.dtype)) {
      c.dtype_errors.push_back(fmt::format("{} has dtype {}, expected F32, BF16, F16 (or F8_E4M3 with a "
                                           "'{}_scale_inv' block-scale tensor)",
                                           where, dtype_name(t.dtype), slot.name));
    }
  }
  for (const auto& [name, src] : s.tensors)
    if (!c.used.count(name)) (is_ignored(name) ? c.ignored : c.unknown).push_back(name);
  return c;
}

// Elements of the vision tower's slots (0 without a tower).
std::uint64_t vision_params(const Check& c) {
  std::uint64_t total = 0;
  for (std::size_t i = c.vision ? c.vision_begin : c.slots.size(); i < c.slots.size(); ++i) {
    std::uint64_t n = 1;
    for (auto d : c.slots[i].shape) n *= static_cast<std::uint64_t>(d);
    total += n;
  }
  return total;
}

std::string list_some(const std::vector<std::string>& v, std::size_t n) {
  std::string out;
  for (std::size_t i = 0; i < v.size() && i < n; ++i) out += fmt::format("{}'{}'", i ? ", " : "", v[i]);
  if (v.size() > n) out += fmt::format(", ... ({} more)", v.size() - n);
  return out;
}

std::string unravel(std::int64_t flat, const std::vector<std::int64_t>& shape) {
  std::vector<std::int64_t> idx(shape.size());
  for (std::size_t i = shape.size(); i-- > 0;) {
    idx[i] = flat % shape[i];
    flat /= shape[i];
  }
  return shape_str(idx);
}

// Reads one slot into its pieces: dequantizes fp8, then rejects the first non-finite element.
void read_slot(Scan& s, const TensorSlot& slot, bool fp8) {
  const auto* src = s.find(slot.name);
  if (!src) {  // an optional tensor (checked in check()): the neutral value
    for (const auto& p : slot.pieces) std::fill(p.dst, p.dst + p.count, 0.0f);
    return;
  }
  SafetensorsReader& r = s.readers[src->reader];
  const TensorInfo& t = *src->info;
  std::vector<float> scale;  // [lead..., ceil(R/128), ceil(C/128)]
  if (fp8) {
    const TensorInfo& st = *s.find(slot.name + "_scale_inv")->info;
    scale.resize(static_cast<std::size_t>(st.numel));
    s.readers[s.find(st.name)->reader].read_f32(st, scale);
  }
  const std::int64_t C = t.shape.empty() ? 1 : t.shape.back();
  const std::int64_t R = t.shape.size() >= 2 ? t.shape[t.shape.size() - 2] : 1;
  const std::int64_t nbc = (C + kFp8BlockSize - 1) / kFp8BlockSize, nbr = (R + kFp8BlockSize - 1) / kFp8BlockSize;
  for (const auto& p : slot.pieces) {
    r.read_f32(t, p.offset, p.count, p.dst);
    for (std::int64_t i = 0; i < p.count; ++i) {
      const std::int64_t g = p.offset + i;  // flat index in the checkpoint tensor
      if (fp8) {
        const std::int64_t c = g % C, row = (g / C) % R, lead = g / (R * C);
        p.dst[i] *= scale[static_cast<std::size_t>(lead * nbr * nbc + (row / kFp8BlockSize) * nbc + c / kFp8BlockSize)];
      }
      if (!std::isfinite(p.dst[i]))
        fail(fmt::format("tensor '{}' in '{}' holds {} at index {} (flat {}){}", slot.name, s.files[src->reader],
                         p.dst[i], unravel(g, t.shape), g, fp8 ? " after fp8 block scaling" : ""));
    }
  }
}

}  // namespace

Checkpoint load_checkpoint(const std::string& dir, std::uint64_t max_bytes) {
  Scan s = scan(dir);
  Check c = check(s);
  const std::string what = fmt::format("checkpoint '{}' ({} layout, prefix '{}')", dir, layout_name(c.names.layout),
                                       c.names.prefix);
  if (!c.missing.empty())
    fail(fmt::format("{}: {} required tensor{} missing, first '{}' (missing: {})", what, c.missing.size(),
                     c.missing.size() == 1 ? " is" : "s are", c.missing[0], list_some(c.missing, 5)));
  if (!c.vision_config_error.empty()) throw ConfigError(c.vision_config_error);
  // Shapes before the tower's completeness: a vision_config of another tower (more blocks) misses
  // tensors too, and the shapes say why.
  if (!c.shape_errors.empty())
    fail(fmt::format("{}: {} (and {} more shape errors)", what, c.shape_errors[0], c.shape_errors.size() - 1));
  if (!c.vision_missing.empty())
    fail(fmt::format("{}: the vision tower is partial: {} of its {} tensors missing, first '{}' (missing: {})", what,
                     c.vision_missing.size(), c.slots.size() - c.vision_begin, c.vision_missing[0],
                     list_some(c.vision_missing, 5)));
  if (!c.vision_extra.empty())
    fail(fmt::format("{}: tensor '{}' is a vision block past vision_config.num_hidden_layers = {} ({} such tensors)",
                     what, c.vision_extra[0], c.vision->config.layers, c.vision_extra.size()));
  if (!c.dtype_errors.empty())
    fail(fmt::format("{}: {} (and {} more dtype errors)", what, c.dtype_errors[0], c.dtype_errors.size() - 1));
  const std::uint64_t bytes = (weights_param_count(s.config) + vision_params(c)) * sizeof(float);
  if (bytes > max_bytes)
    fail(fmt::format("{}: config '{}' needs {:.1f} GiB of fp32 weights, over the limit of {:.1f} GiB", what,
                     s.config.name, bytes / double(1ull << 30), max_bytes / double(1ull << 30)));

  Checkpoint ck;
  ck.weights = allocate_weights(s.config);
  const auto bound = layout_slots(s.config, c.names, &ck.weights);  // c.slots' first part, same order
  const std::set<std::string> fp8(c.fp8.begin(), c.fp8.end());
  for (const auto& slot : bound) read_slot(s, slot, fp8.count(slot.name) > 0);
  for (int i = 0; i < c.mtp_modules; ++i) {
    ModelWeights<float> m = allocate_mtp_module(s.config);
    for (const auto& slot : mtp_slots(s.config, i, c.names, &m)) read_slot(s, slot, fp8.count(slot.name) > 0);
    m.embed_tokens = ck.weights.embed_tokens;  // shared with the main model (spec §7)
    m.lm_head = ck.weights.lm_head;
    ck.mtp.push_back(std::move(m));
  }
  if (c.vision) {
    CheckpointVision v{c.vision->config, allocate_vision_weights(c.vision->config)};
    for (const auto& slot : vision_slots(v.config, &v.weights)) read_slot(s, slot, fp8.count(slot.name) > 0);
    ck.vision = std::move(v);
    ck.warnings = c.vision->warnings;
  }
  ck.config = s.config;
  ck.names = c.names;
  ck.files = s.files;
  ck.unknown_tensors = std::move(c.unknown);
  ck.ignored_tensors = std::move(c.ignored);
  ck.fp8_tensors = std::move(c.fp8);
  return ck;
}

std::string describe_checkpoint(const std::string& dir) {
  // Names listed per category; a broken real checkpoint can miss thousands, the count says so.
  constexpr std::size_t kListed = 8;
  Scan s = scan(dir);
  Check c = check(s);
  const ModelConfig& g = s.config;
  std::map<std::string, std::pair<std::int64_t, std::uint64_t>> hist;  // dtype -> (tensors, bytes)
  std::uint64_t params = 0;
  for (const auto& [name, src] : s.tensors) {
    auto& [n, b] = hist[std::string(dtype_name(src.info->dtype))];
    ++n;
    b += src.info->nbytes();
    params += static_cast<std::uint64_t>(src.info->numel);
  }
  std::string o = fmt::format("checkpoint    {}\n", dir);
  o += fmt::format("config        '{}': H {}, {} layers ({} MSA, {} MoE), heads {}/{} x D {}, V {}, E {} top-{}, "
                   "BLK {} top-{}\n",
                   g.name, g.hidden_size, g.num_hidden_layers, g.num_layers_of(AttnType::MSA),
                   g.num_layers_of(MlpType::MOE), g.num_attention_heads, g.num_key_value_heads, g.head_dim,
                   g.vocab_size, g.num_local_experts, g.num_experts_per_tok, g.index_block_size, g.index_topk_blocks);
  o += fmt::format("files         {}: {}\n", s.files.size(), fmt::join(s.files, ", "));
  o += fmt::format("layout        {} (prefix '{}', LM head '{}')\n", layout_name(c.names.layout), c.names.prefix,
                   c.names.lm_head);
  o += fmt::format("tensors       {} in the files, {} required by the config\n", s.tensors.size(), c.slots.size());
  o += fmt::format("mtp modules   {} of num_mtp_modules = {} in the files\n", c.mtp_modules, g.num_mtp_modules);
  if (c.vision) {
    const VisionConfig& v = c.vision->config;
    o += fmt::format("vision        '{}': Hv {}, {} blocks, heads {} x D {}, MLP {}, patch {}x{}x{}, merge {}x{}, "
                     "image token {}; {} tensors\n",
                     v.name, v.hidden, v.layers, v.heads, v.head_dim, v.mlp, v.temporal_patch, v.patch, v.patch,
                     v.merge, v.merge, v.image_token_id, c.slots.size() - c.vision_begin);
    for (const auto& w : c.vision->warnings) o += fmt::format("warning       {}\n", w);
  }
  const std::uint64_t implied = weights_param_count(g) + vision_params(c);
  o += fmt::format("parameters    {} in the files, {} implied by the config{}\n", params, implied,
                   c.vision ? " and vision_config" : "");
  for (const auto& [d, nb] : hist) o += fmt::format("dtype {:<8} {} tensors, {} bytes\n", d, nb.first, nb.second);
  if (!c.fp8.empty()) o += fmt::format("fp8 weights   {} with 128x128 block scales\n", c.fp8.size());
  auto cat = [&](std::string_view label, const std::vector<std::string>& v) {
    if (!v.empty()) o += fmt::format("{:<13} {}: {}\n", label, v.size(), list_some(v, kListed));
  };
  cat("MISSING", c.missing);
  cat("VISION MISSING", c.vision_missing);
  cat("VISION EXTRA", c.vision_extra);
  if (!c.vision_config_error.empty()) o += fmt::format("VISION CONFIG {}\n", c.vision_config_error);
  cat("SHAPE ERRORS", c.shape_errors);
  cat("DTYPE ERRORS", c.dtype_errors);
  cat("unknown", c.unknown);
  cat("ignored", c.ignored);  // MTP and vision
  const bool ok = c.missing.empty() && c.shape_errors.empty() && c.dtype_errors.empty() && c.vision_missing.empty() &&
                  c.vision_extra.empty() && c.vision_config_error.empty();
  o += fmt::format("verdict       {}\n", ok ? "loadable (headers checked; values are checked on load)"
                                            : "NOT loadable: see the errors above");
  return o;
}

}  // namespace m3
