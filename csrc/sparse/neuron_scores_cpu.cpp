// CPU quantized neuron scores: parallel over neurons; each neuron's up (and gate) row is read once
// and dotted with every row of x (x, widened to fp32 once, stays in L1). With AVX2 the int8 lanes
// (or packed int4 nibbles, unpacked to int8 lanes in registers) are widened to fp32 and summed per
// scale group with independent accumulators; otherwise a scalar loop. With quantize_x, x is
// rounded to int8 codes per group once per call and the dots are integer (maddubs: 32 products
// per instruction pair instead of widening every code to fp32), which is what makes a predictor
// cheaper than the rows it saves on a CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu_parallel.h"
#include "common/cpu_vec.h"
#include "sparse/neuron_scores.h"

namespace fastllm::sparse {
namespace {

constexpr const char* kOp = "fastllm.quantized_neuron_scores";

// Neurons per parallel task: 64 rows of codes (18-36 KB at SmolLM2's width) per claim.
constexpr int64_t kNeuronsPerTask = 64;

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

// ---- quantize_x: integer dots of weight codes with x rounded to int8 codes -------------------------
//
// Per scale group g: d_g = sum of code * x_code (exact in int32), and a dot is
// sum_g (w_scale[g] * x_scale[g]) * float(d_g), accumulated in group order by explicit fused
// multiply-adds (the compiler would contract them in the AVX2 target only). The per-group AVX2
// path (groups that are not whole 32-column blocks) sums its int32 lanes per group before the
// same float arithmetic, so it equals the scalar path bit for bit; the block path below trades
// that for fewer instructions.

// The rounded rows of x: codes [rows, d], scales and code sums [rows, groups], and what the block
// paths read instead of the codes (XLayout):
//   kNibbleBlocks (AVX2, packed int4): each 32-column block's 16 even columns, then its 16 odd
//     ones, so the low and high nibbles of its 16 weight bytes meet their x codes without being
//     interleaved back into column order;
//   kNibbleChunks (AVX-512, packed int4): per 128-column chunk, its 64 even columns then its 64
//     odd ones (zeros past d), matching the low and high nibbles of the chunk's 64 weight bytes;
//   kColumnPairs (AVX-512, int8): column order.
// With packed weights, lane_offset holds 8 * the sum of the codes under each int32 lane of a dot
// (reading the nibbles as code + 8 adds it; taken off in integers, so no fp32 cancellation;
// kNibbleChunks stores it negated, as the value its dot starts from).
// lane_scale holds the x scales laid out as the AVX-512 paths' lanes meet them: per 64-column
// step, one per lane (kColumnPairs); per 32-column block, padded to whole 16-block spans
// (kNibbleChunks, whose span_group maps a span's blocks to its weight scale groups, and spans
// gives each span's first group and how many it covers).
enum class XLayout { kColumns, kNibbleBlocks, kNibbleChunks, kColumnPairs };

// The weight scale groups a 16-block span of kNibbleChunks covers (a mask of them from `first`):
// fixed by d and the group, so worked out once per call rather than by two divisions per span
// and weight row.
struct SpanGroups {
  int64_t first;
  uint16_t mask;
};

// One row of a RoundedX as a block path reads it.
struct RoundedRow {
  const int8_t* codes;  // in the path's XLayout
  const float* scale;   // per group
  const float* lane_scale;
  const int32_t* lane_offset;
  const int32_t* span_group;  // shared by all rows
  const SpanGroups* spans;     // shared by all rows
};

struct RoundedX {
  std::vector<int8_t> codes;
  std::vector<float> scale;
  std::vector<int32_t> sum;
  std::vector<int8_t> ordered;
  std::vector<int32_t> lane_offset;
  std::vector<float> lane_scale;
  std::vector<int32_t> span_group;
  std::vector<SpanGroups> spans;
  int64_t d = 0, groups = 0, ordered_stride = 0, offset_stride = 0, lane_scale_stride = 0;

