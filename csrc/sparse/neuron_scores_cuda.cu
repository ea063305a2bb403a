// CUDA quantized neuron scores: one warp per neuron; each lane loads 16 int8 weights of the
// neuron's up (and gate) row per step (one 16-byte load; a scale group is a multiple of 16 columns,
// so the 16 share one scale), so a warp reads 512 contiguous bytes per step. Up to kRowsPerPass
// rows of x are dotted per read of the weights, their sums kept in registers.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "sparse/neuron_scores.h"

namespace fastllm::sparse {
namespace {

constexpr const char* kOp = "fastllm.quantized_neuron_scores";
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kRowsPerPass = 4;
constexpr int kChunk = 16;  // int8 weights per lane per step: one 16-byte load

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t>
__device__ __forceinline__ float chunk_dot(const scalar_t* __restrict__ x, const int8_t* bytes) {
  float sum = 0.f;
#pragma unroll
  for (int e = 0; e < kChunk; ++e) sum += static_cast<float>(x[e]) * static_cast<float>(bytes[e]);
  return sum;
}

template <typename scalar_t>
__global__ void neuron_scores_kernel(const scalar_t* __restrict__ x,
                                     const int8_t* __restrict__ q_up,
                                     const float* __restrict__ up_scale,
                                     const int8_t* __restrict__ q_gate,
                                     const float* __restrict__ gate_scale,
                                     const float* __restrict__ b_up,
                                     const float* __restrict__ b_gate, float* __restrict__ out,
                                     int64_t rows, int64_t d, int64_t neurons, int64_t group,
                                     Activation act) {
  const int lane = threadIdx.x & 31;
  const int64_t groups = d / group;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
       j < neurons; j += warp_stride) {
    const int8_t* up_row = q_up + j * d;
    const int8_t* gate_row = q_gate == nullptr ? nullptr : q_gate + j * d;
    for (int64_t b0 = 0; b0 < rows; b0 += kRowsPerPass) {
      float up[kRowsPerPass] = {}, gate[kRowsPerPass] = {};
      for (int64_t c = static_cast<int64_t>(lane) * kChunk; c < d; c += 32 * kChunk) {
        const int4 up_bits = *reinterpret_cast<const int4*>(up_row + c);
        const int8_t* up_bytes = reinterpret_cast<const int8_t*>(&up_bits);
        const float su = up_scale[j * groups + c / group];
        int4 gate_bits = {};
        float sg = 0.f;
        if (gate_row != nullptr) {
          gate_bits = *reinterpret_cast<const int4*>(gate_row + c);
          sg = gate_scale[j * groups + c / group];
        }
        const int8_t* gate_bytes = reinterpret_cast<const int8_t*>(&gate_bits);
#pragma unroll
        for (int r = 0; r < kRowsPerPass; ++r) {
          if (b0 + r >= rows) break;
          const scalar_t* xr = x + (b0 + r) * d + c;
          up[r] += su * chunk_dot(xr, up_bytes);
          if (gate_row != nullptr) gate[r] += sg * chunk_dot(xr, gate_bytes);
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
        if (b0 + r >= rows) break;
        const float u = warp_sum(up[r]) + (b_up ? b_up[j] : 0.f);
        const float g = warp_sum(gate[r]) + (b_gate ? b_gate[j] : 0.f);
        if (lane == 0) out[(b0 + r) * neurons + j] = fabsf(hidden_value(act, gate_row != nullptr, u, g));
      }
    }
  }
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

void check_aligned(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0, kOp, ": ",
                    name, " must start on a 16-byte boundary on CUDA (a fresh tensor does; a "
                    "view at an odd storage offset does not)");
}

at::Tensor quantized_neuron_scores_cuda(const at::Tensor& x, const at::Tensor& q_up,
                                        const at::Tensor& up_scale,
                                        const c10::optional<at::Tensor>& q_gate,
                                        const c10::optional<at::Tensor>& gate_scale,
                                        const c10::optional<at::Tensor>& b_up,
                                        const c10::optional<at::Tensor>& b_gate,
                                        c10::string_view activation) {
  const NeuronScoreShape s =
      check_neuron_scores(kOp, x, q_up, up_scale, q_gate, gate_scale, b_up, b_gate);
  const Activation act = parse_activation(kOp, std::string(activation));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({s.rows, s.neurons}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  check_aligned("q_up", q_up);
  if (s.gated) check_aligned("q_gate", *q_gate);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks =
      std::min<int64_t>((s.neurons + kWarpsPerBlock - 1) / kWarpsPerBlock, sms * 32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "quantized_neuron_scores_cuda", [&] {
    neuron_scores_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), q_up.const_data_ptr<int8_t>(),
        up_scale.const_data_ptr<float>(), ptr_or_null<int8_t>(q_gate),
        ptr_or_null<float>(gate_scale), ptr_or_null<float>(b_up), ptr_or_null<float>(b_gate),
        out.data_ptr<float>(), s.rows, s.d_in, s.neurons, s.group, act);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("quantized_neuron_scores", &quantized_neuron_scores_cuda);
}

}  // namespace fastllm::sparse
