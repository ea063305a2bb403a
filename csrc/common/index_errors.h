// How fastllm validates index *values* (slots, page tables, adapter ids, neuron sets) without
// stopping the GPU.
//
// CPU tensors: always checked on the host before any write (reading CPU memory costs nothing).
// CUDA tensors: reading an index on the host would synchronise the stream (and make CUDA-graph
// capture impossible), so by default the host checks only metadata (shape, dtype, device). The
// kernels guard every index they use: an index out of range is never dereferenced (its work is
// skipped) and sets a bit in a per-device error word (`IndexError`). The word is read where the
// caller already synchronises, with `fastllm.ops.raise_index_errors()`. Setting
// FASTLLM_CHECK_INDICES=1 (or `fastllm.ops.checked_indices()`) turns the full host check back on
// for CUDA tensors: a clear error at the call, at the price of a synchronisation per check.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace fastllm {

// One bit per (op, argument); the names table in index_errors.cpp must follow this order.
enum IndexError : uint32_t {
  kPoolWriteSlots = 1u << 0,
  kPoolGatherSlots = 1u << 1,
  kLoraTokenAdapter = 1u << 2,
  kLoraRanks = 1u << 3,
  kLoraRows = 1u << 4,
  kKvLengths = 1u << 5,
  kKvPageTable = 1u << 6,
  kKvEvictLengths = 1u << 7,
  kSparseActiveIdx = 1u << 8,
  kSparseCounts = 1u << 9,
  kLoraSgmvPlan = 1u << 10,
  kKvWork = 1u << 11,
  kKvStepRoom = 1u << 12,
  kIndexErrorCount = 13,
};

// Whether index values of `t` are checked on the host: always for CPU tensors, for CUDA tensors
// only in the debug mode.
bool host_checks_index_values(const at::Tensor& t);
void set_index_debug_mode(bool on);
bool index_debug_mode();

// The device's error word (int32 [1], zero until a kernel finds a bad index). Allocated on the
// first call for that device: call any op once before capturing a CUDA graph.
at::Tensor index_error_word(const at::Device& device);
bool index_error_word_exists(const at::Device& device);
// "fastllm.pool_write: slots" etc., for each bit set in `bits`, joined by "; ".
std::string describe_index_errors(uint32_t bits);

}  // namespace fastllm
