// Op case: linear (reference/ops/linear.h), y = x W^T with W in the checkpoint's [out, in] layout.
// W is scaled by 1/sqrt(H_in) (the usual init), so y stays O(1) like x.
#include "compare/cases/case.h"
#include "reference/ops/linear.h"

#if M3_HAVE_GPU
#include "gpu/kernels/linear.h"
#endif

#include <cmath>

namespace m3::cases {

namespace {

class LinearCase final : public OpCase {
 public:
  std::string op() const override { return "linear"; }
  std::string summary() const override { return "y = x W^T"; }
  std::vector<ParamSpec> param_specs() const override {
    return {{"T", 7, true, 1, "rows"}, {"H_in", 45, true, 1, "input width"}, {"H_out", 33, true, 1, "output width"}};
  }
  std::vector<TensorSpec> inputs(const Params& p) const override {
    return {{"x", Kind::ACT, {pint(p, "T"), pint(p, "H_in")}, "[T, H_in]"},
            {"w", Kind::ACT, {pint(p, "H_out"), pint(p, "H_in")}, "[H_out, H_in]"}};
  }
  std::vector<TensorSpec> outputs(const Params& p) const override {
    return {{"y", Kind::ACT, {pint(p, "T"), pint(p, "H_out")}, "[T, H_out]"}};
  }
  Tensors generate(const Params& p, std::uint64_t seed) const override {
    const auto specs = inputs(p);
    return {{"x", randn(specs[0].dims, seed, "linear.x")},
            {"w", randn(specs[1].dims, seed, "linear.w", 1.0 / std::sqrt(static_cast<double>(pint(p, "H_in"))))}};
  }
  Tensors run(const Params& p, const Tensors& in, Precision prec) const override {
    return prec == Precision::FP64 ? run_t<double>(p, in) : run_t<float>(p, in);
  }
#if M3_HAVE_GPU
  Tensors run_gpu(const Params& p, const Tensors& in) const override {
    using namespace gpu_io;
    const int T = dim(pint(p, "T"), "T"), H_in = dim(pint(p, "H_in"), "H_in"), H_out = dim(pint(p, "H_out"), "H_out");
    const gpu::Stream s;
    const gpu::CublasHandle h;
    const auto x = bf16_in(in.at("x"), s.get());  // [T, H_in]
    const auto w = bf16_in(in.at("w"), s.get());  // [H_out, H_in]
    auto y = out<gpu::bf16>({T, H_out}, s.get());  // [T, H_out]
    gpu::linear(h.get(), x.data(), w.data(), y.data(), T, H_in, H_out, s.get());
    return {{"y", get(y, {T, H_out}, s.get())}};
  }
#endif

 private:
  template <class T>
  static Tensors run_t(const Params&, const Tensors& in) {
    Mat<T> y;  // [T, H_out]
    ref::linear(mat<T>(in.at("x")), mat<T>(in.at("w")), y);
    return {{"y", from_mat(y)}};
  }
};

}  // namespace

const OpCase& linear_case() {
  static const LinearCase c;
  return c;
}

}  // namespace m3::cases
