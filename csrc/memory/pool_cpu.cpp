// CPU kernels for the unified page pool: whole rows moved with memcpy, rows split across threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "memory/pool_checks.h"
#include "memory/pool_rows.h"

namespace fastllm::memory {
namespace {

// Rows per parallel task: below this, thread start-up costs more than the copies.
constexpr int64_t kMinBytesPerTask = 64 * 1024;

template <Direction direction, typename Index>
void move_rows_cpu(const at::Tensor& pool, const at::Tensor& dense, const at::Tensor& slots) {
  const int64_t rows = slots.numel();
  const int64_t row_bytes = pool.size(1) * pool.element_size();
  if (rows == 0 || row_bytes == 0) return;
  auto* pool_bytes = static_cast<char*>(pool.data_ptr());
  auto* dense_bytes = static_cast<char*>(dense.data_ptr());
  const Index* slot_ids = slots.data_ptr<Index>();
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / row_bytes);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      char* in_pool = pool_bytes + slot_offset(slot_ids[row], row_bytes);
      char* in_dense = dense_bytes + row * row_bytes;
      if constexpr (direction == Direction::kGather) {
        std::memcpy(in_dense, in_pool, row_bytes);
      } else {
        std::memcpy(in_pool, in_dense, row_bytes);
      }
    }
  });
}

template <Direction direction>
void move_rows_cpu(const at::Tensor& pool, const at::Tensor& dense, const at::Tensor& slots) {
  if (slots.scalar_type() == at::kInt) {
    move_rows_cpu<direction, int32_t>(pool, dense, slots);
  } else {
    move_rows_cpu<direction, int64_t>(pool, dense, slots);
  }
}

void pool_write_cpu(at::Tensor& pool, const at::Tensor& slots, const at::Tensor& rows) {
  check_pool_write(pool, slots, rows);
  move_rows_cpu<Direction::kWrite>(pool, rows, slots);
}

at::Tensor pool_gather_cpu(const at::Tensor& pool, const at::Tensor& slots) {
  check_pool_gather(pool, slots);
  at::Tensor out = at::empty({slots.size(0), pool.size(1)}, pool.options());
  move_rows_cpu<Direction::kGather>(pool, out, slots);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("pool_write", &pool_write_cpu);
  m.impl("pool_gather", &pool_gather_cpu);
}

}  // namespace fastllm::memory
