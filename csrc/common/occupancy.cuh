// How many blocks of a kernel one SM holds at once, as the runtime computes it from the kernel's
// registers, static and dynamic shared memory: the grids that spread work over exactly one wave
// (sparse/sparse_mlp.h: spread_blocks, plan_sparse_down) are sized from it, since a grid planned
// for more resident blocks than fit runs a second, mostly idle wave.
//
// The query is a host call (no stream work, so it is allowed during CUDA-graph capture), cached
// per (device, kernel, threads, dynamic shared bytes): an op asks it on every call.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

namespace fastllm {

inline int resident_blocks_per_sm(const void* kernel, int threads, size_t dynamic_shared) {
  using Key = std::tuple<int, const void*, int, size_t>;
  static std::mutex mutex;
  static std::map<Key, int> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const Key key{device, kernel, threads, dynamic_shared};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = known.find(key);
    if (it != known.end()) return it->second;
  }
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads,
                                                               dynamic_shared));
  blocks = blocks > 0 ? blocks : 1;  // a launch that fits nowhere fails at launch, with its error
  const std::lock_guard<std::mutex> lock(mutex);
  known.emplace(key, blocks);
  return blocks;
}

// Raises `kernel`'s dynamic shared memory limit to at least `bytes` (needed above 48 KB), never
// lowering it: two threads launching different widths would otherwise undo each other's setting
// between one's set and its launch (and its occupancy query). Call before the occupancy query.
inline void allow_dynamic_shared(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  using Key = std::pair<int, const void*>;
  static std::mutex mutex;
  static std::map<Key, size_t> highest;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& limit = highest[Key{device, kernel}];
  if (bytes <= limit) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  limit = bytes;
}

}  // namespace fastllm
