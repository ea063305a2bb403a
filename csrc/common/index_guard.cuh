// Device side of the index guards (see index_errors.h): a kernel that finds an index out of range
// skips the work that index would address and records which argument was bad.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>

#include <cstdint>

#include "common/index_errors.h"

namespace fastllm {

// The current device's error word, as a kernel argument. Allocating it inside CUDA-graph capture
// would take graph-pool memory whose zero-fill only runs at replay, so that is refused.
inline unsigned int* device_error_word(const at::Tensor& like) {
  if (!index_error_word_exists(like.device())) {
    TORCH_CHECK(at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None,
                "fastllm: the first fastllm op on ", like.device(), " ran inside CUDA-graph "
                "capture; run one step eagerly before capturing (it allocates the device's "
                "index-error word)");
  }
  return reinterpret_cast<unsigned int*>(index_error_word(like.device()).data_ptr<int32_t>());
}

__device__ __forceinline__ void report_index_error(unsigned int* word, IndexError code) {
  atomicOr(word, static_cast<unsigned int>(code));
}

}  // namespace fastllm
