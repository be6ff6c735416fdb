// Run files (run_file.h).
#include "datasets/run_file.h"

#include "datasets/hdf5.h"

#include <array>

namespace m3 {

TraceFn TraceRecorder::fn() {
  return [this](int seq, const std::string& name, const TraceView& v) {
    if (seq != 0) return;
    Tensor t{v.dtype, v.rows, v.cols, {}, {}, {}};
    for (std::int64_t r = 0; r < v.rows; ++r)
      for (std::int64_t c = 0; c < v.cols; ++c) {
        const std::int64_t i = r * v.row_stride + c;
        switch (v.dtype) {
          case TraceView::DType::F32: t.f32.push_back(static_cast<const float*>(v.data)[i]); break;
          case TraceView::DType::F64: t.f64.push_back(static_cast<const double*>(v.data)[i]); break;
          case TraceView::DType::I32: t.i32.push_back(static_cast<const std::int32_t*>(v.data)[i]); break;
        }
      }
    t_.insert_or_assign(name, std::move(t));
  };
}

void write_run_file(const std::string& path, const RunRecord& r) {
  auto f = h5::File::create(path);
  f.set_attr("/", "format", std::string(kRunFormat));
  f.set_attr("/", "schema_version", kRunSchemaVersion);
  f.set_attr("/", "generator", r.generator);
  f.set_attr("/", "seed", static_cast<std::int64_t>(r.seed));
  f.set_attr("/", "config", r.config_json);
  f.set_attr("/", "precision", r.precision);
  const std::array<std::int64_t, 1> nt{static_cast<std::int64_t>(r.prompt.size())};
  f.write("/inputs/tokens", r.prompt.data(), nt);
  const std::array<std::int64_t, 1> ng{static_cast<std::int64_t>(r.generated.size())};
  f.write("/decode/tokens", r.generated.data(), ng);
  if (r.logits) {
    const MatF l = r.logits->cast<float>();  // [T + K, V]
    const std::array<std::int64_t, 2> d{l.rows(), l.cols()};
    f.write("/logits", l.data(), d);
  }
  if (r.trace) {
    for (const auto& [name, t] : r.trace->tensors()) {
      const std::array<std::int64_t, 2> d{t.rows, t.cols};
      const std::string p = "/trace/" + name;
      switch (t.dtype) {
        case TraceView::DType::F32: f.write(p, t.f32.data(), d); break;
        case TraceView::DType::F64: f.write(p, t.f64.data(), d); break;
        case TraceView::DType::I32: f.write(p, t.i32.data(), d); break;
      }
    }
  }
}

}  // namespace m3
