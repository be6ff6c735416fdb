// Golden files (DESIGN §7): one self-describing HDF5 layout for `m3h golden` and `m3h run --out`.
//
//   root attributes  format = "m3h-golden", schema_version, generator (the command line), git_commit,
//                    seed, config (JSON), precision (fp32|fp64|bf16), storage (float32|float64)
//   /inputs/tokens   [T] int32              the prompt
//   /rows            [R] int64              prefill rows kept below (all T, or a documented sample)
//   /trace/<name>    [R, C] or [Hi, R, C]   prefill intermediates under their DESIGN §1 names
//                                           (model.h); block_scores and selection are [Hi, R, .];
//                                           index tensors (selection, experts) are int32
//   /logits          [R, V]                 prefill logits of the kept rows
//   /decode/tokens   [K] int32              greedy tokens of the K decode steps
//   /decode/logits   [K, V]                 the logits of each decode step
// Schema 2 adds, each optional (issue 7):
//   /inputs/image    [C, H*W] float64       an image whose tower rows replace the first N tokens
//                                           (image placeholders), attribute image_size = [H, W];
//                                           the vision part is vision_preset(config name)
//   /vision/features [N, H]                 the tower's rows (vision.h)
//   /mtp/drafts      [D] int32              MTP draft tokens of every round, concatenated, from
//   /mtp/round_sizes [rounds] int64         generate_mtp over the K decode steps with the config's
//                                           seeded MTP modules; attribute mtp_k (drafts a round)
#pragma once

#include "reference/config.h"
#include "reference/model.h"

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace m3 {

inline constexpr const char* kGoldenFormat = "m3h-golden";
inline constexpr std::int64_t kGoldenSchemaVersion = 1;       // text only (every committed file)
inline constexpr std::int64_t kGoldenSchemaVersionExtras = 2;  // with an image and / or MTP drafts

// The commit the binary was built from ("unknown" outside a git checkout).
const char* build_git_commit();

// Rows kept from a prefill of T tokens: all when max_rows >= T, else the block and top-k edges
// (first, BLK-1, BLK, BLK+1, K_blk*BLK-1, K_blk*BLK, K_blk*BLK+1, last) plus seeded random rows,
// sorted (DESIGN §4: "first, last, block edges, random").
std::vector<std::int64_t> sample_rows(std::int64_t T, int blk, int k_blk, std::int64_t max_rows,
                                      std::uint64_t seed);

// A traced tensor as stored: dims [R, C] or [heads, R, C]; values widened to double, ids int32.
struct StoredTensor {
  std::vector<std::int64_t> dims;
  bool is_index = false;
  std::vector<double> values;       // !is_index
  std::vector<std::int32_t> ids;    // is_index
};

// Collects the trace of sequence 0 of a prefill of T tokens, keeping only `rows`. A tensor of
// T*h rows (h heads) is kept as [h, R, C].
class TraceRecorder {
 public:
  TraceRecorder(std::int64_t T, std::vector<std::int64_t> rows);
  TraceFn fn();
  const std::map<std::string, StoredTensor>& tensors() const { return t_; }
  const std::vector<std::int64_t>& rows() const { return rows_; }

 private:
  std::int64_t T_;
  std::vector<std::int64_t> rows_;
  std::map<std::string, StoredTensor> t_;
};

struct GoldenRun {
  std::string generator;  // the command line
  std::uint64_t seed = 0;
  ModelConfig config;
  Precision precision = Precision::FP64;
  bool store_f64 = true;
  std::vector<std::int32_t> tokens;          // [T]
  std::vector<std::int64_t> rows;            // [R]
  std::map<std::string, StoredTensor> trace; // /trace/<name>
  MatD logits;                               // [R, V]
  std::vector<std::int32_t> decode_tokens;   // [K]
  MatD decode_logits;                        // [K, V]
  // Schema 2 (each part optional):
  MatD image;                                // [C, H*W] (empty: no image)
  std::int64_t image_h = 0, image_w = 0;
  MatD vision_features;                      // [N, H]
  int mtp_k = 0;                             // 0: no MTP drafts
  std::vector<std::vector<std::int32_t>> mtp_drafts;  // per round
  bool has_extras() const { return image.size() > 0 || mtp_k > 0; }
};

// What a golden run adds to the text run: an image before the prompt (tokens[0..N) must be the
// vision part's image_token_id, N its token count) and / or MTP drafts over the decode steps.
struct GoldenExtras {
  const MatD* image = nullptr;  // [C, H*W]
  int image_h = 0, image_w = 0;
  int mtp_k = 0;
};

// Runs the reference: prefill `tokens`, then `decode_steps` greedy steps, recording the prefill's
// trace at `rows`.
GoldenRun make_golden(const ModelConfig& cfg, std::uint64_t seed, Precision p,
                      const std::vector<std::int32_t>& tokens, int decode_steps,
                      const std::vector<std::int64_t>& rows, const ModelWeights<float>& weights,
                      const GoldenExtras& extras = {});

void write_golden(const std::string& path, const GoldenRun& g);

// Thrown by read_golden: the message says what is wrong and ends with a HINT line naming the
// command that regenerates the file.
struct GoldenError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Reads and validates: format, schema version, every dataset's presence, shape (from the config,
// T, R and K) and dtype, and that no value is NaN.
GoldenRun read_golden(const std::string& path);

// First disagreement between a recomputed run and a stored one, in forward order: trace tensors
// by layer, then logits, decode tokens, decode logits. Float tensors must be within rel_tol of the
// stored values elementwise (|a-b| <= rel_tol * max|b| of the tensor); index tensors and tokens
// must be equal. Returns "" when they agree, else "<tensor> at [i, j]: got x, stored y ...".
std::string first_difference(const GoldenRun& got, const GoldenRun& stored, double rel_tol);

}  // namespace m3
