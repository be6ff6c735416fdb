// Safetensors files: a validating reader and a writer (DESIGN §7: "validates the header before it
// reads a byte of tensor data").
//
// Format: u64 little-endian N | N bytes of JSON header | data section. The header is an object
// {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}
// with offsets relative to the start of the data section.
//
//   m3::SafetensorsReader r("model.safetensors");        // header fully checked here
//   const m3::TensorInfo& t = r.tensor("lm_head.weight");
//   m3::MatF w = r.read_mat(t);                          // [shape[0], prod(shape[1:])] as float
//
// The reader uses std::ifstream and reads each tensor's bytes once, in bounded chunks, at the
// offset the (checked) header gives. Not mmap: a file truncated or changed after the check then
// gives a read error with the file's name instead of a SIGBUS, and loading converts every element
// to float anyway, so a zero-copy view would save little.
#pragma once

#include "datasets/safetensors_dtype.h"
#include "reference/tensor.h"

#include <cstdint>
#include <fstream>
#include <map>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace m3 {

// Any malformed file: the message names the file, the tensor when there is one, and what was
// expected against what was found.
struct SafetensorsError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The reference Rust implementation refuses headers over 100 MB too; M3's largest shard header
// (~1k tensors) is well under 1 MB.
inline constexpr std::uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::int64_t numel = 0;   // product of shape (1 for a scalar); checked against overflow
  std::uint64_t begin = 0;  // data_offsets, relative to the data section
  std::uint64_t end = 0;
  std::uint64_t nbytes() const { return end - begin; }
};

struct SafetensorsHeader {
  std::uint64_t header_bytes = 0;  // N
  std::uint64_t data_bytes = 0;    // file size - 8 - N
  std::vector<TensorInfo> tensors;  // in header (name) order
  std::map<std::string, std::string> metadata;
  std::unordered_map<std::string, std::size_t> by_name;  // name -> position in tensors
  const TensorInfo* find(std::string_view name) const;   // nullptr when absent
};

// Checks and parses N header bytes of a file of `file_bytes` bytes. `origin` names the file in
// errors. Throws SafetensorsError for anything wrong (see safetensors.cpp for the full list).
SafetensorsHeader parse_safetensors_header(std::string_view header_json, std::uint64_t file_bytes,
                                           std::string_view origin);

// A whole file held in memory: checks the 8-byte length and its bounds, then parses the header.
SafetensorsHeader parse_safetensors_bytes(std::span<const std::uint8_t> file, std::string_view origin);

class SafetensorsReader {
 public:
  // Opens and fully validates the header; throws SafetensorsError (also when it cannot be opened).
  explicit SafetensorsReader(const std::string& path);
  // The same over a file held in memory (tests, the fuzzer).
  static SafetensorsReader from_bytes(std::vector<std::uint8_t> bytes, std::string origin);

  SafetensorsReader(SafetensorsReader&&) noexcept = default;
  SafetensorsReader& operator=(SafetensorsReader&&) noexcept = default;

  const std::string& origin() const { return origin_; }
  const SafetensorsHeader& header() const { return header_; }
  std::uint64_t file_bytes() const { return file_bytes_; }
  // Throws SafetensorsError naming the file when there is no such tensor.
  const TensorInfo& tensor(std::string_view name) const;

  // Elements [first, first + count) of t, converted to float. Throws SafetensorsError when the
  // dtype does not read as float, the range is outside the tensor or the read fails.
  void read_f32(const TensorInfo& t, std::int64_t first, std::int64_t count, float* out);
  void read_f32(const TensorInfo& t, std::span<float> out);  // the whole tensor; out.size() == numel
  // [shape[0], prod(shape[1:])]; a vector [n] gives [n, 1], a scalar [1, 1].
  MatF read_mat(const TensorInfo& t);
  std::vector<std::uint8_t> read_raw(const TensorInfo& t);

 private:
  SafetensorsReader() = default;
  void read_bytes(std::uint64_t data_offset, std::uint64_t n, std::uint8_t* out);

  std::string origin_;
  std::uint64_t file_bytes_ = 0;
  SafetensorsHeader header_;
  std::ifstream file_;               // when reading a file
  std::vector<std::uint8_t> bytes_;  // when reading memory
  bool in_memory_ = false;
};

// Collects tensors, then writes them with a header padded by spaces to a multiple of 8 bytes (so
// the data section starts 8-aligned, as the reference implementation writes it). Tensors are
// laid out in the order added, without gaps.
class SafetensorsWriter {
 public:
  // The tensor's elements are the concatenation of `parts` (row-major), stored as `dtype` (F32,
  // BF16 or F16, rounded to nearest even). The parts are NOT copied: they must stay alive and
  // unchanged until write() / to_bytes(). Throws std::invalid_argument for a duplicate or empty
  // name, another dtype, or parts whose total size is not the shape's product.
  void add(std::string name, Dtype dtype, std::vector<std::int64_t> shape,
           std::vector<std::span<const float>> parts);
  // Bytes as they go into the file (any dtype; tests use it for fp8 and malformed files).
  void add_raw(std::string name, Dtype dtype, std::vector<std::int64_t> shape, std::vector<std::uint8_t> bytes);
  void set_metadata(std::string key, std::string value);

  std::size_t size() const { return entries_.size(); }
  std::uint64_t data_bytes() const { return data_bytes_; }
  std::string header_json() const;  // padded, as written

  void write(const std::string& path) const;   // throws SafetensorsError on I/O failure
  std::vector<std::uint8_t> to_bytes() const;

 private:
  struct Entry {
    std::string name;
    Dtype dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::span<const float>> parts;  // add()
    std::vector<std::uint8_t> raw;              // add_raw()
    std::uint64_t begin = 0, end = 0;
  };
  void push(Entry e, std::uint64_t nbytes);
  template <class Sink>
  void emit(Sink&& sink) const;

  std::vector<Entry> entries_;
  std::set<std::string> names_;
  std::map<std::string, std::string> metadata_;
  std::uint64_t data_bytes_ = 0;
};

// `m3h inspect FILE`: size, header length, tensor count, parameter count, dtype histogram,
// metadata and the first tensors with dtype, shape and offsets.
std::string describe_safetensors(const std::string& file);

}  // namespace m3
