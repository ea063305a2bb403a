// CUDA quantized neuron scores: one warp per neuron at a time (grid-stride, spread evenly by
// plan_neuron_scores). The block first stages up to kScoreMaxRowsPerPass rows of x in shared
// memory as fp32 (swizzled, neuron_scores.h: staged_x_slot), so every neuron the block serves
// reads x from shared memory instead of re-reading it from global memory as scalars. Each lane
// then loads 16-byte words of the neuron's up (and gate) row, two words per step (four 16-byte
// loads in flight with a gate): 16 int8 codes or 32 packed int4 codes per word; a scale group is a
// multiple of 16 columns, so each 16-column step has one scale. Codes become floats without a
// conversion instruction (int8_code / int4_code), are dotted with every staged row, and the sums
// stay in registers.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "common/occupancy.cuh"
#include "sparse/neuron_scores.h"

namespace fastllm::sparse {
namespace {

constexpr const char* kOp = "fastllm.quantized_neuron_scores";
constexpr int kRows = kScoreMaxRowsPerPass;
constexpr int kWordsPerStep = 2;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float dot4(float4 a, float b0, float b1, float b2, float b3) {
  return a.x * b0 + a.y * b1 + a.z * b2 + a.w * b3;
}

// Adds one 16-byte word of codes (up and, if gated, gate) times the staged rows into up / gate.
// The word starts at column c0; `f0` is its first float4 of x. int8: each 32-bit part holds 4
// columns (one float4 of x); packed int4: 8 columns (two float4s). A 16-column step (one scale)
// is the whole int8 word or half a packed one.
template <bool kPacked, bool kGated>
__device__ __forceinline__ void add_word(const float4* __restrict__ xs, int slots, int nr,
                                         int f0, uint4 up_bits, uint4 gate_bits,
                                         const float* up_scale, const float* gate_scale,
                                         float* up, float* gate) {
  const uint32_t uw[4] = {up_bits.x, up_bits.y, up_bits.z, up_bits.w};
  const uint32_t gw[4] = {gate_bits.x, gate_bits.y, gate_bits.z, gate_bits.w};
  constexpr int kSteps = kPacked ? 2 : 1;   // 16-column steps per word
  constexpr int kParts = 4 / kSteps;        // 32-bit parts per step
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    float pu[kRows] = {}, pg[kRows] = {};
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      const int w = step * kParts + part;
      if constexpr (kPacked) {
        float cu[8], cg[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          cu[k] = int4_code(uw[w], k);
          if constexpr (kGated) cg[k] = int4_code(gw[w], k);
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r >= nr) break;
          const float4 a = xs[r * slots + staged_x_slot(f0 + 2 * w)];
          const float4 b = xs[r * slots + staged_x_slot(f0 + 2 * w + 1)];
          pu[r] += dot4(a, cu[0], cu[1], cu[2], cu[3]) + dot4(b, cu[4], cu[5], cu[6], cu[7]);
          if constexpr (kGated) {
            pg[r] += dot4(a, cg[0], cg[1], cg[2], cg[3]) + dot4(b, cg[4], cg[5], cg[6], cg[7]);
          }
        }
      } else {
        float cu[4], cg[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          cu[k] = int8_code(uw[w], k);
          if constexpr (kGated) cg[k] = int8_code(gw[w], k);
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r >= nr) break;
          const float4 a = xs[r * slots + staged_x_slot(f0 + w)];
          pu[r] += dot4(a, cu[0], cu[1], cu[2], cu[3]);
          if constexpr (kGated) pg[r] += dot4(a, cg[0], cg[1], cg[2], cg[3]);
        }
      }
    }
    const float su = up_scale[step], sg = kGated ? gate_scale[step] : 0.f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      up[r] += su * pu[r];
      if constexpr (kGated) gate[r] += sg * pg[r];
    }
  }
}

