// CPU kernels for FastGen profiling and ragged decode attention.
//
// Profiling works on `chunk` query rows at a time, one task per query head: a matmul gives the
// head's logits for the chunk, one causal softmax turns them into probabilities, and their column
// sums (per-key scores) or masked dot products (per-policy masses) are folded in. Each task holds
// one [chunk, Lk] block.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "common/cpu_parallel.h"
#include "common/cpu_vec.h"
#include "kv/kv_checks.h"
#include "kv/kv_math.h"

namespace fastllm::kv {
namespace {

// Work (multiply-adds or exp calls) a parallel task should carry before a thread is worth
// starting: decode steps of a small model are tiny, and on a busy machine waking a second thread
// costs far more than the work.
constexpr int64_t kMinWorkPerTask = 1 << 20;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, work_per_item));
}

// One cache entry's key against one query, and its value added into one output, on 16-float
// vectors (common/cpu_vec.h), target-cloned for float and bfloat16; fp16 takes an F16C path.
FASTLLM_MULTIVERSION float row_dot(const float* q, const float* key, int64_t d) {
  return cpu::dot_f32(q, key, d);
}
FASTLLM_MULTIVERSION float row_dot(const float* q, const c10::BFloat16* key, int64_t d) {
  return cpu::dot_f32(q, key, d);
}
#ifdef FASTLLM_HAVE_AVX2_PATHS
// fp16 rows: c10::Half's scalar conversion left the fp16 decode at under 1 GB/s; F16C widens
// eight halves per instruction. Picked at run time (the build targets plain x86-64).
#define FASTLLM_HAVE_F16C_PATH 1
__attribute__((target("avx2,fma,f16c"))) float row_dot_f16c(const float* q, const c10::Half* key,
                                                            int64_t d) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const auto* halves = reinterpret_cast<const __m128i*>(key);
  int64_t i = 0;
  for (; i + 16 <= d; i += 16, halves += 2) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_cvtph_ps(_mm_loadu_si128(halves)), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8),
                           _mm256_cvtph_ps(_mm_loadu_si128(halves + 1)), acc1);
  }
  float sum = cpu::lane_sum(_mm256_add_ps(acc0, acc1));
  for (; i < d; ++i) sum += q[i] * static_cast<float>(key[i]);
  return sum;
}
__attribute__((target("avx2,fma,f16c"))) void row_axpy_f16c(float* y, float a, const c10::Half* x,
                                                           int64_t d) {
  const __m256 scale = _mm256_set1_ps(a);
  const auto* halves = reinterpret_cast<const __m128i*>(x);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8, ++halves) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(scale, _mm256_cvtph_ps(_mm_loadu_si128(halves)),
                                            _mm256_loadu_ps(y + i)));
  }
  for (; i < d; ++i) y[i] += a * static_cast<float>(x[i]);
}
bool cpu_has_f16c() {
  static const bool has = cpu::cpu_has_avx2_fma() && __builtin_cpu_supports("f16c");
  return has;
}
#endif
float row_dot(const float* q, const c10::Half* key, int64_t d) {
#ifdef FASTLLM_HAVE_F16C_PATH
  if (cpu_has_f16c()) return row_dot_f16c(q, key, d);
#endif
  return cpu::dot_f32(q, key, d);
}
float row_dot(const float* q, const double* key, int64_t d) { return cpu::dot_f32(q, key, d); }
FASTLLM_MULTIVERSION void row_axpy(float* y, float a, const float* x, int64_t d) {
  cpu::axpy_f32(y, a, x, d);
}
FASTLLM_MULTIVERSION void row_axpy(float* y, float a, const c10::BFloat16* x, int64_t d) {
  cpu::axpy_f32(y, a, x, d);
}
void row_axpy(float* y, float a, const c10::Half* x, int64_t d) {
#ifdef FASTLLM_HAVE_F16C_PATH
  if (cpu_has_f16c()) return row_axpy_f16c(y, a, x, d);
#endif
  cpu::axpy_f32(y, a, x, d);
}
void row_axpy(float* y, float a, const double* x, int64_t d) { cpu::axpy_f32(y, a, x, d); }

