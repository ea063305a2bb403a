// CPU quantized neuron scores: parallel over neurons; each neuron's up (and gate) row is read once
// and dotted with every row of x (x, widened to fp32 once, stays in L1). With AVX2 the int8 lanes
// (or packed int4 nibbles, unpacked to int8 lanes in registers) are widened to fp32 and summed per
// scale group with independent accumulators; otherwise a scalar loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/cpu_vec.h"
#include "sparse/neuron_scores.h"

namespace fastllm::sparse {
namespace {

constexpr const char* kOp = "fastllm.quantized_neuron_scores";

// Both dots of one neuron with one row of x; gate may be null (then *gate is untouched). q_up and
// q_gate point at the neuron's row in either storage (d bytes of int8, or d / 2 packed int4).
using QuantizedDots = void (*)(const float* x, const void* q_up, const float* up_scale,
                               const void* q_gate, const float* gate_scale, int64_t d,
                               int64_t group, float* up, float* gate);

// The fallback. Not written on the vector extension: its int8 -> float conversion compiles to
// scalar code in every target clone anyway (2 GB/s of weights).
void quantized_dots_scalar(const float* x, const void* q_up_row, const float* up_scale,
                           const void* q_gate_row, const float* gate_scale, int64_t d,
                           int64_t group, float* up, float* gate) {
  const auto* q_up = static_cast<const int8_t*>(q_up_row);
  const auto* q_gate = static_cast<const int8_t*>(q_gate_row);
  float su = 0.f, sg = 0.f;
  for (int64_t g0 = 0, g = 0; g0 < d; g0 += group, ++g) {
    float pu = 0.f, pg = 0.f;
    for (int64_t i = g0; i < g0 + group; ++i) {
      pu += x[i] * q_up[i];
      if (q_gate != nullptr) pg += x[i] * q_gate[i];
    }
    su += up_scale[g] * pu;
    if (q_gate != nullptr) sg += gate_scale[g] * pg;
  }
  *up = su;
  if (q_gate != nullptr) *gate = sg;
}

// The packed-int4 fallback, decoding each nibble as the CUDA kernel does (int4_code).
void packed_int4_dots_scalar(const float* x, const void* q_up_row, const float* up_scale,
                             const void* q_gate_row, const float* gate_scale, int64_t d,
                             int64_t group, float* up, float* gate) {
  const auto* q_up = static_cast<const uint8_t*>(q_up_row);
  const auto* q_gate = static_cast<const uint8_t*>(q_gate_row);
  float su = 0.f, sg = 0.f;
  for (int64_t g0 = 0, g = 0; g0 < d; g0 += group, ++g) {
    float pu = 0.f, pg = 0.f;
    for (int64_t i = g0; i < g0 + group; ++i) {  // group is even: a byte never straddles groups
      const int half = static_cast<int>(i & 1);
      pu += x[i] * int4_code(q_up[i >> 1], half);
      if (q_gate != nullptr) pg += x[i] * int4_code(q_gate[i >> 1], half);
    }
    su += up_scale[g] * pu;
    if (q_gate != nullptr) sg += gate_scale[g] * pg;
  }
  *up = su;
  if (q_gate != nullptr) *gate = sg;
}

#ifdef FASTLLM_HAVE_AVX2_PATHS
// AVX2 sign-extends and converts eight int8 lanes in two instructions.
__attribute__((target("avx2,fma"))) inline __m256 widen_int8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Columns i .. i + 15 of a row as two 8-lane fp32 vectors, from int8 codes (16 bytes at
// row + i) or packed int4 codes (8 bytes at row + i / 2).
template <bool kPacked>
__attribute__((target("avx2,fma"))) inline void widen_16(const void* row, int64_t i, __m256* lo,
                                                         __m256* hi) {
  if constexpr (kPacked) {
    const __m128i bytes =
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(row) + i / 2));
    const __m128i nibble = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    const __m128i low = _mm_and_si128(bytes, nibble);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    // Column order (byte j: column 2j low, 2j + 1 high), then (u ^ 8) - 8 sign-extends each
    // nibble into its int8 lane.
    const __m128i codes = _mm_sub_epi8(_mm_xor_si128(_mm_unpacklo_epi8(low, high), eight), eight);
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(codes, 8)));
  } else {
    const int8_t* p = static_cast<const int8_t*>(row) + i;
    *lo = widen_int8(p);
    *hi = widen_int8(p + 8);
  }
}

