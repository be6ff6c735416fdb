// Device memory with RAII, typed views of it, streams, events and the cuBLAS handle.
//
// A DeviceBuffer<T> owns n elements (cudaMalloc; never managed memory). Kernels take plain
// pointers plus dimensions in the letters of reference/dims.h; row-major everywhere, as in the
// reference, so one token's vector is one contiguous row.
#pragma once

#include "gpu/runtime/check.h"

#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace m3::gpu {

using bf16 = __nv_bfloat16;

template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    if (n) M3_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)));
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }

  T* data() { return p_; }
  const T* data() const { return p_; }
  std::size_t size() const { return n_; }
  std::size_t bytes() const { return n_ * sizeof(T); }

  void upload(const T* host, std::size_t n, cudaStream_t s = nullptr) {
    check_fits(n);
    M3_CUDA_CHECK(cudaMemcpyAsync(p_, host, n * sizeof(T), cudaMemcpyHostToDevice, s));
    M3_CUDA_CHECK(cudaStreamSynchronize(s));
  }
  void upload(const std::vector<T>& host, cudaStream_t s = nullptr) { upload(host.data(), host.size(), s); }
  std::vector<T> download(cudaStream_t s = nullptr) const {
    std::vector<T> h(n_);
    if (n_) {
      M3_CUDA_CHECK(cudaMemcpyAsync(h.data(), p_, bytes(), cudaMemcpyDeviceToHost, s));
      M3_CUDA_CHECK(cudaStreamSynchronize(s));
    }
    return h;
  }
  // Fills every byte with `byte` (0xFF makes float and bf16 NaN: tests poison outputs with it).
  void fill_bytes(int byte, cudaStream_t s = nullptr) {
    if (n_) M3_CUDA_CHECK(cudaMemsetAsync(p_, byte, bytes(), s));
  }

 private:
  void check_fits(std::size_t n) const {
    if (n > n_)
      throw GpuError("DeviceBuffer: " + std::to_string(n) + " elements do not fit a buffer of " +
                     std::to_string(n_));
  }
  void release() {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

class Stream {
 public:
  Stream() { M3_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() { if (s_) cudaStreamDestroy(s_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  void sync() const { M3_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

class Event {
 public:
  Event() { M3_CUDA_CHECK(cudaEventCreate(&e_)); }
  ~Event() { if (e_) cudaEventDestroy(e_); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(cudaStream_t s) { M3_CUDA_CHECK(cudaEventRecord(e_, s)); }
  cudaEvent_t get() const { return e_; }
  // Milliseconds from `start` to this event (both recorded; waits for this one).
  float since(const Event& start) const {
    M3_CUDA_CHECK(cudaEventSynchronize(e_));
    float ms = 0;
    M3_CUDA_CHECK(cudaEventElapsedTime(&ms, start.e_, e_));
    return ms;
  }

 private:
  cudaEvent_t e_ = nullptr;
};

class CublasHandle {
 public:
  CublasHandle() { M3_CUBLAS_CHECK(cublasCreate(&h_)); }
  ~CublasHandle() { if (h_) cublasDestroy(h_); }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  cublasHandle_t get() const { return h_; }

 private:
  cublasHandle_t h_ = nullptr;
};

// Host-side bf16 conversion (round to nearest even), for uploads and downloads in tests.
std::vector<bf16> to_bf16(const float* x, std::size_t n);
std::vector<float> from_bf16(const bf16* x, std::size_t n);

}  // namespace m3::gpu
