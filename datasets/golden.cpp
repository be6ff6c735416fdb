// Golden files (golden.h): sampling, recording, writing, reading with validation, diffing.
#include "datasets/golden.h"

#include "datasets/hdf5.h"
#include "m3_git_commit.h"
#include "reference/mtp.h"
#include "reference/rng.h"
#include "reference/vision.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <set>

namespace m3 {

const char* build_git_commit() { return M3_GIT_COMMIT; }

std::vector<std::int64_t> sample_rows(std::int64_t T, int blk, int k_blk, std::int64_t max_rows,
                                      std::uint64_t seed) {
  std::vector<std::int64_t> rows;
  if (max_rows >= T) {
    for (std::int64_t r = 0; r < T; ++r) rows.push_back(r);
    return rows;
  }
  const std::int64_t kb = std::int64_t{blk} * k_blk;
  std::set<std::int64_t> s;
  for (std::int64_t r : {std::int64_t{0}, std::int64_t{blk} - 1, std::int64_t{blk}, std::int64_t{blk} + 1, kb - 1,
                         kb, kb + 1, T - 1})
    if (r >= 0 && r < T) s.insert(r);
  CounterRng rng(seed, "golden-rows");
  for (std::uint64_t i = 0; static_cast<std::int64_t>(s.size()) < std::max<std::int64_t>(max_rows, 1); ++i)
    s.insert(static_cast<std::int64_t>(rng.bits(i) % static_cast<std::uint64_t>(T)));
  return {s.begin(), s.end()};
}

TraceRecorder::TraceRecorder(std::int64_t T, std::vector<std::int64_t> rows) : T_(T), rows_(std::move(rows)) {}

TraceFn TraceRecorder::fn() {
  return [this](int seq, const std::string& name, const TraceView& v) {
    if (seq != 0) return;
    StoredTensor t;
    t.is_index = v.dtype == TraceView::DType::I32;
    const std::int64_t R = static_cast<std::int64_t>(rows_.size());
    // [T, C] keeps rows; [h*T, C] (one block per head) keeps [h, R, C]; anything else is kept whole.
    const std::int64_t heads = (T_ > 0 && v.rows % T_ == 0) ? v.rows / T_ : 0;
    std::vector<std::int64_t> src;
    if (heads == 0) {
      t.dims = {v.rows, v.cols};
      for (std::int64_t r = 0; r < v.rows; ++r) src.push_back(r);
    } else {
      t.dims = heads == 1 ? std::vector<std::int64_t>{R, v.cols} : std::vector<std::int64_t>{heads, R, v.cols};
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t r : rows_) src.push_back(h * T_ + r);
    }
    for (std::int64_t r : src)
      for (std::int64_t c = 0; c < v.cols; ++c) {
        if (t.is_index) t.ids.push_back(static_cast<std::int32_t>(v.at(r, c)));
        else t.values.push_back(v.at(r, c));
      }
    t_.insert_or_assign(name, std::move(t));
  };
}

