// 16-byte global -> shared copies with cp.async (sm_80+), shared by the kernels that stage tiles
// in a double buffer (KV decode, LoRA tensor-core SGMV).
#pragma once

namespace fastllm {

// cp.async does not pass through registers, so a thread can have a whole stage of copies in
// flight while the block computes on the previous one; the .cg form skips L1 (each word is read
// once). Before sm_80, a plain load and store.
__device__ __forceinline__ void copy16_async(void* shared_dst, const void* global_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src)
               : "memory");
#else
  *reinterpret_cast<uint4*>(shared_dst) = *reinterpret_cast<const uint4*>(global_src);
#endif
}

__device__ __forceinline__ void async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `pending` committed groups of this thread's copies are in flight.
template <int pending>
__device__ __forceinline__ void async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
#endif
}

}  // namespace fastllm
