// Op case: moe_experts (reference/ops/moe_experts.h): y = routed_scale * sum over the chosen
// experts of w_e SwiGLU-OAI_e(x), plus the unweighted shared expert when shared = 1. Expert
// weights are stored stacked: gate, up [E, I, H], down [E, H, I]. The routing (experts, weights)
// is an input: distinct random experts per token, positive weights summing to 1 (fp32, as the
// router leaves them); with E > K_e some experts get several tokens and some none.
#include "compare/cases/case.h"
#include "reference/ops/moe_experts.h"
#include "reference/rng.h"

#if M3_HAVE_GPU
#include "gpu/kernels/moe_experts.h"
#endif

#include <fmt/format.h>

#include <cmath>
#include <numeric>
#include <stdexcept>
#include <utility>
#include <vector>

namespace m3::cases {

namespace {

class MoeExpertsCase final : public OpCase {
 public:
  std::string op() const override { return "moe_experts"; }
  std::string summary() const override { return "MoE experts + shared expert, weighted and scaled"; }
  std::vector<ParamSpec> param_specs() const override {
    return {{"T", 6, true, 1, "tokens"},
            {"H", 20, true, 1, "hidden size"},
            {"I", 12, true, 1, "expert intermediate width"},
            {"E", 5, true, 1, "routed experts"},
            {"K_e", 2, true, 1, "experts per token"},
            {"shared", 1, true, 0, "1: add a shared expert of width I"},
            {"routed_scale", 2.0, false, 0, "scale of the routed sum"},
            {"alpha", 1.702, false, 0, "SwiGLU sigmoid slope"},
            {"limit", 7.0, false, 0, "SwiGLU clamp"},
            {"beta", 1.0, false, -1e9, "SwiGLU up offset"}};
  }
  void check(const Params& p) const override {
    if (pint(p, "K_e") > pint(p, "E"))
      throw std::invalid_argument(fmt::format("moe_experts: K_e = {} > E = {}", pint(p, "K_e"), pint(p, "E")));
    if (pint(p, "shared") > 1) throw std::invalid_argument("moe_experts: shared must be 0 or 1");
  }
  std::vector<TensorSpec> inputs(const Params& p) const override {
    const auto T = pint(p, "T"), H = pint(p, "H"), I = pint(p, "I"), E = pint(p, "E"), K = pint(p, "K_e");
    std::vector<TensorSpec> s = {{"x", Kind::ACT, {T, H}, "[T, H]"},
                                 {"experts", Kind::IDS, {T, K}, "[T, K_e]"},
                                 {"weights", Kind::F32, {T, K}, "[T, K_e]"},
                                 {"gate", Kind::ACT, {E, I, H}, "[E, I, H]"},
                                 {"up", Kind::ACT, {E, I, H}, "[E, I, H]"},
                                 {"down", Kind::ACT, {E, H, I}, "[E, H, I]"}};
    if (pint(p, "shared") == 1) {
      s.push_back({"shared_gate", Kind::ACT, {I, H}, "[I, H]"});
      s.push_back({"shared_up", Kind::ACT, {I, H}, "[I, H]"});
      s.push_back({"shared_down", Kind::ACT, {H, I}, "[H, I]"});
    }
    return s;
  }
  std::vector<TensorSpec> outputs(const Params& p) const override {
    return {{"y", Kind::ACT, {pint(p, "T"), pint(p, "H")}, "[T, H]"}};
  }
  Tensors generate(const Params& p, std::uint64_t seed) const override {
    const auto T = pint(p, "T"), E = pint(p, "E"), K = pint(p, "K_e");
    const double in_h = 1.0 / std::sqrt(static_cast<double>(pint(p, "H")));
    const double in_i = 1.0 / std::sqrt(static_cast<double>(pint(p, "I")));
    Tensors in;
    for (const TensorSpec& s : inputs(p)) {
      const bool down = s.name == "down" || s.name == "shared_down";
      if (s.kind == Kind::ACT)
        in[s.name] = randn(s.dims, seed, "moe_experts." + s.name, s.name == "x" ? 1.0 : down ? in_i : in_h);
    }
    Tensor ex, w;
    ex.dims = w.dims = {T, K};
    const CounterRng rng(seed, "moe_experts.routing");
    std::uint64_t draw = 0;
    for (std::int64_t t = 0; t < T; ++t) {
      std::vector<std::int64_t> ids(static_cast<std::size_t>(E));
      std::iota(ids.begin(), ids.end(), 0);
      double sum = 0;
      for (std::int64_t j = 0; j < K; ++j) {  // partial Fisher-Yates: K distinct experts
        std::swap(ids[static_cast<std::size_t>(j)],
                  ids[static_cast<std::size_t>(j + static_cast<std::int64_t>(rng.bits(draw++) % (E - j)))]);
        ex.i.push_back(ids[static_cast<std::size_t>(j)]);
        w.f.push_back(0.1 + rng.uniform(draw++));
        sum += w.f.back();
      }
      for (std::int64_t j = 0; j < K; ++j) w.f[static_cast<std::size_t>(t * K + j)] /= sum;
    }
    in["experts"] = std::move(ex);
    in["weights"] = std::move(w);
    return in;
  }
  // Each chosen expert's MLP and the shared one, through the routed weights and scale.
  Tensors rounding_scale(const Params& p, const Tensors& in) const override {
    const double alpha = preal(p, "alpha"), limit = preal(p, "limit"), beta = preal(p, "beta");
    const double scale = preal(p, "routed_scale");
    const MatD x = mat<double>(in.at("x")), w = mat<double>(in.at("weights"));  // [T, H], [T, K_e]
    const MatI ex = ids(in.at("experts"));                                      // [T, K_e]
    MatD s = MatD::Zero(x.rows(), x.cols());                                    // [T, H]
    // Expert by expert (each expert's weights sliced once), over the tokens routed to it.
    for (std::int64_t e = 0; e < pint(p, "E"); ++e) {
      std::vector<std::pair<Eigen::Index, double>> rows;  // (token, its weight for e)
      for (Eigen::Index t = 0; t < x.rows(); ++t)
        for (Eigen::Index k = 0; k < ex.cols(); ++k)
          if (ex(t, k) == e) rows.emplace_back(t, std::abs(w(t, k)));
      if (rows.empty()) continue;
      MatD xe(static_cast<Eigen::Index>(rows.size()), x.cols());  // [n_e, H]
      for (std::size_t i = 0; i < rows.size(); ++i) xe.row(static_cast<Eigen::Index>(i)) = x.row(rows[i].first);
      const MatD se = swiglu_rounding_scale(xe, slice<double>(in.at("gate"), e), slice<double>(in.at("up"), e),
                                            slice<double>(in.at("down"), e), alpha, limit, beta);  // [n_e, H]
      for (std::size_t i = 0; i < rows.size(); ++i)
        s.row(rows[i].first) += scale * rows[i].second * se.row(static_cast<Eigen::Index>(i));
    }
    if (pint(p, "shared") == 1)
      s += swiglu_rounding_scale(x, mat<double>(in.at("shared_gate")), mat<double>(in.at("shared_up")),
                                 mat<double>(in.at("shared_down")), alpha, limit, beta);
    return {{"y", from_mat(s)}};
  }
  Tensors run(const Params& p, const Tensors& in, Precision prec) const override {
    const auto r = prec == Precision::BF16 ? ref::Rounding::BF16 : ref::Rounding::NONE;
    return prec == Precision::FP64 ? run_t<double>(p, in, r) : run_t<float>(p, in, r);
  }
#if M3_HAVE_GPU
  // "y": gpu::moe_experts with grouped expert GEMMs (it falls back to the loop where cuBLAS or the
  // dims cannot group); "y@loop": with one cuBLAS GEMM per expert. The case's stacked gate and up
  // [E, I, H] become the GPU's fused gate_up [E, 2I, H] (expert e: its I gate rows, then its I up).
  Tensors run_gpu(const Params& p, const Tensors& in) const override {
    using namespace gpu_io;
    const int T = dim(pint(p, "T"), "T"), H = dim(pint(p, "H"), "H"), I = dim(pint(p, "I"), "I");
    const int E = dim(pint(p, "E"), "E"), K = dim(pint(p, "K_e"), "K_e");
    const bool shared = pint(p, "shared") == 1;
    const std::size_t rows_ih = std::size_t(I) * H;  // one expert's gate (or up) block [I, H]
    auto stack = [&](const Tensor& gate, const Tensor& up, std::int64_t n) {  // [n, I, H] x2 -> [n, 2I, H]
      Tensor gu;
      gu.dims = {n, 2 * std::int64_t{I}, H};
      for (std::int64_t e = 0; e < n; ++e) {
        gu.f.insert(gu.f.end(), gate.f.begin() + e * rows_ih, gate.f.begin() + (e + 1) * rows_ih);
        gu.f.insert(gu.f.end(), up.f.begin() + e * rows_ih, up.f.begin() + (e + 1) * rows_ih);
      }
      return gu;
    };
    const gpu::Stream s;
    const gpu::CublasHandle h;
    const auto x = bf16_in(in.at("x"), s.get());                                    // [T, H]
    const auto experts = i32_in(in.at("experts"), s.get());                         // [T, K_e]
    const auto weights = f32_in(in.at("weights"), s.get());                         // [T, K_e] fp32
    const auto gate_up = bf16_in(stack(in.at("gate"), in.at("up"), E), s.get());   // [E, 2I, H]
    const auto down = bf16_in(in.at("down"), s.get());                              // [E, H, I]
    gpu::DeviceBuffer<gpu::bf16> shared_gate_up, shared_down;                       // [2I, H], [H, I]
    if (shared) {
      shared_gate_up = bf16_in(stack(in.at("shared_gate"), in.at("shared_up"), 1), s.get());
      shared_down = bf16_in(in.at("shared_down"), s.get());
    }
    gpu::MoeExpertWeights w;
    w.gate_up = gate_up.data();
    w.down = down.data();
    w.E = E;
    w.I = I;
    w.shared_gate_up = shared ? shared_gate_up.data() : nullptr;
    w.shared_down = shared ? shared_down.data() : nullptr;
    w.Is = shared ? I : 0;
    const gpu::SwigluParams sp{static_cast<float>(preal(p, "alpha")), static_cast<float>(preal(p, "limit")),
                               static_cast<float>(preal(p, "beta"))};
    const std::size_t ws_bytes = gpu::moe_experts_workspace_bytes(T, H, K, w);
    gpu::DeviceBuffer<unsigned char> ws(ws_bytes);  // cudaMalloc: 256-byte aligned
    Tensors r;
    for (const auto path : {gpu::MoeGemmPath::GROUPED, gpu::MoeGemmPath::LOOP}) {
      auto y = out<gpu::bf16>({T, H}, s.get());  // [T, H]
      gpu::moe_experts(h.get(), x.data(), experts.data(), weights.data(), T, H, K, w, preal(p, "routed_scale"), sp,
                       y.data(), ws.data(), ws_bytes, s.get(), path);
      r[path == gpu::MoeGemmPath::GROUPED ? "y" : "y@loop"] = get(y, {T, H}, s.get());
    }
    return r;
  }
#endif

 private:
  template <class T>
  static Tensors run_t(const Params& p, const Tensors& in, ref::Rounding r) {
    std::vector<ref::MlpWeights<T>> experts_w;
    for (std::int64_t e = 0; e < pint(p, "E"); ++e)
      experts_w.push_back({slice<T>(in.at("gate"), e), slice<T>(in.at("up"), e), slice<T>(in.at("down"), e)});
    ref::MlpWeights<T> shared;  // empty matrices: no shared expert
    if (pint(p, "shared") == 1)
      shared = {mat<T>(in.at("shared_gate")), mat<T>(in.at("shared_up")), mat<T>(in.at("shared_down"))};
    const ref::SwigluParams sp{preal(p, "alpha"), preal(p, "limit"), preal(p, "beta")};
    Mat<T> y;  // [T, H]
    ref::moe_experts(mat<T>(in.at("x")), ids(in.at("experts")), mat<T>(in.at("weights")), experts_w, shared,
                     preal(p, "routed_scale"), sp, y, r);
    return {{"y", from_mat(y)}};
  }
};

}  // namespace

const OpCase& moe_experts_case() {
  static const MoeExpertsCase c;
  return c;
}

}  // namespace m3::cases
