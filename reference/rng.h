// Counter-based random numbers whose bits are the same on every machine and compiler.
//
// Value i of a stream is a pure function of (seed, stream key, i): SplitMix64 of a counter, so any
// tensor (or any slice of one, e.g. one expert of a layer) can be generated alone, in any order,
// in parallel. The normal transform uses integer arithmetic and one exact conversion only
// (Irwin-Hall: the sum of 12 uniforms minus 6 has mean 0 and variance 1), never libm, whose
// log/cos differ across implementations.
#pragma once

#include <cstdint>
#include <string_view>

namespace m3 {

constexpr std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// FNV-1a of a name: stable stream keys for named tensors.
constexpr std::uint64_t fnv1a64(std::string_view s) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (char c : s) { h ^= static_cast<unsigned char>(c); h *= 0x100000001b3ull; }
  return h;
}

class CounterRng {
 public:
  CounterRng(std::uint64_t seed, std::string_view stream)
      : base_(splitmix64(seed ^ splitmix64(fnv1a64(stream)))) {}
  CounterRng(std::uint64_t seed, std::uint64_t stream) : base_(splitmix64(seed ^ splitmix64(stream))) {}

  // 64 random bits of element i.
  std::uint64_t bits(std::uint64_t i, unsigned k = 0) const { return splitmix64(base_ + 4 * i + k); }

  // Uniform in [0, 1) with 53 random bits (exact: an integer times 2^-53).
  double uniform(std::uint64_t i) const {
    return static_cast<double>(bits(i) >> 11) * 0x1.0p-53;
  }

  // Approximately standard normal (Irwin-Hall of 12 uniforms of 21 bits: mean 0, variance 1,
  // support [-6, 6]). Exact in double: the integer sum is formed without rounding.
  double normal(std::uint64_t i) const {
    std::int64_t sum = 0;
    for (unsigned k = 0; k < 4; ++k) {
      std::uint64_t b = bits(i, k);
      sum += static_cast<std::int64_t>(b & 0x1fffff) + static_cast<std::int64_t>((b >> 21) & 0x1fffff) +
             static_cast<std::int64_t>((b >> 42) & 0x1fffff);
    }
    // 12 uniforms in units of 2^-21, centred: subtract 12 * (2^21 - 1) / 2 exactly (x2 to stay integral).
    std::int64_t centred2 = 2 * sum - 12 * ((std::int64_t{1} << 21) - 1);
    return static_cast<double>(centred2) * 0x1.0p-22;
  }

 private:
  std::uint64_t base_;
};

}  // namespace m3
