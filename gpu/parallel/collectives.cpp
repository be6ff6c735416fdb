// The collectives of collectives.h: host-side checks, then one NCCL call (or one group of
// ncclSend/ncclRecv) on the rank's stream.
#include "gpu/parallel/collectives.h"

#include <fmt/format.h>

#include <algorithm>
#include <numeric>

namespace m3::gpu {

namespace {

void need(bool ok, const Rank& r, const char* op, const std::string& what) {
  if (!ok) throw GpuError(fmt::format("{} (rank {} of {}): {}", op, r.rank(), r.size(), what));
}

// Pointers may be null only where nothing is moved.
void need_buffers(const Rank& r, const char* op, std::size_t count, const void* send, const void* recv) {
  need(count == 0 || (send != nullptr && recv != nullptr), r, op,
       fmt::format("null buffer for {} elements (send {}, recv {})", count, send, recv));
}

// [offset, offset + count) inside [0, capacity), without overflowing.
bool inside(std::size_t offset, std::size_t count, std::size_t capacity) {
  return count <= capacity && offset <= capacity - count;
}

}  // namespace

namespace detail {

void all_reduce_sum(Rank& r, const void* send, void* recv, std::size_t count, ncclDataType_t t) {
  need_buffers(r, "all_reduce_sum", count, send, recv);
  r.check_not_aborting("all_reduce_sum");
  if (count == 0) return;  // every rank has the same count (NCCL's rule): all skip together
  M3_NCCL_CHECK(ncclAllReduce(send, recv, count, t, ncclSum, r.comm(), r.stream()));
}

void all_gather(Rank& r, const void* send, void* recv, std::size_t count, ncclDataType_t t) {
  need_buffers(r, "all_gather", count, send, recv);
  r.check_not_aborting("all_gather");
  if (count == 0) return;
  M3_NCCL_CHECK(ncclAllGather(send, recv, count, t, r.comm(), r.stream()));
}

void reduce_scatter_sum(Rank& r, const void* send, void* recv, std::size_t count, ncclDataType_t t) {
  need_buffers(r, "reduce_scatter_sum", count, send, recv);
  r.check_not_aborting("reduce_scatter_sum");
  if (count == 0) return;
  M3_NCCL_CHECK(ncclReduceScatter(send, recv, count, t, ncclSum, r.comm(), r.stream()));
}

void broadcast(Rank& r, const void* send, void* recv, std::size_t count, ncclDataType_t t, int root) {
  need(root >= 0 && root < r.size(), r, "broadcast", fmt::format("root {} is not a rank of 0..{}", root, r.size() - 1));
  need(count == 0 || recv != nullptr, r, "broadcast", fmt::format("null recv buffer for {} elements", count));
  need(count == 0 || r.rank() != root || send != nullptr, r, "broadcast",
       fmt::format("null send buffer on the root for {} elements", count));
  r.check_not_aborting("broadcast");
  if (count == 0) return;
  M3_NCCL_CHECK(ncclBroadcast(send, recv, count, t, root, r.comm(), r.stream()));
}

void all_to_all_v(Rank& r, const void* send, std::size_t send_elems, std::span<const std::size_t> send_counts,
                  std::span<const std::size_t> send_offsets, void* recv, std::size_t recv_elems,
                  std::span<const std::size_t> recv_counts, std::span<const std::size_t> recv_offsets,
                  ncclDataType_t t, std::size_t elem_bytes) {
  const char* op = "all_to_all_v";
  const auto n = static_cast<std::size_t>(r.size());
  const auto me = static_cast<std::size_t>(r.rank());
  for (const auto& [name, s] : {std::pair{"send_counts", send_counts}, std::pair{"send_offsets", send_offsets},
                                std::pair{"recv_counts", recv_counts}, std::pair{"recv_offsets", recv_offsets}})
    need(s.size() == n, r, op, fmt::format("{} has {} entries, the team has {} ranks", name, s.size(), n));
  for (std::size_t p = 0; p < n; ++p) {
    need(inside(send_offsets[p], send_counts[p], send_elems), r, op,
         fmt::format("the block for rank {} (offset {}, {} elements) ends past the send buffer of {} elements", p,
                     send_offsets[p], send_counts[p], send_elems));
    need(inside(recv_offsets[p], recv_counts[p], recv_elems), r, op,
         fmt::format("the block from rank {} (offset {}, {} elements) ends past the recv buffer of {} elements", p,
                     recv_offsets[p], recv_counts[p], recv_elems));
  }
  need(send_counts[me] == recv_counts[me], r, op,
       fmt::format("sends itself {} elements but expects {} from itself", send_counts[me], recv_counts[me]));
  const std::size_t sent = std::accumulate(send_counts.begin(), send_counts.end(), std::size_t{0});
  const std::size_t received = std::accumulate(recv_counts.begin(), recv_counts.end(), std::size_t{0});
  need(sent == 0 || send != nullptr, r, op, fmt::format("null send buffer for {} elements", sent));
  need(received == 0 || recv != nullptr, r, op, fmt::format("null recv buffer for {} elements", received));
  // Receive blocks must not overlap: NCCL writes them concurrently. Sorted by offset, each
  // non-empty block ends at or before the next one starts.
  std::vector<std::size_t> order(n);  // [size] peers by receive offset
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return recv_offsets[a] < recv_offsets[b]; });
  std::size_t prev = n;  // the last non-empty block seen
  for (std::size_t p : order) {
    if (recv_counts[p] == 0) continue;
    if (prev != n)
      need(recv_offsets[prev] + recv_counts[prev] <= recv_offsets[p], r, op,
           fmt::format("the recv blocks from rank {} (offset {}, {} elements) and rank {} (offset {}, {} elements) "
                       "overlap",
                       prev, recv_offsets[prev], recv_counts[prev], p, recv_offsets[p], recv_counts[p]));
    prev = p;
  }
  const auto* s = static_cast<const char*>(send);
  auto* d = static_cast<char*>(recv);
  const auto s0 = reinterpret_cast<std::uintptr_t>(s), d0 = reinterpret_cast<std::uintptr_t>(d);
  need(sent == 0 || received == 0 || s0 + send_elems * elem_bytes <= d0 || d0 + recv_elems * elem_bytes <= s0, r, op,
       "the send and recv buffers overlap (not supported in place)");
  r.check_not_aborting(op);

