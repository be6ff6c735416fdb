// Safetensors header validation and the reader (safetensors.h). The writer and the summary live
// in safetensors_write.cpp.
//
// Checked, in this order, before any tensor byte is read (each with its own message):
//   file shorter than 8 bytes; header length N over 100 MB or past the end of the file;
//   header not valid JSON, not an object, nested implausibly deep, or with a duplicate name;
//   __metadata__ not an object of strings; an entry not an object; dtype missing, not a string or
//   unknown; shape missing or not an array of non-negative integers, or with a product past
//   2^63 elements (or bytes); data_offsets missing or not two non-negative integers; begin > end;
//   end beyond the data section; end - begin != product(shape) * dtype size; two tensors sharing a
//   byte. Gaps between tensors are allowed (the format does not forbid them; nothing reads them).
#include "datasets/safetensors.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <numeric>
#include <unordered_set>

namespace m3 {

using nlohmann::json;

namespace {

// A valid header nests 3 levels (root object, entry object, shape array); 16 leaves room for
// harmless extras in __metadata__-like fields while bounding pathological inputs.
constexpr int kMaxJsonDepth = 16;
// Tensors are converted in chunks of this many bytes: bounded memory whatever the tensor size.
constexpr std::uint64_t kReadChunkBytes = 4u << 20;

// Names and JSON fragments in messages are clipped: a malformed header can hold megabytes.
std::string clip(std::string_view s, std::size_t n = 120) {
  return s.size() <= n ? std::string(s) : fmt::format("{}...({} bytes)", s.substr(0, n), s.size());
}

std::string shape_str(const std::vector<std::int64_t>& s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

[[noreturn]] void fail(std::string_view origin, std::string_view what) {
  throw SafetensorsError(fmt::format("safetensors '{}': {}", origin, what));
}
[[noreturn]] void fail_tensor(std::string_view origin, std::string_view name, std::string_view what) {
  throw SafetensorsError(fmt::format("safetensors '{}': tensor '{}': {}", origin, clip(name), what));
}

void check_file_size(std::uint64_t file_bytes, std::string_view origin) {
  if (file_bytes < 8)
    fail(origin, fmt::format("file is {} bytes, shorter than the 8-byte header length that starts every "
                             "safetensors file",
                             file_bytes));
}

void check_header_length(std::uint64_t n, std::uint64_t file_bytes, std::string_view origin) {
  if (n > kSafetensorsMaxHeaderBytes)
    fail(origin, fmt::format("header length {} bytes exceeds the limit of {} bytes (a corrupt length field?)",
                             n, kSafetensorsMaxHeaderBytes));
  if (n > file_bytes - 8)
    fail(origin, fmt::format("header length {} bytes runs past the end of the file: the file is {} bytes, so at "
                             "most {} bytes of header fit (truncated file?)",
                             n, file_bytes, file_bytes - 8));
}

std::uint64_t read_u64_le(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// A non-negative integer that fits int64, or nothing.
std::optional<std::int64_t> as_count(const json& v) {
  if (!v.is_number_unsigned()) return std::nullopt;
  const std::uint64_t u = v.get<std::uint64_t>();
  if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) return std::nullopt;
  return static_cast<std::int64_t>(u);
}

TensorInfo parse_entry(const std::string& name, const json& e, std::uint64_t data_bytes, std::string_view origin) {
  auto bad = [&](std::string_view what) { fail_tensor(origin, name, what); };
  if (!e.is_object()) bad(fmt::format("header entry must be an object, found {} {}", e.type_name(), clip(e.dump())));
  TensorInfo t;
  t.name = name;

  const auto dt = e.find("dtype");
  if (dt == e.end()) bad("header entry has no 'dtype'");
  if (!dt->is_string()) bad(fmt::format("'dtype' must be a string, found {} {}", dt->type_name(), clip(dt->dump())));
  const auto d = parse_dtype(dt->get<std::string>());
  if (!d)
    bad(fmt::format("unknown dtype '{}' (expected one of BOOL, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, I16, U16, F16, "
                    "BF16, I32, U32, F32, F64, I64, U64)",
                    clip(dt->get<std::string>(), 40)));
  t.dtype = *d;

  const auto sh = e.find("shape");
  if (sh == e.end()) bad("header entry has no 'shape'");
  if (!sh->is_array()) bad(fmt::format("'shape' must be an array of non-negative integers, found {}", clip(sh->dump())));
  // Product of the non-zero dims must fit int64: then every partial product does too, also for
  // shapes with a zero dim (whose numel is 0).
  std::int64_t prod = 1;
  bool has_zero = false;
  for (std::size_t i = 0; i < sh->size(); ++i) {
    const auto dim = as_count((*sh)[i]);
    if (!dim) bad(fmt::format("shape[{}] must be a non-negative integer below 2^63, found {}", i, clip((*sh)[i].dump())));
    t.shape.push_back(*dim);
    if (*dim == 0) has_zero = true;
    else if (__builtin_mul_overflow(prod, *dim, &prod))
      bad(fmt::format("shape {} has more than 2^63 elements", clip(sh->dump())));
  }
  t.numel = has_zero ? 0 : prod;
  std::int64_t expect_bytes = 0;
  if (__builtin_mul_overflow(t.numel, static_cast<std::int64_t>(dtype_size(t.dtype)), &expect_bytes))
    bad(fmt::format("shape {} of {} needs more than 2^63 bytes", shape_str(t.shape), dtype_name(t.dtype)));

  const auto off = e.find("data_offsets");
  if (off == e.end()) bad("header entry has no 'data_offsets'");
  if (!off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned())
    bad(fmt::format("'data_offsets' must be an array of two non-negative integers [begin, end], found {}",
                    clip(off->dump())));
  t.begin = (*off)[0].get<std::uint64_t>();
  t.end = (*off)[1].get<std::uint64_t>();
  if (t.begin > t.end) bad(fmt::format("data_offsets [{}, {}] have begin > end", t.begin, t.end));
  if (t.end > data_bytes)
    bad(fmt::format("data_offsets [{}, {}] end beyond the data section of {} bytes (truncated file?)", t.begin, t.end,
                    data_bytes));
  if (t.nbytes() != static_cast<std::uint64_t>(expect_bytes))
    bad(fmt::format("data_offsets [{}, {}] hold {} bytes, expected {} = {} elements (shape {}) x {} bytes ({})",
                    t.begin, t.end, t.nbytes(), expect_bytes, t.numel, shape_str(t.shape), dtype_size(t.dtype),
                    dtype_name(t.dtype)));
  return t;
}

}  // namespace

const TensorInfo* SafetensorsHeader::find(std::string_view name) const {
  const auto it = by_name.find(std::string(name));
  return it == by_name.end() ? nullptr : &tensors[it->second];
}

SafetensorsHeader parse_safetensors_header(std::string_view text, std::uint64_t file_bytes, std::string_view origin) {
  check_file_size(file_bytes, origin);
  check_header_length(text.size(), file_bytes, origin);
  SafetensorsHeader h;
  h.header_bytes = text.size();
  h.data_bytes = file_bytes - 8 - text.size();

  std::string duplicate;
  std::unordered_set<std::string> keys;
  json root;
  try {
    root = json::parse(text.begin(), text.end(), [&](int depth, json::parse_event_t ev, json& parsed) {
      if (depth > kMaxJsonDepth)
        fail(origin, fmt::format("header JSON nests deeper than {} levels (a valid header nests 3)", kMaxJsonDepth));
      if (ev == json::parse_event_t::key && depth == 1 && parsed.is_string() &&
          !keys.insert(parsed.get<std::string>()).second && duplicate.empty())
        duplicate = parsed.get<std::string>();
      return true;
    });
  } catch (const json::exception& e) {
    fail(origin, fmt::format("header ({} bytes) is not valid JSON: {}", text.size(), e.what()));
  }
  if (!root.is_object())
    fail(origin, fmt::format("header must be a JSON object, found {} {}", root.type_name(), clip(root.dump())));
  if (!duplicate.empty()) fail_tensor(origin, duplicate, "name appears twice in the header");

  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object())
        fail(origin, fmt::format("'__metadata__' must be an object of strings, found {}", entry.type_name()));
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string())
          fail(origin, fmt::format("'__metadata__' value of '{}' must be a string, found {} {}", clip(k),
                                   v.type_name(), clip(v.dump())));
        h.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    h.by_name.emplace(name, h.tensors.size());
    h.tensors.push_back(parse_entry(name, entry, h.data_bytes, origin));
  }

  // Overlap: walk tensors by start offset; an empty tensor holds no byte and overlaps nothing.
  std::vector<const TensorInfo*> by_begin;
  for (const auto& t : h.tensors)
    if (t.nbytes() > 0) by_begin.push_back(&t);
  std::sort(by_begin.begin(), by_begin.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  const TensorInfo* reach = nullptr;  // the tensor reaching furthest so far
  for (const TensorInfo* t : by_begin) {
    if (reach && t->begin < reach->end)
      fail_tensor(origin, t->name,
                  fmt::format("bytes [{}, {}) overlap tensor '{}' at [{}, {}); tensors must not share bytes", t->begin,
                              t->end, clip(reach->name), reach->begin, reach->end));
    if (!reach || t->end > reach->end) reach = t;
  }
  return h;
}

