// Op case: embedding (reference/ops/embedding.h): out = table[tokens]. A pure gather, so any
// correct kernel matches bit for bit; the ids include 0 and V-1, the ends of the table.
#include "compare/cases/case.h"
#include "reference/ops/embedding.h"
#include "reference/rng.h"

#if M3_HAVE_GPU
#include "gpu/kernels/embedding.h"
#endif

namespace m3::cases {

namespace {

class EmbeddingCase final : public OpCase {
 public:
  std::string op() const override { return "embedding"; }
  std::string summary() const override { return "out = table[tokens] (no scaling)"; }
  std::vector<ParamSpec> param_specs() const override {
    return {{"T", 9, true, 1, "tokens"}, {"V", 50, true, 1, "vocabulary rows"}, {"H", 24, true, 1, "hidden size"}};
  }
  std::vector<TensorSpec> inputs(const Params& p) const override {
    return {{"table", Kind::ACT, {pint(p, "V"), pint(p, "H")}, "[V, H]"},
            {"tokens", Kind::IDS, {pint(p, "T")}, "[T]"}};
  }
  std::vector<TensorSpec> outputs(const Params& p) const override {
    return {{"out", Kind::ACT, {pint(p, "T"), pint(p, "H")}, "[T, H]"}};
  }
  Tensors generate(const Params& p, std::uint64_t seed) const override {
    const std::int64_t T = pint(p, "T"), V = pint(p, "V");
    Tensors in;
    in["table"] = randn({V, pint(p, "H")}, seed, "embedding.table");
    Tensor tok;
    tok.dims = {T};
    const CounterRng rng(seed, "embedding.tokens");
    for (std::int64_t t = 0; t < T; ++t)
      tok.i.push_back(t == 0 ? 0 : t == 1 ? V - 1 : static_cast<std::int64_t>(rng.bits(t) % V));
    in["tokens"] = std::move(tok);
    return in;
  }
  Tensors run(const Params& p, const Tensors& in, Precision prec) const override {
    return prec == Precision::FP64 ? run_t<double>(p, in) : run_t<float>(p, in);
  }
#if M3_HAVE_GPU
  Tensors run_gpu(const Params& p, const Tensors& in) const override {
    using namespace gpu_io;
    const int T = dim(pint(p, "T"), "T"), V = dim(pint(p, "V"), "V"), H = dim(pint(p, "H"), "H");
    const auto tok = ids_vec(in.at("tokens"));  // [T]
    gpu::check_token_ids(tok.data(), tok.size(), V);  // the device cannot throw on a bad id
    const gpu::Stream s;
    const auto table = bf16_in(in.at("table"), s.get());  // [V, H]
    const auto tokens = i32_in(in.at("tokens"), s.get());  // [T]
    auto y = out<gpu::bf16>({T, H}, s.get());               // [T, H]
    gpu::embedding(table.data(), tokens.data(), T, V, H, y.data(), s.get());
    return {{"out", get(y, {T, H}, s.get())}};
  }
#endif

 private:
  template <class T>
  static Tensors run_t(const Params&, const Tensors& in) {
    const auto tokens = ids_vec(in.at("tokens"));  // [T]
    Mat<T> out;                                    // [T, H]
    ref::embedding(mat<T>(in.at("table")), tokens, out);
    return {{"out", from_mat(out)}};
  }
};

}  // namespace

const OpCase& embedding_case() {
  static const EmbeddingCase c;
  return c;
}

}  // namespace m3::cases
