// Helpers of the checkpoint suites (test_checkpoint.cpp, test_checkpoint_vision.cpp): a temporary
// directory per test, a single-file checkpoint's tensors edited in place as raw bytes, bitwise float
// equality (of a reload and of a reload in a narrower dtype), and the message of a refused load.
#pragma once

#include "datasets/checkpoint.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <unistd.h>

namespace m3::test {

// A directory named after the process and the running test, removed with everything in it.
struct TempDir {
  std::filesystem::path p = std::filesystem::temp_directory_path() /
                            ("m3-ckpt-" + std::to_string(::getpid()) + "-" +
                             ::testing::UnitTest::GetInstance()->current_test_info()->test_suite_name() + "-" +
                             ::testing::UnitTest::GetInstance()->current_test_info()->name());
  TempDir() { std::filesystem::create_directories(p); }
  ~TempDir() { std::filesystem::remove_all(p); }
  std::string str() const { return p.string(); }
  std::string file(const std::string& n) const { return (p / n).string(); }
};

// One tensor of a safetensors file, as it is stored.
struct RawTensor {
  std::string name;
  Dtype dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;
};

// Edits model.safetensors of the single-file checkpoint in d in place: fn gets every tensor, in the
// file's order, and may change, drop or add any.
inline void edit_tensors(const TempDir& d, const std::function<void(std::vector<RawTensor>&)>& fn) {
  std::vector<RawTensor> ts;
  {
    SafetensorsReader r(d.file(kSingleFileName));
    for (const auto& t : r.header().tensors) ts.push_back({t.name, t.dtype, t.shape, r.read_raw(t)});
  }
  fn(ts);
  SafetensorsWriter w;
  for (const auto& t : ts) w.add_raw(t.name, t.dtype, t.shape, t.bytes);
  w.write(d.file(kSingleFileName));
}

// Bitwise equality of float vectors (distinguishes -0 / +0 and NaN payloads).
inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Tensors by name, as flat copies.
using FlatTensors = std::map<std::string, std::vector<float>>;

// Every tensor of `saved` must come back in `loaded` as round(x) of each value, bit for bit (those
// that exact(name) names: as saved). Returns how many tensors the reload changed, for the caller to
// show that the rounding was not vacuous.
inline int expect_reloaded_rounded(const FlatTensors& saved, const FlatTensors& loaded,
                                   const std::function<float(float)>& round,
                                   const std::function<bool(const std::string&)>& exact = {}) {
  int changed = 0;
  for (const auto& [name, v] : saved) {
    const auto it = loaded.find(name);
    if (it == loaded.end()) {
      ADD_FAILURE() << name << " was not reloaded";
      continue;
    }
    std::vector<float> want = v;
    if (!exact || !exact(name))
      for (auto& x : want) x = round(x);
    EXPECT_TRUE(same_bits(want, it->second)) << name;
    changed += !same_bits(v, it->second);
  }
  return changed;
}

// The message of the E that loading dir throws; fails the test if it loads or throws something else.
template <class E>
std::string load_error(const std::string& dir) {
  try {
    load_checkpoint(dir);
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
    return "";
  }
  ADD_FAILURE() << "loaded without error";
  return "";
}

}  // namespace m3::test

#define EXPECT_HAS(msg, part) EXPECT_NE((msg).find(part), std::string::npos) << "'" << (part) << "' not in: " << (msg)
