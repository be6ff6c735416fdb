// Typed NCCL collectives on a rank's stream (gpu/parallel/comm.h). They only enqueue: nothing
// here waits, Rank::sync or an event does (except all_to_all_counts, which must read its result).
// Counts are elements of T, pointers are device memory of the rank's device. NCCL's rule holds:
// every rank makes the same calls in the same order with matching counts. What one rank can
// check alone (entry counts, bounds, overlaps, root) is checked on the host and thrown as GpuError
// before anything is enqueued; what needs the peers is check_all_to_all_counts, a collective.
#pragma once

#include "gpu/parallel/comm.h"

#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

namespace m3::gpu {

template <class T>
struct NcclType;  // the ncclDataType_t of an element type; undefined for types NCCL cannot carry
template <> struct NcclType<float> { static constexpr ncclDataType_t value = ncclFloat32; };
template <> struct NcclType<bf16> { static constexpr ncclDataType_t value = ncclBfloat16; };
template <> struct NcclType<std::int32_t> { static constexpr ncclDataType_t value = ncclInt32; };
template <> struct NcclType<std::int64_t> { static constexpr ncclDataType_t value = ncclInt64; };
template <> struct NcclType<std::uint8_t> { static constexpr ncclDataType_t value = ncclUint8; };

template <class T>
constexpr bool kReducible = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

namespace detail {
void all_reduce_sum(Rank& r, const void* send, void* recv, std::size_t count, ncclDataType_t t);
void all_gather(Rank& r, const void* send, void* recv, std::size_t count, ncclDataType_t t);
void reduce_scatter_sum(Rank& r, const void* send, void* recv, std::size_t count, ncclDataType_t t);
void broadcast(Rank& r, const void* send, void* recv, std::size_t count, ncclDataType_t t, int root);
void all_to_all_v(Rank& r, const void* send, std::size_t send_elems, std::span<const std::size_t> send_counts,
                  std::span<const std::size_t> send_offsets, void* recv, std::size_t recv_elems,
                  std::span<const std::size_t> recv_counts, std::span<const std::size_t> recv_offsets,
                  ncclDataType_t t, std::size_t elem_bytes);
}  // namespace detail

// recv[i] = sum over ranks of send[i]; send [count], recv [count]; send == recv is in place.
template <class T>
void all_reduce_sum(Rank& r, const T* send, T* recv, std::size_t count) {
  static_assert(kReducible<T>, "all_reduce_sum: fp32 or bf16");
  detail::all_reduce_sum(r, send, recv, count, NcclType<T>::value);
}

// recv[q*count + i] = send of rank q [i]; send [count], recv [size*count].
template <class T>
void all_gather(Rank& r, const T* send, T* recv, std::size_t count) {
  detail::all_gather(r, send, recv, count, NcclType<T>::value);
}

// recv[i] = sum over ranks q of send_q[rank*count + i]; send [size*count], recv [count].
template <class T>
void reduce_scatter_sum(Rank& r, const T* send, T* recv, std::size_t count) {
  static_assert(kReducible<T>, "reduce_scatter_sum: fp32 or bf16");
  detail::reduce_scatter_sum(r, send, recv, count, NcclType<T>::value);
}

// recv = root's send on every rank; send [count] (read on root only), recv [count].
template <class T>
void broadcast(Rank& r, const T* send, T* recv, std::size_t count, int root) {
  detail::broadcast(r, send, recv, count, NcclType<T>::value, root);
}

// Per-peer blocks, the expert-parallel token dispatch: this rank sends
// send[send_offsets[p], +send_counts[p]) to rank p and receives rank p's block into
// recv[recv_offsets[p], +recv_counts[p]). send [send_elems], recv [recv_elems]; the four spans
// [size]. send_counts[p] here must equal recv_counts[this rank] on p (NCCL does not check:
// check_all_to_all_counts does). Host checks: span sizes, every block inside its buffer, receive
// blocks pairwise disjoint, send and recv buffers disjoint (not in place), the own block's two
// counts equal. Zero counts move nothing; the own block is a device-to-device copy.
template <class T>
void all_to_all_v(Rank& r, const T* send, std::size_t send_elems, std::span<const std::size_t> send_counts,
                  std::span<const std::size_t> send_offsets, T* recv, std::size_t recv_elems,
                  std::span<const std::size_t> recv_counts, std::span<const std::size_t> recv_offsets) {
  detail::all_to_all_v(r, send, send_elems, send_counts, send_offsets, recv, recv_elems, recv_counts, recv_offsets,
                       NcclType<T>::value, sizeof(T));
}

// Collective, waits: given what this rank sends each peer ([size]), returns what each peer sends
// it ([size]): the receive counts a dispatch needs before its all_to_all_v.
std::vector<std::size_t> all_to_all_counts(Rank& r, std::span<const std::size_t> send_counts);

// Collective, waits: throws GpuError on every rank whose recv_counts ([size]) disagree with what
// its peers send it, naming the peer and both counts.
void check_all_to_all_counts(Rank& r, std::span<const std::size_t> send_counts,
                             std::span<const std::size_t> recv_counts);

}  // namespace m3::gpu