  RoundedRow row(int64_t b) const {
    const auto at = [b](const auto& v, int64_t stride) {
      return v.empty() ? nullptr : v.data() + b * stride;
    };
    return {ordered.empty() ? codes.data() + b * d : ordered.data() + b * ordered_stride,
            scale.data() + b * groups, at(lane_scale, lane_scale_stride),
            at(lane_offset, offset_stride), span_group.empty() ? nullptr : span_group.data(),
            spans.empty() ? nullptr : spans.data()};
  }
};

constexpr int64_t kChunkColumns = 128;  // kNibbleChunks: 64 weight bytes, one 512-bit load
constexpr int64_t kSpanBlocks = 16;     // kNibbleChunks: 32-column blocks per span of scales

// The group of each 16-lane dot lane of a 64-column step (kColumnPairs): block 0 or 1 of the pair.
inline int pair_lane_block(int lane) { return lane >> 3; }

// kNibbleChunks' extra arrays: codes reordered per chunk, lane offsets, per-block x scales and the
// span-relative group of each block.
void chunk_x(RoundedX& r, int64_t rows, int64_t group) {
  const int64_t d = r.d, chunks = (d + kChunkColumns - 1) / kChunkColumns, blocks = d / 32;
  const int64_t padded = (blocks + kSpanBlocks - 1) / kSpanBlocks * kSpanBlocks;
  r.ordered_stride = chunks * kChunkColumns;
  r.offset_stride = chunks * 16;
  r.lane_scale_stride = padded;
  r.ordered.assign(rows * r.ordered_stride, 0);
  r.lane_offset.assign(rows * r.offset_stride, 0);
  r.lane_scale.assign(rows * padded, 0.f);
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t i = 0; i < d; ++i) {
      const int8_t code = r.codes[b * d + i];
      const int64_t chunk = i / kChunkColumns, column = i % kChunkColumns;
      r.ordered[b * r.ordered_stride + chunk * kChunkColumns + (column & 1) * 64 + column / 2] =
          code;
      // lane k of a chunk's dot sums the weight bytes 4k .. 4k + 3: columns 8k .. 8k + 7; the
      // offset is stored negated, to start that lane's dot from
      r.lane_offset[b * r.offset_stride + chunk * 16 + column / 8] -= 8 * code;
    }
    for (int64_t block = 0; block < blocks; ++block) {
      r.lane_scale[b * padded + block] = r.scale[b * r.groups + block * 32 / group];
    }
  }
  r.span_group.assign(padded, 0);
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t span_start = block / kSpanBlocks * kSpanBlocks;
    r.span_group[block] = static_cast<int32_t>(block * 32 / group - span_start * 32 / group);
  }
  for (int64_t first_block = 0; first_block < blocks; first_block += kSpanBlocks) {
    const int64_t last_block = std::min(blocks, first_block + kSpanBlocks) - 1;
    const int64_t first = first_block * 32 / group, last = last_block * 32 / group;  // <= 16 apart
    r.spans.push_back({first, static_cast<uint16_t>((1u << (last - first + 1)) - 1)});
  }
}

RoundedX round_x(const float* x, int64_t rows, int64_t d, int64_t group, XLayout layout) {
  const int64_t groups = d / group;
  RoundedX r{std::vector<int8_t>(rows * d), std::vector<float>(rows * groups),
             std::vector<int32_t>(rows * groups), {}, {}, {}, {}, {}, d, groups, d, d / 4, 0};
  for (int64_t b = 0; b < rows; ++b) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* v = x + b * d + g * group;
      float max_abs = 0.f;
      for (int64_t i = 0; i < group; ++i) max_abs = std::max(max_abs, std::fabs(v[i]));
      const float scale = x_group_scale(max_abs);
      int32_t sum = 0;
      for (int64_t i = 0; i < group; ++i) {
        const int code = x_code(v[i], scale);
        r.codes[b * d + g * group + i] = static_cast<int8_t>(code);
        sum += code;
      }
      r.scale[b * groups + g] = scale;
      r.sum[b * groups + g] = sum;
    }
  }
  switch (layout) {
    case XLayout::kColumns:
      return r;
    case XLayout::kNibbleChunks:
      chunk_x(r, rows, group);
      return r;
    case XLayout::kNibbleBlocks:  // d is a multiple of 32 for packed weights
      r.ordered = r.codes;
      for (int64_t b = 0; b < rows; ++b) {
        for (int64_t c = 0; c < d; c += 32) {
          const int8_t* from = r.codes.data() + b * d + c;
          int8_t* to = r.ordered.data() + b * d + c;
          for (int64_t j = 0; j < 16; ++j) {
            to[j] = from[2 * j];
            to[16 + j] = from[2 * j + 1];
          }
        }
      }
      r.lane_offset.resize(rows * d / 4);
      for (int64_t e = 0; e < rows * d / 4; ++e) {
        int32_t sum = 0;
        for (int64_t t = 0; t < 4; ++t) sum += r.ordered[4 * e + t];
        r.lane_offset[e] = 8 * sum;
      }
      return r;
    case XLayout::kColumnPairs: {
      const int64_t steps = d / 64;
      r.lane_scale_stride = steps * 16;
      r.lane_scale.resize(rows * steps * 16);
      for (int64_t b = 0; b < rows; ++b) {
        for (int64_t k = 0; k < steps; ++k) {
          for (int lane = 0; lane < 16; ++lane) {
            const int64_t block = 2 * k + pair_lane_block(lane);
            r.lane_scale[(b * steps + k) * 16 + lane] = r.scale[b * groups + block * 32 / group];
          }
        }
      }
      return r;
    }
  }
  return r;
}

