// The Team (comm.h): communicator creation and teardown, the rank threads, failure propagation.
#include "gpu/parallel/comm.h"

#include "gpu/runtime/device.h"

#include <fmt/format.h>

#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <string_view>
#include <thread>

namespace m3::gpu {

void throw_nccl_error(const char* call, ncclResult_t r, const char* file, int line) {
  int dev = -1;
  cudaGetDevice(&dev);
  std::string msg = fmt::format("NCCL call {} failed: {}", call, ncclGetErrorString(r));
  // NCCL's own account (which peer, which transport); may describe an earlier asynchronous error.
  const char* last = ncclGetLastError(nullptr);
  if (last != nullptr && *last != '\0') msg += fmt::format(" (NCCL: {})", last);
  msg += fmt::format(" at {}:{} (device {}", file, line, dev);
  const int rank = check_rank();
  if (rank >= 0) msg += fmt::format(", rank {}", rank);
  msg += ")";
  throw GpuError(msg);
}

void nccl_nvls_off() {
  // Warn once: every Team re-applies the setting, and a test suite builds many Teams.
  static std::atomic<bool> warned{false};
  const char* old = std::getenv("NCCL_NVLS_ENABLE");
  if (old != nullptr && std::string_view(old) != "0" && !warned.exchange(true))
    fmt::print(stderr,
               "m3: NCCL_NVLS_ENABLE={} overridden to 0: NVLink multicast stays off on shared GPU hosts "
               "(gpu/parallel/comm.h)\n",
               old);
  setenv("NCCL_NVLS_ENABLE", "0", 1);
}

bool Rank::aborting() const { return team_->aborting(); }

void Rank::check_not_aborting(const char* what) const {
  if (aborting())
    throw TeamAborted(fmt::format("{} (rank {}): not enqueued, another rank of the team failed", what, rank_));
}

void Rank::sync() const {
  for (;;) {
    const cudaError_t e = cudaStreamQuery(stream());
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady)
      throw_gpu_error("CUDA", "cudaStreamQuery(rank stream)", cudaGetErrorString(e), __FILE__, __LINE__);
    check_not_aborting("Rank::sync");
    ncclResult_t async = ncclSuccess;
    M3_NCCL_CHECK(ncclCommGetAsyncError(comm_, &async));
    if (async != ncclSuccess)
      throw_nccl_error("(asynchronous error of an enqueued collective)", async, __FILE__, __LINE__);
    // Yield rather than sleep: the wait is on the critical path of every step, and a rank thread
    // has a core to itself (one per GPU); cudaDeviceScheduleSpin makes the same trade.
    std::this_thread::yield();
  }
}

namespace {

// Runs f(rank) on one thread per rank with the rank's device current, and joins. f must not throw.
void each_rank_thread(std::vector<std::unique_ptr<Rank>>& ranks, const std::function<void(Rank&)>& f) {
  std::vector<std::thread> threads;
  threads.reserve(ranks.size());
  for (auto& r : ranks)
    threads.emplace_back([&f, &r] {
      cudaSetDevice(r->device());
      f(*r);
    });
  for (auto& t : threads) t.join();
}

}  // namespace

Team::Team(int ranks) {
  nccl_nvls_off();
  const int available = device_count();
  if (ranks < 1) throw GpuError(fmt::format("Team: ranks must be >= 1, got {}", ranks));
  if (ranks > available) {
    const char* vis = std::getenv("CUDA_VISIBLE_DEVICES");
    throw GpuError(fmt::format("Team: {} ranks requested but only {} CUDA device{} visible (one rank per card{})",
                               ranks, available, available == 1 ? " is" : "s are",
                               vis ? fmt::format("; CUDA_VISIBLE_DEVICES={}", vis) : std::string()));
  }
  int prev_device = 0;
  M3_CUDA_CHECK(cudaGetDevice(&prev_device));
  std::vector<int> devices(static_cast<std::size_t>(ranks));  // [ranks] rank r on device r
  std::iota(devices.begin(), devices.end(), 0);
  std::vector<ncclComm_t> comms(static_cast<std::size_t>(ranks), nullptr);  // [ranks]
  M3_NCCL_CHECK(ncclCommInitAll(comms.data(), ranks, devices.data()));
  for (int r = 0; r < ranks; ++r) {
    auto rk = std::make_unique<Rank>();
    rk->team_ = this;
    rk->rank_ = r;
    rk->size_ = ranks;
    rk->device_ = r;
    rk->comm_ = comms[static_cast<std::size_t>(r)];
    ranks_.push_back(std::move(rk));
  }
  try {
    for (auto& rk : ranks_) {
      M3_CUDA_CHECK(cudaSetDevice(rk->device_));
      rk->stream_ = std::make_unique<Stream>();
    }
    M3_CUDA_CHECK(cudaSetDevice(prev_device));
  } catch (...) {
    abort_comms();
    throw;
  }
}

