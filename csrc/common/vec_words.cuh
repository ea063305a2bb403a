// 16-byte words of 16- or 32-bit floats, the unit of the CUDA kernels' vector loads.
#pragma once

#include <ATen/ATen.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fastllm {

// Elements of scalar_t per 16-byte word.
template <typename scalar_t>
constexpr int kWordElems = 16 / static_cast<int>(sizeof(scalar_t));

template <typename scalar_t>
__device__ __forceinline__ bool word_aligned_ptr(const scalar_t* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

__device__ __forceinline__ uint4 load_word(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// The floats of one 16-byte word of scalar_t (8 fp16 / bf16, 4 fp32), by bit operations on the
// word's registers (taking the word's address instead can put it on the stack).
template <typename scalar_t>
__device__ __forceinline__ void word_floats(const uint4& w, float* out);

template <>
__device__ __forceinline__ void word_floats<float>(const uint4& w, float* out) {
  out[0] = __uint_as_float(w.x);
  out[1] = __uint_as_float(w.y);
  out[2] = __uint_as_float(w.z);
  out[3] = __uint_as_float(w.w);
}

template <>
__device__ __forceinline__ void word_floats<at::Half>(const uint4& w, float* out) {
  const unsigned parts[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(parts[i] & 0xffffu)));
    out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(parts[i] >> 16)));
  }
}

template <>
__device__ __forceinline__ void word_floats<at::BFloat16>(const uint4& w, float* out) {
  const unsigned parts[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // a bf16 is the high half of the fp32 with the same bits
    out[2 * i] = __uint_as_float(parts[i] << 16);
    out[2 * i + 1] = __uint_as_float(parts[i] & 0xffff0000u);
  }
}

}  // namespace fastllm
