// Op case: attention_dense (reference/ops/attention_dense.h), causal GQA: query head h sees keys
// 0..q_pos[t] of KV head h / (Hq/Hkv), fp64 softmax. Query positions include 0 (one key), N-1 and
// the block edges of positions(); odd head counts and an N off any power of two by default.
#include "compare/cases/case.h"
#include "reference/ops/attention_dense.h"

#if M3_HAVE_GPU
#include "gpu/kernels/attention_dense.h"
#include "gpu/kernels/attention_prefill.h"
#endif

#include <fmt/format.h>

#include <stdexcept>

namespace m3::cases {

namespace {

class AttentionDenseCase final : public OpCase {
 public:
  std::string op() const override { return "attention_dense"; }
  std::string summary() const override { return "dense causal GQA attention over a KV cache"; }
  std::vector<ParamSpec> param_specs() const override {
    return {{"T", 5, true, 1, "queries"},     {"N", 37, true, 1, "keys in the cache"},
            {"Hq", 6, true, 1, "query heads"}, {"Hkv", 2, true, 1, "KV heads (divides Hq)"},
            {"D", 16, true, 1, "head dim"}};
  }
  void check(const Params& p) const override {
    if (pint(p, "Hq") % pint(p, "Hkv") != 0)
      throw std::invalid_argument(
          fmt::format("attention_dense: Hq = {} is not divisible by Hkv = {}", pint(p, "Hq"), pint(p, "Hkv")));
  }
  std::vector<TensorSpec> inputs(const Params& p) const override {
    const auto T = pint(p, "T"), N = pint(p, "N"), D = pint(p, "D");
    return {{"q", Kind::ACT, {T, pint(p, "Hq") * D}, "[T, Hq*D]"},
            {"k", Kind::ACT, {N, pint(p, "Hkv") * D}, "[N, Hkv*D]"},
            {"v", Kind::ACT, {N, pint(p, "Hkv") * D}, "[N, Hkv*D]"},
            {"q_pos", Kind::POS, {T}, "[T]"}};
  }
  std::vector<TensorSpec> outputs(const Params& p) const override {
    return {{"out", Kind::ACT, {pint(p, "T"), pint(p, "Hq") * pint(p, "D")}, "[T, Hq*D]"}};
  }
  Tensors generate(const Params& p, std::uint64_t seed) const override {
    const auto s = inputs(p);
    // q, k ~ N(0, 1) per channel, as after QK-norm: scores q.k/sqrt(D) ~ N(0, 1), a softmax that
    // is neither one-hot nor flat.
    return {{"q", randn(s[0].dims, seed, "attention_dense.q")},
            {"k", randn(s[1].dims, seed, "attention_dense.k")},
            {"v", randn(s[2].dims, seed, "attention_dense.v")},
            {"q_pos", positions(pint(p, "T"), pint(p, "N"), 16, 4, seed, "attention_dense.q_pos")}};
  }
  Tensors run(const Params& p, const Tensors& in, Precision prec) const override {
    return prec == Precision::FP64 ? run_t<double>(p, in) : run_t<float>(p, in);
  }
#if M3_HAVE_GPU
  // "out": gpu::attention_dense (any positions). "out@prefill": gpu::attention_dense_prefill as
  // well, where it applies: the queries are one contiguous chunk p0..p0+T-1 and D = 128.
  Tensors run_gpu(const Params& p, const Tensors& in) const override {
    using namespace gpu_io;
    const int T = dim(pint(p, "T"), "T"), N = dim(pint(p, "N"), "N");
    const AttnDims d{dim(pint(p, "Hq"), "Hq"), dim(pint(p, "Hkv"), "Hkv"), dim(pint(p, "D"), "D")};
    const cmp::Dims out_dims = {T, std::int64_t{d.Hq} * d.D};
    const gpu::Stream s;
    const auto q = bf16_in(in.at("q"), s.get());        // [T, Hq*D]
    const auto k = bf16_in(in.at("k"), s.get());        // [N, Hkv*D]
    const auto v = bf16_in(in.at("v"), s.get());        // [N, Hkv*D]
    const auto q_pos = i64_in(in.at("q_pos"), s.get());  // [T]
    const std::size_t ws_bytes = gpu::attention_dense_workspace_bytes(T, N, d);
    gpu::DeviceBuffer<unsigned char> ws(ws_bytes);      // cudaMalloc: 256-byte aligned
    auto y = out<gpu::bf16>(out_dims, s.get());          // [T, Hq*D]
    gpu::attention_dense(q.data(), k.data(), v.data(), q_pos.data(), T, N, d, y.data(), s.get(), ws.data(), ws_bytes);
    Tensors r = {{"out", get(y, out_dims, s.get())}};
    const auto& pos = in.at("q_pos").i;
    bool chunk = d.D == 128;
    for (std::size_t t = 1; t < pos.size() && chunk; ++t) chunk = pos[t] == pos[0] + static_cast<std::int64_t>(t);
    if (chunk) {
      auto yp = out<gpu::bf16>(out_dims, s.get());  // [T, Hq*D]
      gpu::attention_dense_prefill(q.data(), k.data(), v.data(), pos[0], T, N, d, yp.data(), s.get());
      r["out@prefill"] = get(yp, out_dims, s.get());
    }
    return r;
  }
#endif

 private:
  template <class T>
  static Tensors run_t(const Params& p, const Tensors& in) {
    const AttnDims d{static_cast<int>(pint(p, "Hq")), static_cast<int>(pint(p, "Hkv")), static_cast<int>(pint(p, "D"))};
    Mat<T> out;  // [T, Hq*D]
    ref::attention_dense(mat<T>(in.at("q")), mat<T>(in.at("k")), mat<T>(in.at("v")), in.at("q_pos").i, d, out);
    return {{"out", from_mat(out)}};
  }
};

}  // namespace

const OpCase& attention_dense_case() {
  static const AttentionDenseCase c;
  return c;
}

}  // namespace m3::cases
