// Op case: msa_select (reference/ops/msa_select.h), top-K_blk block selection per (index head,
// query) with the forced local (and init) blocks, tie rule score descending then id ascending.
// The block scores are an fp32 input (msa_index's layout, -inf past the query's own block); the
// selection is an index output: exact match, or near-tie where the deciding scores are within
// rounding (tolerance.h). Default positions cover one visible block (q_pos 0), exactly K_blk
// visible blocks (K_blk*BLK - 1: every block taken, no top-k) and K_blk + 1 (the first real top-k).
#include "compare/cases/case.h"
#include "reference/ops/msa_select.h"

#if M3_HAVE_GPU
#include "gpu/kernels/msa_select.h"
#endif

#include <fmt/format.h>

#include <limits>
#include <stdexcept>

namespace m3::cases {

namespace {

class MsaSelectCase final : public OpCase {
 public:
  std::string op() const override { return "msa_select"; }
  std::string summary() const override { return "MSA top-k block selection, [Hi*T, K_blk] ids"; }
  std::vector<ParamSpec> param_specs() const override {
    return {{"T", 7, true, 1, "queries"},
            {"N", 200, true, 1, "keys (NB = ceil(N/BLK) score columns)"},
            {"Hi", 2, true, 1, "index heads"},
            {"BLK", 16, true, 1, "block size"},
            {"K_blk", 4, true, 1, "selected blocks, forced ones included"},
            {"local_blocks", 1, true, 0, "trailing blocks always selected"},
            {"init_blocks", 0, true, 0, "leading blocks always selected"}};
  }
  void check(const Params& p) const override {
    if (pint(p, "K_blk") < pint(p, "local_blocks") + pint(p, "init_blocks"))
      throw std::invalid_argument(fmt::format("msa_select: K_blk = {} < local_blocks + init_blocks = {} + {}",
                                              pint(p, "K_blk"), pint(p, "local_blocks"), pint(p, "init_blocks")));
  }
  std::vector<TensorSpec> inputs(const Params& p) const override {
    const auto T = pint(p, "T"), nb = (pint(p, "N") + pint(p, "BLK") - 1) / pint(p, "BLK");
    return {{"scores", Kind::F32, {pint(p, "Hi") * T, nb}, "[Hi*T, NB = ceil(N/BLK)]"},
            {"q_pos", Kind::POS, {T}, "[T]"}};
  }
  std::vector<TensorSpec> outputs(const Params& p) const override {
    return {{"sel", Kind::IDS, {pint(p, "Hi") * pint(p, "T"), pint(p, "K_blk")}, "[Hi*T, K_blk]"}};
  }
  void check_inputs(const Params& p, const Tensors& in) const override {
    const auto& pos = in.at("q_pos").i;
    for (std::size_t t = 0; t < pos.size(); ++t)
      if (pos[t] < 0 || pos[t] >= pint(p, "N"))
        throw std::invalid_argument(
            fmt::format("msa_select: q_pos[{}] = {} is outside [0, N) = [0, {})", t, pos[t], pint(p, "N")));
  }
  Tensors generate(const Params& p, std::uint64_t seed) const override {
    const auto s = inputs(p);
    const auto T = pint(p, "T"), nb = s[0].dims[1], blk = pint(p, "BLK");
    Tensors in;
    in["q_pos"] = positions(T, pint(p, "N"), blk, pint(p, "K_blk"), seed, "msa_select.q_pos");
    in["scores"] = randn(s[0].dims, seed, "msa_select.scores", 4.0);  // msa_index's scale for Di = 16
    for (std::int64_t r = 0; r < s[0].dims[0]; ++r)  // blocks past the query's own: -inf
      for (std::int64_t b = in["q_pos"].i[static_cast<std::size_t>(r % T)] / blk + 1; b < nb; ++b)
        in["scores"].f[static_cast<std::size_t>(r * nb + b)] = -std::numeric_limits<double>::infinity();
    return in;
  }
  Tensors run(const Params& p, const Tensors& in, Precision prec) const override {
    return prec == Precision::FP64 ? run_t<double>(p, in) : run_t<float>(p, in);
  }
#if M3_HAVE_GPU
  // fp32 scores in, ids out, no bf16 anywhere: an fp32 case (the same storage as a bf16 one) is
  // checked as well.
  bool gpu_precision_ok(Precision prec) const override {
    return prec == Precision::BF16 || prec == Precision::FP32;
  }
  // "sel": msa_select's own choice of kernel; "sel@single_cta" and "sel@split" force each of its two
  // kernels (bit-identical by design), so that small cases check the path large ones take.
  Tensors run_gpu(const Params& p, const Tensors& in) const override {
    using namespace gpu_io;
    using gpu::detail::SelectPath;
    const int T = dim(pint(p, "T"), "T");
    MsaDims d;
    d.Hi = dim(pint(p, "Hi"), "Hi");
    d.BLK = dim(pint(p, "BLK"), "BLK");
    d.K_blk = dim(pint(p, "K_blk"), "K_blk");
    d.local_blocks = dim(pint(p, "local_blocks"), "local_blocks");
    d.init_blocks = dim(pint(p, "init_blocks"), "init_blocks");
    const cmp::Dims od = outputs(p)[0].dims;  // [Hi*T, K_blk]
    const int NB = dim(in.at("scores").dims[1], "NB");
    const gpu::Stream s;
    const auto scores = f32_in(in.at("scores"), s.get());  // [Hi*T, NB] fp32
    const auto q_pos = i64_in(in.at("q_pos"), s.get());    // [T]
    Tensors r;
    auto one = [&](const std::string& name, SelectPath path) {
      auto sel = out<std::int32_t>(od, s.get());  // [Hi*T, K_blk]
      gpu::detail::msa_select_path(scores.data(), q_pos.data(), T, NB, d, sel.data(), s.get(), 1, path);
      r[name] = get(sel, od, s.get());
    };
    one("sel", SelectPath::Auto);
    // Within the split path's limits the single-CTA one fits too (4*NB + 8*K_blk bytes of shared
    // memory <= 129 KB); past them only msa_select's own choice runs.
    if (d.K_blk <= 64 && NB <= 32768) {
      one("sel@single_cta", SelectPath::SingleCta);
      one("sel@split", SelectPath::Split);
    }
    return r;
  }
#endif
  std::optional<MatD> tie_scores(const std::string&, const Params&, const Tensors& in, const Tensors&) const override {
    return mat<double>(in.at("scores"));
  }

 private:
  template <class T>
  static Tensors run_t(const Params& p, const Tensors& in) {
    MsaDims d;
    d.Hi = static_cast<int>(pint(p, "Hi"));
    d.BLK = static_cast<int>(pint(p, "BLK"));
    d.K_blk = static_cast<int>(pint(p, "K_blk"));
    d.local_blocks = static_cast<int>(pint(p, "local_blocks"));
    d.init_blocks = static_cast<int>(pint(p, "init_blocks"));
    MatI sel;  // [Hi*T, K_blk]
    ref::msa_select(mat<T>(in.at("scores")), in.at("q_pos").i, d, sel);
    return {{"sel", from_ids(sel)}};
  }
};

}  // namespace

const OpCase& msa_select_case() {
  static const MsaSelectCase c;
  return c;
}

}  // namespace m3::cases
