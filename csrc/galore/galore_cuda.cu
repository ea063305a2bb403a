// CUDA kernels for the GaLore steps. The GEMMs (down-projection, and back-projection with the
// weight update as its epilogue) go to cuBLAS through ATen in galore_step.h; these kernels are the
// elementwise Adam math in the low-rank space, with fp32 or blockwise 8-bit moments. Nothing here
// reads device data on the host: a step skipped for a non-finite gradient (found_inf) is decided
// by the kernels themselves.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "galore/galore_math.h"
#include "galore/galore_step.h"

namespace fastllm::galore {
namespace {

constexpr int kThreads = 256;
static_assert(kThreads == kQuantBlock, "the 8-bit kernel maps one thread block to one quant block");

unsigned grid_for(int64_t work_items) {
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(work_items, max_blocks)));
}

// A step skipped by found_inf (read on the device, uniform across the grid): moments untouched,
// a zero step written to a non-accumulated out. Returns whether the caller must stop.
template <typename O>
__device__ __forceinline__ bool skip_step(const float* skip, O* o, int64_t numel,
                                          bool accumulate) {
  if (skip == nullptr || *skip == 0.f) return false;
  if (!accumulate) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
         i += stride) {
      o[i] = static_cast<O>(0.f);
    }
  }
  return true;
}

template <typename G, typename O>
__global__ void adam_kernel(const G* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                            O* __restrict__ o, int64_t numel, AdamCoeffs c, bool accumulate,
                            const float* __restrict__ skip) {
  if (skip_step(skip, o, numel, accumulate)) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    float mi = m[i], vi = v[i];
    const float n = adam_moments(static_cast<float>(g[i]), mi, vi, c);
    m[i] = mi;
    v[i] = vi;
    o[i] = static_cast<O>(accumulate ? c.out_beta * static_cast<float>(o[i]) + c.out_alpha * n
                                     : c.out_alpha * n);
  }
}

template <typename G, typename O>
__global__ void adam8bit_kernel(const G* __restrict__ g, int8_t* __restrict__ mq,
                                float* __restrict__ ma, uint8_t* __restrict__ vq,
                                float* __restrict__ va, O* __restrict__ o, int64_t numel,
                                int64_t blocks, AdamCoeffs c, bool accumulate,
                                const float* __restrict__ skip) {
  if (skip_step(skip, o, numel, accumulate)) return;  // uniform: no thread reaches a barrier
  __shared__ float red_m[kQuantBlock];
  __shared__ float red_v[kQuantBlock];
  const int t = threadIdx.x;
  for (int64_t block = blockIdx.x; block < blocks; block += gridDim.x) {
    const int64_t i = block * kQuantBlock + t;
    const bool live = i < numel;
    float mi = 0.0f, vi = 0.0f;
    if (live) {
      mi = dequant_signed(mq[i], ma[block]);
      vi = dequant_unsigned(vq[i], va[block]);
      const float n = adam_moments(static_cast<float>(g[i]), mi, vi, c);
      o[i] = static_cast<O>(accumulate ? c.out_beta * static_cast<float>(o[i]) + c.out_alpha * n
                                       : c.out_alpha * n);
    }
    red_m[t] = fabsf(mi);
    red_v[t] = vi;
    __syncthreads();
    for (int s = kQuantBlock / 2; s > 0; s >>= 1) {
      if (t < s) {
        red_m[t] = fmaxf(red_m[t], red_m[t + s]);
        red_v[t] = fmaxf(red_v[t], red_v[t + s]);
      }
      __syncthreads();
    }
    const float new_ma = red_m[0], new_va = red_v[0];
    if (live) {
      mq[i] = quant_signed(mi, new_ma);
      vq[i] = quant_unsigned(vi, new_va);
    }
    // Every thread has read the old absmax (before the first barrier) and the new one (above)
    // before thread 0 overwrites it and before the next block reuses the shared buffers.
    __syncthreads();
    if (t == 0) {
      ma[block] = new_ma;
      va[block] = new_va;
    }
  }
}

