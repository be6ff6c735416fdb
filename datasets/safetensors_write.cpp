// The safetensors writer and the file summary for `m3h inspect` (safetensors.h).
#include "datasets/safetensors.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <map>

namespace m3 {

using nlohmann::json;

namespace {

// Elements converted per step when writing: bounded scratch memory whatever the tensor size.
constexpr std::size_t kWriteChunkElems = std::size_t{1} << 20;

std::int64_t checked_numel(const std::string& name, const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (auto d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n))
      throw std::invalid_argument(
          fmt::format("SafetensorsWriter: tensor '{}': shape [{}] is negative or overflows", name, fmt::join(shape, ", ")));
  }
  return n;
}

}  // namespace

void SafetensorsWriter::add(std::string name, Dtype dtype, std::vector<std::int64_t> shape,
                            std::vector<std::span<const float>> parts) {
  if (dtype != Dtype::F32 && dtype != Dtype::BF16 && dtype != Dtype::F16)
    throw std::invalid_argument(fmt::format("SafetensorsWriter: tensor '{}': dtype {} cannot be written from float, "
                                            "expected F32, BF16 or F16 (add_raw takes bytes of any dtype)",
                                            name, dtype_name(dtype)));
  const std::int64_t numel = checked_numel(name, shape);
  std::int64_t have = 0;
  for (const auto& p : parts) have += static_cast<std::int64_t>(p.size());
  if (have != numel)
    throw std::invalid_argument(fmt::format("SafetensorsWriter: tensor '{}': parts hold {} floats, expected {} for "
                                            "shape [{}]",
                                            name, have, numel, fmt::join(shape, ", ")));
  push(Entry{std::move(name), dtype, std::move(shape), std::move(parts), {}},
       static_cast<std::uint64_t>(numel) * dtype_size(dtype));
}

void SafetensorsWriter::add_raw(std::string name, Dtype dtype, std::vector<std::int64_t> shape,
                                std::vector<std::uint8_t> bytes) {
  const std::int64_t numel = checked_numel(name, shape);
  if (bytes.size() != static_cast<std::uint64_t>(numel) * dtype_size(dtype))
    throw std::invalid_argument(fmt::format("SafetensorsWriter: tensor '{}': {} bytes, expected {} elements x {} "
                                            "bytes ({})",
                                            name, bytes.size(), numel, dtype_size(dtype), dtype_name(dtype)));
  const std::uint64_t n = bytes.size();
  push(Entry{std::move(name), dtype, std::move(shape), {}, std::move(bytes)}, n);
}

void SafetensorsWriter::push(Entry e, std::uint64_t nbytes) {
  if (e.name.empty() || e.name == "__metadata__")
    throw std::invalid_argument(fmt::format("SafetensorsWriter: '{}' is not a valid tensor name", e.name));
  if (!names_.insert(e.name).second)
    throw std::invalid_argument(fmt::format("SafetensorsWriter: tensor '{}' added twice", e.name));
  e.begin = data_bytes_;
  e.end = data_bytes_ + nbytes;
  data_bytes_ = e.end;
  entries_.push_back(std::move(e));
}

void SafetensorsWriter::set_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }

std::string SafetensorsWriter::header_json() const {
  json h = json::object();
  for (const auto& e : entries_)
    h[e.name] = {{"dtype", std::string(dtype_name(e.dtype))}, {"shape", e.shape}, {"data_offsets", {e.begin, e.end}}};
  if (!metadata_.empty()) h["__metadata__"] = metadata_;
  std::string s = h.dump();
  s.append((8 - s.size() % 8) % 8, ' ');  // the data section then starts 8-aligned
  return s;
}

template <class Sink>
void SafetensorsWriter::emit(Sink&& sink) const {
  const std::string h = header_json();
  std::uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<std::uint8_t>(static_cast<std::uint64_t>(h.size()) >> (8 * i));
  sink(len, 8);
  sink(reinterpret_cast<const std::uint8_t*>(h.data()), h.size());
  std::vector<std::uint8_t> buf;
  for (const auto& e : entries_) {
    if (e.parts.empty()) {  // add_raw
      sink(e.raw.data(), e.raw.size());
      continue;
    }
    const std::size_t size = static_cast<std::size_t>(dtype_size(e.dtype));
    for (const auto& p : e.parts)
      for (std::size_t i = 0; i < p.size(); i += kWriteChunkElems) {
        const std::size_t n = std::min(kWriteChunkElems, p.size() - i);
        buf.resize(n * size);
        convert_from_float(e.dtype, p.data() + i, static_cast<std::int64_t>(n), buf.data());
        sink(buf.data(), buf.size());
      }
  }
}

void SafetensorsWriter::write(const std::string& path) const {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw SafetensorsError(fmt::format("safetensors '{}': cannot create: {}", path, std::strerror(errno)));
  emit([&](const std::uint8_t* p, std::size_t n) { f.write(reinterpret_cast<const char*>(p), static_cast<std::streamsize>(n)); });
  f.flush();
  if (!f) throw SafetensorsError(fmt::format("safetensors '{}': write failed (disk full?)", path));
}

std::vector<std::uint8_t> SafetensorsWriter::to_bytes() const {
  std::vector<std::uint8_t> out;
  emit([&](const std::uint8_t* p, std::size_t n) { out.insert(out.end(), p, p + n); });
  return out;
}

// ---------------------------------------------------------------------------------------------

std::string describe_safetensors(const std::string& file) {
  // Tensors listed one a line up to this many; a real shard holds ~1k, summarized by the histogram.
  constexpr std::size_t kMaxListed = 40;
  SafetensorsReader r(file);
  const auto& h = r.header();
  std::map<std::string, std::pair<std::int64_t, std::uint64_t>> hist;  // dtype -> (tensors, bytes)
  std::uint64_t params = 0;
  for (const auto& t : h.tensors) {
    auto& [count, bytes] = hist[std::string(dtype_name(t.dtype))];
    ++count;
    bytes += t.nbytes();
    params += static_cast<std::uint64_t>(t.numel);
  }
  std::string s = fmt::format("file          {}\n", file);
  s += fmt::format("size          {} bytes (header {} bytes, data {} bytes)\n", r.file_bytes(), h.header_bytes,
                   h.data_bytes);
  s += fmt::format("tensors       {}\n", h.tensors.size());
  s += fmt::format("parameters    {} ({:.3f} M)\n", params, params / 1e6);
  for (const auto& [d, cb] : hist)
    s += fmt::format("dtype {:<8} {} tensors, {} bytes\n", d, cb.first, cb.second);
  for (const auto& [k, v] : h.metadata) s += fmt::format("metadata      {} = {}\n", k, v);
  std::vector<const TensorInfo*> order;
  for (const auto& t : h.tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (std::size_t i = 0; i < order.size() && i < kMaxListed; ++i)
    s += fmt::format("  {:<60} {:<8} [{}] @ {}\n", order[i]->name, dtype_name(order[i]->dtype),
                     fmt::join(order[i]->shape, ", "), order[i]->begin);
  if (order.size() > kMaxListed) s += fmt::format("  ... {} more\n", order.size() - kMaxListed);
  return s;
}

}  // namespace m3