// ---- a block of up to kBlock cache entries against a query group (the decode's inner loops) ----
//
// Per entry and query head the work is one 64- to 256-wide dot product and one axpy: at that size
// the calls, the reduction of each dot's 16 lanes and reloading the rows per head cost more than
// the multiply-adds. So a block's logits load each key chunk once for all the group's heads and
// reduce with a shuffle tree, and its values accumulate into the group's outputs held in
// registers across the block. fp16 rows keep the per-entry F16C path; fp64 (gradcheck) plain loops.
constexpr int64_t kBlock = 16;
constexpr int64_t kMaxVecGroup = 8;

#ifdef FASTLLM_HAVE_VEC
FASTLLM_INLINE float reduce_lanes(cpu::VecF v) {
  typedef float V8 __attribute__((vector_size(32)));
  typedef float V4 __attribute__((vector_size(16)));
  const V8 v8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const V4 v4 = __builtin_shufflevector(v8, v8, 0, 1, 2, 3) +
                __builtin_shufflevector(v8, v8, 4, 5, 6, 7);
  return (v4[0] + v4[2]) + (v4[1] + v4[3]);
}

// The group size is a template argument so that the G accumulators live in registers.
template <int G, typename w_t>
FASTLLM_INLINE void block_logits_fixed(const float* q, const w_t* const* keys, int64_t n,
                                       int64_t d, float* block) {
  for (int64_t j = 0; j < n; ++j) {
    cpu::VecF acc[G] = {};
    for (int64_t k = 0; k < d; k += cpu::kLanes) {
      const cpu::VecF key = cpu::load_vec(keys[j] + k);
      for (int g = 0; g < G; ++g) acc[g] += cpu::load_vec(q + g * d + k) * key;
    }
    for (int g = 0; g < G; ++g) block[g * kBlock + j] = reduce_lanes(acc[g]);
  }
}

template <int G, typename w_t>
FASTLLM_INLINE void block_values_fixed(float* o, const w_t* const* values, int64_t n, int64_t d,
                                       const float* p) {
  for (int64_t k = 0; k < d; k += cpu::kLanes) {
    cpu::VecF acc[G];
    for (int g = 0; g < G; ++g) acc[g] = cpu::load_vec(o + g * d + k);
    for (int64_t j = 0; j < n; ++j) {
      const cpu::VecF value = cpu::load_vec(values[j] + k);
      for (int g = 0; g < G; ++g) acc[g] += p[g * kBlock + j] * value;
    }
    for (int g = 0; g < G; ++g) cpu::store_vec(o + g * d + k, acc[g]);
  }
}

// Groups 1 .. kMaxVecGroup only (vec_block_fits); the callers take the pairs loops otherwise.
#define FASTLLM_GROUP_CASES(CALL) \
  switch (group) {                \
    case 1: CALL(1); break;       \
    case 2: CALL(2); break;       \
    case 3: CALL(3); break;       \
    case 4: CALL(4); break;       \
    case 5: CALL(5); break;       \
    case 6: CALL(6); break;       \
    case 7: CALL(7); break;       \
    case 8: CALL(8); break;       \
    default: break;               \
  }

template <typename w_t>
FASTLLM_INLINE void block_logits_vec(const float* q, int64_t group, const w_t* const* keys,
                                     int64_t n, int64_t d, float* block) {
#define FASTLLM_LOGITS(G) block_logits_fixed<G>(q, keys, n, d, block)
  FASTLLM_GROUP_CASES(FASTLLM_LOGITS)
#undef FASTLLM_LOGITS
}

template <typename w_t>
FASTLLM_INLINE void block_values_vec(float* o, int64_t group, const w_t* const* values,
                                     int64_t n, int64_t d, const float* p) {
#define FASTLLM_VALUES(G) block_values_fixed<G>(o, values, n, d, p)
  FASTLLM_GROUP_CASES(FASTLLM_VALUES)
#undef FASTLLM_VALUES
}
#undef FASTLLM_GROUP_CASES
#endif

template <typename w_t>
void block_logits_pairs(const float* q, int64_t group, const w_t* const* keys, int64_t n,
                        int64_t d, float* block) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t g = 0; g < group; ++g) block[g * kBlock + j] = row_dot(q + g * d, keys[j], d);
  }
}
template <typename w_t>
void block_values_pairs(float* o, int64_t group, const w_t* const* values, int64_t n, int64_t d,
                        const float* p) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t g = 0; g < group; ++g) row_axpy(o + g * d, p[g * kBlock + j], values[j], d);
  }
}