Team::~Team() {
  // ncclCommDestroy from each rank's own thread: NCCL may synchronize the ranks of an intra-node
  // team while it tears down, which one thread destroying them in turn could deadlock on.
  each_rank_thread(ranks_, [this](Rank& r) {
    if (!broken_ && r.comm_ != nullptr) {
      const ncclResult_t e = ncclCommDestroy(r.comm_);
      if (e != ncclSuccess)
        fmt::print(stderr, "m3: ncclCommDestroy failed on rank {}: {}\n", r.rank_, ncclGetErrorString(e));
    }
    r.comm_ = nullptr;
    r.stream_.reset();  // destroyed with its own device current
  });
}

void Team::abort_comms() {
  each_rank_thread(ranks_, [](Rank& r) {
    if (r.comm_ != nullptr) ncclCommAbort(r.comm_);  // its result says nothing we could act on
  });
}

void Team::run(const std::function<void(Rank&)>& f) {
  if (broken_) throw GpuError("Team::run: the team was aborted by an earlier failure (" + broken_reason_ +
                              "); build a new Team");
  enum class Kind { OK, FAILED, STOPPED };  // STOPPED: gave up because another rank failed
  struct Outcome {
    Kind kind = Kind::OK;
    std::string what;
  };
  const int n = size();
  std::vector<Outcome> out(static_cast<std::size_t>(n));  // [ranks]
  std::vector<int> failed_order;                          // FAILED ranks, first failure first
  std::mutex mu;
  std::condition_variable cv;
  int finished = 0;

  const auto body = [&](int r) {
    Outcome o;
    check_rank() = r;
    try {
      M3_CUDA_CHECK(cudaSetDevice(ranks_[static_cast<std::size_t>(r)]->device_));
      f(*ranks_[static_cast<std::size_t>(r)]);
    } catch (const TeamAborted& e) {
      o = {Kind::STOPPED, e.what()};
    } catch (const std::exception& e) {
      o = {Kind::FAILED, e.what()};
    } catch (...) {
      o = {Kind::FAILED, "an exception not derived from std::exception"};
    }
    check_rank() = -1;
    // Raised before taking the lock, so peers polling in Rank::sync stop as early as possible.
    if (o.kind != Kind::OK) abort_.store(true, std::memory_order_release);
    {
      std::lock_guard lk(mu);
      if (o.kind == Kind::FAILED) failed_order.push_back(r);
      out[static_cast<std::size_t>(r)] = std::move(o);
      ++finished;
    }
    cv.notify_all();
  };

  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(n));
  try {
    for (int r = 0; r < n; ++r) threads.emplace_back(body, r);
  } catch (...) {  // no thread for a rank: the started ones would wait for it forever
    abort_.store(true, std::memory_order_release);
    abort_comms();
    for (auto& t : threads) t.join();
    broken_ = true;
    broken_reason_ = "a rank thread could not be started";
    throw;
  }

  bool comms_aborted = false;
  {
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return finished == n || aborting(); });
    if (finished < n && !cv.wait_for(lk, kAbortGrace, [&] { return finished == n; })) {
      // Someone is blocked outside Rank::sync, behind a collective whose peer is gone.
      lk.unlock();
      abort_comms();
      comms_aborted = true;
      lk.lock();
    }
    cv.wait(lk, [&] { return finished == n; });
  }
  for (auto& t : threads) t.join();
  if (!aborting()) return;

  // A peer may hold an unmatched collective: the communicators cannot be trusted any more.
  if (!comms_aborted) abort_comms();
  for (auto& rk : ranks_) rk->comm_ = nullptr;
  broken_ = true;

  std::string msg;
  const auto describe = [&](int r) {
    return fmt::format("rank {} (device {}) failed: {}", r, ranks_[static_cast<std::size_t>(r)]->device_,
                       out[static_cast<std::size_t>(r)].what);
  };
  for (int r : failed_order) msg += (msg.empty() ? "" : "; also ") + describe(r);
  std::vector<int> stopped;
  for (int r = 0; r < n; ++r)
    if (out[static_cast<std::size_t>(r)].kind == Kind::STOPPED) stopped.push_back(r);
  if (msg.empty())  // only TeamAborted was thrown (by user code): report those
    for (int r : stopped) msg += (msg.empty() ? "" : "; also ") + describe(r);
  else if (!stopped.empty())
    msg += fmt::format(" ({} other rank{} stopped waiting for it)", stopped.size(), stopped.size() == 1 ? "" : "s");
  broken_reason_ = failed_order.empty() ? "an abort" : fmt::format("rank {} failed", failed_order.front());
  throw GpuError("Team::run: " + msg);
}

}  // namespace m3::gpu
