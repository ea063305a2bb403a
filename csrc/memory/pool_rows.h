// Row addressing inside the unified page pool, shared by the CPU and CUDA kernels.
//
// The pool's storage is viewed as [num_slots, width]: a slot is one row of `width` elements, and a
// page of page_size elements holds page_size / width slots. Kernels move whole rows between the
// pool and a dense [n, width] tensor, in the widest machine word that divides the row and both
// base addresses, so fp16 rows of 64 elements move as eight 16-byte words.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace fastllm::memory {

// Largest of 16, 8, 4, 2, 1 bytes dividing the row size and both base addresses.
FASTLLM_HOST_DEVICE int row_access_bytes(int64_t row_bytes, std::uintptr_t pool_address,
                                         std::uintptr_t dense_address) {
  const std::uint64_t combined = static_cast<std::uint64_t>(row_bytes) | pool_address | dense_address;
  int bytes = 16;
  while (bytes > 1 && (combined % bytes) != 0) bytes /= 2;
  return bytes;
}

// Offset, in access units, of the first unit of a pool slot. 64-bit: pools pass 2^31 elements.
template <typename Index>
FASTLLM_HOST_DEVICE int64_t slot_offset(Index slot, int64_t units_per_row) {
  return static_cast<int64_t>(slot) * units_per_row;
}

// Whether a slot addresses a row of a pool of num_slots rows; one unsigned compare rejects
// negatives too. Both kernels skip (and report) a slot that does not.
template <typename Index>
FASTLLM_HOST_DEVICE bool slot_in_range(Index slot, int64_t num_slots) {
  return static_cast<uint64_t>(static_cast<int64_t>(slot)) < static_cast<uint64_t>(num_slots);
}

// Which way a kernel moves rows: pool -> dense (gather) or dense -> pool (write).
enum class Direction { kGather, kWrite };

}  // namespace fastllm::memory