// fp16 and fp64 rows, and every dtype where the vector extension is missing: per entry.
template <typename w_t>
void block_logits(const float* q, int64_t group, const w_t* const* keys, int64_t n, int64_t d,
                  float* block) {
  block_logits_pairs(q, group, keys, n, d, block);
}
template <typename w_t>
void block_values(float* o, int64_t group, const w_t* const* values, int64_t n, int64_t d,
                  const float* p) {
  block_values_pairs(o, group, values, n, d, p);
}

#ifdef FASTLLM_HAVE_VEC
// Whether a block's group and width suit the register-blocked loops.
bool vec_block_fits(int64_t group, int64_t d) {
  return group >= 1 && group <= kMaxVecGroup && d % cpu::kLanes == 0;
}

// fp32 and bf16 rows: the register-blocked loops, target-cloned (overload resolution prefers
// these to the templates above).
#define FASTLLM_VEC_BLOCK(w_t)                                                                  \
  FASTLLM_MULTIVERSION void block_logits(const float* q, int64_t group, const w_t* const* keys, \
                                         int64_t n, int64_t d, float* block) {                  \
    if (vec_block_fits(group, d)) return block_logits_vec(q, group, keys, n, d, block);         \
    block_logits_pairs(q, group, keys, n, d, block);                                            \
  }                                                                                             \
  FASTLLM_MULTIVERSION void block_values(float* o, int64_t group, const w_t* const* values,    \
                                         int64_t n, int64_t d, const float* p) {                \
    if (vec_block_fits(group, d)) return block_values_vec(o, group, values, n, d, p);           \
    block_values_pairs(o, group, values, n, d, p);                                              \
  }
FASTLLM_VEC_BLOCK(float)
FASTLLM_VEC_BLOCK(c10::BFloat16)
#undef FASTLLM_VEC_BLOCK
#endif

// Logits of query head h's rows [start, start + rows) against the keys they may see, into
// out [rows, visible] (visible = the last row's position + 1). Called inside a parallel region,
// where ATen's matmul runs single-threaded: one level of parallelism, over heads.
void head_chunk_logits(const at::Tensor& qf, const at::Tensor& kf, int64_t h, int64_t group,
                       int64_t start, int64_t rows, int64_t visible, double scale,
                       at::Tensor& out) {
  at::mm_out(out, qf[h].narrow(0, start, rows), kf[h / group].narrow(0, 0, visible).t());
  out.mul_(scale);
}

// Causal softmax of a chunk of logits [rows, visible] whose row r is the query at position
// first_position + r: the keys after it are masked, then one ATen softmax (vectorized exp) turns
// the chunk into probabilities, zero past each row's position. A scalar exp per logit was most of
// the profiling time.
at::Tensor causal_softmax(at::Tensor& logits, int64_t first_position) {
  const int64_t rows = logits.size(0), visible = logits.size(1);
  float* data = logits.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(data + r * visible + first_position + r + 1, data + (r + 1) * visible,
              -std::numeric_limits<float>::infinity());
  }
  return at::_softmax(logits, 1, false);
}

at::Tensor kv_attention_scores_cpu(const at::Tensor& q, const at::Tensor& k, double scale,
                                   int64_t chunk) {
  check_profile_args("fastllm.kv_attention_scores", q, k, chunk);
  const int64_t hq = q.size(0), lq = q.size(1), hkv = k.size(0), lk = k.size(1), d = q.size(2);
  const int64_t group = hq / hkv, offset = lk - lq;
  at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor kf = k.to(at::kFloat).contiguous();
  at::Tensor acc = at::zeros({hq, lk}, qf.options());
  for (int64_t start = 0; start < lq; start += chunk) {
    const int64_t rows = std::min(chunk, lq - start);
    const int64_t visible = offset + start + rows;
    // One task per query head: its rows all add into the same accumulator row, so no races.
    at::parallel_for(0, hq, grain_for(rows * visible * (d + 3)), [&](int64_t h0, int64_t h1) {
      at::Tensor logits = at::empty({rows, visible}, qf.options());
      for (int64_t h = h0; h < h1; ++h) {
        head_chunk_logits(qf, kf, h, group, start, rows, visible, scale, logits);
        acc[h].narrow(0, 0, visible).add_(causal_softmax(logits, offset + start).sum(0));
      }
    });
  }
  return acc.view({hkv, group, lk}).sum(1);
}