template <typename scalar_t, bool kPacked, bool kGated>
__global__ void __launch_bounds__(kScoreThreads)
    neuron_scores_kernel(const scalar_t* __restrict__ x, const uint8_t* __restrict__ q_up,
                         const float* __restrict__ up_scale, const uint8_t* __restrict__ q_gate,
                         const float* __restrict__ gate_scale, const float* __restrict__ b_up,
                         const float* __restrict__ b_gate, float* __restrict__ out, int64_t rows,
                         int64_t d, int64_t neurons, int64_t group, int rows_per_pass,
                         int64_t row_floats, Activation act) {
  extern __shared__ float4 staged[];  // rows_per_pass rows of row_floats / 4 slots
  constexpr int kColumns = kPacked ? 32 : 16;  // per 16-byte word
  constexpr int kSteps = kColumns / 16;        // 16-column steps (one scale each) per word
  const int lane = threadIdx.x & 31;
  // 32-bit from here on: a row is far below 2^31 columns, and 64-bit division is a long routine.
  const int slots = static_cast<int>(row_floats / 4);
  const int words = static_cast<int>(d / kColumns);  // 16-byte words per row of codes
  const int64_t groups = d / group;
  // The scale of 16-column step t is t / steps_per_group: a shift for the usual power-of-two
  // groups, else a 32-bit division.
  const unsigned steps_per_group = static_cast<unsigned>(group / 16);
  const bool pow2 = (steps_per_group & (steps_per_group - 1)) == 0;
  const unsigned shift = pow2 ? static_cast<unsigned>(__ffs(steps_per_group) - 1) : 0u;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kScoreWarps;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kScoreWarps + (threadIdx.x >> 5);
  for (int64_t b0 = 0; b0 < rows; b0 += rows_per_pass) {
    const int nr = static_cast<int>(rows - b0 < rows_per_pass ? rows - b0 : rows_per_pass);
    __syncthreads();  // every warp is done with the previous pass's rows
    for (int s = threadIdx.x; s < nr * slots; s += blockDim.x) {
      const int r = s / slots, f = s - r * slots;
      const int64_t c = 4 * static_cast<int64_t>(f);
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (c < d) {  // d is a multiple of 16: a float4 is all in or all padding
        const scalar_t* p = x + (b0 + r) * d + c;
        v = make_float4(static_cast<float>(p[0]), static_cast<float>(p[1]),
                        static_cast<float>(p[2]), static_cast<float>(p[3]));
      }
      staged[r * slots + staged_x_slot(f)] = v;
    }
    __syncthreads();
    for (int64_t j = first; j < neurons; j += warp_stride) {
      const uint4* up_row = reinterpret_cast<const uint4*>(q_up) + j * words;
      const uint4* gate_row = kGated ? reinterpret_cast<const uint4*>(q_gate) + j * words
                                     : nullptr;
      const float* us = up_scale + j * groups;
      const float* gs = kGated ? gate_scale + j * groups : nullptr;
      float up[kRows] = {}, gate[kRows] = {};
      for (int w0 = lane; w0 < words; w0 += 32 * kWordsPerStep) {
        uint4 ub[kWordsPerStep], gb[kWordsPerStep];
        // All of the step's loads first, so they are in flight together.
#pragma unroll
        for (int u = 0; u < kWordsPerStep; ++u) {
          const int w = w0 + 32 * u;
          ub[u] = w < words ? up_row[w] : make_uint4(0, 0, 0, 0);
          gb[u] = kGated && w < words ? gate_row[w] : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kWordsPerStep; ++u) {
          const int w = w0 + 32 * u;
          if (w >= words) break;
          // The scales of the word's 16-column steps (the same one unless group == 16).
          float su[kSteps], sg[kSteps];
#pragma unroll
          for (int step = 0; step < kSteps; ++step) {
            const unsigned t = static_cast<unsigned>(w * kSteps + step);
            const unsigned g = pow2 ? t >> shift : t / steps_per_group;
            su[step] = us[g];
            sg[step] = kGated ? gs[g] : 0.f;
          }
          add_word<kPacked, kGated>(staged, slots, nr, w * (kColumns / 4), ub[u], gb[u], su, sg,
                                    up, gate);
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r >= nr) break;
        const float u = warp_sum(up[r]) + (b_up ? b_up[j] : 0.f);
        const float g = kGated ? warp_sum(gate[r]) + (b_gate ? b_gate[j] : 0.f) : 0.f;
        if (lane == 0) out[(b0 + r) * neurons + j] = fabsf(hidden_value(act, kGated, u, g));
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

template <typename scalar_t, bool kPacked, bool kGated>
void launch(const at::Tensor& x, const at::Tensor& q_up, const at::Tensor& up_scale,
            const c10::optional<at::Tensor>& q_gate, const c10::optional<at::Tensor>& gate_scale,
            const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& b_gate,
            at::Tensor& out, const NeuronScoreShape& s, const StagedRows& staging, int64_t sms,
            Activation act, cudaStream_t stream) {
  auto kernel = neuron_scores_kernel<scalar_t, kPacked, kGated>;
  // before the occupancy query, which depends on it
  allow_dynamic_shared(reinterpret_cast<const void*>(kernel),
                       static_cast<size_t>(staging.shared_bytes));
  const NeuronScoresLaunch plan = plan_neuron_scores(
      s.rows, s.d_in, s.neurons, sms,
      resident_blocks_per_sm(reinterpret_cast<const void*>(kernel), kScoreThreads,
                             static_cast<size_t>(staging.shared_bytes)));
  kernel<<<static_cast<unsigned>(plan.blocks), kScoreThreads,
           static_cast<size_t>(plan.shared_bytes), stream>>>(
      x.const_data_ptr<scalar_t>(), static_cast<const uint8_t*>(q_up.const_data_ptr()),
      up_scale.const_data_ptr<float>(),
      kGated ? static_cast<const uint8_t*>(q_gate->const_data_ptr()) : nullptr,
      ptr_or_null<float>(gate_scale), ptr_or_null<float>(b_up), ptr_or_null<float>(b_gate),
      out.data_ptr<float>(), s.rows, s.d_in, s.neurons, s.group,
      static_cast<int>(plan.rows_per_pass), plan.row_floats, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor quantized_neuron_scores_cuda(const at::Tensor& x, const at::Tensor& q_up,
                                        const at::Tensor& up_scale,
                                        const c10::optional<at::Tensor>& q_gate,
                                        const c10::optional<at::Tensor>& gate_scale,
                                        const c10::optional<at::Tensor>& b_up,
                                        const c10::optional<at::Tensor>& b_gate,
                                        c10::string_view activation, bool quantize_x) {
  const NeuronScoreShape s =
      check_neuron_scores(kOp, x, q_up, up_scale, q_gate, gate_scale, b_up, b_gate);
  const Activation act = parse_activation(kOp, std::string(activation));
  const c10::cuda::CUDAGuard guard(x.device());
  if (quantize_x) {
    // x rounded as on the CPU (neuron_scores.h: x_group_scale, x_code), here by ATen ops on the
    // device (no synchronisation), then scored as fp32: the same codes and scores as the CPU's
    // integer dots up to fp32 summation order. (Integer dp4a dots would save the kernel's fp32
    // FMAs; not built.)
    const at::Tensor grouped = x.to(at::kFloat).view({s.rows, s.d_in / s.group, s.group});
    const at::Tensor scale = grouped.abs().amax(-1, /*keepdim=*/true) / 127.f;
    const at::Tensor rounded =
        at::where(scale > 0, (grouped / scale).round() * scale, at::zeros_like(grouped));
    return quantized_neuron_scores_cuda(rounded.view({s.rows, s.d_in}), q_up, up_scale, q_gate,
                                        gate_scale, b_up, b_gate, activation, false);
  }
  at::Tensor out = at::empty({s.rows, s.neurons}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  check_aligned("q_up", q_up);
  if (s.gated) check_aligned("q_gate", *q_gate);
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const StagedRows staging = neuron_scores_staging(s.rows, s.d_in);
  const int64_t sms = props->multiProcessorCount;
  TORCH_CHECK_VALUE(staging.shared_bytes <= static_cast<int64_t>(props->sharedMemPerBlockOptin),
                    kOp, ": d_in (", s.d_in, ") is too wide for one row of x in shared memory (",
                    staging.shared_bytes, " bytes; this GPU allows ",
                    props->sharedMemPerBlockOptin, " per block)");
  const auto stream = at::cuda::getCurrentCUDAStream();
  // x is fp32, fp16 or bf16 (check_neuron_scores): no double instantiation.
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (s.packed) {
      if (s.gated) {
        launch<scalar_t, true, true>(x, q_up, up_scale, q_gate, gate_scale, b_up, b_gate, out, s,
                                     staging, sms, act, stream);
      } else {
        launch<scalar_t, true, false>(x, q_up, up_scale, q_gate, gate_scale, b_up, b_gate, out,
                                      s, staging, sms, act, stream);
      }
    } else if (s.gated) {
      launch<scalar_t, false, true>(x, q_up, up_scale, q_gate, gate_scale, b_up, b_gate, out, s,
                                    staging, sms, act, stream);
    } else {
      launch<scalar_t, false, false>(x, q_up, up_scale, q_gate, gate_scale, b_up, b_gate, out, s,
                                     staging, sms, act, stream);
    }
  };
  switch (x.scalar_type()) {
    case at::kHalf: run(at::Half{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    default: run(float{}); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("quantized_neuron_scores", &quantized_neuron_scores_cuda);
}

}  // namespace fastllm::sparse