GoldenRun make_golden(const ModelConfig& cfg, std::uint64_t seed, Precision p, const std::vector<std::int32_t>& tokens,
                      int decode_steps, const std::vector<std::int64_t>& rows, const ModelWeights<float>& weights,
                      const GoldenExtras& extras) {
  GoldenRun g;
  g.seed = seed;
  g.config = cfg;
  g.precision = p;
  g.tokens = tokens;
  g.rows = rows;
  Model model(cfg, weights, p);
  Sequence seq = model.new_sequence();
  TraceRecorder rec(static_cast<std::int64_t>(tokens.size()), rows);
  MatD logits;  // [T, V]
  if (extras.image) {
    const VisionConfig vc = vision_preset(cfg.name);
    g.image = *extras.image;
    g.image_h = extras.image_h, g.image_w = extras.image_w;
    g.vision_features = vision_forward(vc, generate_vision_weights(vc, seed), g.image, extras.image_h, extras.image_w);
    const Eigen::Index N = g.vision_features.rows();
    if (static_cast<Eigen::Index>(tokens.size()) < N ||
        std::any_of(tokens.begin(), tokens.begin() + N, [&](std::int32_t t) { return t != vc.image_token_id; }))
      throw std::invalid_argument(fmt::format("make_golden: the image gives {} rows, so tokens 0..{} must be the image "
                                              "placeholder {}",
                                              N, N - 1, vc.image_token_id));
    logits = model.prefill_embeds(seq, tokens, leading_image_rows(weights.embed_tokens, tokens, g.vision_features), rec.fn());
  } else {
    logits = model.prefill(seq, tokens, rec.fn());
  }
  g.trace = rec.tensors();
  g.logits.resize(static_cast<Eigen::Index>(rows.size()), logits.cols());
  for (std::size_t i = 0; i < rows.size(); ++i) g.logits.row(i) = logits.row(rows[i]);
  g.decode_logits.resize(decode_steps, logits.cols());
  MatD last = logits.bottomRows(1);
  for (int i = 0; i < decode_steps; ++i) {
    g.decode_tokens.push_back(greedy_token(last, 0));
    last = model.decode(seq, g.decode_tokens.back());
    g.decode_logits.row(i) = last.row(0);
  }
  if (extras.mtp_k > 0) {
    if (extras.image) throw std::invalid_argument("make_golden: an image and MTP drafts together are not supported");
    if (cfg.num_mtp_modules < 1)
      throw std::invalid_argument(fmt::format("make_golden: MTP drafts need MTP modules; '{}' has num_mtp_modules = 0",
                                              cfg.name));
    g.mtp_k = extras.mtp_k;
    Model main(cfg, weights, p);
    std::vector<Model> mods;
    for (int i = 0; i < cfg.num_mtp_modules; ++i)
      mods.emplace_back(mtp_module_config(cfg), generate_mtp_module(cfg, i, seed, weights), p);
    std::vector<Model*> ptrs;
    for (auto& m : mods) ptrs.push_back(&m);
    MtpStats st;
    const auto toks = generate_mtp(main, ptrs, tokens, decode_steps, extras.mtp_k, &st);
    if (toks != g.decode_tokens)
      throw std::runtime_error("make_golden: drafted decoding gave other tokens than greedy decoding (a tie broken "
                               "differently by the batched check)");
    g.mtp_drafts = st.drafts;
  }
  return g;
}

namespace {

void write_values(h5::File& f, const std::string& path, const std::vector<double>& v,
                  std::span<const std::int64_t> dims, bool f64) {
  if (f64) {
    f.write(path, v.data(), dims);
  } else {
    std::vector<float> x(v.begin(), v.end());
    f.write(path, x.data(), dims);
  }
}

}  // namespace

void write_golden(const std::string& path, const GoldenRun& g) {
  auto f = h5::File::create(path);
  f.set_attr("/", "format", std::string(kGoldenFormat));
  f.set_attr("/", "schema_version", g.has_extras() ? kGoldenSchemaVersionExtras : kGoldenSchemaVersion);
  f.set_attr("/", "generator", g.generator);
  f.set_attr("/", "git_commit", std::string(build_git_commit()));
  f.set_attr("/", "seed", static_cast<std::int64_t>(g.seed));
  f.set_attr("/", "config", g.config.to_json(-1));
  f.set_attr("/", "precision", std::string(precision_name(g.precision)));
  f.set_attr("/", "storage", std::string(g.store_f64 ? "float64" : "float32"));
  const std::array<std::int64_t, 1> nt{static_cast<std::int64_t>(g.tokens.size())};
  f.write("/inputs/tokens", g.tokens.data(), nt);
  const std::array<std::int64_t, 1> nr{static_cast<std::int64_t>(g.rows.size())};
  f.write("/rows", g.rows.data(), nr);
  for (const auto& [name, t] : g.trace) {
    const std::string p = "/trace/" + name;
    if (t.is_index) f.write(p, t.ids.data(), t.dims);
    else write_values(f, p, t.values, t.dims, g.store_f64);
  }
  auto write_mat = [&](const std::string& p, const MatD& m) {
    const std::array<std::int64_t, 2> d{m.rows(), m.cols()};
    write_values(f, p, std::vector<double>(m.data(), m.data() + m.size()), d, g.store_f64);
  };
  write_mat("/logits", g.logits);
  const std::array<std::int64_t, 1> nk{static_cast<std::int64_t>(g.decode_tokens.size())};
  f.write("/decode/tokens", g.decode_tokens.data(), nk);
  write_mat("/decode/logits", g.decode_logits);
  if (g.image.size() > 0) {
    const std::array<std::int64_t, 2> di{g.image.rows(), g.image.cols()};
    f.write("/inputs/image", g.image.data(), di);
    f.set_attr("/", "image_height", g.image_h);
    f.set_attr("/", "image_width", g.image_w);
    write_mat("/vision/features", g.vision_features);
  }
  if (g.mtp_k > 0) {
    std::vector<std::int32_t> flat;
    std::vector<std::int64_t> sizes;
    for (const auto& d : g.mtp_drafts) {
      flat.insert(flat.end(), d.begin(), d.end());
      sizes.push_back(static_cast<std::int64_t>(d.size()));
    }
    const std::array<std::int64_t, 1> nf{static_cast<std::int64_t>(flat.size())}, ns{static_cast<std::int64_t>(sizes.size())};
    f.write("/mtp/drafts", flat.data(), nf);
    f.write("/mtp/round_sizes", sizes.data(), ns);
    f.set_attr("/", "mtp_k", static_cast<std::int64_t>(g.mtp_k));
  }
}

}  // namespace m3