at::Tensor kv_policy_recovery_cpu(const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& key_class, int64_t window, double scale,
                                  int64_t chunk) {
  constexpr const char* op = "fastllm.kv_policy_recovery";
  check_profile_args(op, q, k, chunk);
  check_key_class(op, k, key_class, window);
  const int64_t hq = q.size(0), lq = q.size(1), hkv = k.size(0), lk = k.size(1), d = q.size(2);
  const int64_t group = hq / hkv, offset = lk - lq;
  at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor kf = k.to(at::kFloat).contiguous();
  // Per KV head, 0/1 masks over the keys by the first policy that keeps them when they are
  // outside the local window (special, punctuation, heavy, none) and, inside it, whether only the
  // window keeps them (heavy or none): each policy's share of a row is then a masked dot product
  // over one or two contiguous ranges, vectorized, instead of a branch per key.
  enum Mask { kSpecialMask, kPunctMask, kHeavyMask, kNoneMask, kWindowOnlyMask, kMasks };
  at::Tensor cls = key_class.contiguous();
  const uint8_t* cls_data = cls.data_ptr<uint8_t>();
  std::vector<float> masks(static_cast<size_t>(hkv * kMasks * lk), 0.f);
  for (int64_t g = 0; g < hkv; ++g) {
    for (int64_t j = 0; j < lk; ++j) {
      const int policy = first_policy_keeping(cls_data[g * lk + j], lk, j, 0);
      const int mask = policy == 0 ? kSpecialMask : policy == 1 ? kPunctMask
                                                    : policy == 3 ? kHeavyMask : kNoneMask;
      masks[(g * kMasks + mask) * lk + j] = 1.f;
      if (policy >= 3) masks[(g * kMasks + kWindowOnlyMask) * lk + j] = 1.f;
    }
  }
  std::vector<double> mass(hq * 5, 0.0);
  for (int64_t start = 0; start < lq; start += chunk) {
    const int64_t rows = std::min(chunk, lq - start);
    const int64_t visible = offset + start + rows;
    at::parallel_for(0, hq, grain_for(rows * visible * (d + 4)), [&](int64_t h0, int64_t h1) {
      at::Tensor logits = at::empty({rows, visible}, qf.options());
      for (int64_t h = h0; h < h1; ++h) {
        head_chunk_logits(qf, kf, h, group, start, rows, visible, scale, logits);
        const at::Tensor probs = causal_softmax(logits, offset + start);
        const float* data = probs.const_data_ptr<float>();
        const float* head_masks = masks.data() + (h / group) * kMasks * lk;
        auto mask = [&](Mask m) { return head_masks + m * lk; };
        for (int64_t r = 0; r < rows; ++r) {
          const float* row = data + r * visible;
          const int64_t qpos = offset + start + r;
          // Keys [0, outside) are out of the window; [outside, qpos] inside (see kv_math.h).
          const int64_t outside = std::max<int64_t>(0, qpos - window + 1);
          const int64_t inside = qpos + 1 - outside;
          double* part = &mass[h * 5];
          part[0] += row_dot(row, mask(kSpecialMask), qpos + 1);
          part[1] += row_dot(row, mask(kPunctMask), qpos + 1);
          part[2] += row_dot(row + outside, mask(kWindowOnlyMask) + outside, inside);
          part[3] += row_dot(row, mask(kHeavyMask), outside);
          part[4] += row_dot(row, mask(kNoneMask), outside);
        }
      }
    });
  }
  at::Tensor out = at::empty({hkv, 4}, qf.options());
  float* out_data = out.data_ptr<float>();
  const double rows_total = static_cast<double>(std::max<int64_t>(lq, 1) * group);
  for (int64_t g = 0; g < hkv; ++g) {
    double cumulative = 0.0;
    for (int p = 0; p < 4; ++p) {
      double sum = 0.0;
      for (int64_t h = g * group; h < (g + 1) * group; ++h) sum += mass[h * 5 + p];
      cumulative += sum;
      out_data[g * 4 + p] = static_cast<float>(cumulative / rows_total);
    }
  }
  return out;
}


