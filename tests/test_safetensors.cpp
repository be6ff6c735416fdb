// Safetensors: dtype conversions against hand values and independent fp64 formulas, writer/reader
// round trips, one test per malformed-input rule (each asserting what its message names), and a
// deterministic mutation test: thousands of damaged files must each load or throw SafetensorsError.
#include "datasets/safetensors.h"

#include "tests/test_util.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <typeinfo>

#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using m3::Dtype;
using m3::SafetensorsError;
using Bytes = std::vector<std::uint8_t>;

// A file from a header text and a data section, with the length field set to the text's size.
Bytes make_file(const std::string& header, std::size_t data_bytes, std::uint64_t len_field = ~0ull) {
  const std::uint64_t n = len_field == ~0ull ? header.size() : len_field;
  Bytes b(8 + header.size() + data_bytes);
  for (int i = 0; i < 8; ++i) b[i] = static_cast<std::uint8_t>(n >> (8 * i));
  std::copy(header.begin(), header.end(), b.begin() + 8);
  for (std::size_t i = 0; i < data_bytes; ++i) b[8 + header.size() + i] = static_cast<std::uint8_t>(i * 7 + 1);
  return b;
}

// The message of the SafetensorsError that parsing `b` throws ("" if it parses).
std::string parse_error(const Bytes& b) {
  try {
    m3::SafetensorsReader::from_bytes(b, "mem.safetensors");
  } catch (const SafetensorsError& e) {
    return e.what();
  }
  return "";
}

// Asserts the parse fails and the message holds every one of `parts`.
void expect_error(const Bytes& b, std::initializer_list<std::string> parts) {
  const std::string msg = parse_error(b);
  ASSERT_FALSE(msg.empty()) << "expected a SafetensorsError";
  EXPECT_NE(msg.find("mem.safetensors"), std::string::npos) << "message does not name the file: " << msg;
  for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
}

// fp64 value of a half bit pattern, straight from the IEEE definition (independent of the code).
double half_value(std::uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  double v = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
  if (e == 31) v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  return s ? -v : v;
}

// A small valid file: several dtypes, a scalar, an empty tensor, metadata.
struct SmallFile {
  std::vector<float> a{1.0f, -2.5f, 3.25f, 0.0f, 1e-3f, -7.0f};  // [2, 3]
  std::vector<float> b{0.5f, 65504.0f, -1e-7f, 3.0f};             // [4]
  std::vector<float> c{42.0f};                                    // []
  Bytes bytes;
  SmallFile() {
    m3::SafetensorsWriter w;
    w.add("w.a", Dtype::F32, {2, 3}, {a});
    w.add("w.b", Dtype::F16, {4}, {b});
    w.add("w.c", Dtype::BF16, {}, {c});
    w.add("w.empty", Dtype::F32, {0, 5}, {});
    w.add_raw("w.ids", Dtype::I32, {2}, Bytes{1, 0, 0, 0, 2, 0, 0, 0});
    w.add_raw("w.fp8", Dtype::F8_E4M3, {3}, Bytes{0x38, 0x7E, 0x01});
    w.set_metadata("format", "pt");
    bytes = w.to_bytes();
  }
};