namespace m3 {

namespace {

struct Expected {
  std::vector<std::int64_t> dims;
  bool is_index = false;
};

// The trace a prefill of T tokens records at R rows (model.h names, TraceRecorder shapes).
std::map<std::string, Expected> expected_trace(const ModelConfig& c, std::int64_t T, std::int64_t R) {
  std::map<std::string, Expected> e;
  const std::int64_t H = c.hidden_size, Hi = c.index_n_heads;
  auto per_head = [&](std::int64_t cols) {
    return Hi == 1 ? std::vector<std::int64_t>{R, cols} : std::vector<std::int64_t>{Hi, R, cols};
  };
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string b = fmt::format("blk.{}.", l);
    e[b + "attn_norm"] = {{R, H}};
    e[b + "q"] = {{R, std::int64_t{c.num_attention_heads} * c.head_dim}};
    e[b + "k"] = e[b + "v"] = {{R, std::int64_t{c.num_key_value_heads} * c.head_dim}};
    if (c.layer_types[l] == AttnType::MSA) {
      e[b + "idx_q"] = {{R, Hi * c.index_head_dim}};
      e[b + "idx_k"] = {{R, c.index_head_dim}};
      e[b + "block_scores"] = {per_head((T - 1) / c.index_block_size + 1)};
      e[b + "selection"] = {per_head(c.index_topk_blocks), true};
    }
    e[b + "attn_out"] = {{R, std::int64_t{c.num_attention_heads} * c.head_dim}};
    e[b + "ffn_norm"] = {{R, H}};
    if (c.mlp_layer_types[l] == MlpType::DENSE) {
      e[b + "mlp_out"] = {{R, H}};
    } else {
      e[b + "router_logits"] = {{R, c.num_local_experts}};
      e[b + "experts"] = {{R, c.num_experts_per_tok}, true};
      e[b + "expert_weights"] = {{R, c.num_experts_per_tok}};
      e[b + "moe_out"] = {{R, H}};
    }
    e[b + "out"] = {{R, H}};
  }
  return e;
}

}  // namespace

