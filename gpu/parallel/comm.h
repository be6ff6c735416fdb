// The NCCL communicator over the local GPUs: a Team of N ranks, rank r on device r, each rank one
// host thread with its device set, its own non-blocking stream and its own ncclComm_t.
//
//   m3::gpu::Team team(2);                        // throws GpuError if 2 > visible cards
//   team.run([&](m3::gpu::Rank& r) {              // every rank at once, one thread each
//     all_reduce_sum(r, x[r.rank()], y[r.rank()], n);   // gpu/parallel/collectives.h
//     r.sync();                                   // waits, but gives up if another rank failed
//   });                                           // rethrows any rank's exception, rank named
//
// Why one thread per GPU in one process (DESIGN §6 allows either): the harness is one process
// (m3h, the tests, bench_gpu) that owns its weights, inputs and the CPU reference it compares
// against; threads share all of that without copies, and need no launcher and no unique-id file.
// Threads and not one thread driving every device because a rank's code (the model's layer loop,
// later) blocks on its own stream and must not serialize the others. The communicators come from
// ncclCommInitAll, which is ncclGetUniqueId + one ncclCommInitRank per device inside
// ncclGroupStart/End; a later one-process-per-GPU mode swaps only the Team constructor.
//
// Failure without hangs. A rank that throws sets the team's abort flag. Ranks waiting in
// Rank::sync() (a polling wait, never cudaStreamSynchronize) see it within microseconds and
// throw TeamAborted; the collective wrappers refuse to enqueue once it is set. A rank blocked
// anywhere else (a blocking copy behind a collective whose peer is gone) is freed after
// kAbortGrace by ncclCommAbort on every communicator, which stops the NCCL kernels it waits
// behind (NCCL's fault-tolerance path; PyTorch's watchdog does the same). After any failure the
// communicators are aborted (a peer may hold an unmatched collective) and the Team refuses
// further runs: build a new one. "Blocked anywhere else" includes unwinding: a rank that stops in
// sync() and then frees a DeviceBuffer waits in cudaFree (it synchronizes the device) behind its
// unmatched collective, so a failed run whose ranks own buffers inside f reports after ~kAbortGrace
// (2.5 s measured on 2 H200s), not at once. What it cannot free: a rank spinning in its own code. A rank
// blocked on the host inside an NCCL call (the first call between two ranks connects them there,
// and needs both) relies on NCCL polling the abort flag in its connection waits: NCCL's path,
// untested here; the tests connect their ranks before they inject a failure.
//
// NVLink multicast (NVLS) is forced off before the first communicator: on the shared GPU hosts a
// program that uses it can take every card of the host out of service (DESIGN §6, the hosts' notes).
#pragma once

#include "gpu/runtime/buffer.h"
#include "gpu/runtime/check.h"

#include <nccl.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace m3::gpu {

// Thrown by a rank that stopped because another rank failed; Team::run reports the failure that
// caused it, not this.
struct TeamAborted : GpuError {
  using GpuError::GpuError;
};

// The rank of the calling thread inside Team::run is check_rank() (gpu/runtime/check.h, thread-local):
// Team sets it in each rank's thread, so M3_CUDA_CHECK and M3_NCCL_CHECK both name the rank.

[[noreturn]] void throw_nccl_error(const char* call, ncclResult_t r, const char* file, int line);

// Sets NCCL_NVLS_ENABLE=0 (overwriting; says so on stderr once if the user had another value).
// Team's constructor calls it; call it yourself before any other NCCL use.
void nccl_nvls_off();

class Team;

class Rank {
 public:
  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_->get(); }
  ncclComm_t comm() const { return comm_; }
  // True once any rank of the team failed: work enqueued now may never complete.
  bool aborting() const;
  // Waits for this rank's stream. Throws on a CUDA error, an asynchronous NCCL error, or
  // TeamAborted when another rank failed meanwhile (its peers' collectives would never finish).
  void sync() const;
  // Throws TeamAborted if the team is aborting: the collective wrappers call it before enqueueing.
  void check_not_aborting(const char* what) const;

 private:
  friend class Team;
  Team* team_ = nullptr;
  int rank_ = 0, size_ = 0, device_ = 0;
  ncclComm_t comm_ = nullptr;
  std::unique_ptr<Stream> stream_;  // created on device_
};

class Team {
 public:
  // How long a failed run waits for the other ranks to stop by themselves before it aborts the
  // communicators: far above the poll latency of Rank::sync (microseconds), far below a test's
  // timeout. Only a rank blocked outside sync() ever waits this long.
  static constexpr std::chrono::milliseconds kAbortGrace{2000};

  // `ranks` ranks on devices 0..ranks-1. GpuError when ranks < 1 or more than the visible cards
  // (the message states both numbers).
  explicit Team(int ranks);
  ~Team();
  Team(const Team&) = delete;
  Team& operator=(const Team&) = delete;

  int size() const { return static_cast<int>(ranks_.size()); }
  Rank& rank(int r) { return *ranks_.at(static_cast<std::size_t>(r)); }
  bool aborting() const { return abort_.load(std::memory_order_acquire); }
  // True after a failed run: the communicators are gone, run() throws.
  bool broken() const { return broken_; }

  // Runs f on every rank at once, one thread each, the rank's device current. Returns when all
  // have returned; if any threw, throws GpuError "Team::run: rank R (device D) failed: ..." naming
  // every rank that failed on its own (ranks that only stopped waiting for it are counted).
  void run(const std::function<void(Rank&)>& f);

 private:
  void abort_comms();  // ncclCommAbort on every communicator, each from its own thread
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::atomic<bool> abort_{false};
  bool broken_ = false;
  std::string broken_reason_;
};

}  // namespace m3::gpu

// Checks an NCCL call: GpuError naming the call, NCCL's message, file:line, device and rank.
#define M3_NCCL_CHECK(call)                                                          \
  do {                                                                               \
    ncclResult_t m3_nr_ = (call);                                                    \
    if (m3_nr_ != ncclSuccess) ::m3::gpu::throw_nccl_error(#call, m3_nr_, __FILE__, __LINE__); \
  } while (0)