// Parses the header of `good`, changes one thing a writer could get wrong, writes it back with a
// correct length field: reaches the rules that random byte damage rarely gets past JSON to.
Bytes semantic_edit(const Bytes& good, std::mt19937_64& g) {
  const auto h = m3::parse_safetensors_bytes(good, "good");
  const std::string text(good.begin() + 8, good.begin() + 8 + static_cast<std::ptrdiff_t>(h.header_bytes));
  nlohmann::json j = nlohmann::json::parse(text);
  const std::string name = h.tensors[g() % h.tensors.size()].name;
  auto& e = j[name];
  std::string out;
  switch (g() % 7) {
    case 0: {  // move a tensor's bytes: overlap, gap, or past the end
      const std::int64_t d = static_cast<std::int64_t>(g() % 17) - 8;
      for (auto& o : e["data_offsets"]) o = std::max<std::int64_t>(0, o.get<std::int64_t>() + d);
      break;
    }
    case 1: {
      const char* dt[] = {"F32", "F16", "BF16", "F64", "I8", "F8_E4M3", "F4", "f32", ""};
      e["dtype"] = dt[g() % std::size(dt)];
      break;
    }
    case 2: e = g() % 2 ? nlohmann::json(7) : nlohmann::json::array({1, 2}); break;
    case 3: j = nlohmann::json::array({j}); break;
    case 4: {  // nesting far deeper than a header ever needs
      nlohmann::json deep = 1;
      for (int i = 0; i < 20; ++i) deep = nlohmann::json::array({deep});
      e["shape"] = deep;
      break;
    }
    case 5: j["__metadata__"] = g() % 2 ? nlohmann::json(3) : nlohmann::json{{"k", 1}}; break;
    default: break;  // duplicate key, below
  }
  out = j.dump();
  if (out.size() > 2 && out[0] == '{' && g() % 4 == 0)  // a second entry under the same name
    out = "{\"" + name + "\": " + j[name].dump() + ", " + out.substr(1);
  Bytes b(8 + out.size());
  for (int i = 0; i < 8; ++i) b[i] = static_cast<std::uint8_t>(static_cast<std::uint64_t>(out.size()) >> (8 * i));
  std::copy(out.begin(), out.end(), b.begin() + 8);
  b.insert(b.end(), good.begin() + 8 + static_cast<std::ptrdiff_t>(h.header_bytes), good.end());
  return b;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Dtype conversions

TEST(SafetensorsDtype_f16, HandValues) {
  EXPECT_EQ(m3::float_to_f16_bits(1.0f), 0x3C00);
  EXPECT_EQ(m3::float_to_f16_bits(-2.0f), 0xC000);
  EXPECT_EQ(m3::float_to_f16_bits(65504.0f), 0x7BFF);           // max half
  EXPECT_EQ(m3::float_to_f16_bits(65519.99f), 0x7BFF);          // below the 65504/65536 midpoint
  EXPECT_EQ(m3::float_to_f16_bits(65520.0f), 0x7C00);           // the midpoint ties to even = Inf
  EXPECT_EQ(m3::float_to_f16_bits(1e30f), 0x7C00);
  EXPECT_EQ(m3::float_to_f16_bits(-INFINITY), 0xFC00);
  EXPECT_EQ(m3::float_to_f16_bits(std::ldexp(1.0f, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(m3::float_to_f16_bits(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(m3::float_to_f16_bits(std::ldexp(1.0f, -25)), 0x0000);  // half of it: tie to even = 0
  EXPECT_EQ(m3::float_to_f16_bits(-std::ldexp(1.0f, -25)), 0x8000);
  EXPECT_EQ(m3::float_to_f16_bits(std::ldexp(1.5f, -25)), 0x0001);  // above the tie
  EXPECT_EQ(m3::float_to_f16_bits(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 units: tie to even = 2
  EXPECT_EQ(m3::float_to_f16_bits(std::ldexp(5.0f, -25)), 0x0002);  // 2.5 units: tie to even = 2
  EXPECT_EQ(m3::float_to_f16_bits(-0.0f), 0x8000);
  const std::uint16_t nan = m3::float_to_f16_bits(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7C00, 0x7C00);
  EXPECT_NE(nan & 0x03FF, 0);
  EXPECT_TRUE(std::isnan(m3::f16_bits_to_float(0x7E00)));
  EXPECT_EQ(m3::f16_bits_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(m3::f16_bits_to_float(0x3555), 0.333251953125f);
}

// Every half widens to its IEEE value and narrows back to itself.
TEST(SafetensorsDtype_f16, AllPatternsRoundTrip) {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const float f = m3::f16_bits_to_float(static_cast<std::uint16_t>(h));
    const double ref = half_value(static_cast<std::uint16_t>(h));
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(f)) << h;
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), ref) << h;
    ASSERT_EQ(m3::float_to_f16_bits(f), h) << h;
  }
}

// Narrowing equals round-to-nearest-even computed in fp64 from the sorted list of all halves, on
// random floats over the whole half range and on every exact midpoint.
TEST(SafetensorsDtype_f16, NarrowingMatchesNearestEven) {
  std::vector<double> pos;  // the 31744 finite non-negative halves, ascending with the bits
  for (std::uint16_t h = 0; h < 0x7C00; ++h) pos.push_back(half_value(h));
  auto reference = [&](float x) -> std::uint16_t {
    const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
    const double a = std::abs(static_cast<double>(x));
    // Past max + half an ulp (65520) the result is Inf; exactly 65520 ties to even = Inf too.
    if (a >= 65520.0) return sign | 0x7C00;
    if (a > pos.back()) return sign | 0x7BFF;  // (65504, 65520): nearer the max than 2^16
    const auto hi = static_cast<std::size_t>(std::lower_bound(pos.begin(), pos.end(), a) - pos.begin());
    if (pos[hi] == a) return sign | static_cast<std::uint16_t>(hi);
    const std::size_t lo = hi - 1;
    const double dlo = a - pos[lo], dhi = pos[hi] - a;
    const std::size_t pick = dlo < dhi ? lo : dhi < dlo ? hi : (lo % 2 == 0 ? lo : hi);
    return sign | static_cast<std::uint16_t>(pick);
  };
  std::mt19937_64 g = m3::test::test_rng();
  SCOPED_TRACE(m3::test::seed_note());
  std::uniform_real_distribution<double> expo(-27.0, 16.5);
  int checked = 0;
  for (int i = 0; i < 200000; ++i) {
    const float x = static_cast<float>((i & 1 ? -1.0 : 1.0) * std::exp2(expo(g)));
    ASSERT_EQ(m3::float_to_f16_bits(x), reference(x)) << "x = " << x;
    ++checked;
  }
  for (std::size_t h = 0; h + 1 < pos.size(); ++h) {  // midpoints are exact in float (12 bits)
    const float mid = static_cast<float>((pos[h] + pos[h + 1]) / 2);
    ASSERT_EQ(static_cast<double>(mid), (pos[h] + pos[h + 1]) / 2);
    ASSERT_EQ(m3::float_to_f16_bits(mid), reference(mid)) << "midpoint above " << h;
    ++checked;
  }
  EXPECT_GT(checked, 230000);
}

TEST(SafetensorsDtype_fp8, E4m3AllCodesMatchTheOcpDefinition) {
  for (int b = 0; b < 256; ++b) {
    const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    const float got = m3::f8_e4m3_to_float(static_cast<std::uint8_t>(b));
    if (e == 15 && m == 7) {  // S.1111.111: the only NaNs (0x7F, 0xFF); E4M3FN has no Inf
      EXPECT_TRUE(std::isnan(got)) << b;
      continue;
    }
    const double mag = e == 0 ? m / 8.0 * std::pow(2.0, -6) : (1 + m / 8.0) * std::pow(2.0, e - 7);
    EXPECT_EQ(static_cast<double>(got), s ? -mag : mag) << b;
    EXPECT_TRUE(std::isfinite(got)) << b;
  }
  EXPECT_EQ(m3::f8_e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(m3::f8_e4m3_to_float(0x7E), 448.0f);   // max finite
  EXPECT_EQ(m3::f8_e4m3_to_float(0xFE), -448.0f);
  EXPECT_EQ(m3::f8_e4m3_to_float(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(m3::f8_e4m3_to_float(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_TRUE(std::signbit(m3::f8_e4m3_to_float(0x80)));
  EXPECT_TRUE(std::isnan(m3::f8_e4m3_to_float(0x7F)));
  EXPECT_TRUE(std::isnan(m3::f8_e4m3_to_float(0xFF)));
}

TEST(SafetensorsDtype_fp8, E5m2AndE8m0) {
  EXPECT_EQ(m3::f8_e5m2_to_float(0x3C), 1.0f);
  EXPECT_EQ(m3::f8_e5m2_to_float(0x7B), 57344.0f);
  EXPECT_TRUE(std::isinf(m3::f8_e5m2_to_float(0x7C)));
  EXPECT_TRUE(std::isnan(m3::f8_e5m2_to_float(0x7D)));
  EXPECT_EQ(m3::f8_e8m0_to_float(127), 1.0f);
  EXPECT_EQ(m3::f8_e8m0_to_float(0), std::ldexp(1.0f, -127));
  EXPECT_TRUE(std::isnan(m3::f8_e8m0_to_float(255)));
}

TEST(SafetensorsDtype, NamesAndSizes) {
  EXPECT_EQ(m3::parse_dtype("BF16"), Dtype::BF16);
  EXPECT_EQ(m3::parse_dtype("F8_E4M3"), Dtype::F8_E4M3);
  EXPECT_FALSE(m3::parse_dtype("bf16").has_value());  // the format spells dtypes in capitals
  EXPECT_FALSE(m3::parse_dtype("F4").has_value());
  EXPECT_EQ(m3::dtype_size(Dtype::F64), 8);
  EXPECT_EQ(m3::dtype_size(Dtype::F8_E4M3), 1);
  EXPECT_FALSE(m3::dtype_reads_as_float(Dtype::I32));
  float out[2];
  EXPECT_THROW(m3::convert_to_float(Dtype::I64, Bytes(16).data(), 2, out), std::invalid_argument);
  Bytes dst(2);
  EXPECT_THROW(m3::convert_from_float(Dtype::F8_E4M3, out, 2, dst.data()), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Writer and reader

TEST(Safetensors, RoundTripInMemoryAndFile) {
  SmallFile f;
  const auto dir = fs::temp_directory_path() / ("m3-st-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string path = (dir / "small.safetensors").string();
  {
    std::ofstream o(path, std::ios::binary);
    o.write(reinterpret_cast<const char*>(f.bytes.data()), static_cast<std::streamsize>(f.bytes.size()));
  }
  for (int from_file = 0; from_file < 2; ++from_file) {
    SCOPED_TRACE(from_file ? "file" : "memory");
    auto r = from_file ? m3::SafetensorsReader(path) : m3::SafetensorsReader::from_bytes(f.bytes, "mem");
    const auto& h = r.header();
    EXPECT_EQ(h.header_bytes % 8, 0u);  // padded: the data section starts 8-aligned
    EXPECT_EQ(8 + h.header_bytes + h.data_bytes, f.bytes.size());
    EXPECT_EQ(h.tensors.size(), 6u);
    EXPECT_EQ(h.metadata.at("format"), "pt");
    const m3::MatF a = r.read_mat(r.tensor("w.a"));
    ASSERT_EQ(a.rows(), 2);
    ASSERT_EQ(a.cols(), 3);
    for (int i = 0; i < 6; ++i) EXPECT_EQ(a.data()[i], f.a[i]);  // F32: the same bits
    std::vector<float> b(4);
    r.read_f32(r.tensor("w.b"), b);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(b[i], m3::f16_bits_to_float(m3::float_to_f16_bits(f.b[i])));
    EXPECT_EQ(r.read_mat(r.tensor("w.c"))(0, 0), m3::round_bf16(42.0f));
    EXPECT_EQ(r.tensor("w.c").shape.size(), 0u);
    EXPECT_EQ(r.tensor("w.empty").numel, 0);
    EXPECT_EQ(r.read_mat(r.tensor("w.empty")).size(), 0);
    std::vector<float> p(3);
    r.read_f32(r.tensor("w.fp8"), p);
    EXPECT_EQ(p, (std::vector<float>{1.0f, 448.0f, std::ldexp(1.0f, -9)}));
    float part[2];
    r.read_f32(r.tensor("w.a"), 2, 2, part);  // a sub-range
    EXPECT_EQ(part[0], 3.25f);
    EXPECT_EQ(part[1], 0.0f);
    EXPECT_EQ(r.read_raw(r.tensor("w.ids")), (Bytes{1, 0, 0, 0, 2, 0, 0, 0}));
    EXPECT_THROW(r.read_mat(r.tensor("w.ids")), SafetensorsError);  // I32 does not read as float
    EXPECT_THROW(r.read_f32(r.tensor("w.a"), 5, 2, part), SafetensorsError);
    EXPECT_THROW(r.tensor("nope"), SafetensorsError);
  }
  const std::string d = m3::describe_safetensors(path);
  EXPECT_NE(d.find("tensors       6"), std::string::npos) << d;
  EXPECT_NE(d.find("F16"), std::string::npos) << d;
  fs::remove_all(dir);
}

TEST(Safetensors, WriterRejectsBadTensors) {
  std::vector<float> v(6);
  m3::SafetensorsWriter w;
  w.add("x", Dtype::F32, {2, 3}, {v});
  EXPECT_THROW(w.add("x", Dtype::F32, {6}, {v}), std::invalid_argument);         // duplicate
  EXPECT_THROW(w.add("y", Dtype::F32, {7}, {v}), std::invalid_argument);         // size vs shape
  EXPECT_THROW(w.add("z", Dtype::F8_E4M3, {6}, {v}), std::invalid_argument);     // not writable from float
  EXPECT_THROW(w.add("__metadata__", Dtype::F32, {6}, {v}), std::invalid_argument);
  EXPECT_THROW(w.add_raw("r", Dtype::F16, {3}, Bytes(5)), std::invalid_argument);
  EXPECT_THROW(m3::SafetensorsReader("/nonexistent/x.safetensors"), SafetensorsError);
}

// ---------------------------------------------------------------------------------------------
// Malformed files: one test per rule, each checking that its message names the right thing.

TEST(SafetensorsBad, ShorterThanLengthField) { expect_error(Bytes{1, 2, 3, 4, 5}, {"5 bytes", "8-byte"}); }

TEST(SafetensorsBad, TruncatedInHeader) {
  SmallFile f;
  Bytes b(f.bytes.begin(), f.bytes.begin() + 40);
  expect_error(b, {"header length", "runs past the end of the file", "40 bytes"});
}

TEST(SafetensorsBad, TruncatedInData) {
  SmallFile f;
  Bytes b(f.bytes.begin(), f.bytes.end() - 3);  // the last tensor (w.fp8) loses its bytes
  expect_error(b, {"tensor 'w.fp8'", "beyond the data section"});
}

TEST(SafetensorsBad, HeaderLengthHuge) {
  expect_error(make_file("{}", 0, 1ull << 40), {"header length 1099511627776", "exceeds the limit"});
}

TEST(SafetensorsBad, HeaderLengthLargerThanFile) {
  expect_error(make_file("{}      ", 8, 200), {"header length 200", "runs past the end"});
}

TEST(SafetensorsBad, NotJson) { expect_error(make_file(R"({"a": [1, })", 0), {"not valid JSON"}); }
TEST(SafetensorsBad, EmptyHeader) { expect_error(make_file("", 0), {"not valid JSON"}); }
TEST(SafetensorsBad, HeaderNotObject) { expect_error(make_file("[1, 2]", 0), {"must be a JSON object", "array"}); }
TEST(SafetensorsBad, TooDeep) { expect_error(make_file(std::string(40, '[') + std::string(40, ']'), 0), {"nests deeper"}); }

TEST(SafetensorsBad, EntryNotObject) { expect_error(make_file(R"({"w": 3})", 0), {"tensor 'w'", "must be an object"}); }

TEST(SafetensorsBad, MissingDtype) {
  expect_error(make_file(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", 4), {"tensor 'w'", "no 'dtype'"});
}
TEST(SafetensorsBad, DtypeNotString) {
  expect_error(make_file(R"({"w": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}})", 4),
               {"tensor 'w'", "'dtype' must be a string"});
}
TEST(SafetensorsBad, UnknownDtype) {
  expect_error(make_file(R"({"w": {"dtype": "F12", "shape": [1], "data_offsets": [0, 4]}})", 4),
               {"tensor 'w'", "unknown dtype 'F12'"});
}
TEST(SafetensorsBad, MissingShape) {
  expect_error(make_file(R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})", 4), {"tensor 'w'", "no 'shape'"});
}
TEST(SafetensorsBad, ShapeNotArray) {
  expect_error(make_file(R"({"w": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}})", 4),
               {"tensor 'w'", "'shape' must be an array"});
}
TEST(SafetensorsBad, ShapeNegative) {
  expect_error(make_file(R"({"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 4]}})", 4),
               {"tensor 'w'", "shape[1] must be a non-negative integer", "-1"});
}
TEST(SafetensorsBad, ShapeNotInteger) {
  expect_error(make_file(R"({"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}})", 4),
               {"tensor 'w'", "shape[0] must be a non-negative integer"});
}
TEST(SafetensorsBad, ShapeProductOverflows) {
  expect_error(make_file(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}})", 4),
               {"tensor 'w'", "more than 2^63 elements"});
  // Fits int64 as elements, not as bytes.
  expect_error(make_file(R"({"w": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 4]}})", 4),
               {"tensor 'w'", "more than 2^63 bytes"});
}
TEST(SafetensorsBad, MissingOffsets) {
  expect_error(make_file(R"({"w": {"dtype": "F32", "shape": [1]}})", 4), {"tensor 'w'", "no 'data_offsets'"});
}
TEST(SafetensorsBad, OffsetsWrongType) {
  expect_error(make_file(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}})", 8),
               {"tensor 'w'", "'data_offsets' must be an array of two"});
  expect_error(make_file(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", 8),
               {"tensor 'w'", "'data_offsets' must be an array of two non-negative integers"});
}
TEST(SafetensorsBad, OffsetsBeginAfterEnd) {
  expect_error(make_file(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", 8),
               {"tensor 'w'", "[8, 4]", "begin > end"});
}
TEST(SafetensorsBad, OffsetsOutsideFile) {
  expect_error(make_file(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [100, 104]}})", 8),
               {"tensor 'w'", "[100, 104]", "beyond the data section of 8 bytes"});
}
TEST(SafetensorsBad, SizeMismatch) {
  expect_error(make_file(R"({"w": {"dtype": "BF16", "shape": [3, 2], "data_offsets": [0, 8]}})", 16),
               {"tensor 'w'", "hold 8 bytes", "expected 12 = 6 elements (shape [3, 2]) x 2 bytes (BF16)"});
}
TEST(SafetensorsBad, OverlappingTensors) {
  expect_error(make_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                         R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                         16),
               {"tensor 'b'", "overlap tensor 'a'", "[4, 12)", "[0, 8)"});
}
TEST(SafetensorsBad, GapsAndEmptyTensorsAreFine) {
  // A gap before 'b', and an empty tensor inside 'a''s bytes: nothing shares a byte.
  const Bytes b = make_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                            R"( "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]},)"
                            R"( "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}})",
                            16);
  EXPECT_EQ(parse_error(b), "");
}
TEST(SafetensorsBad, DuplicateName) {
  expect_error(make_file(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                         R"( "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                         8),
               {"tensor 'w'", "appears twice"});
}
TEST(SafetensorsBad, MetadataNotStrings) {
  expect_error(make_file(R"({"__metadata__": {"format": 1}})", 0), {"'__metadata__' value of 'format'", "string"});
  expect_error(make_file(R"({"__metadata__": [1]})", 0), {"'__metadata__' must be an object"});
}

