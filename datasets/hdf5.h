// A small RAII layer over the HDF5 C API: files, groups, datasets and attributes of the dtypes the
// harness stores (float32, float64, int32, int64; bfloat16 as uint16 with attribute dtype="bfloat16").
// Every failing HDF5 call throws H5Error naming the call, the object path and file:line.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace m3::h5 {

struct H5Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Owns one hid_t and closes it with the matching H5*close.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer close) : id_(id), close_(close) {}
  Handle(Handle&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) { reset(); id_ = o.id_; close_ = o.close_; o.id_ = H5I_INVALID_HID; }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { reset(); }
  hid_t id() const { return id_; }
  explicit operator bool() const { return id_ >= 0; }

 private:
  void reset() {
    if (id_ >= 0 && close_) close_(id_);
    id_ = H5I_INVALID_HID;
  }
  hid_t id_ = H5I_INVALID_HID;
  Closer close_ = nullptr;
};

enum class DType { F32, F64, I32, I64, BF16 };

class File {
 public:
  // Creates (truncating) or opens read-only. The error names the path.
  static File create(const std::string& path);
  static File open_read(const std::string& path);
  // Opens an existing file for reading and writing (tests use it to damage files on purpose).
  static File open_rw(const std::string& path);

  const std::string& path() const { return path_; }
  hid_t id() const { return h_.id(); }

  // Creates every missing group of `path` ("/trace/blk.0" creates /trace then /trace/blk.0).
  void ensure_group(const std::string& path);

  // Writes a dataset of `dims` from `data` (row-major); parents created as needed.
  void write(const std::string& path, const float* data, std::span<const std::int64_t> dims);
  void write(const std::string& path, const double* data, std::span<const std::int64_t> dims);
  void write(const std::string& path, const std::int32_t* data, std::span<const std::int64_t> dims);
  void write(const std::string& path, const std::int64_t* data, std::span<const std::int64_t> dims);
  // bfloat16 bits stored as uint16 with attribute dtype = "bfloat16".
  void write_bf16(const std::string& path, const std::uint16_t* data, std::span<const std::int64_t> dims);

  // Attributes on a group or dataset (object "/" is the root).
  void set_attr(const std::string& object, const std::string& name, const std::string& value);
  void set_attr(const std::string& object, const std::string& name, std::int64_t value);
  void set_attr(const std::string& object, const std::string& name, double value);

  bool exists(const std::string& path) const;
  // Shape and element type of a dataset; throws H5Error when it is missing.
  std::vector<std::int64_t> shape(const std::string& path) const;
  DType dtype(const std::string& path) const;
  // Reads a whole dataset converted to T (HDF5 converts numeric types; bfloat16 is widened).
  template <class T>
  std::vector<T> read(const std::string& path) const;
  std::string attr_string(const std::string& object, const std::string& name) const;
  std::int64_t attr_int(const std::string& object, const std::string& name) const;
  // A numeric attribute (float or integer) widened to double.
  double attr_double(const std::string& object, const std::string& name) const;
  bool has_attr(const std::string& object, const std::string& name) const;
  // Every dataset of the file (full paths, in HDF5's name order) and the names of an object's
  // attributes: what `m3h inspect` prints.
  std::vector<std::string> datasets() const;
  std::vector<std::string> attr_names(const std::string& object) const;

 private:
  File(Handle h, std::string path) : h_(std::move(h)), path_(std::move(path)) {}
  void write_raw(const std::string& path, hid_t mem_type, hid_t file_type, const void* data,
                 std::span<const std::int64_t> dims);
  Handle h_;
  std::string path_;
};

}  // namespace m3::h5