GoldenRun read_golden(const std::string& path) {
  std::string hint = "HINT: regenerate it with scripts/make-golden (committed files) or the command in its "
                     "'generator' attribute";
  auto fail = [&](const std::string& what) -> GoldenError {
    return GoldenError(fmt::format("{}: {}\n{}", path, what, hint));
  };
  std::unique_ptr<h5::File> fp;
  try {
    fp = std::make_unique<h5::File>(h5::File::open_read(path));
  } catch (const h5::H5Error& e) {
    throw fail(e.what());
  }
  const h5::File& f = *fp;
  if (!f.has_attr("/", "format")) throw fail("not a golden file: root attribute 'format' is missing");
  const std::string format = f.attr_string("/", "format");
  if (format != kGoldenFormat)
    throw fail(fmt::format("wrong format '{}', expected '{}'", format, kGoldenFormat));
  if (f.has_attr("/", "generator"))
    hint = fmt::format("HINT: regenerate it with: {}", f.attr_string("/", "generator"));
  const std::int64_t version = f.has_attr("/", "schema_version") ? f.attr_int("/", "schema_version") : -1;
  if (version != kGoldenSchemaVersion && version != kGoldenSchemaVersionExtras)
    throw fail(fmt::format("schema_version {} is not one of the supported {} and {}", version, kGoldenSchemaVersion,
                           kGoldenSchemaVersionExtras));

  GoldenRun g;
  try {
    g.generator = f.attr_string("/", "generator");
    g.seed = static_cast<std::uint64_t>(f.attr_int("/", "seed"));
    g.config = parse_config_json(f.attr_string("/", "config"), path + ":config");
    g.precision = parse_precision(f.attr_string("/", "precision"));
    const std::string storage = f.attr_string("/", "storage");
    if (storage != "float32" && storage != "float64")
      throw fail(fmt::format("storage '{}' is neither float32 nor float64", storage));
    g.store_f64 = storage == "float64";
  } catch (const GoldenError&) {
    throw;
  } catch (const std::exception& e) {
    throw fail(e.what());
  }
  const auto want_float = g.store_f64 ? h5::DType::F64 : h5::DType::F32;
  auto check = [&](const std::string& p, const std::vector<std::int64_t>& dims, h5::DType dt) {
    if (!f.exists(p)) throw fail(fmt::format("dataset '{}' is missing", p));
    const auto got = f.shape(p);
    if (got != dims)
      throw fail(fmt::format("dataset '{}' has shape [{}], expected [{}]", p, fmt::join(got, ", "), fmt::join(dims, ", ")));
    if (f.dtype(p) != dt) throw fail(fmt::format("dataset '{}' has the wrong element type for this file", p));
  };
  auto read_floats = [&](const std::string& p) {
    auto v = f.read<double>(p);
    for (std::size_t i = 0; i < v.size(); ++i)
      if (std::isnan(v[i])) throw fail(fmt::format("dataset '{}' holds NaN at flat index {}", p, i));
    return v;
  };
  const auto nt = f.exists("/inputs/tokens") ? f.shape("/inputs/tokens") : std::vector<std::int64_t>{};
  if (nt.size() != 1 || nt[0] < 1) throw fail("dataset '/inputs/tokens' is missing or not a non-empty vector");
  const std::int64_t T = nt[0];
  check("/inputs/tokens", {T}, h5::DType::I32);
  g.tokens = f.read<std::int32_t>("/inputs/tokens");
  const auto nr = f.exists("/rows") ? f.shape("/rows") : std::vector<std::int64_t>{};
  if (nr.size() != 1) throw fail("dataset '/rows' is missing or not a vector");
  const std::int64_t R = nr[0];
  check("/rows", {R}, h5::DType::I64);
  g.rows = f.read<std::int64_t>("/rows");
  for (std::size_t i = 0; i < g.rows.size(); ++i)
    if (g.rows[i] < 0 || g.rows[i] >= T || (i && g.rows[i] <= g.rows[i - 1]))
      throw fail(fmt::format("/rows[{}] = {} is not increasing inside [0, {})", i, g.rows[i], T));
  for (const auto& [name, e] : expected_trace(g.config, T, R)) {
    const std::string p = "/trace/" + name;
    check(p, e.dims, e.is_index ? h5::DType::I32 : want_float);
    StoredTensor t{e.dims, e.is_index, {}, {}};
    if (e.is_index) t.ids = f.read<std::int32_t>(p);
    else t.values = read_floats(p);
    g.trace.emplace(name, std::move(t));
  }
  const std::int64_t V = g.config.vocab_size;
  auto read_mat = [&](const std::string& p, std::int64_t rows) {
    check(p, {rows, V}, want_float);
    auto v = read_floats(p);
    return MatD(Eigen::Map<MatD>(v.data(), rows, V));
  };
  g.logits = read_mat("/logits", R);
  const auto nk = f.exists("/decode/tokens") ? f.shape("/decode/tokens") : std::vector<std::int64_t>{};
  if (nk.size() != 1) throw fail("dataset '/decode/tokens' is missing or not a vector");
  check("/decode/tokens", nk, h5::DType::I32);
  g.decode_tokens = f.read<std::int32_t>("/decode/tokens");
  g.decode_logits = read_mat("/decode/logits", nk[0]);
  if (version == kGoldenSchemaVersionExtras) {
    if (f.exists("/inputs/image")) {
      const auto di = f.shape("/inputs/image");
      if (di.size() != 2) throw fail("dataset '/inputs/image' is not a matrix [C, H*W]");
      check("/inputs/image", di, h5::DType::F64);
      const std::int64_t ih = f.has_attr("/", "image_height") ? f.attr_int("/", "image_height") : -1;
      const std::int64_t iw = f.has_attr("/", "image_width") ? f.attr_int("/", "image_width") : -1;
      if (ih <= 0 || iw <= 0 || ih * iw != di[1])
        throw fail("root attributes image_height / image_width are missing or do not match /inputs/image's pixels");
      g.image_h = ih, g.image_w = iw;
      auto px = read_floats("/inputs/image");
      g.image = MatD(Eigen::Map<MatD>(px.data(), di[0], di[1]));
      const auto dv = f.exists("/vision/features") ? f.shape("/vision/features") : std::vector<std::int64_t>{};
      if (dv.size() != 2 || dv[1] != g.config.hidden_size) throw fail("dataset '/vision/features' is missing or not [N, H]");
      check("/vision/features", dv, want_float);
      auto fv = read_floats("/vision/features");
      g.vision_features = MatD(Eigen::Map<MatD>(fv.data(), dv[0], dv[1]));
    }
    if (f.exists("/mtp/drafts")) {
      g.mtp_k = f.has_attr("/", "mtp_k") ? static_cast<int>(f.attr_int("/", "mtp_k")) : 0;
      const auto flat = f.read<std::int32_t>("/mtp/drafts");
      const auto sizes = f.read<std::int64_t>("/mtp/round_sizes");
      std::size_t at = 0;
      for (auto n : sizes) {
        if (n < 0 || at + static_cast<std::size_t>(n) > flat.size()) throw fail("/mtp/round_sizes do not add up to /mtp/drafts");
        g.mtp_drafts.emplace_back(flat.begin() + static_cast<std::ptrdiff_t>(at), flat.begin() + static_cast<std::ptrdiff_t>(at + n));
        at += static_cast<std::size_t>(n);
      }
      if (at != flat.size() || g.mtp_k < 1) throw fail("/mtp: round sizes or mtp_k do not match the drafts");
    }
    if (!g.has_extras()) throw fail("schema_version 2 without /inputs/image or /mtp");
  }
  return g;
}

