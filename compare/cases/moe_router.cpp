// Op case: moe_router (reference/ops/moe_router.h): logits = x W_gate^T, s = sigmoid(logits),
// experts = top-K_e of s + bias (ties to the lower id), weights = s of the chosen, renormalized.
// The router runs in fp32 even on the bf16 path (spec §4: never bf16), so in bf16 cases only x is
// bf16 and the outputs are compared in the fp32 tier. `experts` is an index output: where a row's
// choice differs only between experts whose biased scores are within rounding, it is a near-tie,
// and that row of `weights` (which follows the choice) is not compared.
#include "compare/cases/case.h"
#include "reference/ops/moe_router.h"

#if M3_HAVE_GPU
#include "gpu/kernels/moe_router.h"
#endif

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

namespace m3::cases {

namespace {

class MoeRouterCase final : public OpCase {
 public:
  std::string op() const override { return "moe_router"; }
  std::string summary() const override { return "MoE router: sigmoid scores, biased top-k, renormalized weights"; }
  std::vector<ParamSpec> param_specs() const override {
    return {{"T", 7, true, 1, "tokens"},
            {"H", 24, true, 1, "hidden size"},
            {"E", 9, true, 1, "routed experts"},
            {"K_e", 3, true, 1, "experts per token"},
            {"renormalize", 1, true, 0, "1: weights sum to 1 over the chosen; 0: raw sigmoid scores"}};
  }
  void check(const Params& p) const override {
    if (pint(p, "K_e") > pint(p, "E"))
      throw std::invalid_argument(fmt::format("moe_router: K_e = {} > E = {}", pint(p, "K_e"), pint(p, "E")));
    if (pint(p, "renormalize") > 1) throw std::invalid_argument("moe_router: renormalize must be 0 or 1");
  }
  std::vector<TensorSpec> inputs(const Params& p) const override {
    const auto H = pint(p, "H"), E = pint(p, "E");
    return {{"x", Kind::ACT, {pint(p, "T"), H}, "[T, H]"},
            {"w_gate", Kind::F32, {E, H}, "[E, H]"},
            {"bias", Kind::F32, {E}, "[E]"}};
  }
  std::vector<TensorSpec> outputs(const Params& p) const override {
    const auto T = pint(p, "T"), K = pint(p, "K_e");
    return {{"logits", Kind::F32, {T, pint(p, "E")}, "[T, E]"},
            {"experts", Kind::IDS, {T, K}, "[T, K_e]"},
            {"weights", Kind::F32, {T, K}, "[T, K_e]"}};
  }
  Tensors generate(const Params& p, std::uint64_t seed) const override {
    const auto s = inputs(p);
    // The bias (load balancing) is small next to the sigmoid scores but moves some choices.
    return {{"x", randn(s[0].dims, seed, "moe_router.x")},
            {"w_gate", randn(s[1].dims, seed, "moe_router.w_gate", 1.0 / std::sqrt(static_cast<double>(pint(p, "H"))))},
            {"bias", randn(s[2].dims, seed, "moe_router.bias", 0.1)}};
  }
  Tensors run(const Params& p, const Tensors& in, Precision prec) const override {
    return prec == Precision::FP64 ? run_t<double>(p, in) : run_t<float>(p, in);
  }
#if M3_HAVE_GPU
  // x is bf16 on the GPU (an activation), so even this fp32-tier op takes bf16 cases only.
  Tensors run_gpu(const Params& p, const Tensors& in) const override {
    using namespace gpu_io;
    const int T = dim(pint(p, "T"), "T"), H = dim(pint(p, "H"), "H"), E = dim(pint(p, "E"), "E");
    const int K = dim(pint(p, "K_e"), "K_e");
    const gpu::Stream s;
    const auto x = bf16_in(in.at("x"), s.get());          // [T, H]
    const auto w_gate = f32_in(in.at("w_gate"), s.get());  // [E, H] fp32
    const auto bias = f32_in(in.at("bias"), s.get());      // [E] fp32
    auto logits = out<float>({T, E}, s.get());              // [T, E]
    auto experts = out<std::int32_t>({T, K}, s.get());      // [T, K_e]
    auto weights = out<float>({T, K}, s.get());             // [T, K_e]
    gpu::moe_router(x.data(), w_gate.data(), bias.data(), K, pint(p, "renormalize") == 1, logits.data(),
                    experts.data(), weights.data(), T, H, E, s.get());
    return {{"logits", get(logits, {T, E}, s.get())},
            {"experts", get(experts, {T, K}, s.get())},
            {"weights", get(weights, {T, K}, s.get())}};
  }
#endif
  std::optional<MatD> tie_scores(const std::string& output, const Params&, const Tensors& in,
                                 const Tensors& ref_out) const override {
    if (output != "experts") return std::nullopt;
    MatD key = mat<double>(ref_out.at("logits"));  // [T, E] -> the biased scores that choose
    const auto& bias = in.at("bias").f;
    for (Eigen::Index t = 0; t < key.rows(); ++t)
      for (Eigen::Index e = 0; e < key.cols(); ++e)
        key(t, e) = 1.0 / (1.0 + std::exp(-key(t, e))) + bias[static_cast<std::size_t>(e)];
    return key;
  }
  std::string follows(const std::string& output) const override { return output == "weights" ? "experts" : ""; }

 private:
  template <class T>
  static Tensors run_t(const Params& p, const Tensors& in) {
    Mat<T> logits, weights;  // [T, E], [T, K_e]
    MatI experts;            // [T, K_e]
    ref::moe_router(mat<T>(in.at("x")), mat<T>(in.at("w_gate")), vec<T>(in.at("bias")),
                    static_cast<int>(pint(p, "K_e")), pint(p, "renormalize") == 1, logits, experts, weights);
    return {{"logits", from_mat(logits)}, {"experts", from_ids(experts)}, {"weights", from_mat(weights)}};
  }
};

}  // namespace

const OpCase& moe_router_case() {
  static const MoeRouterCase c;
  return c;
}

}  // namespace m3::cases
