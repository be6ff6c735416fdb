// Deterministic structural mutation test of the case-file reader (the fuzz coverage of issue 3 for
// HDF5 case files): seeded damage to the committed cases at the HDF5 level (attributes deleted or
// retyped, datasets deleted, reshaped, retyped, filled with NaN / Inf / huge values, parameters
// set to 0, negative or enormous values), then verify_case. Every outcome must be a verdict or a
// cases::CaseError (m3h verify: exit 2 with a message), never a crash or another exception type.
// Byte-level fuzzing is left to libhdf5's own project: its crashes on malformed files are not ours.
#include "compare/verify.h"
#include "datasets/hdf5.h"
#include "reference/tensor.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <limits>
#include <random>

namespace {

namespace fs = std::filesystem;
const fs::path kCases = fs::path(M3_SOURCE_DIR) / "datasets/data/cases";

// One seeded structural mutation of an open case file; returns what it did.
std::string mutate(m3::h5::File& f, std::mt19937_64& g) {
  auto pick = [&](const auto& v) { return v[g() % v.size()]; };
  const auto sets = f.datasets();
  const auto attrs = f.attr_names("/");
  const std::int64_t nasty[] = {0, -1, 1, 3, 1 << 20, std::int64_t{1} << 40, std::numeric_limits<std::int64_t>::min()};
  switch (g() % 7) {
    case 0: {  // delete an attribute
      const auto a = pick(attrs);
      H5Adelete(f.id(), a.c_str());
      return "delete attribute " + a;
    }
    case 1: {  // an integer where a string was, or a nasty integer value
      const auto a = pick(attrs);
      f.set_attr("/", a, nasty[g() % 7]);
      return "attribute " + a + " := integer";
    }
    case 2: {  // a string where a number was
      const auto a = pick(attrs);
      f.set_attr("/", a, std::string(g() % 2 ? "" : "x7"));
      return "attribute " + a + " := string";
    }
    case 3: {  // delete a dataset
      const auto d = pick(sets);
      H5Ldelete(f.id(), d.c_str(), H5P_DEFAULT);
      return "delete " + d;
    }
    default: {  // rewrite a dataset with another shape, type or poisoned values
      const auto d = pick(sets);
      auto shape = f.shape(d);
      const auto type = f.dtype(d);
      const int how = static_cast<int>(g() % 4);
      if (how == 0 && !shape.empty()) shape[g() % shape.size()] += (g() % 2 ? 1 : -1);
      if (how == 1) shape.push_back(1);
      for (auto& s : shape) s = std::max<std::int64_t>(s, 0);
      std::int64_t n = 1;
      for (auto s : shape) n *= s;
      H5Ldelete(f.id(), d.c_str(), H5P_DEFAULT);
      if (how == 2) {  // integers where floats were (or the reverse)
        std::vector<std::int32_t> x(static_cast<std::size_t>(n), static_cast<std::int32_t>(g() % 1000) - 500);
        f.write(d, x.data(), shape);
        return "retype " + d;
      }
      // Same element type as before (so the type check passes), poisoned or wrong values.
      const double poison[] = {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                               1e30, -7.0};
      const double v = poison[g() % 4];
      const auto n_ = static_cast<std::size_t>(n);
      switch (type) {
        case m3::h5::DType::F32: { std::vector<float> x(n_, static_cast<float>(v)); f.write(d, x.data(), shape); break; }
        case m3::h5::DType::F64: { std::vector<double> x(n_, v); f.write(d, x.data(), shape); break; }
        case m3::h5::DType::BF16: {
          std::vector<std::uint16_t> x(n_, m3::float_to_bf16_bits(static_cast<float>(v)));
          f.write_bf16(d, x.data(), shape);
          break;
        }
        case m3::h5::DType::I32: { std::vector<std::int32_t> x(n_, -3); f.write(d, x.data(), shape); break; }
        case m3::h5::DType::I64: { std::vector<std::int64_t> x(n_, 1 << 30); f.write(d, x.data(), shape); break; }
      }
      return "rewrite " + d;
    }
  }
}

}  // namespace

TEST(CaseFileMutations, VerdictOrCaseErrorNeverACrash) {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(kCases))
    if (e.path().extension() == ".h5") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  ASSERT_GE(files.size(), 12u);
  const fs::path tmp = fs::temp_directory_path() / ("m3-case-mut-" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  std::mt19937_64 g(20261128);  // fixed: a failure reproduces exactly
  int verdicts = 0, errors = 0;
  for (int i = 0; i < 240; ++i) {
    const fs::path src = files[i % files.size()];
    const fs::path dst = tmp / ("m" + std::to_string(i) + ".h5");
    fs::copy_file(src, dst, fs::copy_options::overwrite_existing);
    std::string what;
    {
      auto f = m3::h5::File::open_rw(dst.string());
      for (int k = 0, n = 1 + static_cast<int>(g() % 3); k < n; ++k) what += mutate(f, g) + "; ";
    }
    SCOPED_TRACE(src.filename().string() + ": " + what);
    try {
      auto r = m3::cmp::verify_case(dst.string(), m3::cmp::Device::CPU);
      ++verdicts;
    } catch (const m3::cases::CaseError&) {
      ++errors;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "not a CaseError: " << typeid(e).name() << ": " << e.what();
    }
  }
  fs::remove_all(tmp);
  // Both outcomes must occur, or the mutations are not reaching the reader's checks.
  EXPECT_GT(errors, 100);
  EXPECT_GT(verdicts, 0);
  std::cout << "mutations: " << verdicts << " verdicts, " << errors << " CaseErrors\n";
}
