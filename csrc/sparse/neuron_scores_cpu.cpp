// CPU quantized neuron scores: parallel over neurons; each neuron's int8 up (and gate) row is read
// once and dotted with every row of x (x, widened to fp32 once, stays in L1). The int8 lanes are
// widened to fp32 in registers and summed per scale group with independent accumulators; the
// group sums are scaled into a vector total, so there is one horizontal sum per dot, not one per
// group.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/cpu_vec.h"
#ifdef FASTLLM_HAVE_AVX2_PATHS
#include <immintrin.h>
#endif
#include "sparse/neuron_scores.h"

namespace fastllm::sparse {
namespace {

constexpr const char* kOp = "fastllm.quantized_neuron_scores";

#ifdef FASTLLM_HAVE_VEC
using cpu::horizontal_sum;
using cpu::kLanes;
using cpu::load_vec;
using cpu::VecF;

typedef int8_t VecI8 __attribute__((vector_size(16)));
typedef int32_t VecI32 __attribute__((vector_size(64)));
static_assert(sizeof(VecI8) == kLanes, "one int8 vector widens to one float vector");

// Sign-extend to int32, then convert: GCC turns these two steps into vpmovsxbd + vcvtdq2ps, but
// a direct int8 -> float conversion into 16 scalar conversions.
FASTLLM_INLINE VecF load_int8(const int8_t* p) {
  VecI8 v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(__builtin_convertvector(v, VecI32), VecF);
}

#ifdef FASTLLM_HAVE_AVX2_PATHS
// The vector extension's int8 -> float conversion compiles to scalar code in every target clone
// (2 GB/s of weights); AVX2 sign-extends and converts eight lanes in two instructions.
__attribute__((target("avx2,fma"))) inline __m256 widen_int8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

__attribute__((target("avx2,fma"))) inline float lane_sum(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
}

template <bool kGated>
__attribute__((target("avx2,fma"))) void quantized_dots_avx2(
    const float* __restrict__ x, const int8_t* __restrict__ q_up,
    const float* __restrict__ up_scale, const int8_t* __restrict__ q_gate,
    const float* __restrict__ gate_scale, int64_t d, int64_t group, float* up, float* gate) {
  __m256 up_total = _mm256_setzero_ps(), gate_total = _mm256_setzero_ps();
  for (int64_t g0 = 0, g = 0; g0 < d; g0 += group, ++g) {
    __m256 u0 = _mm256_setzero_ps(), u1 = _mm256_setzero_ps();
    __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps();
    for (int64_t i = g0; i < g0 + group; i += 16) {  // group is a multiple of 16
      const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
      u0 = _mm256_fmadd_ps(x0, widen_int8(q_up + i), u0);
      u1 = _mm256_fmadd_ps(x1, widen_int8(q_up + i + 8), u1);
      if constexpr (kGated) {
        v0 = _mm256_fmadd_ps(x0, widen_int8(q_gate + i), v0);
        v1 = _mm256_fmadd_ps(x1, widen_int8(q_gate + i + 8), v1);
      }
    }
    up_total = _mm256_fmadd_ps(_mm256_set1_ps(up_scale[g]), _mm256_add_ps(u0, u1), up_total);
    if constexpr (kGated) {
      gate_total =
          _mm256_fmadd_ps(_mm256_set1_ps(gate_scale[g]), _mm256_add_ps(v0, v1), gate_total);
    }
  }
  *up = lane_sum(up_total);
  if constexpr (kGated) *gate = lane_sum(gate_total);
}
#endif

// Both dots of one neuron with one row of x; gate may be null (then *gate is untouched).
FASTLLM_MULTIVERSION void quantized_dots_portable(const float* __restrict__ x,
                                         const int8_t* __restrict__ q_up,
                                         const float* __restrict__ up_scale,
                                         const int8_t* __restrict__ q_gate,
                                         const float* __restrict__ gate_scale, int64_t d,
                                         int64_t group, float* up, float* gate) {
  VecF up_total = {}, gate_total = {};
  for (int64_t g0 = 0, g = 0; g0 < d; g0 += group, ++g) {
    VecF u0 = {}, u1 = {}, v0 = {}, v1 = {};
    int64_t i = g0;
    const int64_t end = g0 + group;
    if (q_gate != nullptr) {
      for (; i + 2 * kLanes <= end; i += 2 * kLanes) {
        const VecF x0 = load_vec(x + i), x1 = load_vec(x + i + kLanes);
        u0 += x0 * load_int8(q_up + i);
        u1 += x1 * load_int8(q_up + i + kLanes);
        v0 += x0 * load_int8(q_gate + i);
        v1 += x1 * load_int8(q_gate + i + kLanes);
      }
      if (i < end) {  // group is a multiple of kLanes: at most one vector left
        const VecF x0 = load_vec(x + i);
        u0 += x0 * load_int8(q_up + i);
        v0 += x0 * load_int8(q_gate + i);
      }
      gate_total += gate_scale[g] * (v0 + v1);
    } else {
      for (; i + 2 * kLanes <= end; i += 2 * kLanes) {
        u0 += load_vec(x + i) * load_int8(q_up + i);
        u1 += load_vec(x + i + kLanes) * load_int8(q_up + i + kLanes);
      }
      if (i < end) u0 += load_vec(x + i) * load_int8(q_up + i);
    }
    up_total += up_scale[g] * (u0 + u1);
  }
  *up = horizontal_sum(up_total);
  if (q_gate != nullptr) *gate = horizontal_sum(gate_total);
}
#else
void quantized_dots_portable(const float* x, const int8_t* q_up, const float* up_scale,
                    const int8_t* q_gate, const float* gate_scale, int64_t d, int64_t group,
                    float* up, float* gate) {
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
#endif

void quantized_dots(const float* x, const int8_t* q_up, const float* up_scale,
                    const int8_t* q_gate, const float* gate_scale, int64_t d, int64_t group,
                    float* up, float* gate) {
#ifdef FASTLLM_HAVE_AVX2_PATHS
  if (cpu::cpu_has_avx2_fma()) {
    if (q_gate != nullptr) {
      return quantized_dots_avx2<true>(x, q_up, up_scale, q_gate, gate_scale, d, group, up, gate);
    }
    return quantized_dots_avx2<false>(x, q_up, up_scale, q_gate, gate_scale, d, group, up, gate);
  }
#endif
  quantized_dots_portable(x, q_up, up_scale, q_gate, gate_scale, d, group, up, gate);
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
  const int8_t* qu = q_up.const_data_ptr<int8_t>();
  const int8_t* qg = s.gated ? q_gate->const_data_ptr<int8_t>() : nullptr;
  const float* su = up_scale.const_data_ptr<float>();
  const float* sg = s.gated ? gate_scale->const_data_ptr<float>() : nullptr;
  const float* bu = b_up.has_value() ? b_up->const_data_ptr<float>() : nullptr;
  const float* bg = b_gate.has_value() ? b_gate->const_data_ptr<float>() : nullptr;
  const int64_t d = s.d_in, groups = d / s.group;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, s.neurons, 64, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t b = 0; b < s.rows; ++b) {
        float up = 0.f, gate = 0.f;
        quantized_dots(xf + b * d, qu + j * d, su + j * groups, qg ? qg + j * d : nullptr,
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