// Both integer dots of one neuron with one rounded row; the arguments as QuantizedDots', with x
// as codes, their group scales and code sums.
using IntegerDots = void (*)(const int8_t* x, const float* x_scale, const int32_t* x_sum,
                             const void* q_up, const float* up_scale, const void* q_gate,
                             const float* gate_scale, int64_t d, int64_t group, float* up,
                             float* gate);

template <bool kPacked>
inline int weight_code(const void* row, int64_t i) {
  if constexpr (kPacked) {
    const uint8_t byte = static_cast<const uint8_t*>(row)[i >> 1];
    const int nibble = (i & 1) ? byte >> 4 : byte & 0x0F;
    return (nibble ^ 8) - 8;
  } else {
    return static_cast<const int8_t*>(row)[i];
  }
}

template <bool kPacked>
void integer_dots_scalar(const int8_t* x, const float* x_scale, const int32_t* x_sum,
                         const void* q_up, const float* up_scale, const void* q_gate,
                         const float* gate_scale, int64_t d, int64_t group, float* up,
                         float* gate) {
  (void)x_sum;
  float su = 0.f, sg = 0.f;
  for (int64_t g0 = 0, g = 0; g0 < d; g0 += group, ++g) {
    int32_t du = 0, dg = 0;
    for (int64_t i = g0; i < g0 + group; ++i) {
      du += weight_code<kPacked>(q_up, i) * x[i];
      if (q_gate != nullptr) dg += weight_code<kPacked>(q_gate, i) * x[i];
    }
    su = std::fma(up_scale[g] * x_scale[g], static_cast<float>(du), su);
    if (q_gate != nullptr) sg = std::fma(gate_scale[g] * x_scale[g], static_cast<float>(dg), sg);
  }
  *up = su;
  if (q_gate != nullptr) *gate = sg;
}

#ifdef FASTLLM_HAVE_AVX2_PATHS
__attribute__((target("avx2,fma"))) inline int32_t int_lane_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// Columns i .. i + 31 of a weight row as 32 unsigned bytes u with code = u - kOffset: int8 codes
// are made unsigned by moving their sign onto x (u = |code|, x' = sign(code) * x, kOffset 0:
// the x to use is returned in *x_signed); packed nibbles become u = nibble ^ 8 = code + 8 (x
// unchanged, the caller subtracts 8 * sum(x codes) per group). u * x' pairs then fit maddubs'
// int16 sums (2 * 128 * 127 and 2 * 15 * 127 < 32767).
template <bool kPacked>
__attribute__((target("avx2,fma"))) inline __m256i unsigned_codes_32(const void* row, int64_t i,
                                                                      __m256i x,
                                                                      __m256i* x_signed) {
  if constexpr (kPacked) {
    const __m128i bytes = _mm_xor_si128(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(row) + i / 2)),
        _mm_set1_epi8(static_cast<char>(0x88)));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_and_si128(bytes, nibble);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    *x_signed = x;
    // byte j: column 2j low, 2j + 1 high
    return _mm256_set_m128i(_mm_unpackhi_epi8(low, high), _mm_unpacklo_epi8(low, high));
  } else {
    const __m256i w =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int8_t*>(row) + i));
    *x_signed = _mm256_sign_epi8(x, w);
    return _mm256_sign_epi8(w, w);
  }
}

// The int32 dot of 32 columns (u and x' from unsigned_codes_32) as 8 lanes.
__attribute__((target("avx2,fma"))) inline __m256i dot_32(__m256i u, __m256i x_signed) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x_signed), _mm256_set1_epi16(1));
}

