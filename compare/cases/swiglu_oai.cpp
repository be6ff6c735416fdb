// Op case: swiglu_oai (reference/ops/swiglu_oai.h). mlp = 1 checks the whole MLP (mlp_swiglu:
// y = W_down act(W_gate x, W_up x)); mlp = 0 the activation alone on given gate and up:
//   act = (clamp(up, -limit, limit) + beta) * g * sigmoid(alpha g),  g = min(gate, limit).
// Gate and up have a standard deviation of 4, so ~8% of them cross the limit of 7 and the clamps
// are exercised on both sides.
#include "compare/cases/case.h"
#include "reference/ops/swiglu_oai.h"

#if M3_HAVE_GPU
#include "gpu/kernels/linear.h"
#include "gpu/kernels/swiglu_oai.h"
#endif

#include <cmath>
#include <stdexcept>

namespace m3::cases {

namespace {

constexpr double kGateUpStd = 4.0;  // P(|N(0, 4^2)| > 7) = 8%: both clamps are hit

class SwigluOaiCase final : public OpCase {
 public:
  std::string op() const override { return "swiglu_oai"; }
  std::string summary() const override { return "SwiGLU-OAI MLP (mlp=1) or activation only (mlp=0)"; }
  std::vector<ParamSpec> param_specs() const override {
    return {{"T", 6, true, 1, "rows"},
            {"H", 20, true, 1, "hidden size (mlp=1)"},
            {"I", 28, true, 1, "intermediate width"},
            {"mlp", 1, true, 0, "1: mlp_swiglu on x; 0: swiglu_oai on gate, up"},
            {"alpha", 1.702, false, 0, "sigmoid slope"},
            {"limit", 7.0, false, 0, "clamp of gate (above) and up (both sides)"},
            {"beta", 1.0, false, -1e9, "offset added to up"}};
  }
  void check(const Params& p) const override {
    if (pint(p, "mlp") > 1) throw std::invalid_argument("swiglu_oai: mlp must be 0 or 1");
  }
  std::vector<TensorSpec> inputs(const Params& p) const override {
    const auto T = pint(p, "T"), H = pint(p, "H"), I = pint(p, "I");
    if (pint(p, "mlp") == 0) return {{"gate", Kind::ACT, {T, I}, "[T, I]"}, {"up", Kind::ACT, {T, I}, "[T, I]"}};
    return {{"x", Kind::ACT, {T, H}, "[T, H]"},
            {"w_gate", Kind::ACT, {I, H}, "[I, H]"},
            {"w_up", Kind::ACT, {I, H}, "[I, H]"},
            {"w_down", Kind::ACT, {H, I}, "[H, I]"}};
  }
  std::vector<TensorSpec> outputs(const Params& p) const override {
    if (pint(p, "mlp") == 0) return {{"act", Kind::ACT, {pint(p, "T"), pint(p, "I")}, "[T, I]"}};
    return {{"y", Kind::ACT, {pint(p, "T"), pint(p, "H")}, "[T, H]"}};
  }
  Tensors generate(const Params& p, std::uint64_t seed) const override {
    const auto s = inputs(p);
    if (pint(p, "mlp") == 0)
      return {{"gate", randn(s[0].dims, seed, "swiglu_oai.gate", kGateUpStd)},
              {"up", randn(s[1].dims, seed, "swiglu_oai.up", kGateUpStd)}};
    const double h = static_cast<double>(pint(p, "H")), i = static_cast<double>(pint(p, "I"));
    // act reaches ~50 at the clamps; w_down's 0.1/sqrt(I) brings y back to O(1).
    return {{"x", randn(s[0].dims, seed, "swiglu_oai.x")},
            {"w_gate", randn(s[1].dims, seed, "swiglu_oai.w_gate", kGateUpStd / std::sqrt(h))},
            {"w_up", randn(s[2].dims, seed, "swiglu_oai.w_up", kGateUpStd / std::sqrt(h))},
            {"w_down", randn(s[3].dims, seed, "swiglu_oai.w_down", 0.1 / std::sqrt(i))}};
  }
  // mlp = 1: its gate, up and act are rounded to bf16 between the steps; mlp = 0 has one rounding.
  Tensors rounding_scale(const Params& p, const Tensors& in) const override {
    if (pint(p, "mlp") == 0) return {};
    return {{"y", from_mat(swiglu_rounding_scale(mat<double>(in.at("x")), mat<double>(in.at("w_gate")),
                                                 mat<double>(in.at("w_up")), mat<double>(in.at("w_down")),
                                                 preal(p, "alpha"), preal(p, "limit"), preal(p, "beta")))}};
  }
  Tensors run(const Params& p, const Tensors& in, Precision prec) const override {
    const auto r = prec == Precision::BF16 ? ref::Rounding::BF16 : ref::Rounding::NONE;
    return prec == Precision::FP64 ? run_t<double>(p, in, r) : run_t<float>(p, in, r);
  }
#if M3_HAVE_GPU
  // mlp = 0: "act" from gpu::swiglu_oai(gate, up), "act@fused" from its fused [gate | up] form.
  // mlp = 1: the MLP as the model runs it, gpu::linear (gate, up) -> gpu::swiglu_oai -> gpu::linear
  // (down), gate, up and act stored in bf16 between the steps (DESIGN §3), where the bf16 case's
  // reference rounds them too (ref::Rounding::BF16).
  Tensors run_gpu(const Params& p, const Tensors& in) const override {
    using namespace gpu_io;
    const int T = dim(pint(p, "T"), "T"), H = dim(pint(p, "H"), "H"), I = dim(pint(p, "I"), "I");
    const gpu::SwigluParams sp{static_cast<float>(preal(p, "alpha")), static_cast<float>(preal(p, "limit")),
                               static_cast<float>(preal(p, "beta"))};
    const gpu::Stream s;
    if (pint(p, "mlp") == 0) {
      const Tensor& g = in.at("gate");  // [T, I]
      const Tensor& u = in.at("up");    // [T, I]
      const auto gate = bf16_in(g, s.get()), up = bf16_in(u, s.get());
      auto act = out<gpu::bf16>({T, I}, s.get());  // [T, I]
      gpu::swiglu_oai(gate.data(), up.data(), sp, act.data(), T, I, s.get());
      Tensor gu;  // [T, 2I] = [gate | up] per row
      gu.dims = {T, 2 * std::int64_t{I}};
      for (std::int64_t t = 0; t < T; ++t) {
        gu.f.insert(gu.f.end(), g.f.begin() + t * I, g.f.begin() + (t + 1) * I);
        gu.f.insert(gu.f.end(), u.f.begin() + t * I, u.f.begin() + (t + 1) * I);
      }
      const auto gate_up = bf16_in(gu, s.get());
      auto act_fused = out<gpu::bf16>({T, I}, s.get());  // [T, I]
      gpu::swiglu_oai(gate_up.data(), sp, act_fused.data(), T, I, s.get());
      return {{"act", get(act, {T, I}, s.get())}, {"act@fused", get(act_fused, {T, I}, s.get())}};
    }
    const gpu::CublasHandle h;
    const auto x = bf16_in(in.at("x"), s.get());            // [T, H]
    const auto w_gate = bf16_in(in.at("w_gate"), s.get());  // [I, H]
    const auto w_up = bf16_in(in.at("w_up"), s.get());      // [I, H]
    const auto w_down = bf16_in(in.at("w_down"), s.get());  // [H, I]
    gpu::DeviceBuffer<gpu::bf16> gate(std::size_t(T) * I), up(std::size_t(T) * I), act(std::size_t(T) * I);  // [T, I]
    auto y = out<gpu::bf16>({T, H}, s.get());  // [T, H]
    gpu::linear(h.get(), x.data(), w_gate.data(), gate.data(), T, H, I, s.get());
    gpu::linear(h.get(), x.data(), w_up.data(), up.data(), T, H, I, s.get());
    gpu::swiglu_oai(gate.data(), up.data(), sp, act.data(), T, I, s.get());
    gpu::linear(h.get(), act.data(), w_down.data(), y.data(), T, I, H, s.get());
    return {{"y", get(y, {T, H}, s.get())}};
  }
#endif

 private:
  template <class T>
  static Tensors run_t(const Params& p, const Tensors& in, ref::Rounding r) {
    const ref::SwigluParams sp{preal(p, "alpha"), preal(p, "limit"), preal(p, "beta")};
    Mat<T> out;  // [T, I] or [T, H]
    if (pint(p, "mlp") == 0) {
      ref::swiglu_oai(mat<T>(in.at("gate")), mat<T>(in.at("up")), sp, out);
      return {{"act", from_mat(out)}};
    }
    ref::mlp_swiglu(mat<T>(in.at("x")), mat<T>(in.at("w_gate")), mat<T>(in.at("w_up")), mat<T>(in.at("w_down")), sp,
                    out, r);
    return {{"y", from_mat(out)}};
  }
};

}  // namespace

const OpCase& swiglu_oai_case() {
  static const SwigluOaiCase c;
  return c;
}

}  // namespace m3::cases
