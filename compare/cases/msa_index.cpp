// Op case: msa_index (reference/ops/msa_index.h), MSA index-branch block scores:
// S_i(t, b) = max over keys j <= q_pos[t] of block b of qI_i(t) . kI(j); -inf past the query's
// own block. The scores stay fp32 in bf16 cases (DESIGN §3: exact fp32 block scores), so they
// are compared in the fp32 tier. The last query sits at N - 1, which fixes NB = ceil(N / BLK).
#include "compare/cases/case.h"
#include "reference/ops/msa_index.h"

#if M3_HAVE_GPU
#include "gpu/kernels/msa_index.h"
#endif

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

namespace m3::cases {

namespace {

class MsaIndexCase final : public OpCase {
 public:
  std::string op() const override { return "msa_index"; }
  std::string summary() const override { return "MSA index scores, block-max pooled, [Hi*T, NB]"; }
  std::vector<ParamSpec> param_specs() const override {
    return {{"T", 6, true, 1, "queries"},        {"N", 53, true, 1, "keys in the index-K cache"},
            {"Hi", 2, true, 1, "index heads"},   {"Di", 16, true, 1, "index head dim"},
            {"BLK", 8, true, 1, "block size"}};
  }
  std::vector<TensorSpec> inputs(const Params& p) const override {
    const auto T = pint(p, "T");
    return {{"idx_q", Kind::ACT, {T, pint(p, "Hi") * pint(p, "Di")}, "[T, Hi*Di]"},
            {"idx_k", Kind::ACT, {pint(p, "N"), pint(p, "Di")}, "[N, Di]"},
            {"q_pos", Kind::POS, {T}, "[T]"}};
  }
  std::vector<TensorSpec> outputs(const Params& p) const override {
    const auto nb = (pint(p, "N") + pint(p, "BLK") - 1) / pint(p, "BLK");
    return {{"scores", Kind::F32, {pint(p, "Hi") * pint(p, "T"), nb}, "[Hi*T, NB = ceil(N/BLK)]"}};
  }
  void check_inputs(const Params& p, const Tensors& in) const override {
    const auto& pos = in.at("q_pos").i;
    const auto N = pint(p, "N");
    for (std::size_t t = 0; t < pos.size(); ++t)
      if (pos[t] < 0 || pos[t] >= N)
        throw std::invalid_argument(fmt::format("msa_index: q_pos[{}] = {} is outside [0, N) = [0, {})", t, pos[t], N));
    const auto max_pos = *std::max_element(pos.begin(), pos.end());
    if (max_pos != N - 1)
      throw std::invalid_argument(fmt::format(
          "msa_index: max(q_pos) = {}, expected N - 1 = {} (the scores have NB = floor(max(q_pos)/BLK) + 1 "
          "columns; a case's cache ends at its last query)", max_pos, N - 1));
  }
  Tensors generate(const Params& p, std::uint64_t seed) const override {
    const auto s = inputs(p);
    return {{"idx_q", randn(s[0].dims, seed, "msa_index.idx_q")},
            {"idx_k", randn(s[1].dims, seed, "msa_index.idx_k")},
            {"q_pos", positions(pint(p, "T"), pint(p, "N"), pint(p, "BLK"), 2, seed, "msa_index.q_pos")}};
  }
  Tensors run(const Params& p, const Tensors& in, Precision prec) const override {
    return prec == Precision::FP64 ? run_t<double>(p, in) : run_t<float>(p, in);
  }
#if M3_HAVE_GPU
  Tensors run_gpu(const Params& p, const Tensors& in) const override {
    using namespace gpu_io;
    const int T = dim(pint(p, "T"), "T"), N = dim(pint(p, "N"), "N");
    MsaDims d;
    d.Hi = dim(pint(p, "Hi"), "Hi");
    d.Di = dim(pint(p, "Di"), "Di");
    d.BLK = dim(pint(p, "BLK"), "BLK");
    d.K_blk = 1;  // not used by the scoring
    const cmp::Dims sd = outputs(p)[0].dims;  // [Hi*T, NB]
    const gpu::Stream s;
    const auto idx_q = bf16_in(in.at("idx_q"), s.get());  // [T, Hi*Di]
    const auto idx_k = bf16_in(in.at("idx_k"), s.get());  // [N, Di]
    const auto q_pos = i64_in(in.at("q_pos"), s.get());   // [T]
    auto scores = out<float>(sd, s.get());                 // [Hi*T, NB] fp32
    gpu::msa_index(idx_q.data(), idx_k.data(), q_pos.data(), T, N, dim(sd[1], "NB"), d, scores.data(), s.get());
    return {{"scores", get(scores, sd, s.get())}};
  }
#endif

 private:
  template <class T>
  static Tensors run_t(const Params& p, const Tensors& in) {
    MsaDims d;
    d.Hi = static_cast<int>(pint(p, "Hi"));
    d.Di = static_cast<int>(pint(p, "Di"));
    d.BLK = static_cast<int>(pint(p, "BLK"));
    d.K_blk = 1;  // not used by the scoring
    Mat<T> scores;  // [Hi*T, NB]
    ref::msa_index(mat<T>(in.at("idx_q")), mat<T>(in.at("idx_k")), in.at("q_pos").i, d, scores);
    return {{"scores", from_mat(scores)}};
  }
};

}  // namespace

const OpCase& msa_index_case() {
  static const MsaIndexCase c;
  return c;
}

}  // namespace m3::cases
