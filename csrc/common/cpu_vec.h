// fp32 inner loops for the CPU kernels, written on 16-float vectors (GCC/Clang vector extension):
// one AVX-512 register, two AVX2 or four SSE ones, whichever target clone the including kernel
// runs. Plain loops over float arrays left the accumulators in memory, and a single chain of
// FMAs waits on its own latency every step; these keep several independent chains in registers.
// Reduced-precision weights are widened lane by lane as they are loaded.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// For hand-written AVX2 paths (conversions the vector extension leaves scalar), chosen at run
// time because the build targets plain x86-64.
#define FASTLLM_HAVE_AVX2_PATHS 1
#include <immintrin.h>
#endif

// Compile a kernel's hot loops for AVX-512, AVX2 and the baseline and pick at load time: the build
// targets plain x86-64, which would leave these loops at SSE2 width.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTLLM_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTLLM_MULTIVERSION
#endif

namespace fastllm::cpu {

// FASTLLM_CPU_SCALAR=1 makes the kernels with a hand-written AVX2 path take their scalar
// fallback instead (read at each call: the tests compare both paths in one process).
inline bool scalar_forced() {
  const char* env = std::getenv("FASTLLM_CPU_SCALAR");
  return env != nullptr && env[0] == '1';
}

// FASTLLM_CPU_NO_AVX512=1 keeps the kernels with an AVX-512 path on their AVX2 one (tests; and
// machines whose AVX-512 clocks down).
inline bool avx512_refused() {
  const char* env = std::getenv("FASTLLM_CPU_NO_AVX512");
  return env != nullptr && env[0] == '1';
}

#ifdef FASTLLM_HAVE_AVX2_PATHS
inline bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

// AVX-512 with byte ops and VNNI (vpdpbusd: 64 unsigned-by-signed byte products per instruction).
inline bool cpu_has_avx512_vnni() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
  }();
  return has;
}

// The sum of an AVX register's eight lanes.
__attribute__((target("avx2,fma"))) inline float lane_sum(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
}
#endif

#if defined(__GNUC__)
#define FASTLLM_HAVE_VEC 1
#define FASTLLM_INLINE inline __attribute__((always_inline))
typedef float VecF __attribute__((vector_size(64)));
constexpr int kLanes = 16;

FASTLLM_INLINE VecF load_vec(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename w_t>
FASTLLM_INLINE VecF load_vec(const w_t* p) {
  float widened[kLanes];
  for (int l = 0; l < kLanes; ++l) widened[l] = static_cast<float>(p[l]);
  return load_vec(widened);
}
FASTLLM_INLINE void store_vec(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }
FASTLLM_INLINE float horizontal_sum(VecF v) {
  float sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += v[l];
  return sum;
}

typedef int32_t VecI __attribute__((vector_size(64)));

// e^x on 16 lanes: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact n ln2), e^r by
// Cephes' degree-6 polynomial, 2^n put into the exponent bits. x is clamped to [-87, 88] first, so
// 2^n stays a normal float (e^-100 comes out as e^-87, not 0: the callers only rank with it).
FASTLLM_INLINE VecF exp_vec(VecF x) {
  x = x < -87.f ? VecF{} - 87.f : x;
  x = x > 88.f ? VecF{} + 88.f : x;
  const VecF t = x * 1.44269504088896341f + 0.5f;
  VecI n = __builtin_convertvector(t, VecI);          // toward zero,
  n += __builtin_convertvector(n, VecF) > t;  // then down (true is -1): floor(x log2 e + 1/2)
  const VecF nf = __builtin_convertvector(n, VecF);
  const VecF r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  VecF p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  VecF scale;
  const VecI bits = (n + 127) << 23;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// x . w with four independent accumulators.
template <typename w_t>
FASTLLM_INLINE float dot_f32(const float* __restrict__ x, const w_t* __restrict__ w, int64_t n) {
  VecF acc[4] = {};
  int64_t k = 0;
  for (; k + 4 * kLanes <= n; k += 4 * kLanes) {
    for (int u = 0; u < 4; ++u) acc[u] += load_vec(x + k + u * kLanes) * load_vec(w + k + u * kLanes);
  }
  for (; k + kLanes <= n; k += kLanes) acc[0] += load_vec(x + k) * load_vec(w + k);
  float sum = horizontal_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; k < n; ++k) sum += x[k] * static_cast<float>(w[k]);
  return sum;
}

// y += a * x.
template <typename w_t>
FASTLLM_INLINE void axpy_f32(float* __restrict__ y, float a, const w_t* __restrict__ x, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store_vec(y + i, load_vec(y + i) + a * load_vec(x + i));
  for (; i < n; ++i) y[i] += a * static_cast<float>(x[i]);
}
#else
#define FASTLLM_INLINE inline
template <typename w_t>
float dot_f32(const float* x, const w_t* w, int64_t n) {
  float sum = 0;
  for (int64_t k = 0; k < n; ++k) sum += x[k] * static_cast<float>(w[k]);
  return sum;
}
template <typename w_t>
void axpy_f32(float* y, float a, const w_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<float>(x[i]);
}
#endif

}  // namespace fastllm::cpu