SafetensorsHeader parse_safetensors_bytes(std::span<const std::uint8_t> file, std::string_view origin) {
  check_file_size(file.size(), origin);
  const std::uint64_t n = read_u64_le(file.data());
  check_header_length(n, file.size(), origin);
  return parse_safetensors_header(
      std::string_view(reinterpret_cast<const char*>(file.data()) + 8, static_cast<std::size_t>(n)), file.size(),
      origin);
}

// ---------------------------------------------------------------------------------------------
// Reader

SafetensorsReader::SafetensorsReader(const std::string& path) : origin_(path) {
  file_.open(path, std::ios::binary);
  if (!file_) fail(path, fmt::format("cannot open: {}", std::strerror(errno)));
  file_.seekg(0, std::ios::end);
  const std::streamoff size = file_.tellg();
  if (size < 0) fail(path, "cannot determine the file size");
  file_bytes_ = static_cast<std::uint64_t>(size);
  check_file_size(file_bytes_, path);
  std::uint8_t len[8];
  file_.seekg(0);
  file_.read(reinterpret_cast<char*>(len), 8);
  if (!file_) fail(path, "cannot read the 8-byte header length");
  const std::uint64_t n = read_u64_le(len);
  check_header_length(n, file_bytes_, path);
  std::string text(static_cast<std::size_t>(n), '\0');
  file_.read(text.data(), static_cast<std::streamsize>(n));
  if (file_.gcount() != static_cast<std::streamsize>(n)) fail(path, fmt::format("cannot read the {}-byte header", n));
  header_ = parse_safetensors_header(text, file_bytes_, path);
}