namespace {

// Flat index -> "[i, j, k]" for a tensor of dims.
std::string coords(std::int64_t flat, const std::vector<std::int64_t>& dims) {
  std::vector<std::int64_t> c(dims.size());
  for (std::size_t d = dims.size(); d-- > 0;) {
    c[d] = flat % dims[d];
    flat /= dims[d];
  }
  return fmt::format("[{}]", fmt::join(c, ", "));
}

std::string diff_values(const std::string& name, const double* a, const double* b, std::int64_t n,
                        const std::vector<std::int64_t>& dims, double rel_tol) {
  // The scale is the largest finite stored magnitude; -inf entries (block scores past a query's
  // block) must be matched exactly.
  double scale = 0;
  for (std::int64_t i = 0; i < n; ++i)
    if (std::isfinite(b[i])) scale = std::max(scale, std::abs(b[i]));
  const double tol = rel_tol * scale;
  for (std::int64_t i = 0; i < n; ++i)
    if (a[i] != b[i] && !(std::abs(a[i] - b[i]) <= tol))  // NaN fails too
      return fmt::format("{} at {}: got {:.9g}, stored {:.9g} (|diff| {:.3g} > {:.3g} = {:.1g} x max|stored| {:.4g})",
                         name, coords(i, dims), a[i], b[i], std::abs(a[i] - b[i]), tol, rel_tol, scale);
  return "";
}

template <class I>
std::string diff_ids(const std::string& name, const std::vector<I>& a, const std::vector<I>& b,
                     const std::vector<std::int64_t>& dims) {
  if (a.size() != b.size()) return fmt::format("{}: {} entries, stored {}", name, a.size(), b.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return fmt::format("{} at {}: got {}, stored {}", name, coords(static_cast<std::int64_t>(i), dims), a[i], b[i]);
  return "";
}

// Trace names in forward order: layer by layer, in the order the model emits them.
int forward_rank(const std::string& name) {
  static const std::vector<std::string> order{"attn_norm", "q", "k", "v", "idx_q", "idx_k", "block_scores",
                                              "selection", "attn_out", "ffn_norm", "mlp_out", "router_logits",
                                              "experts", "expert_weights", "moe_out", "out"};
  const auto dot = name.rfind('.');
  const int layer = std::stoi(name.substr(4, name.find('.', 4) - 4));
  const auto it = std::find(order.begin(), order.end(), name.substr(dot + 1));
  return layer * 100 + static_cast<int>(it - order.begin());
}

}  // namespace

std::string first_difference(const GoldenRun& got, const GoldenRun& stored, double rel_tol) {
  if (got.tokens != stored.tokens) return "inputs/tokens differ";
  if (got.rows != stored.rows) return "rows differ";
  std::vector<std::string> names;
  for (const auto& [n, t] : stored.trace) names.push_back(n);
  std::sort(names.begin(), names.end(),
            [](const std::string& a, const std::string& b) { return forward_rank(a) < forward_rank(b); });
  for (const auto& n : names) {
    const StoredTensor& s = stored.trace.at(n);
    auto it = got.trace.find(n);
    if (it == got.trace.end()) return fmt::format("trace/{} missing from the recomputed run", n);
    const StoredTensor& g = it->second;
    if (g.dims != s.dims) return fmt::format("trace/{}: shape differs", n);
    std::string d = s.is_index ? diff_ids("trace/" + n, g.ids, s.ids, s.dims)
                               : diff_values("trace/" + n, g.values.data(), s.values.data(),
                                             static_cast<std::int64_t>(s.values.size()), s.dims, rel_tol);
    if (!d.empty()) return d;
  }
  auto diff_mat = [&](const std::string& n, const MatD& a, const MatD& b) -> std::string {
    if (a.rows() != b.rows() || a.cols() != b.cols()) return n + ": shape differs";
    return diff_values(n, a.data(), b.data(), b.size(), {b.rows(), b.cols()}, rel_tol);
  };
  if (auto d = diff_mat("logits", got.logits, stored.logits); !d.empty()) return d;
  if (auto d = diff_ids("decode/tokens", got.decode_tokens, stored.decode_tokens,
                        {static_cast<std::int64_t>(stored.decode_tokens.size())});
      !d.empty())
    return d;
  if (auto d = diff_mat("decode/logits", got.decode_logits, stored.decode_logits); !d.empty()) return d;
  if (stored.image.size() > 0)
    if (auto d = diff_mat("vision/features", got.vision_features, stored.vision_features); !d.empty()) return d;
  if (got.mtp_drafts != stored.mtp_drafts) {
    for (std::size_t r = 0; r < std::min(got.mtp_drafts.size(), stored.mtp_drafts.size()); ++r)
      if (got.mtp_drafts[r] != stored.mtp_drafts[r])
        return fmt::format("mtp/drafts of round {}: got [{}], stored [{}]", r, fmt::join(got.mtp_drafts[r], " "),
                           fmt::join(stored.mtp_drafts[r], " "));
    return fmt::format("mtp/drafts: {} rounds, stored {}", got.mtp_drafts.size(), stored.mtp_drafts.size());
  }
  return "";
}

}  // namespace m3