// The group's integer dot of columns [g0, g0 + group) (group a multiple of 16): 32 columns per
// step, a 16-column tail in the low half of a vector.
template <bool kPacked, bool kGated>
__attribute__((target("avx2,fma"))) inline void group_dots(const int8_t* x, const void* q_up,
                                                           const void* q_gate, int64_t g0,
                                                           int64_t group, int32_t* du,
                                                           int32_t* dg) {
  __m256i au = _mm256_setzero_si256(), ag = _mm256_setzero_si256();
  int64_t i = g0;
  for (; i + 32 <= g0 + group; i += 32) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    __m256i xs;
    const __m256i u = unsigned_codes_32<kPacked>(q_up, i, xv, &xs);
    au = _mm256_add_epi32(au, dot_32(u, xs));
    if constexpr (kGated) {
      const __m256i v = unsigned_codes_32<kPacked>(q_gate, i, xv, &xs);
      ag = _mm256_add_epi32(ag, dot_32(v, xs));
    }
  }
  int32_t tail_u = 0, tail_g = 0;
  for (; i < g0 + group; ++i) {  // 16 columns at most (group is a multiple of 16)
    const int xi = x[i];
    tail_u += (weight_code<kPacked>(q_up, i) + (kPacked ? 8 : 0)) * xi;
    if constexpr (kGated) tail_g += (weight_code<kPacked>(q_gate, i) + (kPacked ? 8 : 0)) * xi;
  }
  *du = int_lane_sum(au) + tail_u;
  if constexpr (kGated) *dg = int_lane_sum(ag) + tail_g;
}

template <bool kGated, bool kPacked>
__attribute__((target("avx2,fma"))) void integer_dots_avx2(
    const int8_t* __restrict__ x, const float* __restrict__ x_scale,
    const int32_t* __restrict__ x_sum, const void* __restrict__ q_up,
    const float* __restrict__ up_scale, const void* __restrict__ q_gate,
    const float* __restrict__ gate_scale, int64_t d, int64_t group, float* up, float* gate) {
  float su = 0.f, sg = 0.f;
  for (int64_t g0 = 0, g = 0; g0 < d; g0 += group, ++g) {
    int32_t du = 0, dg = 0;
    group_dots<kPacked, kGated>(x, q_up, q_gate, g0, group, &du, &dg);
    if constexpr (kPacked) {  // u = code + 8
      du -= 8 * x_sum[g];
      dg -= 8 * x_sum[g];
    }
    su = std::fma(up_scale[g] * x_scale[g], static_cast<float>(du), su);
    if constexpr (kGated) sg = std::fma(gate_scale[g] * x_scale[g], static_cast<float>(dg), sg);
  }
  *up = su;
  if constexpr (kGated) *gate = sg;
}

// Groups of whole 32-column blocks (the defaults: int4 group 32, int8 group 64): each block's
// 8 int32 lane sums become floats scaled by its group's w_scale * x_scale in a vector
// accumulator, with no horizontal sum per group. Packed rows take x in nibble order (RoundedX),
// so a block costs one 16-byte load, two masks and one 128-bit insert per weight row; the
// nibbles are read as u = code + 8 and the lanes' 8 * sum(x codes) subtracted as integers. Summed
// in another order than the scalar path: equal to it up to fp32 rounding.
template <bool kPacked>
__attribute__((target("avx2,fma"))) inline __m256 block_dot(const void* row, int64_t i,
                                                            __m256i x, __m256i offset,
                                                            float scale, __m256 acc) {
  __m256i u, x_signed;
  if constexpr (kPacked) {
    const __m128i bytes = _mm_xor_si128(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(row) + i / 2)),
        _mm_set1_epi8(static_cast<char>(0x88)));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble),
                         _mm_and_si128(bytes, nibble));
    x_signed = x;
  } else {
    u = unsigned_codes_32<false>(row, i, x, &x_signed);
  }
  __m256i dot = dot_32(u, x_signed);
  if constexpr (kPacked) dot = _mm256_sub_epi32(dot, offset);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc);
}

