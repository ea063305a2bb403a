// CUDA kernels for the unified page pool.
//
// A group of threads (a power of two, up to a block) owns one row at a time and moves it in the
// widest word the row's size and alignment allow, so short rows (a KV head of 64 fp16 values) and
// long rows (an adapter row of 4096) both give coalesced, full-width transactions.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/index_guard.cuh"
#include "memory/pool_checks.h"
#include "memory/pool_rows.h"

namespace fastllm::memory {
namespace {

constexpr int kThreadsPerBlock = 256;

template <Direction direction, typename Unit, typename Index>
__global__ void move_rows_kernel(Unit* __restrict__ pool, Unit* __restrict__ dense,
                                 const Index* __restrict__ slots, int64_t rows,
                                 int64_t num_slots, int64_t units_per_row,
                                 int threads_per_row_log2, unsigned int* error_word) {
  const int threads_per_row = 1 << threads_per_row_log2;
  const int rows_per_block = kThreadsPerBlock >> threads_per_row_log2;
  const int lane = threadIdx.x & (threads_per_row - 1);
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block +
                     (threadIdx.x >> threads_per_row_log2);
       row < rows; row += row_stride) {
    const Index slot = slots[row];
    Unit* dense_row = dense + row * units_per_row;
    if (!slot_in_range(slot, num_slots)) {
      // Never touch the pool through a bad slot; a gather's row reads as zeros.
      if (lane == 0) {
        report_index_error(error_word, direction == Direction::kGather ? kPoolGatherSlots
                                                                       : kPoolWriteSlots);
      }
      if constexpr (direction == Direction::kGather) {
        for (int64_t unit = lane; unit < units_per_row; unit += threads_per_row) {
          dense_row[unit] = Unit{};
        }
      }
      continue;
    }
    Unit* pool_row = pool + slot_offset(slot, units_per_row);
    for (int64_t unit = lane; unit < units_per_row; unit += threads_per_row) {
      if constexpr (direction == Direction::kGather) {
        dense_row[unit] = pool_row[unit];
      } else {
        pool_row[unit] = dense_row[unit];
      }
    }
  }
}

template <Direction direction, typename Unit, typename Index>
void launch_move_rows(const at::Tensor& pool, const at::Tensor& dense, const at::Tensor& slots,
                      int64_t units_per_row) {
  const int64_t rows = slots.numel();
  int threads_per_row_log2 = 0;
  while ((1 << threads_per_row_log2) < units_per_row &&
         (1 << threads_per_row_log2) < kThreadsPerBlock) {
    ++threads_per_row_log2;
  }
  const int64_t rows_per_block = kThreadsPerBlock >> threads_per_row_log2;
  const int64_t blocks_needed = (rows + rows_per_block - 1) / rows_per_block;
  // Enough blocks to fill every SM several times; the grid-stride loop covers the rest.
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  const auto blocks = static_cast<unsigned>(std::min(blocks_needed, max_blocks));
  move_rows_kernel<direction, Unit, Index>
      <<<blocks, kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
          static_cast<Unit*>(pool.data_ptr()), static_cast<Unit*>(dense.data_ptr()),
          slots.const_data_ptr<Index>(), rows, pool.size(0), units_per_row, threads_per_row_log2,
          device_error_word(pool));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Direction direction, typename Index>
void move_rows_cuda(const at::Tensor& pool, const at::Tensor& dense, const at::Tensor& slots) {
  const int64_t row_bytes = pool.size(1) * pool.element_size();
  if (slots.numel() == 0 || row_bytes == 0) return;
  const int access = row_access_bytes(row_bytes, reinterpret_cast<std::uintptr_t>(pool.data_ptr()),
                                      reinterpret_cast<std::uintptr_t>(dense.data_ptr()));
  const int64_t units = row_bytes / access;
  switch (access) {
    case 16: return launch_move_rows<direction, uint4, Index>(pool, dense, slots, units);
    case 8: return launch_move_rows<direction, uint2, Index>(pool, dense, slots, units);
    case 4: return launch_move_rows<direction, uint32_t, Index>(pool, dense, slots, units);
    case 2: return launch_move_rows<direction, uint16_t, Index>(pool, dense, slots, units);
    default: return launch_move_rows<direction, uint8_t, Index>(pool, dense, slots, units);
  }
}

template <Direction direction>
void move_rows_cuda(const at::Tensor& pool, const at::Tensor& dense, const at::Tensor& slots) {
  const c10::cuda::CUDAGuard device_guard(pool.device());
  if (slots.scalar_type() == at::kInt) {
    move_rows_cuda<direction, int32_t>(pool, dense, slots);
  } else {
    move_rows_cuda<direction, int64_t>(pool, dense, slots);
  }
}

void pool_write_cuda(at::Tensor& pool, const at::Tensor& slots, const at::Tensor& rows) {
  check_pool_write(pool, slots, rows);
  move_rows_cuda<Direction::kWrite>(pool, rows, slots);
}

at::Tensor pool_gather_cuda(const at::Tensor& pool, const at::Tensor& slots) {
  check_pool_gather_except_range(pool, slots);
  check_index_range("fastllm.pool_gather", "slots", slots, pool.size(0));
  at::Tensor out = at::empty({slots.size(0), pool.size(1)}, pool.options());
  move_rows_cuda<Direction::kGather>(pool, out, slots);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("pool_write", &pool_write_cuda);
  m.impl("pool_gather", &pool_gather_cuda);
}

}  // namespace fastllm::memory