SafetensorsReader SafetensorsReader::from_bytes(std::vector<std::uint8_t> bytes, std::string origin) {
  SafetensorsReader r;
  r.header_ = parse_safetensors_bytes(bytes, origin);
  r.origin_ = std::move(origin);
  r.file_bytes_ = bytes.size();
  r.bytes_ = std::move(bytes);
  r.in_memory_ = true;
  return r;
}

const TensorInfo& SafetensorsReader::tensor(std::string_view name) const {
  const TensorInfo* t = header_.find(name);
  if (!t) fail_tensor(origin_, name, fmt::format("not in this file ({} tensors)", header_.tensors.size()));
  return *t;
}

void SafetensorsReader::read_bytes(std::uint64_t offset, std::uint64_t n, std::uint8_t* out) {
  if (offset > header_.data_bytes || n > header_.data_bytes - offset)
    fail(origin_, fmt::format("read of {} bytes at data offset {} is outside the {}-byte data section", n, offset,
                              header_.data_bytes));
  if (n == 0) return;  // an empty tensor: nothing to read (and `out` may be null)
  const std::uint64_t at = 8 + header_.header_bytes + offset;
  if (in_memory_) {
    std::memcpy(out, bytes_.data() + at, n);
    return;
  }
  file_.clear();
  file_.seekg(static_cast<std::streamoff>(at));
  file_.read(reinterpret_cast<char*>(out), static_cast<std::streamsize>(n));
  if (file_.gcount() != static_cast<std::streamsize>(n))
    fail(origin_, fmt::format("read of {} bytes at file offset {} failed (file changed or truncated after its header "
                              "was checked?)",
                              n, at));
}

void SafetensorsReader::read_f32(const TensorInfo& t, std::int64_t first, std::int64_t count, float* out) {
  if (!dtype_reads_as_float(t.dtype))
    fail_tensor(origin_, t.name, fmt::format("dtype {} does not read as float", dtype_name(t.dtype)));
  if (first < 0 || count < 0 || first > t.numel || count > t.numel - first)
    fail_tensor(origin_, t.name,
                fmt::format("element range [{}, {}+{}) is outside its {} elements", first, first, count, t.numel));
  const std::int64_t size = dtype_size(t.dtype);
  const std::int64_t chunk = static_cast<std::int64_t>(kReadChunkBytes) / size;
  std::vector<std::uint8_t> buf(static_cast<std::size_t>(std::min(count, chunk) * size));
  for (std::int64_t done = 0; done < count;) {
    const std::int64_t n = std::min(chunk, count - done);
    read_bytes(t.begin + static_cast<std::uint64_t>((first + done) * size), static_cast<std::uint64_t>(n * size),
               buf.data());
    convert_to_float(t.dtype, buf.data(), n, out + done);
    done += n;
  }
}

void SafetensorsReader::read_f32(const TensorInfo& t, std::span<float> out) {
  if (static_cast<std::int64_t>(out.size()) != t.numel)
    fail_tensor(origin_, t.name,
                fmt::format("output buffer holds {} floats, expected {} (shape {})", out.size(), t.numel,
                            shape_str(t.shape)));
  read_f32(t, 0, t.numel, out.data());
}

MatF SafetensorsReader::read_mat(const TensorInfo& t) {
  const std::int64_t rows = t.shape.empty() ? 1 : t.shape[0];
  std::int64_t cols = 1;
  for (std::size_t i = 1; i < t.shape.size(); ++i) cols *= t.shape[i];  // fits: checked in parse_entry
  MatF m(rows, cols);
  read_f32(t, std::span<float>(m.data(), static_cast<std::size_t>(m.size())));
  return m;
}

std::vector<std::uint8_t> SafetensorsReader::read_raw(const TensorInfo& t) {
  std::vector<std::uint8_t> out(static_cast<std::size_t>(t.nbytes()));
  read_bytes(t.begin, t.nbytes(), out.data());
  return out;
}

}  // namespace m3
