// Programmatic dependent launch (sm_90+): a kernel that consumes another's output is launched
// with the programmatic-serialization attribute, so its blocks are scheduled while the producer
// finishes and run everything that does not read the producer's output (index loads, slice
// bounds, L2 prefetches of weights) before waiting for it. The pair then costs about one launch
// and the consumer's ramp-up overlaps the producer's tail: most of what fusing the two kernels
// would give, without a grid-wide barrier or a workspace that must be zero before the launch.
// On older GPUs (and code built for them) the attribute is not set and both device calls are
// no-ops, so the consumer simply starts after the producer, as in plain stream order.
//
// A consumer must not take the producer's output through a `const __restrict__` pointer (or
// __ldg): the read-only path lets the compiler hoist those loads above the wait, and the
// non-coherent loads are outside the memory model the wait's guarantee is stated in. It must
// also reach the wait in every thread before it exits: the next kernel in the stream relies on
// the consumer's completion implying the producer's.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace fastllm {

// In the producer: lets the dependent grid launch once every block of this grid has called it
// (or exited). It does not make this grid's writes visible; the consumer's wait does.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// In the consumer: returns once the producer grid has completed and its memory is visible. A
// no-op for a kernel that was launched without the attribute.
__device__ __forceinline__ void wait_for_producer() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether `kernel` may be launched as a dependent on the current device. The device must take the
// attribute (compute capability 9.0+) AND the code that runs must contain the griddepcontrol
// instructions: a build whose newest target is, say, compute_80 PTX is JIT-compiled on an H100
// without them, and a dependent launched with the attribute would then read the producer's
// output before it is visible (the producer's implicit trigger at exit does not flush it). So the
// kernel's PTX version decides, read once per (device, kernel). FASTLLM_DEPENDENT_LAUNCH=0 turns
// dependent launches off (triage).
inline bool dependent_launch_supported(const void* kernel) {
  static const bool enabled = [] {
    const char* env = std::getenv("FASTLLM_DEPENDENT_LAUNCH");
    return env == nullptr || std::string(env) != "0";
  }();
  if (!enabled) return false;
  using Key = std::pair<int, const void*>;
  static std::mutex mutex;
  static std::map<Key, bool> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find({device, kernel});
  if (it != known.end()) return it->second;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const bool supported = major >= 9 && attributes.ptxVersion >= 90;
  known.emplace(Key{device, kernel}, supported);
  return supported;
}

// Launches `kernel` on `stream`, as a programmatic dependent of the work before it where
// `dependent` (the kernel must then call wait_for_producer before reading that work's output).
template <typename... Params, typename... Args>
void launch_maybe_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared,
                            cudaStream_t stream, bool dependent, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = dependent ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace fastllm
