// Op case: swiglu_oai (reference/ops/swiglu_oai.h). mlp = 1 checks the whole MLP (mlp_swiglu:
// y = W_down act(W_gate x, W_up x)); mlp = 0 the activation alone on given gate and up:
//   act = (clamp(up, -limit, limit) + beta) * g * sigmoid(alpha g),  g = min(gate, limit).
// Gate and up have a standard deviation of 4, so ~8% of them cross the limit of 7 and the clamps
// are exercised on both sides.
#include "compare/cases/case.h"
#include "reference/ops/swiglu_oai.h"

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
  Tensors run(const Params& p, const Tensors& in, bool fp64) const override {
    return fp64 ? run_t<double>(p, in) : run_t<float>(p, in);
  }

 private:
  template <class T>
  static Tensors run_t(const Params& p, const Tensors& in) {
    const ref::SwigluParams sp{preal(p, "alpha"), preal(p, "limit"), preal(p, "beta")};
    Mat<T> out;  // [T, I] or [T, H]
    if (pint(p, "mlp") == 0) {
      ref::swiglu_oai(mat<T>(in.at("gate")), mat<T>(in.at("up")), sp, out);
      return {{"act", from_mat(out)}};
    }
    ref::mlp_swiglu(mat<T>(in.at("x")), mat<T>(in.at("w_gate")), mat<T>(in.at("w_up")), mat<T>(in.at("w_down")), sp,
                    out);
    return {{"y", from_mat(out)}};
  }
};

}  // namespace

const OpCase& swiglu_oai_case() {
  static const SwigluOaiCase c;
  return c;
}

}  // namespace m3::cases
