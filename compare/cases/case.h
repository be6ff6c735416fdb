// Op case files (DESIGN §7): one op's inputs, its expected outputs and its parameters in one HDF5
// file, the interface for checking any kernel (ours, or one dumped from PyTorch) against the
// reference with `m3h verify case.h5`. Layout (schema_version 1):
//
//   root attributes  format = "m3h-case", schema_version = 1, op (a stem of reference/ops),
//                    precision = "fp32" | "bf16" | "fp64", seed, generator (command line),
//                    one attribute per parameter of the op (T, Hq, BLK, eps, ...: integers as
//                    int64, reals as float64)
//   /inputs/<name>   float tensors as float32 / float64 / bf16 (by precision, below), ids int32,
//                    positions int64
//   /outputs/<name>  the same storage rules
//
// Float storage by precision: activations and weights (Kind::ACT) are float32 in fp32 cases,
// float64 in fp64 cases and bf16 (uint16 bits, attribute dtype = "bfloat16") in bf16 cases; the
// tensors the GPU path keeps in fp32 even in bf16 mode (Kind::F32: block scores, router logits
// and weights) stay float32 there. A bf16 case holds bf16-rounded inputs, and its outputs come
// from the reference in its bf16-emulating way: fp32 math on those inputs, outputs rounded to bf16.
//
// Each op registers one OpCase (compare/cases/<op>.cpp; the registry is in case.cpp): its
// parameters with awkward defaults, its tensors' shapes, a seeded input generator, the reference
// run, and for index outputs the scores that decide them (near-ties).
//
// GPU twins (`m3h verify --device gpu`, compare/verify.h): OpCase::run_gpu runs the op's CUDA
// kernel(s) of gpu/kernels on the case's inputs, uploaded in the GPU's storage (ACT as bf16, F32 as
// fp32, IDS as int32, POS as int64), and returns the outputs widened to double. An output that more
// than one GPU kernel computes comes back once per extra kernel as "<output>@<kernel>" (e.g.
// attention_dense's "out@prefill"), each checked against the same expected output. The GPU
// computes in bf16, so run_gpu takes bf16 cases only, except where the op's GPU path is fp32 (or
// exact) end to end on an fp32 case's storage: gpu_precision_ok says which (msa_select).
// Built only with CUDA (M3_HAVE_GPU = 1); the CPU-only build keeps the CaseError default.
#pragma once