template <typename O>
__global__ void decay_kernel(O* __restrict__ p, int64_t numel, float decay,
                             const float* __restrict__ skip) {
  if (*skip != 0.f) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    p[i] = static_cast<O>(static_cast<float>(p[i]) * decay);
  }
}

const float* skip_ptr(const at::Tensor& skip) {
  return skip.defined() ? skip.const_data_ptr<float>() : nullptr;
}

void decay_kernel_cuda(at::Tensor& param, double decay, const at::Tensor& skip) {
  const int64_t numel = param.numel();
  if (numel == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_weight_type(param.scalar_type(), [&](auto tag) {
    using O = decltype(tag);
    decay_kernel<O><<<grid_for((numel + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        param.data_ptr<O>(), numel, static_cast<float>(decay), skip.const_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void adam_kernel_cuda(const at::Tensor& low, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                      at::Tensor& out, const AdamCoeffs& c, bool accumulate,
                      const at::Tensor& skip) {
  const int64_t numel = low.numel();
  if (numel == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_pair(low, out, [&](auto low_tag, auto out_tag) {
    using G = decltype(low_tag);
    using O = decltype(out_tag);
    adam_kernel<G, O><<<grid_for((numel + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        low.const_data_ptr<G>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
        out.data_ptr<O>(), numel, c, accumulate, skip_ptr(skip));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void adam8bit_kernel_cuda(const at::Tensor& low, at::Tensor& m_codes, at::Tensor& m_absmax,
                          at::Tensor& v_codes, at::Tensor& v_absmax, at::Tensor& out,
                          const AdamCoeffs& c, bool accumulate, const at::Tensor& skip) {
  const int64_t numel = low.numel();
  if (numel == 0) return;
  const int64_t blocks = quant_blocks(numel);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_pair(low, out, [&](auto low_tag, auto out_tag) {
    using G = decltype(low_tag);
    using O = decltype(out_tag);
    adam8bit_kernel<G, O><<<grid_for(blocks), kThreads, 0, stream>>>(
        low.const_data_ptr<G>(), m_codes.data_ptr<int8_t>(), m_absmax.data_ptr<float>(),
        v_codes.data_ptr<uint8_t>(), v_absmax.data_ptr<float>(), out.data_ptr<O>(), numel, blocks,
        c, accumulate, skip_ptr(skip));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void galore_adam_step_cuda(at::Tensor& param, const at::Tensor& grad,
                           const std::optional<at::Tensor>& left,
                           const std::optional<at::Tensor>& right, at::Tensor& exp_avg,
                           at::Tensor& exp_avg_sq, bool grad_is_projected, double lr, double beta1,
                           double beta2, double eps, double weight_decay, double scale,
                           int64_t step, const std::optional<at::Tensor>& found_inf) {
  const c10::cuda::CUDAGuard device_guard(param.device());
  galore_adam_step_impl(&adam_kernel_cuda, &decay_kernel_cuda, param, grad, left, right, exp_avg,
                        exp_avg_sq, grad_is_projected,
                        Hyper{lr, beta1, beta2, eps, weight_decay, scale, step}, found_inf);
}

void galore_adam8bit_step_cuda(at::Tensor& param, const at::Tensor& grad,
                               const std::optional<at::Tensor>& left,
                               const std::optional<at::Tensor>& right, at::Tensor& m_codes,
                               at::Tensor& m_absmax, at::Tensor& v_codes, at::Tensor& v_absmax,
                               bool grad_is_projected, double lr, double beta1, double beta2,
                               double eps, double weight_decay, double scale, int64_t step,
                               const std::optional<at::Tensor>& found_inf) {
  const c10::cuda::CUDAGuard device_guard(param.device());
  galore_adam8bit_step_impl(&adam8bit_kernel_cuda, &decay_kernel_cuda, param, grad, left, right,
                            m_codes, m_absmax, v_codes, v_absmax, grad_is_projected,
                            Hyper{lr, beta1, beta2, eps, weight_decay, scale, step}, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("galore_adam_step", &galore_adam_step_cuda);
  m.impl("galore_adam8bit_step", &galore_adam8bit_step_cuda);
}

}  // namespace fastllm::galore
