// Lets one inline function serve both the CPU kernels and the CUDA kernels, so the CPU tests run
// the same index arithmetic the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define FASTLLM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTLLM_HOST_DEVICE inline
#endif