#include "compare/metrics.h"
#include "reference/tensor.h"

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace m3::cases {

inline constexpr const char* kCaseFormat = "m3h-case";
inline constexpr std::int64_t kCaseSchemaVersion = 1;

enum class Kind {
  ACT,  // float activation or weight: float32 / float64 / bf16 by the case's precision
  F32,  // float the GPU path keeps in fp32 in bf16 mode: float32, or float64 in fp64 cases
  IDS,  // int32 ids (tokens, blocks, experts), -1 = none; index outputs compare exactly
  POS,  // int64 positions
};

struct TensorSpec {
  std::string name;
  Kind kind = Kind::ACT;
  cmp::Dims dims;
  std::string dims_expr;  // the shape in dimension letters, for messages: "[T, Hq*D]"
};

// A tensor in memory, whatever its storage: floats widened to double, ids and positions to int64.
struct Tensor {
  cmp::Dims dims;
  std::vector<double> f;        // ACT, F32
  std::vector<std::int64_t> i;  // IDS, POS
};
using Tensors = std::map<std::string, Tensor>;

struct ParamSpec {
  std::string name;
  double def = 0;     // default: small and awkward (odd counts, lengths off the block grid)
  bool is_int = true;
  double min = 1;     // smallest legal value
  std::string help;
};
using Params = std::map<std::string, double>;

// Thrown for anything wrong with a case file or a case request; the message names the file and
// the attribute or dataset, and (for files) ends with a HINT on how to regenerate it.
struct CaseError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

class OpCase {
 public:
  virtual ~OpCase() = default;
  virtual std::string op() const = 0;  // the stem of reference/ops/<op>.h
  virtual std::string summary() const = 0;
  virtual std::vector<ParamSpec> param_specs() const = 0;
  // Relations between parameters (Hq % Hkv, R <= D, ...); throws std::invalid_argument.
  virtual void check(const Params&) const {}
  virtual std::vector<TensorSpec> inputs(const Params&) const = 0;
  virtual std::vector<TensorSpec> outputs(const Params&) const = 0;
  // Relations between the inputs and the parameters that shapes cannot express (max(q_pos) =
  // N - 1, ids in range, ...); throws std::invalid_argument. Called by read_case.
  virtual void check_inputs(const Params&, const Tensors&) const {}
  // Seeded inputs, values in double (the caller rounds them to the case's storage).
  virtual Tensors generate(const Params&, std::uint64_t seed) const = 0;
  // The reference op in double (FP64) or float (FP32, BF16); the caller rounds the inputs and the
  // outputs to the case's storage. In BF16, an op whose GPU twin stores intermediates in bf16 (the
  // MLPs: gate, up, act, each expert's output) rounds them at the same points (DESIGN §3).
  virtual Tensors run(const Params&, const Tensors& in, Precision prec) const = 0;
  // For an index output: scores(r, id) = the score that decided id in row r (near-ties).
  virtual std::optional<MatD> tie_scores(const std::string& /*output*/, const Params&,
                                         const Tensors& /*in*/, const Tensors& /*ref_out*/) const {
    return std::nullopt;
  }
  // For a float output whose rows follow an index output's rows (router weights follow the
  // chosen experts): that output's name, else "". Its rows are skipped where the ids near-tie.
  virtual std::string follows(const std::string& /*output*/) const { return ""; }
  // For ops whose bf16 outputs sum bf16-rounded intermediates of any size (the SwiGLU MLPs: gate,
  // up and act stored in bf16, act up to ~56): per output, per element, sum over the intermediates
  // v the element depends on of |d out / d v| * |v| (first order, fp64, from the inputs); the bf16
  // tier adds kBf16RoundingFactor times it to the element's atol (compare/tolerance.h). Outputs
  // absent from the map (every output of most ops) get no such term.
  virtual Tensors rounding_scale(const Params&, const Tensors& /*in*/) const { return {}; }
  // The GPU twin on `in` (see the file comment): every output of outputs(p), plus
  // "<output>@<kernel>" for extra kernels. Throws CaseError where the op or these parameters have
  // no GPU path (the message says which and why), m3::gpu::GpuError for what a kernel rejects.
  virtual Tensors run_gpu(const Params&, const Tensors& /*in*/) const;
  // Case precisions the GPU path can be checked in: bf16 (the GPU's own), and fp32 only where the
  // op's GPU path holds every input and output in fp32 or exactly (no bf16 rounding anywhere).
  virtual bool gpu_precision_ok(Precision p) const { return p == Precision::BF16; }
};

// The registry: every op stem of reference/ops, in forward order.
const std::vector<const OpCase*>& all_ops();
const OpCase& find_op(std::string_view op);  // throws CaseError listing the known ops

// One case in memory.
struct Case {
  std::string op;
  Precision precision = Precision::FP32;
  std::uint64_t seed = 0;
  std::string generator;
  Params params;
  Tensors inputs;
  Tensors outputs;
};

// Defaults overridden by "NAME=VALUE" assignments; checks names, integrality, minima, relations.
Params resolve_params(const OpCase& op, const std::vector<std::string>& assignments);
// "T=5 N=37 ..." in the order of param_specs.
std::string params_str(const OpCase& op, const Params& p);

// The storage element type of a kind in a precision, and the precision an output is compared
// in (its tolerance tier): FP32 for F32 kinds of bf16 cases.
enum class Storage { F32, F64, BF16, I32, I64 };
Storage storage_of(Kind k, Precision p);
std::string_view storage_name(Storage s);
Precision tier_of(Kind k, Precision p);

// Rounds float tensors to their storage (float32, bf16) in place; no-op for fp64 and ints.
void round_to_storage(const std::vector<TensorSpec>& specs, Precision p, Tensors& t);

// Runs the reference on `inputs` (rounded to storage first) and returns outputs rounded to storage.
Tensors run_reference(const OpCase& op, const Params& p, const Tensors& inputs, Precision prec);

// Generates inputs from the seed and the reference's outputs on them.
Case make_case(const OpCase& op, const Params& p, Precision prec, std::uint64_t seed,
               std::string generator);

void write_case(const std::string& path, const Case& c);
// Reads and validates: format, schema_version, op, precision, every parameter, every input and
// output (presence, shape, dtype) and no NaN in an input. Throws CaseError naming what is wrong.
Case read_case(const std::string& path);

// --- helpers for the op files ---

std::int64_t pint(const Params& p, const std::string& name);
double preal(const Params& p, const std::string& name);
std::int64_t element_count(const cmp::Dims& dims);

// Standard normal values times `scale`, from the counter RNG (the same bits on every machine).
Tensor randn(const cmp::Dims& dims, std::uint64_t seed, std::string_view stream, double scale = 1.0);
// T sorted query positions in [0, N): N-1 (always), 0 and block edges (BLK-1, BLK, k*BLK-1, k*BLK, k*BLK+1
// for k = K_blk) where they fit, then seeded random ones; distinct while T <= N.
Tensor positions(std::int64_t T, std::int64_t N, std::int64_t blk, std::int64_t k_blk, std::uint64_t seed,
                 std::string_view stream);

// Views of a Tensor as reference types: rows = dims[0], the other dims flattened into columns;
// slice(k) of a rank-3 tensor [A, B, C] is the matrix [B, C] at k.
template <class T>
Mat<T> mat(const Tensor& t);
template <class T>
Mat<T> slice(const Tensor& t, std::int64_t k);
template <class T>
Vec<T> vec(const Tensor& t);
MatI ids(const Tensor& t);
std::vector<std::int32_t> ids_vec(const Tensor& t);

template <class T>
Tensor from_mat(const Mat<T>& m);
Tensor from_ids(const MatI& m);

// OpCase::rounding_scale of one SwiGLU-OAI MLP y = W_down act(W_gate x, W_up x) whose gate, up,
// act and output are rounded to bf16 (mlp_swiglu, Rounding::BF16): per element of y [T, H],
// sum_j |W_down[h, j]| m_j + |y[h]|, with m_j = |act_j| + |d act_j / d gate_j * gate_j| +
// |d act_j / d up_j * up_j| (zero where the clamp holds the input), in fp64.
// x [T, H], w_gate, w_up [I, H], w_down [H, I].
MatD swiglu_rounding_scale(const MatD& x, const MatD& w_gate, const MatD& w_up, const MatD& w_down, double alpha,
                           double limit, double beta);

}  // namespace m3::cases

