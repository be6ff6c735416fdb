// Op case: qk_norm_rope (reference/ops/qk_norm_rope.h): per-head Gemma RMSNorm, then partial NeoX
// RoPE of the first R of D channels by the token's absolute position. norm = 0 checks rope_neox
// alone (no w). Positions reach P - 1 = 2^20 - 1 by default, where fp32 angles would be off by
// ~0.06 rad: a kernel must form p * theta^(-2i/R) in fp64 (or an equally careful way) to agree.
#include "compare/cases/case.h"
#include "reference/ops/qk_norm_rope.h"

#if M3_HAVE_GPU
#include "gpu/kernels/qk_norm_rope.h"
#endif

#include <fmt/format.h>

#include <stdexcept>

namespace m3::cases {

namespace {

class QkNormRopeCase final : public OpCase {
 public:
  std::string op() const override { return "qk_norm_rope"; }
  std::string summary() const override { return "per-head RMSNorm + partial NeoX RoPE (norm=0: RoPE only)"; }
  std::vector<ParamSpec> param_specs() const override {
    return {{"T", 6, true, 1, "tokens"},
            {"heads", 3, true, 1, "heads in x"},
            {"D", 24, true, 1, "head dim"},
            {"R", 16, true, 0, "rotary dims (even, <= D)"},
            {"P", 1048576, true, 1, "positions drawn from [0, P)"},
            {"norm", 1, true, 0, "1: RMSNorm then RoPE (qk_norm_rope); 0: RoPE only (rope_neox)"},
            {"eps", 1e-6, false, 0, "RMSNorm epsilon"},
            {"theta", 5e6, false, 1, "RoPE base"}};
  }
  void check(const Params& p) const override {
    const auto R = pint(p, "R"), D = pint(p, "D");
    if (R % 2 != 0 || R > D)
      throw std::invalid_argument(fmt::format("qk_norm_rope: R = {} must be even and <= D = {}", R, D));
    if (pint(p, "norm") > 1) throw std::invalid_argument("qk_norm_rope: norm must be 0 or 1");
  }
  std::vector<TensorSpec> inputs(const Params& p) const override {
    std::vector<TensorSpec> s = {{"x", Kind::ACT, {pint(p, "T"), pint(p, "heads") * pint(p, "D")}, "[T, heads*D]"},
                                 {"positions", Kind::POS, {pint(p, "T")}, "[T]"}};
    if (pint(p, "norm") == 1) s.push_back({"w", Kind::ACT, {pint(p, "D")}, "[D]"});
    return s;
  }
  std::vector<TensorSpec> outputs(const Params& p) const override {
    return {{"y", Kind::ACT, {pint(p, "T"), pint(p, "heads") * pint(p, "D")}, "[T, heads*D]"}};
  }
  Tensors generate(const Params& p, std::uint64_t seed) const override {
    const auto specs = inputs(p);
    Tensors in;
    in["x"] = randn(specs[0].dims, seed, "qk_norm_rope.x");
    in["positions"] = positions(pint(p, "T"), pint(p, "P"), 1, 1, seed, "qk_norm_rope.positions");
    if (pint(p, "norm") == 1) in["w"] = randn({pint(p, "D")}, seed, "qk_norm_rope.w", 0.5);
    return in;
  }
  Tensors run(const Params& p, const Tensors& in, Precision prec) const override {
    return prec == Precision::FP64 ? run_t<double>(p, in) : run_t<float>(p, in);
  }
#if M3_HAVE_GPU
  // norm = 1 only: the GPU fuses the norm into the rotation and has no RoPE-alone kernel.
  Tensors run_gpu(const Params& p, const Tensors& in) const override {
    using namespace gpu_io;
    if (pint(p, "norm") != 1)
      throw CaseError("qk_norm_rope with norm = 0 (RoPE alone) has no GPU twin: gpu::qk_norm_rope always applies "
                      "the RMSNorm; write the case with norm=1");
    const int T = dim(pint(p, "T"), "T"), heads = dim(pint(p, "heads"), "heads"), D = dim(pint(p, "D"), "D");
    const gpu::Stream s;
    const auto x = bf16_in(in.at("x"), s.get());            // [T, heads*D]
    const auto w = bf16_in(in.at("w"), s.get());            // [D]
    const auto pos = i64_in(in.at("positions"), s.get());   // [T]
    auto y = out<gpu::bf16>({T, std::int64_t{heads} * D}, s.get());  // [T, heads*D]
    gpu::qk_norm_rope(x.data(), heads, D, w.data(), preal(p, "eps"), dim(pint(p, "R"), "R"), preal(p, "theta"),
                      pos.data(), y.data(), T, s.get());
    return {{"y", get(y, {T, std::int64_t{heads} * D}, s.get())}};
  }
#endif

 private:
  template <class T>
  static Tensors run_t(const Params& p, const Tensors& in) {
    const int heads = static_cast<int>(pint(p, "heads")), D = static_cast<int>(pint(p, "D"));
    const int R = static_cast<int>(pint(p, "R"));
    const auto& pos = in.at("positions").i;  // [T]
    Mat<T> y = mat<T>(in.at("x"));           // [T, heads*D]
    if (pint(p, "norm") == 1) {
      ref::qk_norm_rope(mat<T>(in.at("x")), heads, D, vec<T>(in.at("w")), preal(p, "eps"), R, preal(p, "theta"), pos,
                        y);
    } else {
      ref::rope_neox(y, heads, D, R, preal(p, "theta"), pos);
    }
    return {{"y", from_mat(y)}};
  }
};

}  // namespace

const OpCase& qk_norm_rope_case() {
  static const QkNormRopeCase c;
  return c;
}

}  // namespace m3::cases