template <bool kGated, bool kPacked>
__attribute__((target("avx2,fma"))) void integer_dots_avx2_blocks(
    const RoundedRow& x, const void* __restrict__ q_up, const float* __restrict__ up_scale,
    const void* __restrict__ q_gate, const float* __restrict__ gate_scale, int64_t d,
    int64_t group, float* up, float* gate) {
  __m256 au = _mm256_setzero_ps(), ag = _mm256_setzero_ps();
  for (int64_t g0 = 0, g = 0; g0 < d; g0 += group, ++g) {
    const float su = up_scale[g] * x.scale[g];
    const float sg = kGated ? gate_scale[g] * x.scale[g] : 0.f;
    for (int64_t i = g0; i < g0 + group; i += 32) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.codes + i));
      const __m256i offset =
          kPacked ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.lane_offset + i / 4))
                  : _mm256_setzero_si256();
      au = block_dot<kPacked>(q_up, i, xv, offset, su, au);
      if constexpr (kGated) ag = block_dot<kPacked>(q_gate, i, xv, offset, sg, ag);
    }
  }
  *up = cpu::lane_sum(au);
  if constexpr (kGated) *gate = cpu::lane_sum(ag);
}

// The int8 block path on AVX-512 VNNI: two 32-column blocks per step, one vpdpbusd per weight
// row. int8 codes move their sign onto x by a masked negation (AVX-512 has no sign instruction). A
// lane's scale is w_scale * x_scale of its block's group: x's come laid out per step
// (RoundedX::lane_scale), w's are broadcast from memory when both blocks share a group, or two
// consecutive ones spread over the lanes by one permute.
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) inline __m512i int8_pair_dot(
    const int8_t* row, int64_t i, __m512i x) {
  const __m512i w = _mm512_loadu_si512(reinterpret_cast<const void*>(row + i));
  const __m512i x_signed =
      _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), x_signed);
}

// w_scale of each lane's group (g0 for block 0's lanes, g1 for block 1's), per pair_lane_block.
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) inline __m512 pair_w_scale(
    const float* w_scale, int64_t g0, int64_t g1) {
  if (g0 == g1) return _mm512_set1_ps(w_scale[g0]);
  const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  if (g1 == g0 + 1) {
    const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(w_scale + g0)));
    return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(two));
  }
  return _mm512_permutexvar_ps(
      spread, _mm512_castps128_ps512(_mm_set_ps(0.f, 0.f, w_scale[g1], w_scale[g0])));
}

template <bool kGated>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) void int8_dots_vnni_pairs(
    const RoundedRow& x, const void* __restrict__ q_up_row, const float* __restrict__ up_scale,
    const void* __restrict__ q_gate_row, const float* __restrict__ gate_scale, int64_t d,
    int64_t group, float* up, float* gate) {
  const auto* q_up = static_cast<const int8_t*>(q_up_row);
  const auto* q_gate = static_cast<const int8_t*>(q_gate_row);
  __m512 au = _mm512_setzero_ps(), ag = _mm512_setzero_ps();
  // The groups of the step's two blocks, counted without a division per step.
  int64_t i = 0, g = 0, left = group;
  const auto next_block_group = [&]() {
    const int64_t current = g;
    left -= 32;
    if (left == 0) {
      ++g;
      left = group;
    }
    return current;
  };
  for (; i + 64 <= d; i += 64) {
    const int64_t g0 = next_block_group(), g1 = next_block_group();
    const __m512i xv = _mm512_loadu_si512(reinterpret_cast<const void*>(x.codes + i));
    const __m512 xs = _mm512_loadu_ps(x.lane_scale + i / 4);  // 16 per 64 columns
    au = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(int8_pair_dot(q_up, i, xv)),
                                       pair_w_scale(up_scale, g0, g1)), xs, au);
    if constexpr (kGated) {
      ag = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(int8_pair_dot(q_gate, i, xv)),
                                         pair_w_scale(gate_scale, g0, g1)), xs, ag);
    }
  }
  __m256 tail_u = _mm256_setzero_ps(), tail_g = _mm256_setzero_ps();
  if (i < d) {  // one 32-column block left, of group g
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.codes + i));
    const __m256i none = _mm256_setzero_si256();
    tail_u = block_dot<false>(q_up, i, xv, none, up_scale[g] * x.scale[g], tail_u);
    if constexpr (kGated) {
      tail_g = block_dot<false>(q_gate, i, xv, none, gate_scale[g] * x.scale[g], tail_g);
    }
  }
  *up = _mm512_reduce_add_ps(au) + cpu::lane_sum(tail_u);
  if constexpr (kGated) *gate = _mm512_reduce_add_ps(ag) + cpu::lane_sum(tail_g);
}

