// Op case: rms_norm (reference/ops/rms_norm.h), Gemma RMSNorm y = x rsqrt(mean(x^2) + eps) (1 + w).
// heads = 0 normalizes whole rows (rms_norm); heads = h > 0 normalizes each of the h slices of
// H/h values with one shared w [H/h] (rms_norm_heads: QK-norm and the index norms).
// Rows get different scales (1/8 .. 8) so the normalization has something to undo.
#include "compare/cases/case.h"
#include "reference/ops/rms_norm.h"

#if M3_HAVE_GPU
#include "gpu/kernels/qk_norm_rope.h"
#include "gpu/kernels/rms_norm.h"
#endif

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

namespace m3::cases {

namespace {

class RmsNormCase final : public OpCase {
 public:
  std::string op() const override { return "rms_norm"; }
  std::string summary() const override { return "Gemma RMSNorm per row (heads=0) or per head slice (heads>0)"; }
  std::vector<ParamSpec> param_specs() const override {
    return {{"T", 5, true, 1, "rows"},
            {"H", 42, true, 1, "row width"},
            {"heads", 0, true, 0, "0: one norm per row; h: h head slices of H/h, w shared"},
            {"eps", 1e-6, false, 0, "added to the mean of squares"}};
  }
  void check(const Params& p) const override {
    const auto heads = pint(p, "heads");
    if (heads > 0 && pint(p, "H") % heads != 0)
      throw std::invalid_argument(
          fmt::format("rms_norm: H = {} is not divisible by heads = {}", pint(p, "H"), heads));
  }
  std::vector<TensorSpec> inputs(const Params& p) const override {
    const auto heads = pint(p, "heads"), H = pint(p, "H");
    return {{"x", Kind::ACT, {pint(p, "T"), H}, "[T, H]"},
            heads > 0 ? TensorSpec{"w", Kind::ACT, {H / heads}, "[H/heads]"} : TensorSpec{"w", Kind::ACT, {H}, "[H]"}};
  }
  std::vector<TensorSpec> outputs(const Params& p) const override {
    return {{"y", Kind::ACT, {pint(p, "T"), pint(p, "H")}, "[T, H]"}};
  }
  Tensors generate(const Params& p, std::uint64_t seed) const override {
    const auto specs = inputs(p);
    Tensors in;
    in["x"] = randn(specs[0].dims, seed, "rms_norm.x");
    const std::int64_t T = pint(p, "T"), H = pint(p, "H");
    for (std::int64_t t = 0; t < T; ++t) {
      const double scale = std::ldexp(1.0, static_cast<int>(t % 7) - 3);  // 2^-3 .. 2^3: exact in bf16
      for (std::int64_t c = 0; c < H; ++c) in["x"].f[static_cast<std::size_t>(t * H + c)] *= scale;
    }
    in["w"] = randn(specs[1].dims, seed, "rms_norm.w", 0.5);  // Gemma w sits around 0: (1 + w)
    return in;
  }
  Tensors run(const Params& p, const Tensors& in, Precision prec) const override {
    return prec == Precision::FP64 ? run_t<double>(p, in) : run_t<float>(p, in);
  }
#if M3_HAVE_GPU
  // heads = 0: gpu::rms_norm. heads > 0: gpu::qk_norm_rope with R = 0 (no rotation), which is
  // exactly rms_norm_heads: one Gemma RMSNorm per H/heads slice with the shared w (d <= 512).
  Tensors run_gpu(const Params& p, const Tensors& in) const override {
    using namespace gpu_io;
    const int T = dim(pint(p, "T"), "T"), H = dim(pint(p, "H"), "H"), heads = dim(pint(p, "heads"), "heads");
    const gpu::Stream s;
    const auto x = bf16_in(in.at("x"), s.get());  // [T, H]
    const auto w = bf16_in(in.at("w"), s.get());  // [H] or [H/heads]
    auto y = out<gpu::bf16>({T, H}, s.get());     // [T, H]
    if (heads == 0)
      gpu::rms_norm(x.data(), w.data(), preal(p, "eps"), y.data(), T, H, s.get());
    else
      gpu::qk_norm_rope(x.data(), heads, H / heads, w.data(), preal(p, "eps"), /*R=*/0, /*theta=*/1.0,
                        /*positions=*/nullptr, y.data(), T, s.get());
    return {{"y", get(y, {T, H}, s.get())}};
  }
#endif

 private:
  template <class T>
  static Tensors run_t(const Params& p, const Tensors& in) {
    const auto heads = static_cast<int>(pint(p, "heads"));
    Mat<T> y;  // [T, H]
    if (heads == 0) ref::rms_norm(mat<T>(in.at("x")), vec<T>(in.at("w")), preal(p, "eps"), y);
    else ref::rms_norm_heads(mat<T>(in.at("x")), heads, vec<T>(in.at("w")), preal(p, "eps"), y);
    return {{"y", from_mat(y)}};
  }
};

}  // namespace

const OpCase& rms_norm_case() {
  static const RmsNormCase c;
  return c;
}

}  // namespace m3::cases
