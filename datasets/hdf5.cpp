// RAII layer over the HDF5 C API (hdf5.h).
#include "datasets/hdf5.h"

#include "reference/tensor.h"

#include <fmt/format.h>

namespace m3::h5 {

namespace {

// Checks an HDF5 return value (negative = failure) and throws naming the call, the object and
// file:line. HDF5's own stack printing is switched off once, so errors surface only through here.
#define M3_H5(call, object)                                                                           \
  ([&] {                                                                                               \
    auto r_ = (call);                                                                                  \
    if (r_ < 0)                                                                                        \
      throw H5Error(fmt::format("HDF5 call {} failed for '{}' at {}:{}", #call, object, __FILE__, __LINE__)); \
    return r_;                                                                                         \
  }())

void quiet_hdf5() {
  static const bool once = [] { return H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr) >= 0; }();
  (void)once;
}

std::string parent_of(const std::string& path) {
  auto pos = path.find_last_of('/');
  return pos == std::string::npos || pos == 0 ? "/" : path.substr(0, pos);
}

}  // namespace

File File::create(const std::string& path) {
  quiet_hdf5();
  hid_t id = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (id < 0) throw H5Error(fmt::format("cannot create HDF5 file '{}'", path));
  return File(Handle(id, H5Fclose), path);
}

File File::open_read(const std::string& path) {
  quiet_hdf5();
  if (H5Fis_hdf5(path.c_str()) <= 0) throw H5Error(fmt::format("'{}' is missing or not an HDF5 file", path));
  hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (id < 0) throw H5Error(fmt::format("cannot open HDF5 file '{}'", path));
  return File(Handle(id, H5Fclose), path);
}

File File::open_rw(const std::string& path) {
  quiet_hdf5();
  if (H5Fis_hdf5(path.c_str()) <= 0) throw H5Error(fmt::format("'{}' is missing or not an HDF5 file", path));
  hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  if (id < 0) throw H5Error(fmt::format("cannot open HDF5 file '{}' for writing", path));
  return File(Handle(id, H5Fclose), path);
}

bool File::exists(const std::string& path) const {
  if (path == "/") return true;
  // Every prefix must exist before H5Lexists may be asked about the next component.
  std::size_t pos = 0;
  while ((pos = path.find('/', pos + 1)) != std::string::npos)
    if (H5Lexists(id(), path.substr(0, pos).c_str(), H5P_DEFAULT) <= 0) return false;
  return H5Lexists(id(), path.c_str(), H5P_DEFAULT) > 0;
}

void File::ensure_group(const std::string& path) {
  if (path.empty() || path == "/" || exists(path)) return;
  ensure_group(parent_of(path));
  // No modification times: the same content gives the same bytes, so regenerated committed files
  // show no diff unless a value changed.
  Handle gcpl(M3_H5(H5Pcreate(H5P_GROUP_CREATE), path), H5Pclose);
  M3_H5(H5Pset_obj_track_times(gcpl.id(), false), path);
  Handle g(M3_H5(H5Gcreate2(id(), path.c_str(), H5P_DEFAULT, gcpl.id(), H5P_DEFAULT), path), H5Gclose);
}

void File::write_raw(const std::string& path, hid_t mem_type, hid_t file_type, const void* data,
                     std::span<const std::int64_t> dims) {
  ensure_group(parent_of(path));
  std::vector<hsize_t> d(dims.begin(), dims.end());
  Handle space(M3_H5(H5Screate_simple(static_cast<int>(d.size()), d.data(), nullptr), path), H5Sclose);
  Handle dcpl(M3_H5(H5Pcreate(H5P_DATASET_CREATE), path), H5Pclose);
  M3_H5(H5Pset_obj_track_times(dcpl.id(), false), path);  // reproducible bytes (ensure_group)
  Handle set(M3_H5(H5Dcreate2(id(), path.c_str(), file_type, space.id(), H5P_DEFAULT, dcpl.id(), H5P_DEFAULT),
                   path),
             H5Dclose);
  M3_H5(H5Dwrite(set.id(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), path);
}

void File::write(const std::string& p, const float* x, std::span<const std::int64_t> d) {
  write_raw(p, H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, x, d);
}
void File::write(const std::string& p, const double* x, std::span<const std::int64_t> d) {
  write_raw(p, H5T_NATIVE_DOUBLE, H5T_IEEE_F64LE, x, d);
}
void File::write(const std::string& p, const std::int32_t* x, std::span<const std::int64_t> d) {
  write_raw(p, H5T_NATIVE_INT32, H5T_STD_I32LE, x, d);
}
void File::write(const std::string& p, const std::int64_t* x, std::span<const std::int64_t> d) {
  write_raw(p, H5T_NATIVE_INT64, H5T_STD_I64LE, x, d);
}
void File::write_bf16(const std::string& p, const std::uint16_t* x, std::span<const std::int64_t> d) {
  write_raw(p, H5T_NATIVE_UINT16, H5T_STD_U16LE, x, d);
  set_attr(p, "dtype", std::string("bfloat16"));
}

void File::set_attr(const std::string& object, const std::string& name, const std::string& value) {
  Handle type(M3_H5(H5Tcopy(H5T_C_S1), object), H5Tclose);
  M3_H5(H5Tset_size(type.id(), std::max<std::size_t>(1, value.size())), object);
  Handle space(M3_H5(H5Screate(H5S_SCALAR), object), H5Sclose);
  if (H5Aexists_by_name(id(), object.c_str(), name.c_str(), H5P_DEFAULT) > 0)
    M3_H5(H5Adelete_by_name(id(), object.c_str(), name.c_str(), H5P_DEFAULT), object);
  Handle a(M3_H5(H5Acreate_by_name(id(), object.c_str(), name.c_str(), type.id(), space.id(), H5P_DEFAULT,
                                   H5P_DEFAULT, H5P_DEFAULT),
                 object + "@" + name),
           H5Aclose);
  const char* s = value.empty() ? "" : value.c_str();
  M3_H5(H5Awrite(a.id(), type.id(), s), object + "@" + name);
}

namespace {
template <class T>
void set_scalar_attr(hid_t file, const std::string& object, const std::string& name, hid_t mem, hid_t ftype,
                     T value) {
  Handle space(M3_H5(H5Screate(H5S_SCALAR), object), H5Sclose);
  if (H5Aexists_by_name(file, object.c_str(), name.c_str(), H5P_DEFAULT) > 0)
    M3_H5(H5Adelete_by_name(file, object.c_str(), name.c_str(), H5P_DEFAULT), object);
  Handle a(M3_H5(H5Acreate_by_name(file, object.c_str(), name.c_str(), ftype, space.id(), H5P_DEFAULT,
                                   H5P_DEFAULT, H5P_DEFAULT),
                 object + "@" + name),
           H5Aclose);
  M3_H5(H5Awrite(a.id(), mem, &value), object + "@" + name);
}
}  // namespace

void File::set_attr(const std::string& o, const std::string& n, std::int64_t v) {
  set_scalar_attr(id(), o, n, H5T_NATIVE_INT64, H5T_STD_I64LE, v);
}
void File::set_attr(const std::string& o, const std::string& n, double v) {
  set_scalar_attr(id(), o, n, H5T_NATIVE_DOUBLE, H5T_IEEE_F64LE, v);
}

bool File::has_attr(const std::string& object, const std::string& name) const {
  return exists(object) && H5Aexists_by_name(id(), object.c_str(), name.c_str(), H5P_DEFAULT) > 0;
}

std::string File::attr_string(const std::string& object, const std::string& name) const {
  if (!has_attr(object, name))
    throw H5Error(fmt::format("{}: attribute '{}' missing on '{}'", path_, name, object));
  Handle a(M3_H5(H5Aopen_by_name(id(), object.c_str(), name.c_str(), H5P_DEFAULT, H5P_DEFAULT), object), H5Aclose);
  Handle type(M3_H5(H5Aget_type(a.id()), object), H5Tclose);
  if (H5Tget_class(type.id()) != H5T_STRING)
    throw H5Error(fmt::format("{}: attribute '{}' on '{}' is not a string", path_, name, object));
  if (H5Tis_variable_str(type.id()) > 0) {
    char* s = nullptr;
    Handle mem(M3_H5(H5Tcopy(H5T_C_S1), object), H5Tclose);
    M3_H5(H5Tset_size(mem.id(), H5T_VARIABLE), object);
    // h5py writes UTF-8 strings: the memory type must carry the file's character set to convert.
    M3_H5(H5Tset_cset(mem.id(), H5Tget_cset(type.id())), object);
    M3_H5(H5Aread(a.id(), mem.id(), &s), object);
    std::string out = s ? s : "";
    H5free_memory(s);
    return out;
  }
  std::string out(H5Tget_size(type.id()), '\0');
  M3_H5(H5Aread(a.id(), type.id(), out.data()), object);
  while (!out.empty() && out.back() == '\0') out.pop_back();
  return out;
}

std::int64_t File::attr_int(const std::string& object, const std::string& name) const {
  if (!has_attr(object, name))
    throw H5Error(fmt::format("{}: attribute '{}' missing on '{}'", path_, name, object));
  Handle a(M3_H5(H5Aopen_by_name(id(), object.c_str(), name.c_str(), H5P_DEFAULT, H5P_DEFAULT), object), H5Aclose);
  Handle type(M3_H5(H5Aget_type(a.id()), object), H5Tclose);
  if (H5Tget_class(type.id()) != H5T_INTEGER)
    throw H5Error(fmt::format("{}: attribute '{}' on '{}' is not an integer", path_, name, object));
  std::int64_t v = 0;
  M3_H5(H5Aread(a.id(), H5T_NATIVE_INT64, &v), object);
  return v;
}

double File::attr_double(const std::string& object, const std::string& name) const {
  if (!has_attr(object, name))
    throw H5Error(fmt::format("{}: attribute '{}' missing on '{}'", path_, name, object));
  Handle a(M3_H5(H5Aopen_by_name(id(), object.c_str(), name.c_str(), H5P_DEFAULT, H5P_DEFAULT), object), H5Aclose);
  Handle type(M3_H5(H5Aget_type(a.id()), object), H5Tclose);
  const auto cls = H5Tget_class(type.id());
  if (cls != H5T_FLOAT && cls != H5T_INTEGER)
    throw H5Error(fmt::format("{}: attribute '{}' on '{}' is not a number", path_, name, object));
  double v = 0;
  M3_H5(H5Aread(a.id(), H5T_NATIVE_DOUBLE, &v), object);
  return v;
}

std::vector<std::int64_t> File::shape(const std::string& path) const {
  if (!exists(path)) throw H5Error(fmt::format("{}: dataset '{}' is missing", path_, path));
  Handle set(M3_H5(H5Dopen2(id(), path.c_str(), H5P_DEFAULT), path), H5Dclose);
  Handle space(M3_H5(H5Dget_space(set.id()), path), H5Sclose);
  int rank = M3_H5(H5Sget_simple_extent_ndims(space.id()), path);
  std::vector<hsize_t> d(rank);
  M3_H5(H5Sget_simple_extent_dims(space.id(), d.data(), nullptr), path);
  return {d.begin(), d.end()};
}

DType File::dtype(const std::string& path) const {
  if (!exists(path)) throw H5Error(fmt::format("{}: dataset '{}' is missing", path_, path));
  Handle set(M3_H5(H5Dopen2(id(), path.c_str(), H5P_DEFAULT), path), H5Dclose);
  Handle type(M3_H5(H5Dget_type(set.id()), path), H5Tclose);
  const auto cls = H5Tget_class(type.id());
  const auto size = H5Tget_size(type.id());
  if (cls == H5T_FLOAT) return size == 4 ? DType::F32 : DType::F64;
  if (cls == H5T_INTEGER) {
    if (size == 2 && has_attr(path, "dtype") && attr_string(path, "dtype") == "bfloat16") return DType::BF16;
    if (size == 4) return DType::I32;
    if (size == 8) return DType::I64;
  }
  throw H5Error(fmt::format("{}: dataset '{}' has an unsupported element type (class {}, {} bytes)", path_, path,
                            static_cast<int>(cls), size));
}

std::vector<std::string> File::datasets() const {
  std::vector<std::string> out;
#if H5_VERSION_GE(1, 12, 0)
  auto visit = [](hid_t, const char* name, const H5O_info2_t* info, void* op) -> herr_t {
#else
  auto visit = [](hid_t, const char* name, const H5O_info_t* info, void* op) -> herr_t {
#endif
    if (info->type == H5O_TYPE_DATASET) static_cast<std::vector<std::string>*>(op)->push_back(std::string("/") + name);
    return 0;
  };
#if H5_VERSION_GE(1, 12, 0)
  M3_H5(H5Ovisit3(id(), H5_INDEX_NAME, H5_ITER_INC, visit, &out, H5O_INFO_BASIC), path_);
#else
  M3_H5(H5Ovisit2(id(), H5_INDEX_NAME, H5_ITER_INC, visit, &out, H5O_INFO_BASIC), path_);
#endif
  return out;
}

std::vector<std::string> File::attr_names(const std::string& object) const {
  std::vector<std::string> out;
  auto visit = [](hid_t, const char* name, const H5A_info_t*, void* op) -> herr_t {
    static_cast<std::vector<std::string>*>(op)->push_back(name);
    return 0;
  };
  hsize_t idx = 0;
  M3_H5(H5Aiterate_by_name(id(), object.c_str(), H5_INDEX_NAME, H5_ITER_INC, &idx, visit, &out, H5P_DEFAULT), object);
  return out;
}

template <class T>
std::vector<T> File::read(const std::string& path) const {
  const auto dims = shape(path);
  std::size_t n = 1;
  for (auto d : dims) n *= static_cast<std::size_t>(d);
  std::vector<T> out(n);
  Handle set(M3_H5(H5Dopen2(id(), path.c_str(), H5P_DEFAULT), path), H5Dclose);
  if (dtype(path) == DType::BF16) {
    std::vector<std::uint16_t> raw(n);
    M3_H5(H5Dread(set.id(), H5T_NATIVE_UINT16, H5S_ALL, H5S_ALL, H5P_DEFAULT, raw.data()), path);
    for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(bf16_bits_to_float(raw[i]));
    return out;
  }
  hid_t mem = std::is_same_v<T, float>          ? H5T_NATIVE_FLOAT
              : std::is_same_v<T, double>       ? H5T_NATIVE_DOUBLE
              : std::is_same_v<T, std::int32_t> ? H5T_NATIVE_INT32
                                                : H5T_NATIVE_INT64;
  M3_H5(H5Dread(set.id(), mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()), path);
  return out;
}

template std::vector<float> File::read<float>(const std::string&) const;
template std::vector<double> File::read<double>(const std::string&) const;
template std::vector<std::int32_t> File::read<std::int32_t>(const std::string&) const;
template std::vector<std::int64_t> File::read<std::int64_t>(const std::string&) const;

}  // namespace m3::h5