// The packed-int4 path on AVX-512 VNNI, 128 columns per step. One 64-byte load holds a chunk of
// 128 columns; its low nibbles are the even columns and its high nibbles the odd ones, so two
// vpdpbusd against x's evens and odds (kNibbleChunks) sum lane k over columns 8k .. 8k + 7, all
// of 32-column block k / 4. Each lane's int32 dot is then scaled by its block's
// w_scale * x_scale: the 16 products of a span of 16 blocks are made once (one masked load of
// the span's w scales, spread by one permute) and each chunk takes its four by another permute.
// Per 128 columns and weight row: a load, three logic ops, two vpdpbusd, a subtraction, a
// conversion, a permute and an FMA, against twice the pairs path's unpack-convert-scale.
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) inline __m512i nibble_chunk_dot(
    const uint8_t* row, int64_t chunk, __mmask64 bytes, __m512i x_even, __m512i x_odd,
    __m512i minus_offset) {
  // Bytes past the row (a short last chunk) load as 0: nibbles 8, against x codes of 0.
  // A full chunk takes a plain load: masked loads of whole rows ran at 2/3 of its speed.
  const __m512i w = bytes == ~0ull
                        ? _mm512_loadu_si512(reinterpret_cast<const void*>(row + 64 * chunk))
                        : _mm512_maskz_loadu_epi8(bytes, row + 64 * chunk);
  // (w & 0x0F) ^ 0x08 in one ternary-logic op (truth table 0x6A: (A & B) ^ C), per nibble.
  const __m512i nibble = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(0x08);
  const __m512i low = _mm512_ternarylogic_epi32(w, nibble, eight, 0x6A);
  const __m512i high = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), nibble, eight, 0x6A);
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(minus_offset, low, x_even), high, x_odd);
}

// The 16 w_scale * x_scale products of the span of blocks from first_block.
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) inline __m512 span_scales(
    const float* w_scale, const RoundedRow& x, int64_t first_block) {
  const SpanGroups& groups = x.spans[first_block / kSpanBlocks];
  const __m512 w = _mm512_permutexvar_ps(
      _mm512_loadu_si512(reinterpret_cast<const void*>(x.span_group + first_block)),
      _mm512_maskz_loadu_ps(static_cast<__mmask16>(groups.mask), w_scale + groups.first));
  return _mm512_mul_ps(w, _mm512_loadu_ps(x.lane_scale + first_block));
}

template <bool kGated>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) void packed_dots_vnni_chunks(
    const RoundedRow& x, const void* __restrict__ q_up_row, const float* __restrict__ up_scale,
    const void* __restrict__ q_gate_row, const float* __restrict__ gate_scale, int64_t d,
    int64_t group, float* up, float* gate) {
  const auto* q_up = static_cast<const uint8_t*>(q_up_row);
  const auto* q_gate = static_cast<const uint8_t*>(q_gate_row);
  (void)group;  // in x.spans
  const int64_t blocks = d / 32;
  const __m512i chunk_lane_block = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 au = _mm512_setzero_ps(), ag = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < blocks; b0 += kSpanBlocks) {
    const int64_t span = std::min(kSpanBlocks, blocks - b0);
    const __m512 pu = span_scales(up_scale, x, b0);
    const __m512 pg = kGated ? span_scales(gate_scale, x, b0) : _mm512_setzero_ps();
    for (int64_t q = 0; q < span; q += 4) {
      const int64_t chunk = (b0 + q) / 4;
      const __mmask64 bytes = span - q >= 4 ? ~0ull : (1ull << (16 * (span - q))) - 1;
      const int8_t* xc = x.codes + chunk * kChunkColumns;
      const __m512i x_even = _mm512_loadu_si512(reinterpret_cast<const void*>(xc));
      const __m512i x_odd = _mm512_loadu_si512(reinterpret_cast<const void*>(xc + 64));
      const __m512i minus_offset =
          _mm512_loadu_si512(reinterpret_cast<const void*>(x.lane_offset + chunk * 16));
      const __m512i lanes =
          _mm512_add_epi32(chunk_lane_block, _mm512_set1_epi32(static_cast<int>(q)));
      au = _mm512_fmadd_ps(_mm512_cvtepi32_ps(nibble_chunk_dot(q_up, chunk, bytes, x_even, x_odd,
                                                               minus_offset)),
                           _mm512_permutexvar_ps(lanes, pu), au);
      if constexpr (kGated) {
        ag = _mm512_fmadd_ps(_mm512_cvtepi32_ps(nibble_chunk_dot(q_gate, chunk, bytes, x_even,
                                                                 x_odd, minus_offset)),
                             _mm512_permutexvar_ps(lanes, pg), ag);
      }
    }
  }
  *up = _mm512_reduce_add_ps(au);
  if constexpr (kGated) *gate = _mm512_reduce_add_ps(ag);
}
#endif