// ---------------------------------------------------------------------------------------------
// Mutation test: seeded damage to a valid file; each result must load (and read every tensor) or
// throw SafetensorsError. Fixed seed: the same cases on every run, so a failure reproduces.

TEST(SafetensorsBad, MutationsLoadOrThrowSafetensorsError) {
  const SmallFile f;
  const Bytes& good = f.bytes;
  const std::uint64_t header_end = 8 + m3::parse_safetensors_bytes(good, "good").header_bytes;
  std::mt19937_64 g(20240611);
  auto pick = [&](std::uint64_t n) { return n ? g() % n : 0; };
  const char* tokens[] = {"{", "}", "[", "]", ",", ":", "\"", "-", "0", "9", "1e3", "null", "true", "\"F32\"",
                          "\"F8_E4M3\"", "\"I64\"", "18446744073709551615", "9223372036854775807", "[]", "{}",
                          "\"__metadata__\"", "\"data_offsets\"", "\"shape\"", "\"dtype\"", "\\u0000", "\xff"};
  const int kCases = 20000;  // ~0.45 s optimized, ~3 s under ASan + UBSan (measured, 2 shared cores)
  int ok = 0, rejected = 0;
  std::map<std::string, int> kinds;  // what the rejections said, coarsely: proves variety
  const char* kKinds[] = {"shorter than", "exceeds the limit", "runs past", "not valid JSON", "JSON object",
                          "must be an object", "dtype", "shape", "data_offsets", "beyond the data", "hold",
                          "overlap", "twice", "__metadata__", "nests deeper"};
  for (int c = 0; c < kCases; ++c) {
    Bytes b = good;
    const int edits = 1 + static_cast<int>(pick(3));
    for (int e = 0; e < edits; ++e) {
      switch (pick(9)) {
        case 0:  // flip a bit, mostly in the header
          if (!b.empty()) b[pick(std::min<std::uint64_t>(b.size(), pick(4) ? header_end : b.size()))] ^= 1u << pick(8);
          break;
        case 1:  // truncate
          b.resize(pick(b.size() + 1));
          break;
        case 2: {  // rewrite the length field: small nudge or anything
          if (b.size() < 8) break;
          std::uint64_t n = 0;
          std::memcpy(&n, b.data(), 8);
          n = pick(2) ? n + pick(33) - 16 : g() >> pick(64);
          std::memcpy(b.data(), &n, 8);
          break;
        }
        case 3: case 4: {  // replace a header byte range with a JSON-ish token
          if (b.size() <= 8) break;
          const std::uint64_t at = 8 + pick(std::min<std::uint64_t>(b.size(), header_end) - 8);
          const std::uint64_t len = std::min<std::uint64_t>(pick(4), b.size() - at);
          const std::string t = tokens[pick(std::size(tokens))];
          b.erase(b.begin() + static_cast<std::ptrdiff_t>(at), b.begin() + static_cast<std::ptrdiff_t>(at + len));
          b.insert(b.begin() + static_cast<std::ptrdiff_t>(at), t.begin(), t.end());
          break;
        }
        case 5: {  // change a digit in the header (shapes, offsets)
          std::vector<std::size_t> digits;
          for (std::size_t i = 8; i < std::min<std::uint64_t>(b.size(), header_end); ++i)
            if (b[i] >= '0' && b[i] <= '9') digits.push_back(i);
          if (!digits.empty()) b[digits[pick(digits.size())]] = static_cast<std::uint8_t>('0' + pick(10));
          break;
        }
        case 6:  // append garbage
          for (std::uint64_t i = pick(16); i > 0; --i) b.push_back(static_cast<std::uint8_t>(g()));
          break;
        default:  // a semantic edit of the (intact) header, length field kept right
          b = semantic_edit(good, g);
      }
    }
    try {
      auto r = m3::SafetensorsReader::from_bytes(b, "mutant");
      for (const auto& t : r.header().tensors) {
        if (m3::dtype_reads_as_float(t.dtype)) {
          std::vector<float> out(static_cast<std::size_t>(t.numel));
          r.read_f32(t, out);
        } else {
          r.read_raw(t);
        }
      }
      ++ok;
    } catch (const SafetensorsError& e) {
      ++rejected;
      for (const char* k : kKinds)
        if (std::string(e.what()).find(k) != std::string::npos) ++kinds[k];
    } catch (const std::exception& e) {
      FAIL() << "case " << c << ": " << typeid(e).name() << " instead of SafetensorsError: " << e.what();
    }
  }
  // Not vacuous: both outcomes occur often and the rejections hit most of the rules.
  EXPECT_GT(ok, kCases / 50);
  EXPECT_GT(rejected, kCases / 2);
  EXPECT_GE(kinds.size(), 14u) << "rejection kinds seen: " << kinds.size();
  for (const auto& [k, n] : kinds) std::printf("  %-20s %d\n", k.c_str(), n);
  std::printf("  loaded %d, rejected %d of %d\n", ok, rejected, kCases);
}
