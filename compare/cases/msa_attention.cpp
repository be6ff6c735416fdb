// Op case: msa_attention (reference/ops/msa_attention.h), MSA's block-sparse exact attention:
// query head h attends the keys j <= q_pos[t] of the blocks its KV group g = h/(Hq/Hkv) selected
// in sel [Hkv*T, K_blk] (an input here, -1 = unused). The generated selections are what
// msa_select can produce: random non-local blocks, the local block last, -1 padding when fewer
// than K_blk blocks are visible; queries at 0, N-1 and the BLK and K_blk*BLK edges.
#include "compare/cases/case.h"
#include "reference/ops/msa_attention.h"
#include "reference/rng.h"

#if M3_HAVE_GPU
#include "gpu/kernels/msa_attention.h"
#endif

#include <fmt/format.h>

#include <algorithm>
#include <numeric>
#include <stdexcept>

namespace m3::cases {

namespace {

class MsaAttentionCase final : public OpCase {
 public:
  std::string op() const override { return "msa_attention"; }
  std::string summary() const override { return "MSA block-sparse attention over selected blocks"; }
  std::vector<ParamSpec> param_specs() const override {
    return {{"T", 6, true, 1, "queries"},         {"N", 70, true, 1, "keys in the cache"},
            {"Hq", 6, true, 1, "query heads"},     {"Hkv", 3, true, 1, "KV heads = index heads (divides Hq)"},
            {"D", 16, true, 1, "head dim"},        {"BLK", 8, true, 1, "block size"},
            {"K_blk", 3, true, 1, "selected blocks per (query, group)"}};
  }
  void check(const Params& p) const override {
    if (pint(p, "Hq") % pint(p, "Hkv") != 0)
      throw std::invalid_argument(
          fmt::format("msa_attention: Hq = {} is not divisible by Hkv = {}", pint(p, "Hq"), pint(p, "Hkv")));
  }
  std::vector<TensorSpec> inputs(const Params& p) const override {
    const auto T = pint(p, "T"), N = pint(p, "N"), D = pint(p, "D"), Hkv = pint(p, "Hkv");
    return {{"q", Kind::ACT, {T, pint(p, "Hq") * D}, "[T, Hq*D]"},
            {"k", Kind::ACT, {N, Hkv * D}, "[N, Hkv*D]"},
            {"v", Kind::ACT, {N, Hkv * D}, "[N, Hkv*D]"},
            {"q_pos", Kind::POS, {T}, "[T]"},
            {"sel", Kind::IDS, {Hkv * T, pint(p, "K_blk")}, "[Hkv*T, K_blk]"}};
  }
  std::vector<TensorSpec> outputs(const Params& p) const override {
    return {{"out", Kind::ACT, {pint(p, "T"), pint(p, "Hq") * pint(p, "D")}, "[T, Hq*D]"}};
  }
  Tensors generate(const Params& p, std::uint64_t seed) const override {
    const auto s = inputs(p);
    const auto T = pint(p, "T"), blk = pint(p, "BLK"), k_blk = pint(p, "K_blk");
    Tensors in;
    in["q"] = randn(s[0].dims, seed, "msa_attention.q");
    in["k"] = randn(s[1].dims, seed, "msa_attention.k");
    in["v"] = randn(s[2].dims, seed, "msa_attention.v");
    in["q_pos"] = positions(T, pint(p, "N"), blk, k_blk, seed, "msa_attention.q_pos");
    Tensor sel;
    sel.dims = s[4].dims;
    const CounterRng rng(seed, "msa_attention.sel");
    std::uint64_t draw = 0;
    for (std::int64_t r = 0; r < s[4].dims[0]; ++r) {
      const std::int64_t L = in["q_pos"].i[static_cast<std::size_t>(r % T)] / blk;  // own block
      std::vector<std::int64_t> older(static_cast<std::size_t>(L));                // blocks 0..L-1
      std::iota(older.begin(), older.end(), 0);
      const std::int64_t n_older = std::min(k_blk - 1, L);
      for (std::int64_t i = 0; i < n_older; ++i)  // partial Fisher-Yates: a random n_older-subset
        std::swap(older[static_cast<std::size_t>(i)],
                  older[static_cast<std::size_t>(i + static_cast<std::int64_t>(rng.bits(draw++) % (L - i)))]);
      for (std::int64_t i = 0; i < k_blk; ++i)
        sel.i.push_back(i < n_older ? older[static_cast<std::size_t>(i)] : i == n_older ? L : -1);
    }
    in["sel"] = std::move(sel);
    return in;
  }
  Tensors run(const Params& p, const Tensors& in, Precision prec) const override {
    return prec == Precision::FP64 ? run_t<double>(p, in) : run_t<float>(p, in);
  }
#if M3_HAVE_GPU
  Tensors run_gpu(const Params& p, const Tensors& in) const override {
    using namespace gpu_io;
    const int T = dim(pint(p, "T"), "T"), N = dim(pint(p, "N"), "N");
    const int blk = dim(pint(p, "BLK"), "BLK"), k_blk = dim(pint(p, "K_blk"), "K_blk");
    const AttnDims d{dim(pint(p, "Hq"), "Hq"), dim(pint(p, "Hkv"), "Hkv"), dim(pint(p, "D"), "D")};
    const cmp::Dims out_dims = {T, std::int64_t{d.Hq} * d.D};
    const gpu::Stream s;
    const auto q = bf16_in(in.at("q"), s.get());        // [T, Hq*D]
    const auto k = bf16_in(in.at("k"), s.get());        // [N, Hkv*D]
    const auto v = bf16_in(in.at("v"), s.get());        // [N, Hkv*D]
    const auto q_pos = i64_in(in.at("q_pos"), s.get());  // [T]
    const auto sel = i32_in(in.at("sel"), s.get());      // [Hkv*T, K_blk]
    const std::size_t ws_bytes = gpu::msa_attention_workspace_bytes(T, k_blk, d);
    gpu::DeviceBuffer<unsigned char> ws(ws_bytes);      // cudaMalloc: 256-byte aligned
    auto y = out<gpu::bf16>(out_dims, s.get());          // [T, Hq*D]
    gpu::msa_attention(q.data(), k.data(), v.data(), q_pos.data(), sel.data(), T, N, blk, k_blk, d, y.data(), s.get(),
                       ws.data(), ws_bytes);
    return {{"out", get(y, out_dims, s.get())}};
  }
#endif

 private:
  template <class T>
  static Tensors run_t(const Params& p, const Tensors& in) {
    const AttnDims d{static_cast<int>(pint(p, "Hq")), static_cast<int>(pint(p, "Hkv")), static_cast<int>(pint(p, "D"))};
    Mat<T> out;  // [T, Hq*D]
    ref::msa_attention(mat<T>(in.at("q")), mat<T>(in.at("k")), mat<T>(in.at("v")), in.at("q_pos").i,
                       ids(in.at("sel")), static_cast<int>(pint(p, "BLK")), d, out);
    return {{"out", from_mat(out)}};
  }
};

}  // namespace

const OpCase& msa_attention_case() {
  static const MsaAttentionCase c;
  return c;
}

}  // namespace m3::cases