// Where a decode's per-entry probabilities go: a fresh [caches, stride] tensor (kv_ragged_decode:
// zero past each length), or added into the caches' accumulated scores (kv_decode_step).
struct ScoreSink {
  float* data;
  int64_t stride;
  bool accumulate;
};

// lse may be null (kv_decode_step has no use for it).
template <typename scalar_t>
void ragged_decode_cpu_impl(const at::Tensor& q, const at::Tensor& kv_rows,
                            const at::Tensor& page_table, const int32_t* len, int64_t page_rows,
                            double scale, const DecodeWork& work, at::Tensor& out, float* lse_data,
                            const ScoreSink& sink) {
  const int64_t batch = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t caches = page_table.size(0), hkv = caches / batch, group = hq / hkv;
  const int64_t pages = page_table.size(1), width = pages * page_rows;
  const scalar_t* q_data = q.data_ptr<scalar_t>();
  const scalar_t* rows = kv_rows.data_ptr<scalar_t>();
  const int32_t* table = page_table.data_ptr<int32_t>();
  const int64_t items = work.items;
  // Per (cache, group head, entry): the entry's softmax weight relative to the running maximum
  // of its item when its block was read, and that maximum (probs, ref). Partial max, sum and
  // weighted values per (item, g).
  // Read only below each cache's length, all written first: no need to zero them every step.
  const std::unique_ptr<float[]> probs(new float[caches * group * width]);
  const std::unique_ptr<float[]> ref(new float[caches * group * width]);
  if (group == 0) {  // no query heads (q [B, 0, D]): nothing to attend, no probability to add
    if (!sink.accumulate) {
      for (int64_t c = 0; c < caches; ++c) std::fill_n(sink.data + c * sink.stride, sink.stride, 0.f);
    }
    return;
  }
  std::vector<float> part_m(items * group), part_s(items * group);
  std::vector<float> part_o(items * group * d);
  int64_t entries = 0, longest = 0;
  for (int64_t c = 0; c < caches; ++c) {
    entries += len[c];
    longest = std::max<int64_t>(longest, len[c]);
  }
  // One task per item serves the cache's whole query group, so each key and value row is read
  // once per step, not once per query head of the group (GQA). One pass over the item's rows, a
  // block of entries at a time (online softmax): a row's value is read while its key is still
  // in cache, and the weights the scores need are kept, not recomputed.
  const int64_t per_task = (entries + items - 1) / std::max<int64_t>(items, 1) * d * 3 * group;
  static cpu::ContentionBackoff items_contention;
  cpu::claim_parallel_chunks(items_contention, items, grain_for(per_task), [&](int64_t t0,
                                                                               int64_t t1) {
    std::vector<float> qrows(group * d), m(group), sum(group), block(group * kBlock);
    const scalar_t* key_of[kBlock];
    const scalar_t* value_of[kBlock];
    for (int64_t t = t0; t < t1; ++t) {
      int64_t c, begin, end;
      // Every item's cache lies in [0, caches): checked on the host (check_decode_work).
      work.range(t, [&](int64_t cache) { return int64_t{len[cache]}; }, &c, &begin, &end);
      const int64_t seq = c / hkv, first_head = (c % hkv) * group;
      for (int64_t i = 0; i < group * d; ++i) {  // the scale folded into the queries
        qrows[i] = static_cast<float>(q_data[(seq * hq + first_head) * d + i]) *
                   static_cast<float>(scale);
      }
      float* pr = probs.get() + c * group * width;  // [group, width]
      float* rf = ref.get() + c * group * width;
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(sum.begin(), sum.end(), 0.f);
      float* o = part_o.data() + t * group * d;  // head g's partial at o + g * d
      std::fill_n(o, group * d, 0.f);
      for (int64_t b = begin; b < end; b += kBlock) {
        const int64_t n = std::min(kBlock, end - b);
        for (int64_t j = 0; j < n; ++j) {
          key_of[j] = rows + entry_slot(table + c * pages, b + j, page_rows) * 2 * d;
          value_of[j] = key_of[j] + d;
        }
        block_logits(qrows.data(), group, key_of, n, d, block.data());
        for (int64_t g = 0; g < group; ++g) {
          float* lb = block.data() + g * kBlock;
          const float block_max = *std::max_element(lb, lb + n);
          if (block_max > m[g]) {  // a new maximum: rescale what the item holds so far
            const float f = std::exp(m[g] - block_max);  // 0 for the first block
            sum[g] *= f;
            for (int64_t i = 0; i < d; ++i) o[g * d + i] *= f;
            m[g] = block_max;
          }
          for (int64_t j = 0; j < n; ++j) {
            lb[j] = std::exp(lb[j] - m[g]);
            sum[g] += lb[j];
            pr[g * width + b + j] = lb[j];
            rf[g * width + b + j] = m[g];
          }
        }
        block_values(o, group, value_of, n, d, block.data());
      }
      for (int64_t g = 0; g < group; ++g) {
        part_m[t * group + g] = m[g];
        part_s[t * group + g] = sum[g];
      }
    }
  });
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const int64_t items_per_cache = (items + caches - 1) / std::max<int64_t>(caches, 1);
  static cpu::ContentionBackoff merge_contention;
  cpu::claim_parallel_chunks(merge_contention, caches,
                             grain_for(group * (items_per_cache * d + longest)),
                             [&](int64_t c0, int64_t c1) {
    std::vector<float> acc(d), step(width);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t seq = c / hkv;
      int64_t lo, hi;
      work.items_of(c, &lo, &hi);
      // This step's probabilities summed over the group first, then added to the scores once,
      // as kv_evict_round adds a step's scores: the same rounding on every device.
      std::fill_n(step.data(), len[c], 0.f);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t cg = c * group + g, head = (c % hkv) * group + g;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = lo; i < hi; ++i) {
          if (part_s[i * group + g] > 0.f) m = std::max(m, part_m[i * group + g]);
        }
        float total = 0.f;
        for (int64_t i = 0; i < d; ++i) acc[i] = 0.f;
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t t = i * group + g;
          if (part_s[t] <= 0.f) continue;
          const float w = std::exp(part_m[t] - m);
          total += w * part_s[t];
          for (int64_t j = 0; j < d; ++j) acc[j] += w * part_o[t * d + j];
        }
        scalar_t* o = out_data + (seq * hq + head) * d;
        const float inv = total > 0.f ? 1.f / total : 0.f;
        for (int64_t i = 0; i < d; ++i) o[i] = static_cast<scalar_t>(acc[i] * inv);
        const float l = total > 0.f ? m + std::log(total) : -std::numeric_limits<float>::infinity();
        if (lse_data != nullptr) lse_data[seq * hq + head] = l;
        // An entry's probability is its weight times exp(its reference maximum - lse); the
        // reference changes once per block at most.
        const float* pr = probs.get() + cg * width;
        const float* rf = ref.get() + cg * width;
        float last_ref = std::numeric_limits<float>::quiet_NaN(), factor = 0.f;
        for (int64_t e = 0; e < len[c]; ++e) {
          if (!(rf[e] == last_ref)) {
            last_ref = rf[e];
            factor = std::exp(rf[e] - l);
          }
          step[e] += pr[e] * factor;
        }
      }
      float* sc = sink.data + c * sink.stride;
      if (sink.accumulate) {
        for (int64_t e = 0; e < len[c]; ++e) sc[e] += step[e];
      } else {
        std::copy_n(step.data(), len[c], sc);
        std::fill(sc + len[c], sc + sink.stride, 0.f);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_ragged_decode_cpu(
    const at::Tensor& q, const at::Tensor& kv_rows, const at::Tensor& page_table,
    const at::Tensor& lengths, int64_t page_rows, double scale, int64_t num_splits,
    const std::optional<at::Tensor>& work) {
  check_decode_args(q, kv_rows, page_table, lengths, page_rows, num_splits, work);
  at::Tensor qc = q.contiguous();
  at::Tensor table = page_table.contiguous();
  at::Tensor lens = lengths.contiguous();
  at::Tensor list = work.has_value() ? work->contiguous() : at::Tensor();
  const int64_t caches = page_table.size(0);
  const DecodeWork plan{list.defined() ? list.const_data_ptr<int32_t>() : nullptr,
                        list.defined() ? list.size(0) : caches * num_splits, num_splits, caches};
  at::Tensor out = at::empty_like(qc);
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  at::Tensor scores =
      at::empty({page_table.size(0), page_table.size(1) * page_rows}, lse.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kv_ragged_decode",
                                  [&] {
                                    ragged_decode_cpu_impl<scalar_t>(
                                        qc, kv_rows, table, lens.const_data_ptr<int32_t>(),
                                        page_rows, scale, plan, out, lse.data_ptr<float>(),
                                        ScoreSink{scores.data_ptr<float>(), scores.size(1),
                                                  false});
                                  });
  return {out, lse, scores};
}

// Cache c's eviction once this step's scores are in (kv_evict_round's rule): the lowest-score
// evictable entry, the first on ties, when more than `heavy` are evictable.
void evict_round_one(int64_t* pos_data, float* score_data, uint8_t* flag_data, int64_t* len_data,
                     int64_t* move_data, int64_t c, int64_t cap, int64_t newest, int64_t window,
                     int64_t heavy, bool grow) {
  if (grow) return;
  const int64_t len = len_data[c];
  const int64_t* p = pos_data + c * cap;
  const float* s = score_data + c * cap;
  const uint8_t* f = flag_data + c * cap;
  int64_t evictable_count = 0, victim = -1;
  for (int64_t j = 0; j < len; ++j) {
    if (!evictable(f[j], p[j], newest, window)) continue;
    ++evictable_count;
    if (victim < 0 || s[j] < s[victim]) victim = j;
  }
  if (evictable_count <= heavy) return;
  evict_entry(pos_data, score_data, flag_data, len_data, move_data, c, cap, victim);
}

at::Tensor kv_evict_round_cpu(at::Tensor& pos, at::Tensor& score, at::Tensor& flags,
                              at::Tensor& lengths, const at::Tensor& step_scores,
                              const at::Tensor& newest, const at::Tensor& window,
                              const at::Tensor& heavy, const at::Tensor& grow) {
  check_evict_args(pos, score, flags, lengths, step_scores, newest, window, heavy, grow);
  const int64_t caches = pos.size(0), cap = pos.size(1), step_width = step_scores.size(1);
  at::Tensor moves = at::full({caches, 2}, -1, lengths.options());
  int64_t* pos_data = pos.data_ptr<int64_t>();
  float* score_data = score.data_ptr<float>();
  uint8_t* flag_data = flags.data_ptr<uint8_t>();
  int64_t* len_data = lengths.data_ptr<int64_t>();
  int64_t* move_data = moves.data_ptr<int64_t>();
  const float* step_data = step_scores.const_data_ptr<float>();
  const int64_t* newest_data = newest.const_data_ptr<int64_t>();
  const int64_t* window_data = window.const_data_ptr<int64_t>();
  const int64_t* heavy_data = heavy.const_data_ptr<int64_t>();
  const bool* grow_data = grow.const_data_ptr<bool>();
  // A decode step has a few dozen caches of a few hundred entries: one thread, no task overhead.
  for (int64_t c = 0; c < caches; ++c) {
    float* s = score_data + c * cap;
    const float* add = step_data + c * step_width;
    for (int64_t j = 0, n = std::min(len_data[c], step_width); j < n; ++j) s[j] += add[j];
    evict_round_one(pos_data, score_data, flag_data, len_data, move_data, c, cap,
                    newest_data[c], window_data[c], heavy_data[c], grow_data[c]);
  }
  return moves;
}

// One decode step over C ragged caches (schema in registration.cpp): append each cache's new
// entry, attend over the caches, add the probabilities into the scores, evict at most one entry
// per cache and move the pool row of its last entry into the hole. One op, so a decode step's
// bookkeeping costs one dispatch instead of a dozen small tensor ops per layer.
std::tuple<at::Tensor, at::Tensor> kv_decode_step_cpu(
    const at::Tensor& q, const at::Tensor& new_rows, const at::Tensor& new_pos,
    const at::Tensor& new_class, at::Tensor& kv_rows, const at::Tensor& page_table,
    at::Tensor& lengths, at::Tensor& pos, at::Tensor& score, at::Tensor& flags,
    const at::Tensor& keep_classes, const at::Tensor& sinks, const at::Tensor& window,
    const at::Tensor& heavy, const at::Tensor& grow, int64_t page_rows, double scale,
    int64_t num_splits, const std::optional<at::Tensor>& work,
    const std::optional<at::Tensor>& capacity) {
  check_decode_step_args(q, new_rows, new_pos, new_class, kv_rows, page_table, lengths, pos, score,
                         flags, keep_classes, sinks, window, heavy, grow, page_rows, num_splits,
                         work, capacity);
  const at::Tensor qc = q.contiguous(), rows_in = new_rows.contiguous();
  const at::Tensor table = page_table.contiguous();
  const at::Tensor classes = new_class.contiguous(), keep = keep_classes.contiguous();
  const at::Tensor sink_counts = sinks.contiguous();
  const at::Tensor room = capacity.has_value() ? capacity->contiguous() : at::Tensor();
  const at::Tensor list = work.has_value() ? work->contiguous() : at::Tensor();
  const int64_t caches = pos.size(0), cap = pos.size(1), pages = table.size(1);
  const int64_t row_bytes = kv_rows.size(1) * kv_rows.element_size();
  const int32_t* table_data = table.const_data_ptr<int32_t>();
  auto* pool = static_cast<char*>(kv_rows.data_ptr());
  const auto* incoming = static_cast<const char*>(rows_in.const_data_ptr());
  int64_t* len_data = lengths.data_ptr<int64_t>();
  int64_t* pos_data = pos.data_ptr<int64_t>();
  float* score_data = score.data_ptr<float>();
  uint8_t* flag_data = flags.data_ptr<uint8_t>();
  const int64_t* new_pos_data = new_pos.const_data_ptr<int64_t>();
  const uint8_t* class_data = classes.const_data_ptr<uint8_t>();
  const uint8_t* keep_data = keep.const_data_ptr<uint8_t>();
  const int64_t* sink_data = sink_counts.const_data_ptr<int64_t>();
  const int64_t* capacity_data = room.defined() ? room.const_data_ptr<int64_t>() : nullptr;
  auto slot_of = [&](int64_t c, int64_t e) { return entry_slot(table_data + c * pages, e, page_rows); };
  // The decode kernels take int32 lengths (kv_ragged_decode's contract).
  std::vector<int32_t> len32(caches);
  for (int64_t c = 0; c < caches; ++c) {
    const int64_t e = new_entry_index(len_data[c], capacity_data ? capacity_data[c] : -1);
    std::memcpy(pool + slot_of(c, e) * row_bytes, incoming + c * row_bytes, row_bytes);
    pos_data[c * cap + e] = new_pos_data[c];
    flag_data[c * cap + e] = new_entry_flags(class_data[c], keep_data[c], new_pos_data[c],
                                             sink_data[c]);
    score_data[c * cap + e] = 0.f;
    len_data[c] = e + 1;
    len32[c] = static_cast<int32_t>(e + 1);
  }
  const DecodeWork plan{list.defined() ? list.const_data_ptr<int32_t>() : nullptr,
                        list.defined() ? list.size(0) : caches * num_splits, num_splits, caches};
  at::Tensor out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kv_decode_step", [&] {
    ragged_decode_cpu_impl<scalar_t>(qc, kv_rows, table, len32.data(), page_rows, scale, plan, out,
                                     nullptr, ScoreSink{score_data, cap, true});
  });
  at::Tensor moves = at::full({caches, 2}, -1, lengths.options());
  int64_t* move_data = moves.data_ptr<int64_t>();
  const int64_t* window_data = window.const_data_ptr<int64_t>();
  const int64_t* heavy_data = heavy.const_data_ptr<int64_t>();
  const bool* grow_data = grow.const_data_ptr<bool>();
  for (int64_t c = 0; c < caches; ++c) {
    evict_round_one(pos_data, score_data, flag_data, len_data, move_data, c, cap, new_pos_data[c],
                    window_data[c], heavy_data[c], grow_data[c]);
    if (move_data[2 * c] < 0) continue;
    std::memmove(pool + slot_of(c, move_data[2 * c]) * row_bytes,
                 pool + slot_of(c, move_data[2 * c + 1]) * row_bytes, row_bytes);
  }
  return {out, moves};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) {
  m.impl("kv_attention_scores", &kv_attention_scores_cpu);
  m.impl("kv_policy_recovery", &kv_policy_recovery_cpu);
  m.impl("kv_ragged_decode", &kv_ragged_decode_cpu);
  m.impl("kv_evict_round", &kv_evict_round_cpu);
  m.impl("kv_decode_step", &kv_decode_step_cpu);
}

}  // namespace fastllm::kv