  if (send_counts[me] != 0)
    M3_CUDA_CHECK(cudaMemcpyAsync(d + recv_offsets[me] * elem_bytes, s + send_offsets[me] * elem_bytes,
                                  send_counts[me] * elem_bytes, cudaMemcpyDeviceToDevice, r.stream()));
  // One group: the sends and receives progress together, so no pair order can deadlock. A failed
  // call inside still ends the group (NCCL's rule) before the error is thrown.
  M3_NCCL_CHECK(ncclGroupStart());
  ncclResult_t first = ncclSuccess;
  const char* first_call = "";
  for (std::size_t p = 0; p < n && first == ncclSuccess; ++p) {
    if (p == me) continue;
    const int peer = static_cast<int>(p);
    if (send_counts[p] != 0) {
      first = ncclSend(s + send_offsets[p] * elem_bytes, send_counts[p], t, peer, r.comm(), r.stream());
      first_call = "ncclSend(block for peer)";
    }
    if (first == ncclSuccess && recv_counts[p] != 0) {
      first = ncclRecv(d + recv_offsets[p] * elem_bytes, recv_counts[p], t, peer, r.comm(), r.stream());
      first_call = "ncclRecv(block from peer)";
    }
  }
  const ncclResult_t end = ncclGroupEnd();
  if (first != ncclSuccess) throw_nccl_error(first_call, first, __FILE__, __LINE__);
  if (end != ncclSuccess) throw_nccl_error("ncclGroupEnd() (all_to_all_v)", end, __FILE__, __LINE__);
}

}  // namespace detail

std::vector<std::size_t> all_to_all_counts(Rank& r, std::span<const std::size_t> send_counts) {
  const auto n = static_cast<std::size_t>(r.size());
  need(send_counts.size() == n, r, "all_to_all_counts",
       fmt::format("send_counts has {} entries, the team has {} ranks", send_counts.size(), n));
  // One count to and from every peer, through the device (NCCL moves device memory only).
  std::vector<std::int64_t> host(send_counts.begin(), send_counts.end());  // [size]
  DeviceBuffer<std::int64_t> out(n), in(n);                                 // [size] each
  out.upload(host, r.stream());
  in.fill_bytes(0xFF, r.stream());  // -1 everywhere: a count that never arrived cannot pass as one
  std::vector<std::size_t> ones(n, 1), offsets(n);  // [size] one element per peer, at index p
  std::iota(offsets.begin(), offsets.end(), std::size_t{0});
  detail::all_to_all_v(r, out.data(), n, ones, offsets, in.data(), n, ones, offsets, ncclInt64, sizeof(std::int64_t));
  r.sync();
  // download() waits with cudaStreamSynchronize, which is safe now: the stream has drained.
  const auto got = in.download(r.stream());
  std::vector<std::size_t> recv_counts(n);
  for (std::size_t p = 0; p < n; ++p) {
    need(got[p] >= 0, r, "all_to_all_counts", fmt::format("no count arrived from rank {}", p));
    recv_counts[p] = static_cast<std::size_t>(got[p]);
  }
  return recv_counts;
}

void check_all_to_all_counts(Rank& r, std::span<const std::size_t> send_counts,
                             std::span<const std::size_t> recv_counts) {
  const auto n = static_cast<std::size_t>(r.size());
  need(recv_counts.size() == n, r, "check_all_to_all_counts",
       fmt::format("recv_counts has {} entries, the team has {} ranks", recv_counts.size(), n));
  const auto sent_to_me = all_to_all_counts(r, send_counts);
  std::string bad;
  for (std::size_t p = 0; p < n; ++p)
    if (sent_to_me[p] != recv_counts[p])
      bad += fmt::format("{}rank {} sends {} elements, {} expected", bad.empty() ? "" : "; ", p, sent_to_me[p],
                         recv_counts[p]);
  need(bad.empty(), r, "check_all_to_all_counts", "mismatched all-to-all counts: " + bad);
}

}  // namespace m3::gpu
