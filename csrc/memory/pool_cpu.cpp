// CPU kernels for the unified page pool: whole rows moved with memcpy, rows split across threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>

#include "memory/pool_checks.h"
#include "memory/pool_rows.h"

namespace fastllm::memory {
namespace {

// Rows per parallel task: below this, thread start-up costs more than the copies.
constexpr int64_t kMinBytesPerTask = 64 * 1024;

// Returns false if a slot was out of range; the rows before it may have been copied, so only a
// gather (whose output is discarded on failure) may rely on this instead of checking beforehand.
template <Direction direction, typename Index>
bool move_rows_cpu(const at::Tensor& pool, const at::Tensor& dense, const at::Tensor& slots) {
  const int64_t rows = slots.numel();
  const int64_t row_bytes = pool.size(1) * pool.element_size();
  const int64_t num_slots = pool.size(0);
  if (rows == 0) return true;
  auto* pool_bytes = static_cast<char*>(pool.data_ptr());
  auto* dense_bytes = static_cast<char*>(dense.data_ptr());
  const Index* slot_ids = slots.data_ptr<Index>();
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / std::max<int64_t>(1, row_bytes));
  std::atomic<bool> all_in_range{true};
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (!slot_in_range(slot_ids[row], num_slots)) {
        all_in_range.store(false, std::memory_order_relaxed);
        return;
      }
      char* in_pool = pool_bytes + slot_offset(slot_ids[row], row_bytes);
      char* in_dense = dense_bytes + row * row_bytes;
      if constexpr (direction == Direction::kGather) {
        std::memcpy(in_dense, in_pool, row_bytes);
      } else {
        std::memcpy(in_pool, in_dense, row_bytes);
      }
    }
  });
  return all_in_range.load();
}

template <Direction direction>
bool move_rows_cpu(const at::Tensor& pool, const at::Tensor& dense, const at::Tensor& slots) {
  if (slots.scalar_type() == at::kInt) {
    return move_rows_cpu<direction, int32_t>(pool, dense, slots);
  }
  return move_rows_cpu<direction, int64_t>(pool, dense, slots);
}

void pool_write_cpu(at::Tensor& pool, const at::Tensor& slots, const at::Tensor& rows) {
  check_pool_write(pool, slots, rows);
  move_rows_cpu<Direction::kWrite>(pool, rows, slots);
}

at::Tensor pool_gather_cpu(const at::Tensor& pool, const at::Tensor& slots) {
  check_pool_gather_except_range(pool, slots);
  at::Tensor out = at::empty({slots.size(0), pool.size(1)}, pool.options());
  if (!move_rows_cpu<Direction::kGather>(pool, out, slots)) {
    check_index_range("fastllm.pool_gather", "slots", slots, pool.size(0));  // raises, with range
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("pool_write", &pool_write_cpu);
  m.impl("pool_gather", &pool_gather_cpu);
}

}  // namespace fastllm::memory
