// SwiGLU-OAI activation and MLP (spec §2.4): the clamped gated activation shared by the dense
// MLP, the routed experts and the shared expert. The activation is evaluated in double per
// element and rounded once to T; the three projections are Eigen GEMMs in T.
#include "reference/ops/swiglu_oai.h"

#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

namespace m3::ref {

namespace {

// 1 / (1 + exp(-z)) never produces NaN for finite z: exp(-z) overflows to +inf for z < ~-709
// and the quotient is then exactly 0, the correct limit.
inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

void check_params(const SwigluParams& p, const char* who) {
  // A negative (or NaN) limit would make the clamp of `up` an empty interval.
  if (!(p.limit >= 0.0))
    throw std::invalid_argument(fmt::format("{}: limit is {}, expected >= 0", who, p.limit));
}

}  // namespace

template <class T>
void swiglu_oai(const Mat<T>& gate, const Mat<T>& up, const SwigluParams& p, Mat<T>& act) {
  check_params(p, "swiglu_oai");
  if (gate.rows() != up.rows() || gate.cols() != up.cols())
    throw std::invalid_argument(
        fmt::format("swiglu_oai: up is {}x{}, expected the shape of gate {}x{}", up.rows(),
                    up.cols(), gate.rows(), gate.cols()));
  // A no-op when act aliases gate or up (same shape), so aliasing stays legal.
  act.resize(gate.rows(), gate.cols());  // [R, I]
  for (Eigen::Index r = 0; r < gate.rows(); ++r)
    for (Eigen::Index i = 0; i < gate.cols(); ++i) {
      // Written as comparisons (not std::min / std::clamp) so that a NaN input stays NaN, as
      // torch.clamp does, instead of depending on argument order.
      double g = static_cast<double>(gate(r, i));
      double u = static_cast<double>(up(r, i));
      if (g > p.limit) g = p.limit;  // the gate is clamped from above only
      if (u > p.limit) u = p.limit;
      if (u < -p.limit) u = -p.limit;
      act(r, i) = static_cast<T>((u + p.beta) * g * sigmoid(p.alpha * g));
    }
}

template <class T>
void mlp_swiglu(const Mat<T>& x, const Mat<T>& w_gate, const Mat<T>& w_up, const Mat<T>& w_down,
                const SwigluParams& p, Mat<T>& y, Rounding r) {
  const Eigen::Index H = x.cols(), I = w_gate.rows();
  if (w_gate.cols() != H)
    throw std::invalid_argument(fmt::format(
        "mlp_swiglu: w_gate has {} columns, expected H = {} (x's columns)", w_gate.cols(), H));
  if (w_up.rows() != I || w_up.cols() != H)
    throw std::invalid_argument(fmt::format("mlp_swiglu: w_up is {}x{}, expected [I, H] = {}x{}",
                                            w_up.rows(), w_up.cols(), I, H));
  if (w_down.rows() != H || w_down.cols() != I)
    throw std::invalid_argument(fmt::format("mlp_swiglu: w_down is {}x{}, expected [H, I] = {}x{}",
                                            w_down.rows(), w_down.cols(), H, I));
  Mat<T> gate(x.rows(), I);  // [R, I]
  Mat<T> up(x.rows(), I);    // [R, I]
  gate.noalias() = x * w_gate.transpose();
  up.noalias() = x * w_up.transpose();
  const bool bf16 = r == Rounding::BF16;
  if (bf16) round_bf16_inplace(gate), round_bf16_inplace(up);
  swiglu_oai(gate, up, p, gate);  // act overwrites gate: [R, I]
  if (bf16) round_bf16_inplace(gate);
  // x is no longer read, so y may be x itself.
  y.noalias() = gate * w_down.transpose();  // [R, H]
  if (bf16) round_bf16_inplace(y);
}

template void swiglu_oai<float>(const Mat<float>&, const Mat<float>&, const SwigluParams&,
                                Mat<float>&);
template void swiglu_oai<double>(const Mat<double>&, const Mat<double>&, const SwigluParams&,
                                 Mat<double>&);
template void mlp_swiglu<float>(const Mat<float>&, const Mat<float>&, const Mat<float>&,
                                const Mat<float>&, const SwigluParams&, Mat<float>&, Rounding);
template void mlp_swiglu<double>(const Mat<double>&, const Mat<double>&, const Mat<double>&,
                                 const Mat<double>&, const SwigluParams&, Mat<double>&, Rounding);

}  // namespace m3::ref
