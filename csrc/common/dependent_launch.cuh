// Programmatic dependent launch (sm_90+): a kernel that consumes another's output is launched
// with the programmatic-serialization attribute, so its blocks are scheduled while the producer
// finishes and run everything that does not read the producer's output (index loads, slice
// bounds, L2 prefetches of weights) before waiting for it. The pair then costs about one launch
// and the consumer's ramp-up overlaps the producer's tail: most of what fusing the two kernels
// would give, without a grid-wide barrier or a workspace that must be zero before the launch.
// On older GPUs (and builds for them) the attribute is not set and both device calls are no-ops,
// so the consumer simply starts after the producer, as in plain stream order.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

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

// Whether the current device takes the attribute (compute capability 9.0 and newer).
inline bool dependent_launch_supported(int major) { return major >= 9; }

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
