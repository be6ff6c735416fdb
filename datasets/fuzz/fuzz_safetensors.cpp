// libFuzzer target for the safetensors reader: any bytes are parsed as a whole file and, when the
// header passes, every tensor is read (converted to float where its dtype allows). The only
// acceptable failure is SafetensorsError; any other exception aborts, and the sanitizers catch
// out-of-bounds reads, overflow and leaks. The CI fallback is the seeded mutation test in
// tests/test_safetensors.cpp (SafetensorsBad.MutationsLoadOrThrowSafetensorsError).
//
// Build and run (clang with libFuzzer; not part of the CMake build):
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
//     -I. -I/usr/include/eigen3 datasets/fuzz/fuzz_safetensors.cpp datasets/safetensors.cpp \
//     datasets/safetensors_dtype.cpp -lfmt -o build/fuzz_safetensors
//   mkdir -p build/fuzz_corpus && build/fuzz_safetensors -max_total_time=60 -max_len=4096 build/fuzz_corpus
// A seed corpus helps: any small file written by m3::SafetensorsWriter (or save_checkpoint of the
// tiny preset, whose shards are ~200 KB; keep -max_len above the seed's size then).
#include "datasets/safetensors.h"

#include <cstddef>
#include <cstdint>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    auto r = m3::SafetensorsReader::from_bytes(std::vector<std::uint8_t>(data, data + size), "fuzz-input");
    for (const auto& t : r.header().tensors) {
      // numel * dtype size == the tensor's bytes <= the input's size: memory stays bounded.
      if (m3::dtype_reads_as_float(t.dtype)) {
        std::vector<float> out(static_cast<std::size_t>(t.numel));
        r.read_f32(t, out);
      } else {
        (void)r.read_raw(t);
      }
    }
  } catch (const m3::SafetensorsError&) {
    // expected for malformed input
  }
  return 0;
}
