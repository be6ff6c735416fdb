// Op case: lm_head (reference/ops/lm_head.h), logits = W_lm RMSNorm_final(h), W_lm untied from
// the embedding. A V off any power of two by default.
#include "compare/cases/case.h"
#include "reference/ops/lm_head.h"

#if M3_HAVE_GPU
#include "gpu/kernels/lm_head.h"
#endif

#include <cmath>

namespace m3::cases {

namespace {

class LmHeadCase final : public OpCase {
 public:
  std::string op() const override { return "lm_head"; }
  std::string summary() const override { return "logits = W RMSNorm(h)"; }
  std::vector<ParamSpec> param_specs() const override {
    return {{"T", 4, true, 1, "rows"},
            {"H", 32, true, 1, "hidden size"},
            {"V", 61, true, 1, "vocabulary"},
            {"eps", 1e-6, false, 0, "final RMSNorm epsilon"}};
  }
  std::vector<TensorSpec> inputs(const Params& p) const override {
    const auto H = pint(p, "H");
    return {{"h", Kind::ACT, {pint(p, "T"), H}, "[T, H]"},
            {"norm_w", Kind::ACT, {H}, "[H]"},
            {"w", Kind::ACT, {pint(p, "V"), H}, "[V, H]"}};
  }
  std::vector<TensorSpec> outputs(const Params& p) const override {
    return {{"logits", Kind::ACT, {pint(p, "T"), pint(p, "V")}, "[T, V]"}};
  }
  Tensors generate(const Params& p, std::uint64_t seed) const override {
    const auto s = inputs(p);
    // The residual stream grows through the layers: h at scale 3, undone by the norm.
    return {{"h", randn(s[0].dims, seed, "lm_head.h", 3.0)},
            {"norm_w", randn(s[1].dims, seed, "lm_head.norm_w", 0.3)},
            {"w", randn(s[2].dims, seed, "lm_head.w", 1.0 / std::sqrt(static_cast<double>(pint(p, "H"))))}};
  }
  Tensors run(const Params& p, const Tensors& in, Precision prec) const override {
    return prec == Precision::FP64 ? run_t<double>(p, in) : run_t<float>(p, in);
  }
#if M3_HAVE_GPU
  // The GPU's logits are fp32 (no output rounding); they are compared, unrounded, with the case's
  // bf16 logits in the bf16 tier.
  Tensors run_gpu(const Params& p, const Tensors& in) const override {
    using namespace gpu_io;
    const int T = dim(pint(p, "T"), "T"), H = dim(pint(p, "H"), "H"), V = dim(pint(p, "V"), "V");
    const gpu::Stream s;
    const gpu::CublasHandle handle;
    const auto h = bf16_in(in.at("h"), s.get());            // [T, H]
    const auto norm_w = bf16_in(in.at("norm_w"), s.get());  // [H]
    const auto w = bf16_in(in.at("w"), s.get());            // [V, H]
    gpu::DeviceBuffer<gpu::bf16> scratch(std::size_t(T) * H);  // [T, H] the normed h
    auto logits = out<float>({T, V}, s.get());                 // [T, V] fp32
    gpu::lm_head(handle.get(), h.data(), norm_w.data(), preal(p, "eps"), w.data(), logits.data(), scratch.data(), T,
                 H, V, s.get());
    return {{"logits", get(logits, {T, V}, s.get())}};
  }
#endif

 private:
  template <class T>
  static Tensors run_t(const Params& p, const Tensors& in) {
    Mat<T> logits;  // [T, V]
    ref::lm_head(mat<T>(in.at("h")), vec<T>(in.at("norm_w")), preal(p, "eps"), mat<T>(in.at("w")), logits);
    return {{"logits", from_mat(logits)}};
  }
};

}  // namespace

const OpCase& lm_head_case() {
  static const LmHeadCase c;
  return c;
}

}  // namespace m3::cases
