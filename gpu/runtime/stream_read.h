// A read-bandwidth probe: streams a device buffer once with 16-byte loads and folds it into one
// word, so that the loads cannot be dropped. The yardstick of kernels that only read (the MSA
// index scan of decode: n * Di * 2 bytes in, a few KB out), which a device-to-device copy (read +
// write, DRAM turnarounds between them) may understate or overstate; bench_gpu reports both.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace m3::gpu {

// xor_out (device, one word) = XOR of the buffer's 32-bit words, bytes / 4 of them. bytes a
// multiple of 16 and d 16-byte aligned (GpuError otherwise); bytes = 0 gives 0. One wave of CTAs
// (occupancy x SMs) strides over the buffer with 4 independent loads in flight a thread.
// zero_out = false skips the reset (a 4-byte memset enqueued before the kernel on s): the XOR is
// folded into *xor_out as it stands, so that a timed span holds the read alone (bench_gpu resets
// the word outside its events; at 256 MiB the memset node would add a few % to ~60 us).
void stream_read(const void* d, std::size_t bytes, unsigned* xor_out, cudaStream_t s, bool zero_out = true);

}  // namespace m3::gpu