// The block paths' signature: the arguments as IntegerDots', x as one RoundedRow in the path's
// layout.
using IntegerBlockDots = void (*)(const RoundedRow& x, const void* q_up, const float* up_scale,
                                  const void* q_gate, const float* gate_scale, int64_t d,
                                  int64_t group, float* up, float* gate);

struct BlockPath {
  IntegerBlockDots dots;  // null: no block path (groups not whole 32-column blocks, or no AVX2)
  XLayout layout;
};

BlockPath pick_integer_block_dots(bool gated, bool packed, int64_t group) {
#ifdef FASTLLM_HAVE_AVX2_PATHS
  if (group % 32 == 0 && cpu::cpu_has_avx512_vnni() && cpu::cpu_has_avx2_fma() &&
      !cpu::scalar_forced() && !cpu::avx512_refused()) {
    if (packed) {
      return {gated ? packed_dots_vnni_chunks<true> : packed_dots_vnni_chunks<false>,
              XLayout::kNibbleChunks};
    }
    return {gated ? int8_dots_vnni_pairs<true> : int8_dots_vnni_pairs<false>,
            XLayout::kColumnPairs};
  }
  if (group % 32 == 0 && cpu::cpu_has_avx2_fma() && !cpu::scalar_forced()) {
    if (packed) {
      return {gated ? integer_dots_avx2_blocks<true, true> : integer_dots_avx2_blocks<false, true>,
              XLayout::kNibbleBlocks};
    }
    return {gated ? integer_dots_avx2_blocks<true, false> : integer_dots_avx2_blocks<false, false>,
            XLayout::kColumns};
  }
#endif
  (void)gated, (void)packed, (void)group;
  return {nullptr, XLayout::kColumns};
}

IntegerDots pick_integer_dots(bool gated, bool packed) {
#ifdef FASTLLM_HAVE_AVX2_PATHS
  if (cpu::cpu_has_avx2_fma() && !cpu::scalar_forced()) {
    if (packed) return gated ? integer_dots_avx2<true, true> : integer_dots_avx2<false, true>;
    return gated ? integer_dots_avx2<true, false> : integer_dots_avx2<false, false>;
  }
#endif
  (void)gated;
  return packed ? integer_dots_scalar<true> : integer_dots_scalar<false>;
}

// Chosen once per call (the build targets plain x86-64, so AVX2 is a run-time decision).
QuantizedDots pick_quantized_dots(bool gated, bool packed) {
#ifdef FASTLLM_HAVE_AVX2_PATHS
  if (cpu::cpu_has_avx2_fma() && !cpu::scalar_forced()) {
    if (packed) return gated ? quantized_dots_avx2<true, true> : quantized_dots_avx2<false, true>;
    return gated ? quantized_dots_avx2<true, false> : quantized_dots_avx2<false, false>;
  }
#endif
  (void)gated;
  return packed ? packed_int4_dots_scalar : quantized_dots_scalar;
}

// Scores of `count` neurons of one row from their dots: |act(gate + b_gate) * (up + b_up)|, or
// |act(up + b_up)| without a gate (null gate; null biases are 0). SiLU and ReLU run on 16-float
// vectors (SiLU through cpu::exp_vec, within a few ulps of expf: per-neuron expf and a scalar
// division took a third of the int4 scores' time at SmolLM2's shape); other activations call
// hidden_value per neuron.
FASTLLM_MULTIVERSION void scores_from_dots(Activation act, const float* up, const float* gate,
                                           const float* b_up, const float* b_gate, int64_t count,
                                           float* out) {
  const bool gated = gate != nullptr;
#if FASTLLM_HAVE_VEC
  if (act == Activation::kSilu || act == Activation::kRelu) {
    for (int64_t j = 0; j < count; j += cpu::kLanes) {
      const int64_t lanes = std::min<int64_t>(cpu::kLanes, count - j);
      float u[cpu::kLanes] = {}, g[cpu::kLanes] = {}, score[cpu::kLanes];
      for (int64_t l = 0; l < lanes; ++l) {
        u[l] = up[j + l] + (b_up ? b_up[j + l] : 0.f);
        if (gated) g[l] = gate[j + l] + (b_gate ? b_gate[j + l] : 0.f);
      }
      const cpu::VecF v = cpu::load_vec(gated ? g : u);
      const cpu::VecF activated = act == Activation::kRelu
                                      ? (v > 0.f ? v : cpu::VecF{})
                                      : v / (1.f + cpu::exp_vec(cpu::VecF{} - v));
      const cpu::VecF h = gated ? activated * cpu::load_vec(u) : activated;
      cpu::store_vec(score, h < 0.f ? cpu::VecF{} - h : h);
      for (int64_t l = 0; l < lanes; ++l) out[j + l] = score[l];
    }
    return;
  }
#endif
  for (int64_t j = 0; j < count; ++j) {
    const float u = up[j] + (b_up ? b_up[j] : 0.f);
    const float g = gated ? gate[j] + (b_gate ? b_gate[j] : 0.f) : 0.f;
    out[j] = std::fabs(hidden_value(act, gated, u, g));
  }
}