template <bool kGated, bool kPacked>
__attribute__((target("avx2,fma"))) void quantized_dots_avx2(
    const float* __restrict__ x, const void* __restrict__ q_up,
    const float* __restrict__ up_scale, const void* __restrict__ q_gate,
    const float* __restrict__ gate_scale, int64_t d, int64_t group, float* up, float* gate) {
  __m256 up_total = _mm256_setzero_ps(), gate_total = _mm256_setzero_ps();
  for (int64_t g0 = 0, g = 0; g0 < d; g0 += group, ++g) {
    __m256 u0 = _mm256_setzero_ps(), u1 = _mm256_setzero_ps();
    __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps();
    for (int64_t i = g0; i < g0 + group; i += 16) {  // group is a multiple of 16
      const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
      __m256 w0, w1;
      widen_16<kPacked>(q_up, i, &w0, &w1);
      u0 = _mm256_fmadd_ps(x0, w0, u0);
      u1 = _mm256_fmadd_ps(x1, w1, u1);
      if constexpr (kGated) {
        widen_16<kPacked>(q_gate, i, &w0, &w1);
        v0 = _mm256_fmadd_ps(x0, w0, v0);
        v1 = _mm256_fmadd_ps(x1, w1, v1);
      }
    }
    // Group sums are scaled into a vector total: one horizontal sum per dot, not per group.
    up_total = _mm256_fmadd_ps(_mm256_set1_ps(up_scale[g]), _mm256_add_ps(u0, u1), up_total);
    if constexpr (kGated) {
      gate_total =
          _mm256_fmadd_ps(_mm256_set1_ps(gate_scale[g]), _mm256_add_ps(v0, v1), gate_total);
    }
  }
  *up = cpu::lane_sum(up_total);
  if constexpr (kGated) *gate = cpu::lane_sum(gate_total);
}
#endif

// Chosen once per call (the build targets plain x86-64, so AVX2 is a run-time decision).
QuantizedDots pick_quantized_dots(bool gated, bool packed) {
#ifdef FASTLLM_HAVE_AVX2_PATHS
  if (cpu::cpu_has_avx2_fma()) {
    if (packed) return gated ? quantized_dots_avx2<true, true> : quantized_dots_avx2<false, true>;
    return gated ? quantized_dots_avx2<true, false> : quantized_dots_avx2<false, false>;
  }
#endif
  (void)gated;
  return packed ? packed_int4_dots_scalar : quantized_dots_scalar;
}

at::Tensor quantized_neuron_scores_cpu(const at::Tensor& x, const at::Tensor& q_up,
                                       const at::Tensor& up_scale,
                                       const c10::optional<at::Tensor>& q_gate,
                                       const c10::optional<at::Tensor>& gate_scale,
                                       const c10::optional<at::Tensor>& b_up,
                                       const c10::optional<at::Tensor>& b_gate,
                                       c10::string_view activation) {
  const NeuronScoreShape s =
      check_neuron_scores(kOp, x, q_up, up_scale, q_gate, gate_scale, b_up, b_gate);
  const Activation act = parse_activation(kOp, std::string(activation));
  at::Tensor out = at::empty({s.rows, s.neurons}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const at::Tensor xf_t = x.to(at::kFloat).contiguous();
  const float* xf = xf_t.const_data_ptr<float>();
  // Bytes per row of codes: d (int8) or d / 2 (packed int4).
  const auto* qu = static_cast<const uint8_t*>(q_up.const_data_ptr());
  const auto* qg = s.gated ? static_cast<const uint8_t*>(q_gate->const_data_ptr()) : nullptr;
  const int64_t row_bytes = s.packed ? s.d_in / 2 : s.d_in;
  const float* su = up_scale.const_data_ptr<float>();
  const float* sg = s.gated ? gate_scale->const_data_ptr<float>() : nullptr;
  const float* bu = b_up.has_value() ? b_up->const_data_ptr<float>() : nullptr;
  const float* bg = b_gate.has_value() ? b_gate->const_data_ptr<float>() : nullptr;
  const int64_t d = s.d_in, groups = d / s.group;
  float* op = out.data_ptr<float>();
  const QuantizedDots quantized_dots = pick_quantized_dots(s.gated, s.packed);
  at::parallel_for(0, s.neurons, 64, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t b = 0; b < s.rows; ++b) {
        float up = 0.f, gate = 0.f;
        quantized_dots(xf + b * d, qu + j * row_bytes, su + j * groups,
                       qg ? qg + j * row_bytes : nullptr,
                       sg ? sg + j * groups : nullptr, d, s.group, &up, &gate);
        up += bu ? bu[j] : 0.f;
        gate += bg ? bg[j] : 0.f;
        op[b * s.neurons + j] = std::fabs(hidden_value(act, s.gated, up, gate));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("quantized_neuron_scores", &quantized_neuron_scores_cpu);
}

}  // namespace fastllm::sparse