#if M3_HAVE_GPU
#include "gpu/runtime/buffer.h"

namespace m3::cases::gpu_io {

// Host <-> device copies for the GPU twins (case.cpp), synchronous on `s`. Uploads convert the
// widened values to the GPU's storage: bf16 (round to nearest even: exact for a bf16 case's
// values), fp32, int32 (ids), int64 (positions).
gpu::DeviceBuffer<gpu::bf16> bf16_in(const Tensor& t, cudaStream_t s);
gpu::DeviceBuffer<float> f32_in(const Tensor& t, cudaStream_t s);
gpu::DeviceBuffer<std::int32_t> i32_in(const Tensor& t, cudaStream_t s);
gpu::DeviceBuffer<std::int64_t> i64_in(const Tensor& t, cudaStream_t s);
// An output buffer of element_count(dims) elements, poisoned so that an element the kernel never
// writes cannot pass: 0xFF bytes (bf16 / fp32 NaN), 0x80 bytes for ids (a large negative id).
template <class T>
gpu::DeviceBuffer<T> out(const cmp::Dims& dims, cudaStream_t s);
// Downloads and widens (bf16, fp32 -> Tensor::f; int32 -> Tensor::i).
Tensor get(const gpu::DeviceBuffer<gpu::bf16>& d, const cmp::Dims& dims, cudaStream_t s);
Tensor get(const gpu::DeviceBuffer<float>& d, const cmp::Dims& dims, cudaStream_t s);
Tensor get(const gpu::DeviceBuffer<std::int32_t>& d, const cmp::Dims& dims, cudaStream_t s);
// Casts a case dimension (int64) to the kernels' int, throwing CaseError when it does not fit.
int dim(std::int64_t v, const char* what);

}  // namespace m3::cases::gpu_io
#endif
