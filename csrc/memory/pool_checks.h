// Argument validation for the pool ops, identical for every device.
#pragma once

#include "common/checks.h"

namespace fastllm::memory {

inline void check_pool_and_slots(const char* op, const at::Tensor& pool, const at::Tensor& slots) {
  check_dim(op, "pool", pool, 2);
  check_float_dtype(op, "pool", pool);
  check_contiguous(op, "pool", pool);
  check_dim(op, "slots", slots, 1);
  check_index_dtype(op, "slots", slots);
  check_contiguous(op, "slots", slots);
  check_same_device(op, "pool", pool, "slots", slots);
}

inline void check_pool_write(const at::Tensor& pool, const at::Tensor& slots,
                             const at::Tensor& rows) {
  constexpr const char* op = "fastllm.pool_write";
  check_pool_and_slots(op, pool, slots);
  check_dim(op, "rows", rows, 2);
  check_same_dtype(op, "pool", pool, "rows", rows);
  check_contiguous(op, "rows", rows);
  check_same_device(op, "pool", pool, "rows", rows);
  TORCH_CHECK_VALUE(rows.size(1) == pool.size(1), op, ": rows must have pool's width ",
                    pool.size(1), ", got rows of shape ", rows.sizes());
  TORCH_CHECK_VALUE(rows.size(0) == slots.size(0), op, ": rows and slots must have the same length, "
                    "got ", rows.size(0), " rows and ", slots.size(0), " slots");
  // Last: the range check may synchronise with the GPU, so every cheap check fails first.
  check_index_range(op, "slots", slots, pool.size(0));
}

// The slot range is left to the caller: a gather writes only its fresh output, so it may check
// slots while it copies (CPU) instead of in a separate pass.
inline void check_pool_gather_except_range(const at::Tensor& pool, const at::Tensor& slots) {
  check_pool_and_slots("fastllm.pool_gather", pool, slots);
}

}  // namespace fastllm::memory