at::Tensor quantized_neuron_scores_cpu(const at::Tensor& x, const at::Tensor& q_up,
                                       const at::Tensor& up_scale,
                                       const c10::optional<at::Tensor>& q_gate,
                                       const c10::optional<at::Tensor>& gate_scale,
                                       const c10::optional<at::Tensor>& b_up,
                                       const c10::optional<at::Tensor>& b_gate,
                                       c10::string_view activation, bool quantize_x) {
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
  // Every path scores blocks of kNeuronsPerTask neurons against every row; dots(j, b, &up, &gate)
  // is the path's pair of dot products for neuron j and row b, kept in [rows, neurons] buffers
  // (one allocation per call: one per task cost more than the scores at SmolLM2's shape) for
  // scores_from_dots, per row of the task's neurons.
  static cpu::ContentionBackoff contention;
  std::vector<float> up_dots(s.rows * s.neurons), gate_dots(s.gated ? s.rows * s.neurons : 0);
  const auto score_all = [&](const auto& dots) {
    const int64_t tasks = (s.neurons + kNeuronsPerTask - 1) / kNeuronsPerTask;
    cpu::claim_parallel(contention, tasks, [&](int64_t task) {
      const int64_t first = task * kNeuronsPerTask;
      const int64_t end = std::min(s.neurons, first + kNeuronsPerTask);
      float unused = 0.f;
      for (int64_t j = first; j < end; ++j) {
        for (int64_t b = 0; b < s.rows; ++b) {
          const int64_t at = b * s.neurons + j;
          dots(j, b, &up_dots[at], s.gated ? &gate_dots[at] : &unused);
        }
      }
      for (int64_t b = 0; b < s.rows; ++b) {
        const int64_t at = b * s.neurons + first;
        scores_from_dots(act, up_dots.data() + at, s.gated ? gate_dots.data() + at : nullptr,
                         bu ? bu + first : nullptr, bg ? bg + first : nullptr, end - first,
                         op + at);
      }
    });
  };
  if (quantize_x) {
    const BlockPath block = pick_integer_block_dots(s.gated, s.packed, s.group);
    const RoundedX rx = round_x(xf, s.rows, d, s.group, block.layout);
    if (block.dots != nullptr) {
      std::vector<RoundedRow> x_rows(s.rows);
      for (int64_t b = 0; b < s.rows; ++b) x_rows[b] = rx.row(b);
      score_all([&](int64_t j, int64_t b, float* up, float* gate) {
        block.dots(x_rows[b], qu + j * row_bytes, su + j * groups,
                   qg ? qg + j * row_bytes : nullptr, sg ? sg + j * groups : nullptr, d, s.group,
                   up, gate);
      });
      return out;
    }
    const IntegerDots integer_dots = pick_integer_dots(s.gated, s.packed);
    score_all([&](int64_t j, int64_t b, float* up, float* gate) {
      integer_dots(rx.codes.data() + b * d, rx.scale.data() + b * groups,
                   rx.sum.data() + b * groups, qu + j * row_bytes, su + j * groups,
                   qg ? qg + j * row_bytes : nullptr, sg ? sg + j * groups : nullptr, d, s.group,
                   up, gate);
    });
    return out;
  }
  const QuantizedDots quantized_dots = pick_quantized_dots(s.gated, s.packed);
  score_all([&](int64_t j, int64_t b, float* up, float* gate) {
    quantized_dots(xf + b * d, qu + j * row_bytes, su + j * groups,
                   qg ? qg + j * row_bytes : nullptr, sg ? sg + j * groups : nullptr, d, s.group,
                   up, gate);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("quantized_neuron_scores", &quantized_neuron_scores_cpu);
}

}  // namespace fastllm::sparse
