// Op case files (case.h): the registry, parameters, storage rounding, the reference run, and the
// HDF5 writer and validating reader.
#include "compare/cases/case.h"

#include "datasets/hdf5.h"
#include "reference/rng.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <set>
#include <tuple>
#include <type_traits>

namespace m3::cases {

// Defined in compare/cases/<op>.cpp. Listed here by hand: self-registering statics in a static
// library are dropped by the linker when nothing else references their object file.
const OpCase& embedding_case();
const OpCase& rms_norm_case();
const OpCase& linear_case();
const OpCase& qk_norm_rope_case();
const OpCase& attention_dense_case();
const OpCase& msa_index_case();
const OpCase& msa_select_case();
const OpCase& msa_attention_case();
const OpCase& swiglu_oai_case();
const OpCase& moe_router_case();
const OpCase& moe_experts_case();
const OpCase& lm_head_case();

const std::vector<const OpCase*>& all_ops() {
  static const std::vector<const OpCase*> ops = {
      &embedding_case(),     &rms_norm_case(),  &linear_case(),        &qk_norm_rope_case(),
      &attention_dense_case(), &msa_index_case(), &msa_select_case(),  &msa_attention_case(),
      &swiglu_oai_case(),    &moe_router_case(), &moe_experts_case(),  &lm_head_case()};
  return ops;
}

Tensors OpCase::run_gpu(const Params&, const Tensors&) const {
  throw CaseError(fmt::format("op {} has no GPU twin; use --device cpu", op()));
}

const OpCase& find_op(std::string_view op) {
  std::vector<std::string> names;
  for (const OpCase* c : all_ops()) {
    if (c->op() == op) return *c;
    names.push_back(c->op());
  }
  throw CaseError(fmt::format("unknown op '{}'; known ops: {}", op, fmt::join(names, ", ")));
}

// --- parameters ---

namespace {

void check_params(const OpCase& op, const Params& p) {
  for (const ParamSpec& s : op.param_specs()) {
    const double v = p.at(s.name);
    if (s.is_int && v != std::floor(v))
      throw std::invalid_argument(fmt::format("{}: parameter {} = {} must be an integer", op.op(), s.name, v));
    if (!(v >= s.min))
      throw std::invalid_argument(fmt::format("{}: parameter {} = {} must be >= {} ({})", op.op(), s.name, v, s.min,
                                              s.help));
  }
  op.check(p);
}

}  // namespace

Params resolve_params(const OpCase& op, const std::vector<std::string>& assignments) {
  Params p;
  std::vector<std::string> names;
  for (const ParamSpec& s : op.param_specs()) {
    p[s.name] = s.def;
    names.push_back(s.name);
  }
  for (const std::string& a : assignments) {
    const auto eq = a.find('=');
    const std::string name = a.substr(0, eq);
    if (eq == std::string::npos || !p.count(name))
      throw CaseError(fmt::format("'{}' is not a parameter of {}: expected NAME=VALUE with NAME one of {}", a,
                                  op.op(), fmt::join(names, ", ")));
    const std::string value = a.substr(eq + 1);
    char* end = nullptr;
    const double v = std::strtod(value.c_str(), &end);
    if (value.empty() || *end != '\0')
      throw CaseError(fmt::format("{}: '{}' is not a number", name, value));
    p[name] = v;
  }
  try {
    check_params(op, p);
  } catch (const std::invalid_argument& e) {
    throw CaseError(e.what());
  }
  return p;
}

std::string params_str(const OpCase& op, const Params& p) {
  std::vector<std::string> parts;
  for (const ParamSpec& s : op.param_specs())
    parts.push_back(s.is_int ? fmt::format("{}={}", s.name, pint(p, s.name))
                             : fmt::format("{}={:g}", s.name, preal(p, s.name)));
  return fmt::format("{}", fmt::join(parts, " "));
}

std::int64_t pint(const Params& p, const std::string& name) {
  auto it = p.find(name);
  if (it == p.end()) throw std::logic_error("case parameter '" + name + "' is not defined");
  return static_cast<std::int64_t>(it->second);
}
double preal(const Params& p, const std::string& name) {
  auto it = p.find(name);
  if (it == p.end()) throw std::logic_error("case parameter '" + name + "' is not defined");
  return it->second;
}

// --- storage ---

Storage storage_of(Kind k, Precision p) {
  switch (k) {
    case Kind::IDS: return Storage::I32;
    case Kind::POS: return Storage::I64;
    case Kind::F32: return p == Precision::FP64 ? Storage::F64 : Storage::F32;
    case Kind::ACT: return p == Precision::FP64 ? Storage::F64 : p == Precision::BF16 ? Storage::BF16 : Storage::F32;
  }
  return Storage::F32;
}

std::string_view storage_name(Storage s) {
  switch (s) {
    case Storage::F32: return "float32";
    case Storage::F64: return "float64";
    case Storage::BF16: return "bfloat16";
    case Storage::I32: return "int32";
    case Storage::I64: return "int64";
  }
  return "?";
}

Precision tier_of(Kind k, Precision p) {
  const Storage s = storage_of(k, p);
  return s == Storage::BF16 ? Precision::BF16 : s == Storage::F64 ? Precision::FP64 : Precision::FP32;
}

void round_to_storage(const std::vector<TensorSpec>& specs, Precision p, Tensors& t) {
  for (const TensorSpec& s : specs) {
    auto it = t.find(s.name);
    if (it == t.end()) continue;
    const Storage st = storage_of(s.kind, p);
    for (double& x : it->second.f) {
      if (st == Storage::F32) x = static_cast<float>(x);
      else if (st == Storage::BF16) x = round_bf16(static_cast<float>(x));
    }
  }
}

std::int64_t element_count(const cmp::Dims& dims) {
  std::int64_t n = 1;
  for (auto d : dims) n *= d;
  return n;
}

// --- reference run ---

Tensors run_reference(const OpCase& op, const Params& p, const Tensors& inputs, Precision prec) {
  Tensors in = inputs;
  round_to_storage(op.inputs(p), prec, in);
  Tensors out = op.run(p, in, prec);
  const auto specs = op.outputs(p);
  for (const TensorSpec& s : specs) {
    auto it = out.find(s.name);
    if (it == out.end() || it->second.dims != s.dims)
      throw std::logic_error(fmt::format("{}: the reference returned no output '{}' of shape {}", op.op(), s.name,
                                         cmp::coord_str(s.dims)));
  }
  round_to_storage(specs, prec, out);
  return out;
}

Case make_case(const OpCase& op, const Params& p, Precision prec, std::uint64_t seed, std::string generator) {
  Case c{op.op(), prec, seed, std::move(generator), p, op.generate(p, seed), {}};
  round_to_storage(op.inputs(p), prec, c.inputs);
  c.outputs = run_reference(op, p, c.inputs, prec);
  return c;
}

// --- writing ---

namespace {

void write_tensor(h5::File& f, const std::string& path, const TensorSpec& s, const Tensor& t, Precision p) {
  if (t.dims != s.dims)
    throw CaseError(fmt::format("{}: tensor {} has shape {}, expected {} = {}", f.path(), path,
                                cmp::coord_str(t.dims), s.dims_expr, cmp::coord_str(s.dims)));
  const std::size_t n = static_cast<std::size_t>(element_count(t.dims));
  switch (storage_of(s.kind, p)) {
    case Storage::F32: {
      std::vector<float> v(t.f.begin(), t.f.end());
      f.write(path, v.data(), t.dims);
      break;
    }
    case Storage::F64: f.write(path, t.f.data(), t.dims); break;
    case Storage::BF16: {
      std::vector<std::uint16_t> v(n);
      for (std::size_t i = 0; i < n; ++i) v[i] = float_to_bf16_bits(static_cast<float>(t.f[i]));
      f.write_bf16(path, v.data(), t.dims);
      break;
    }
    case Storage::I32: {
      std::vector<std::int32_t> v(n);
      for (std::size_t i = 0; i < n; ++i) {
        if (t.i[i] < std::numeric_limits<std::int32_t>::min() || t.i[i] > std::numeric_limits<std::int32_t>::max())
          throw CaseError(fmt::format("{}: id {} of {} does not fit int32", f.path(), t.i[i], path));
        v[i] = static_cast<std::int32_t>(t.i[i]);
      }
      f.write(path, v.data(), t.dims);
      break;
    }
    case Storage::I64: f.write(path, t.i.data(), t.dims); break;
  }
}

}  // namespace

void write_case(const std::string& path, const Case& c) {
  const OpCase& op = find_op(c.op);
  // Written beside the target and renamed, so an interrupted run never leaves half a case.
  const std::string tmp = path + ".tmp";
  try {
    h5::File f = h5::File::create(tmp);
    f.set_attr("/", "format", std::string(kCaseFormat));
    f.set_attr("/", "schema_version", kCaseSchemaVersion);
    f.set_attr("/", "op", c.op);
    f.set_attr("/", "precision", std::string(precision_name(c.precision)));
    f.set_attr("/", "seed", static_cast<std::int64_t>(c.seed));
    f.set_attr("/", "generator", c.generator);
    for (const ParamSpec& s : op.param_specs()) {
      if (s.is_int) f.set_attr("/", s.name, pint(c.params, s.name));
      else f.set_attr("/", s.name, preal(c.params, s.name));
    }
    for (const auto& [group, specs, tensors] :
         {std::tuple{"inputs", op.inputs(c.params), &c.inputs}, std::tuple{"outputs", op.outputs(c.params), &c.outputs}})
      for (const TensorSpec& s : specs) {
        auto it = tensors->find(s.name);
        if (it == tensors->end()) throw CaseError(fmt::format("case {}: no {} tensor '{}'", c.op, group, s.name));
        write_tensor(f, fmt::format("/{}/{}", group, s.name), s, it->second, c.precision);
      }
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    throw CaseError(fmt::format("cannot rename {} to {}", tmp, path));
}

// --- reading ---

namespace {

Storage storage_from(h5::DType d) {
  switch (d) {
    case h5::DType::F32: return Storage::F32;
    case h5::DType::F64: return Storage::F64;
    case h5::DType::BF16: return Storage::BF16;
    case h5::DType::I32: return Storage::I32;
    case h5::DType::I64: return Storage::I64;
  }
  return Storage::F32;
}

}  // namespace

Case read_case(const std::string& path) {
  std::string hint = "write a case with `m3h case --op OP --out FILE` or datasets/tools/dump_case.py";
  auto fail = [&](const std::string& what) {
    return CaseError(fmt::format("{}: {}\nHINT: {}", path, what, hint));
  };
  h5::File f = [&] {
    try {
      return h5::File::open_read(path);
    } catch (const h5::H5Error& e) {  // its message names the path already
      throw CaseError(fmt::format("{}\nHINT: {}", e.what(), hint));
    }
  }();
  try {
    if (f.has_attr("/", "generator") && !f.attr_string("/", "generator").empty())
      hint = fmt::format("the file says it was written by `{}`; run that again (the committed cases: "
                         "scripts/make-cases)", f.attr_string("/", "generator"));
    if (!f.has_attr("/", "format"))
      throw fail(fmt::format("not an op case file: root attribute 'format' is missing (expected '{}')", kCaseFormat));
    if (const auto fmt_attr = f.attr_string("/", "format"); fmt_attr != kCaseFormat)
      throw fail(fmt::format("not an op case file: attribute format is '{}', expected '{}'", fmt_attr, kCaseFormat));
    if (!f.has_attr("/", "schema_version") || f.attr_int("/", "schema_version") != kCaseSchemaVersion)
      throw fail(fmt::format("attribute schema_version is {}, expected {}",
                             f.has_attr("/", "schema_version") ? std::to_string(f.attr_int("/", "schema_version"))
                                                               : "missing",
                             kCaseSchemaVersion));
    for (const char* a : {"op", "precision"})
      if (!f.has_attr("/", a)) throw fail(fmt::format("root attribute '{}' is missing", a));
    Case c;
    c.op = f.attr_string("/", "op");
    const OpCase* op = nullptr;
    try {
      op = &find_op(c.op);
      c.precision = parse_precision(f.attr_string("/", "precision"));
    } catch (const std::invalid_argument& e) {
      throw fail(e.what());
    }
    c.seed = f.has_attr("/", "seed") ? static_cast<std::uint64_t>(f.attr_int("/", "seed")) : 0;
    c.generator = f.has_attr("/", "generator") ? f.attr_string("/", "generator") : "";
    for (const ParamSpec& s : op->param_specs()) {
      if (!f.has_attr("/", s.name))
        throw fail(fmt::format("parameter attribute '{}' of op {} is missing ({})", s.name, c.op, s.help));
      c.params[s.name] = s.is_int ? static_cast<double>(f.attr_int("/", s.name)) : f.attr_double("/", s.name);
    }
    try {
      check_params(*op, c.params);
    } catch (const std::invalid_argument& e) {
      throw fail(e.what());
    }
    auto load = [&](std::string_view group, const std::vector<TensorSpec>& specs, Tensors& tensors) {
      for (const TensorSpec& s : specs) {
        const std::string ds = fmt::format("/{}s/{}", group, s.name);
        const Storage want = storage_of(s.kind, c.precision);
        if (!f.exists(ds))
          throw fail(fmt::format("{} {} is missing (expected {} {} = {})", group, ds, storage_name(want), s.dims_expr,
                                 cmp::coord_str(s.dims)));
        const auto shape = f.shape(ds);
        if (shape != s.dims)
          throw fail(fmt::format("{} {} has shape {}, expected {} = {}", group, ds, cmp::coord_str(shape),
                                 s.dims_expr, cmp::coord_str(s.dims)));
        const Storage got = storage_from(f.dtype(ds));
        if (got != want)
          throw fail(fmt::format("{} {} is {}, expected {} in a {} case", group, ds, storage_name(got),
                                 storage_name(want), precision_name(c.precision)));
        Tensor t;
        t.dims = shape;
        if (s.kind == Kind::IDS || s.kind == Kind::POS) t.i = f.read<std::int64_t>(ds);
        else t.f = f.read<double>(ds);
        if (group == "input")
          for (std::size_t i = 0; i < t.f.size(); ++i)
            if (std::isnan(t.f[i]))
              throw fail(fmt::format("input {} has NaN at {}", ds,
                                     cmp::coord_str(cmp::unravel(static_cast<std::int64_t>(i), shape))));
        tensors[s.name] = std::move(t);
      }
    };
    load("input", op->inputs(c.params), c.inputs);
    try {
      op->check_inputs(c.params, c.inputs);
    } catch (const std::invalid_argument& e) {
      throw fail(e.what());
    }
    load("output", op->outputs(c.params), c.outputs);
    return c;
  } catch (const h5::H5Error& e) {
    throw fail(e.what());
  }
}

}  // namespace m3::cases

#if M3_HAVE_GPU
// --- GPU uploads and downloads (case.h, gpu_io) ---

namespace m3::cases::gpu_io {

namespace {

template <class T>
gpu::DeviceBuffer<T> upload(const std::vector<T>& host, cudaStream_t s) {
  gpu::DeviceBuffer<T> d(host.size());
  if (!host.empty()) d.upload(host, s);
  return d;
}

void check_size(std::size_t got, const cmp::Dims& dims) {
  if (got < static_cast<std::size_t>(element_count(dims)))
    throw std::logic_error(fmt::format("gpu_io: a device buffer of {} elements for a tensor {}", got,
                                       cmp::coord_str(dims)));
}

}  // namespace

gpu::DeviceBuffer<gpu::bf16> bf16_in(const Tensor& t, cudaStream_t s) {
  const std::vector<float> f(t.f.begin(), t.f.end());
  return upload(gpu::to_bf16(f.data(), f.size()), s);
}

gpu::DeviceBuffer<float> f32_in(const Tensor& t, cudaStream_t s) {
  return upload(std::vector<float>(t.f.begin(), t.f.end()), s);
}

gpu::DeviceBuffer<std::int32_t> i32_in(const Tensor& t, cudaStream_t s) {
  std::vector<std::int32_t> v(t.i.size());
  for (std::size_t k = 0; k < v.size(); ++k) {
    if (t.i[k] < std::numeric_limits<std::int32_t>::min() || t.i[k] > std::numeric_limits<std::int32_t>::max())
      throw CaseError(fmt::format("id {} at {} does not fit int32", t.i[k], k));
    v[k] = static_cast<std::int32_t>(t.i[k]);
  }
  return upload(v, s);
}

gpu::DeviceBuffer<std::int64_t> i64_in(const Tensor& t, cudaStream_t s) { return upload(t.i, s); }

template <class T>
gpu::DeviceBuffer<T> out(const cmp::Dims& dims, cudaStream_t s) {
  gpu::DeviceBuffer<T> d(static_cast<std::size_t>(element_count(dims)));
  d.fill_bytes(std::is_integral_v<T> ? 0x80 : 0xFF, s);
  return d;
}
template gpu::DeviceBuffer<gpu::bf16> out<gpu::bf16>(const cmp::Dims&, cudaStream_t);
template gpu::DeviceBuffer<float> out<float>(const cmp::Dims&, cudaStream_t);
template gpu::DeviceBuffer<std::int32_t> out<std::int32_t>(const cmp::Dims&, cudaStream_t);

Tensor get(const gpu::DeviceBuffer<gpu::bf16>& d, const cmp::Dims& dims, cudaStream_t s) {
  check_size(d.size(), dims);
  const auto h = d.download(s);
  const auto f = gpu::from_bf16(h.data(), static_cast<std::size_t>(element_count(dims)));
  return Tensor{dims, {f.begin(), f.end()}, {}};
}

Tensor get(const gpu::DeviceBuffer<float>& d, const cmp::Dims& dims, cudaStream_t s) {
  check_size(d.size(), dims);
  const auto h = d.download(s);
  return Tensor{dims, {h.begin(), h.begin() + element_count(dims)}, {}};
}

Tensor get(const gpu::DeviceBuffer<std::int32_t>& d, const cmp::Dims& dims, cudaStream_t s) {
  check_size(d.size(), dims);
  const auto h = d.download(s);
  return Tensor{dims, {}, {h.begin(), h.begin() + element_count(dims)}};
}

int dim(std::int64_t v, const char* what) {
  if (v < 0 || v > std::numeric_limits<int>::max())
    throw CaseError(fmt::format("{} = {} does not fit the GPU kernels' int dimensions", what, v));
  return static_cast<int>(v);
}

}  // namespace m3::cases::gpu_io
#endif
