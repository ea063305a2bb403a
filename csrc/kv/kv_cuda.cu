// CUDA kernels for FastGen profiling and ragged decode attention.
//
// Profiling: ATen ops per chunk of query rows (a batched cuBLAS GEMM, a causal softmax, fixed-
// order reductions; see chunk_probabilities): the attention map is held one chunk at a time and
// the results repeat bit for bit run to run, as far as cuBLAS does (one stream, or
// CUBLAS_WORKSPACE_CONFIG set); fp16 / bf16 prompts run the GEMMs on tensor cores with fp32
// accumulation, and with TF32 allowed for fp32 matmuls the fp32 GEMMs follow it.
//
// Decode: one block per work item (kv_math.h, DecodeWork: a run of one cache's entries, from
// even splits or a work list planned from the caches' real length bounds, plan_decode_work),
// serving the cache's whole query group (decode_gqa_kernel, planned by plan_decode): the item's
// K/V rows are streamed through shared memory once, in tiles double-buffered with cp.async, with
// an online softmax per head; the logits go to a workspace once. A second kernel merges each
// cache's items and turns the logits into per-entry probabilities summed over the group
// (decode_merge_scores_kernel). Shapes the grouped kernel does not take (fp64, head dims that
// are not whole 16-byte words, very large groups) use the per-head kernel (grid (item, group
// head)), which reads each row once per head.
//
// No host synchronisation: index values are checked on the host only in the debug mode (see
// common/index_errors.h). The decode kernels treat a cache whose length lies outside
// [0, pages * page_rows] as empty and skip every entry whose page id lies outside the pool, and the
// eviction kernel leaves a cache whose length lies outside [0, capacity] alone; each reports its
// bit in the device error word. An entry skipped that way gets no probability; outputs of a cache
// with no usable entry are zero.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cfloat>
#include <limits>

#include "common/async_copy.cuh"
#include "common/index_guard.cuh"
#include "common/vec_words.cuh"
#include "kv/kv_checks.h"
#include "kv/kv_math.h"

namespace fastllm::kv {
namespace {

constexpr int kThreads = 128;

// Block-wide reduction of (max, sum-of-exp) pairs, the online-softmax merge.
__device__ void block_softmax_stats(float& m, float& s) {
  __shared__ float sm[kThreads], ss[kThreads];
  sm[threadIdx.x] = m;
  ss[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      const float m1 = sm[threadIdx.x], m2 = sm[threadIdx.x + stride];
      const float mm = fmaxf(m1, m2);
      const float s1 = m1 == -FLT_MAX ? 0.f : ss[threadIdx.x] * __expf(m1 - mm);
      const float s2 = m2 == -FLT_MAX ? 0.f : ss[threadIdx.x + stride] * __expf(m2 - mm);
      sm[threadIdx.x] = mm;
      ss[threadIdx.x] = s1 + s2;
    }
    __syncthreads();
  }
  m = sm[0];
  s = ss[0];
  __syncthreads();
}


template <typename scalar_t>
__device__ float dot_row(const float* q_shared, const scalar_t* key, int d) {
  float acc = 0.f;
  for (int i = 0; i < d; ++i) acc += q_shared[i] * static_cast<float>(key[i]);
  return acc;
}

// fp16 / bf16 GEMMs with fp32 outputs (aten::bmm.dtype) exist from torch 2.8; before, the
// inputs become fp32 first.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
constexpr bool kHalfGemmToFloat = true;
at::Tensor logits_gemm(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::bmm(a, b) : at::bmm(a, b, at::kFloat);
}
#else
constexpr bool kHalfGemmToFloat = false;
at::Tensor logits_gemm(const at::Tensor& a, const at::Tensor& b) { return at::bmm(a, b); }
#endif

// Profiling, per chunk of `chunk` query rows: one batched GEMM (cuBLAS) of all the query heads of
// each KV head against the keys the chunk sees, a causal softmax and reductions, in ATen ops on
// the current stream. No L x L map is held and nothing is added atomically, so the scores and
// the policies chosen from them are the same run to run (a float-atomic kernel summed them in
// whatever order its blocks finished). fp32 softmax and sums, as the CPU kernel; the GEMMs take
// fp16 / bf16 inputs as they are, with fp32 accumulation (gemm_heads).

// Probabilities [Hkv, G, rows, visible] of query rows [start, start + rows) (queries qg
// [Hkv, G, Lq, D], keys kf [Hkv, Lk, D], fp32; the last query sits at key Lk - 1).
at::Tensor chunk_probabilities(const at::Tensor& qg, const at::Tensor& kf, int64_t start,
                               int64_t rows, double scale) {
  const int64_t hkv = qg.size(0), group = qg.size(1), lq = qg.size(2), d = qg.size(3);
  const int64_t offset = kf.size(1) - lq, visible = offset + start + rows;
  const at::Tensor queries = qg.narrow(2, start, rows).reshape({hkv, group * rows, d});
  at::Tensor logits = logits_gemm(queries, kf.narrow(1, 0, visible).transpose(1, 2));
  logits.mul_(scale);
  logits = logits.view({hkv, group, rows, visible});
  const auto index = qg.options().dtype(at::kLong);
  const at::Tensor position = at::arange(offset + start, offset + start + rows, index).unsqueeze(1);
  logits.masked_fill_(at::arange(visible, index).unsqueeze(0) > position, -INFINITY);
  return at::_softmax(logits, -1, false);
}

// Queries grouped by KV head [Hkv, G, Lq, D] and keys, in the GEMM's input dtype: fp16 and bf16
// stay as they are (tensor-core GEMMs with fp32 accumulation and fp32 logits, the products of the
// same rounded inputs the CPU kernel multiplies in fp32), fp64 becomes fp32 as on the CPU.
std::pair<at::Tensor, at::Tensor> gemm_heads(const at::Tensor& q, const at::Tensor& k) {
  const int64_t hq = q.size(0), lq = q.size(1), hkv = k.size(0), d = q.size(2);
  const bool half = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  const at::ScalarType dtype = half && kHalfGemmToFloat ? q.scalar_type() : at::kFloat;
  return {q.to(dtype).contiguous().view({hkv, hq / hkv, lq, d}), k.to(dtype).contiguous()};
}

at::Tensor kv_attention_scores_cuda(const at::Tensor& q, const at::Tensor& k, double scale,
                                    int64_t chunk) {
  check_profile_args("fastllm.kv_attention_scores", q, k, chunk);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t lq = q.size(1), hkv = k.size(0), lk = k.size(1);
  at::Tensor scores = at::zeros({hkv, lk}, q.options().dtype(at::kFloat));
  if (q.size(0) == 0 || lq == 0) return scores;
  const auto [qg, kf] = gemm_heads(q, k);
  for (int64_t start = 0; start < lq; start += chunk) {
    const int64_t rows = std::min(chunk, lq - start), visible = lk - lq + start + rows;
    scores.narrow(1, 0, visible).add_(chunk_probabilities(qg, kf, start, rows, scale).sum({1, 2}));
  }
  return scores;
}

at::Tensor kv_policy_recovery_cuda(const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& key_class, int64_t window, double scale,
                                   int64_t chunk) {
  constexpr const char* op = "fastllm.kv_policy_recovery";
  check_profile_args(op, q, k, chunk);
  check_key_class(op, k, key_class, window);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t hq = q.size(0), lq = q.size(1), hkv = k.size(0), lk = k.size(1);
  const int64_t group = hkv > 0 ? hq / hkv : 1;
  at::Tensor mass = at::zeros({hkv, 4}, q.options().dtype(at::kFloat));
  if (hq > 0 && lq > 0) {
    const auto [qg, kf] = gemm_heads(q, k);
    // Which policy first keeps each key (kv_math.h, first_policy_keeping): special, then
    // punctuation, then the local window (depends on the query), then heavy hitters.
    const at::Tensor cls = key_class.to(at::kInt);
    const at::Tensor special = cls.bitwise_and(kSpecial).ne(0);
    const at::Tensor punct = cls.bitwise_and(kPunct).ne(0).logical_and(special.logical_not());
    const at::Tensor by_class = special.logical_or(punct);
    const at::Tensor heavy = cls.bitwise_and(kHeavy).ne(0).logical_and(by_class.logical_not());
    const auto index = q.options().dtype(at::kLong);
    for (int64_t start = 0; start < lq; start += chunk) {
      const int64_t rows = std::min(chunk, lq - start), visible = lk - lq + start + rows;
      // Summed over the group first: every mask below is the same for a KV head's query heads.
      const at::Tensor probs = chunk_probabilities(qg, kf, start, rows, scale).sum(1);
      const at::Tensor position =
          at::arange(lk - lq + start, lk - lq + start + rows, index).unsqueeze(1);
      // [1, rows, visible]: the key lies in the query's local window
      const at::Tensor local =
          (position - at::arange(visible, index).unsqueeze(0)).lt(window).unsqueeze(0);
      auto keys = [&](const at::Tensor& m) {  // [Hkv, 1, visible]
        return m.narrow(1, 0, visible).unsqueeze(1);
      };
      // Special and punctuation keys are kept whatever the query: one pass over the key sums.
      const at::Tensor per_key = probs.sum(1);  // [Hkv, visible]
      mass.select(1, 0).add_(per_key.mul(keys(special).squeeze(1)).sum(1));
      mass.select(1, 1).add_(per_key.mul(keys(punct).squeeze(1)).sum(1));
      const at::Tensor local_only = local.logical_and(keys(by_class).logical_not());
      const at::Tensor heavy_only = keys(heavy).logical_and(local.logical_not());
      mass.select(1, 2).add_(probs.mul(local_only).sum({1, 2}));
      mass.select(1, 3).add_(probs.mul(heavy_only).sum({1, 2}));
    }
  }
  return mass.cumsum(1).div_(static_cast<double>(std::max<int64_t>(lq, 1) * group));
}

// Cache c's length, or 0 (an empty cache) when it lies outside [0, width]; err, where given,
// records the bad length.
__device__ int64_t guarded_length(const int32_t* lengths, int64_t c, int64_t width,
                                  unsigned int* err) {
  const int64_t len = lengths[c];
  if (length_in_range(len, width)) return len;
  if (err != nullptr && threadIdx.x == 0) report_index_error(err, kKvLengths);
  return 0;
}

// Cache and entries of a decode item on the device: a length outside [0, width] counts as an
// empty cache (reported once per cache, by its first item, where `report`); false for a work-list
// row that breaks the list's structure (reported, kKvWork): the caller writes an empty partial.
// Outside the debug mode the host never reads the list, so this per-row check is what stops a
// malformed list from merging one cache's partials into another or counting entries twice.
__device__ bool device_item_range(const DecodeWork& work, int64_t item, const int32_t* lengths,
                                  int64_t width, bool report, unsigned int* err, int64_t* cache,
                                  int64_t* begin, int64_t* end) {
  unsigned int* length_err = report && work.first_of_cache(item) ? err : nullptr;
  const bool ok = work.range(
      item, [&](int64_t c) { return guarded_length(lengths, c, width, length_err); }, cache, begin,
      end);
  if (!ok && report && threadIdx.x == 0) report_index_error(err, kKvWork);
  return ok;
}

// The per-head fallback. grid: (items, group heads), kThreads threads, d floats of dynamic
// shared memory.
template <typename scalar_t>
__global__ void decode_split_kernel(const scalar_t* __restrict__ q,
                                    const scalar_t* __restrict__ rows,
                                    const int32_t* __restrict__ table,
                                    const int32_t* __restrict__ lengths, DecodeWork work,
                                    float* __restrict__ logits, float* __restrict__ part_m,
                                    float* __restrict__ part_s, float* __restrict__ part_o,
                                    int64_t hq, int64_t hkv, int64_t pages, int64_t page_rows,
                                    int64_t pool_pages, int64_t width, int d, float scale,
                                    unsigned int* err) {
  extern __shared__ float q_shared[];
  const int64_t group = hq / hkv;
  const int64_t item = blockIdx.x, g = blockIdx.y;
  const int64_t t = item * group + g;  // the partial's slot
  int64_t c, begin, end;
  if (!device_item_range(work, item, lengths, pages * page_rows, g == 0, err, &c, &begin, &end)) {
    if (threadIdx.x == 0) {
      part_m[t] = -FLT_MAX;
      part_s[t] = 0.f;
    }
    return;
  }
  const int64_t cg = c * group + g;
  const int64_t seq = c / hkv, head = (c % hkv) * group + g;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    q_shared[i] = static_cast<float>(q[(seq * hq + head) * d + i]) * scale;
  }
  __syncthreads();
  const int32_t* page_row = table + c * pages;
  float* lg = logits + cg * width;
  float m = -FLT_MAX, sum = 0.f;
  for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
    if (!page_in_range(page_row[e / page_rows], pool_pages)) {
      report_index_error(err, kKvPageTable);
      lg[e] = -INFINITY;  // no probability, and the value loop skips it
      continue;
    }
    const float x = dot_row(q_shared, rows + entry_slot(page_row, e, page_rows) * 2 * d, d);
    lg[e] = x;
    const float mm = fmaxf(m, x);
    sum = sum * __expf(m - mm) + __expf(x - mm);
    m = mm;
  }
  block_softmax_stats(m, sum);  // its barriers also publish lg to the whole block
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float acc = 0.f;
    for (int64_t e = begin; e < end; ++e) {
      if (!page_in_range(page_row[e / page_rows], pool_pages)) continue;
      const scalar_t* value = rows + entry_slot(page_row, e, page_rows) * 2 * d + d;
      acc += __expf(lg[e] - m) * static_cast<float>(value[i]);
    }
    part_o[t * d + i] = acc;
  }
  if (threadIdx.x == 0) {
    part_m[t] = m;
    part_s[t] = sum;
  }
}


__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_total(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The grouped decode of one work item (kv_math.h, plan_decode, DecodeWork). grid: (items),
// kDecodeThreads threads; dynamic shared memory as plan_decode lays it out. Writes the item's
// partial max, sum and unnormalised output per query head and each entry's logit per head into
// the workspace (the layouts decode_merge_scores_kernel reads).
template <typename scalar_t>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_gqa_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ rows,
                      const int32_t* __restrict__ table, const int32_t* __restrict__ lengths,
                      DecodeWork work, float* __restrict__ logits, float* __restrict__ part_m,
                      float* __restrict__ part_s, float* __restrict__ part_o, int64_t hq,
                      int64_t hkv, int64_t pages, int64_t page_rows, int64_t pool_pages,
                      int64_t width, int d, int tile, int key_lanes, float scale,
                      unsigned int* err) {
  constexpr int vec = 16 / static_cast<int>(sizeof(scalar_t));
  extern __shared__ uint4 shared_words[];
  const int group = static_cast<int>(hq / hkv);
  const int row_elems = 2 * d, chunks = d / vec, words_per_row = row_elems / vec;
  scalar_t* stage = reinterpret_cast<scalar_t*>(shared_words);  // [2][tile][2D]
  float* q_s = reinterpret_cast<float*>(stage + 2 * tile * row_elems);  // [G][D], scaled
  float* logit_s = q_s + group * d;                                     // [G][tile]
  float* p_s = logit_s + group * tile;                                  // [G][tile]
  float* m_s = p_s + group * tile;
  float* l_s = m_s + group;
  float* alpha_s = l_s + group;

  const int64_t item = blockIdx.x;
  int64_t c, begin, end;
  if (!device_item_range(work, item, lengths, pages * page_rows, true, err, &c, &begin, &end)) {
    for (int g = threadIdx.x; g < group; g += blockDim.x) {  // an empty partial for the merge
      part_m[item * group + g] = -FLT_MAX;
      part_s[item * group + g] = 0.f;
    }
    return;  // the whole block: no barrier is left waiting
  }
  const int64_t seq = c / hkv, head0 = (c % hkv) * group;
  // q_s holds head g's element (part * vec + i) at g * D + i * chunks + part: the lanes of one
  // key (consecutive parts) read consecutive banks, and the other keys' lanes the same words.
  for (int i = threadIdx.x; i < group * d; i += blockDim.x) {
    const int g = i / d, dim = i % d;
    q_s[g * d + (dim % vec) * chunks + dim / vec] =
        static_cast<float>(q[(seq * hq + head0) * d + i]) * scale;
  }
  if (threadIdx.x < group) {
    m_s[threadIdx.x] = -FLT_MAX;
    l_s[threadIdx.x] = 0.f;
  }
  const int32_t* page_row = table + c * pages;
  // Entry indices fit 32 bits (lengths are int32): 32-bit division, no 64-bit division routine.
  const int rows_per_page = static_cast<int>(page_rows);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  // Staging copies whole rows: a group of lanes_per_row lanes (the largest power of two <= the
  // row's 16-byte words, at most a warp) per entry, consecutive lanes on consecutive words, so an
  // entry's page id and slot are computed once per lane, not once per word.
  int lanes_per_row = 32;
  while (lanes_per_row > words_per_row) lanes_per_row >>= 1;
  const int rows_per_warp = 32 / lanes_per_row;

  // Copies entries [first, first + n) into buffer `buf`; a row whose page lies outside the pool
  // is zeroed (its logit becomes -inf below, and 0 * zeros keeps P.V finite).
  auto stage_tile = [&](int buf, int64_t first) {
    const int n = static_cast<int>(min(static_cast<int64_t>(tile), end - first));
    scalar_t* dst = stage + buf * tile * row_elems;
    for (int e = warp * rows_per_warp + lane / lanes_per_row; e < n; e += warps * rows_per_warp) {
      const int entry = static_cast<int>(first) + e;
      const int64_t page = page_row[entry / rows_per_page];
      const bool page_ok = page_in_range(page, pool_pages);
      const scalar_t* from =
          rows + (page_ok ? (page * page_rows + entry % rows_per_page) * row_elems : 0);
      scalar_t* to = dst + e * row_elems;
      for (int word = lane % lanes_per_row; word < words_per_row; word += lanes_per_row) {
        if (page_ok) {
          copy16_async(to + word * vec, from + word * vec);
        } else {
          *reinterpret_cast<uint4*>(to + word * vec) = make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
    async_commit();
  };

  const int keys_per_warp = 32 / key_lanes;
  const int key_of_lane = lane / key_lanes, part = lane % key_lanes;
  const int pairs = group * chunks;
  float acc[kDecodeMaxPairs][vec];
#pragma unroll
  for (int k = 0; k < kDecodeMaxPairs; ++k) {
#pragma unroll
    for (int i = 0; i < vec; ++i) acc[k][i] = 0.f;
  }

  const int64_t tiles = (end - begin + tile - 1) / tile;
  if (tiles > 0) stage_tile(0, begin);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t first = begin + t * tile;
    const int n = static_cast<int>(min(static_cast<int64_t>(tile), end - first));
    if (t + 1 < tiles) {
      stage_tile(static_cast<int>((t + 1) & 1), first + tile);
      async_wait<1>();  // this tile's copies are done, the next tile's may still fly
    } else {
      async_wait<0>();
    }
    __syncthreads();  // every thread's copies of this tile (and, at t = 0, q_s, m_s, l_s)
    const scalar_t* buf = stage + (t & 1) * tile * row_elems;

    // QK^T: key_lanes lanes per key, one 16-byte word of it each. The lane's words of all its
    // keys in the tile (at most kDecodeKeysPerLane, plan_decode) go to registers first, so q is
    // read from shared memory once per head, not once per key and head. Trip counts depend on the
    // warp only, so the shuffles see the whole warp.
    const int key_step = warps * keys_per_warp;
    const int first_key = warp * keys_per_warp;
    const int keys = n > first_key ? (n - first_key + key_step - 1) / key_step : 0;
    uint4 words[kDecodeKeysPerLane];
    unsigned usable = 0;  // bit it: key it of this lane is an entry with a page in the pool
#pragma unroll
    for (int it = 0; it < kDecodeKeysPerLane; ++it) {
      const int e = first_key + it * key_step + key_of_lane;
      words[it] = make_uint4(0u, 0u, 0u, 0u);
      if (it < keys && e < n) {
        if (part < chunks) words[it] = *reinterpret_cast<const uint4*>(buf + e * row_elems + part * vec);
        const bool page_ok =
            page_in_range(page_row[(static_cast<int>(first) + e) / rows_per_page], pool_pages);
        if (!page_ok && part == 0) report_index_error(err, kKvPageTable);
        usable |= static_cast<unsigned>(page_ok) << it;
      }
    }
    for (int g = 0; g < group; ++g) {
      float qg[vec];
#pragma unroll
      for (int i = 0; i < vec; ++i) qg[i] = part < chunks ? q_s[g * d + i * chunks + part] : 0.f;
#pragma unroll
      for (int it = 0; it < kDecodeKeysPerLane; ++it) {
        if (it < keys) {  // warp-uniform
          float k[vec];
          word_floats<scalar_t>(words[it], k);
          float dot = 0.f;
#pragma unroll
          for (int i = 0; i < vec; ++i) dot += qg[i] * k[i];
          for (int offset = key_lanes / 2; offset > 0; offset >>= 1) {
            dot += __shfl_xor_sync(0xffffffffu, dot, offset);
          }
          const int e = first_key + it * key_step + key_of_lane;
          if (part == 0 && e < n) logit_s[g * tile + e] = (usable >> it) & 1u ? dot : -INFINITY;
        }
      }
    }
    __syncthreads();

    // The logits, once, for the per-entry probabilities; and the online softmax, a warp per head.
    for (int i = threadIdx.x; i < group * n; i += blockDim.x) {
      const int g = i / n, e = i % n;
      logits[(c * group + g) * width + first + e] = logit_s[g * tile + e];
    }
    for (int g = warp; g < group; g += warps) {
      float top = -FLT_MAX;
      for (int e = lane; e < n; e += 32) top = fmaxf(top, logit_s[g * tile + e]);
      top = warp_max(top);
      const float m_old = m_s[g], m_new = fmaxf(m_old, top);
      float sum = 0.f;
      for (int e = lane; e < tile; e += 32) {
        const float p = e < n ? __expf(logit_s[g * tile + e] - m_new) : 0.f;
        p_s[g * tile + e] = p;
        sum += p;
      }
      sum = warp_total(sum);
      if (lane == 0) {
        const float alpha = __expf(m_old - m_new);
        alpha_s[g] = alpha;
        l_s[g] = l_s[g] * alpha + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();

    // P.V: each thread's (head, chunk) pairs, 16-byte words of the values.
#pragma unroll
    for (int k = 0; k < kDecodeMaxPairs; ++k) {
      const int pair = threadIdx.x + k * kDecodeThreads;
      if (pair < pairs) {
        const int g = pair / chunks, chunk = pair % chunks;
        const float alpha = alpha_s[g];
#pragma unroll
        for (int i = 0; i < vec; ++i) acc[k][i] *= alpha;
        const float* p = p_s + g * tile;
        const scalar_t* value = buf + d + chunk * vec;
        for (int e = 0; e < n; ++e) {
          float v[vec];
          word_floats<scalar_t>(*reinterpret_cast<const uint4*>(value + e * row_elems), v);
          const float pe = p[e];
#pragma unroll
          for (int i = 0; i < vec; ++i) acc[k][i] += pe * v[i];
        }
      }
    }
    __syncthreads();  // the next iteration stages into the buffer read two tiles ago, and
                      // rewrites logit_s / p_s
  }

#pragma unroll
  for (int k = 0; k < kDecodeMaxPairs; ++k) {
    const int pair = threadIdx.x + k * kDecodeThreads;
    if (pair < pairs) {
      const int g = pair / chunks, chunk = pair % chunks;
      float* o = part_o + (item * group + g) * d + chunk * vec;
#pragma unroll
      for (int i = 0; i < vec; ++i) o[i] = acc[k][i];
    }
  }
  __syncthreads();  // m_s / l_s of a split with no tile were set before the loop
  if (threadIdx.x < group) {
    const int64_t t = item * group + threadIdx.x;
    part_m[t] = m_s[threadIdx.x];
    part_s[t] = l_s[threadIdx.x];
  }
}

// The items' merge and the per-entry probabilities in one kernel. grid: (caches, max(entry
// blocks, output blocks) of kThreads); dynamic shared memory: 3 floats per query head of the
// group. Every block merges its cache's items per head (a few dozen partials), so each entry's
// probability is the logit normalised by the head's log-sum-exp, summed over the group; block y
// also writes output elements [y * kThreads, (y + 1) * kThreads) of the cache's G x D outputs
// (one per thread: the split loop per output is the long pole, so it is spread over blocks).
template <typename scalar_t>
__global__ void decode_merge_scores_kernel(const float* __restrict__ part_m,
                                           const float* __restrict__ part_s,
                                           const float* __restrict__ part_o,
                                           const float* __restrict__ logits,
                                           const int32_t* __restrict__ lengths,
                                           DecodeWork work, scalar_t* __restrict__ out,
                                           float* __restrict__ lse, float* __restrict__ scores,
                                           int64_t hq, int64_t hkv, int d, int64_t width,
                                           unsigned int* err) {
  extern __shared__ float merged[];
  const int group = static_cast<int>(hq / hkv);
  float* m_s = merged;              // the head's largest partial max
  float* total_s = m_s + group;     // its sum of exp, relative to m_s
  float* lse_s = total_s + group;   // -inf for a head with no usable entry
  const int64_t c = blockIdx.x, seq = c / hkv, head0 = (c % hkv) * group;
  int64_t lo, hi;
  work.items_of(c, &lo, &hi);
  // A cache with no item (a malformed work list) gets zero outputs and no probability.
  if (lo == hi && blockIdx.y == 0 && threadIdx.x == 0) report_index_error(err, kKvWork);
  for (int g = threadIdx.x; g < group; g += blockDim.x) {
    float m = -FLT_MAX;
    for (int64_t i = lo; i < hi; ++i) {
      if (part_s[i * group + g] > 0.f) m = fmaxf(m, part_m[i * group + g]);
    }
    float total = 0.f;
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = i * group + g;
      if (part_s[t] > 0.f) total += __expf(part_m[t] - m) * part_s[t];
    }
    m_s[g] = m;
    total_s[g] = total;
    lse_s[g] = total > 0.f ? m + logf(total) : -INFINITY;
  }
  __syncthreads();
  {
    const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
    if (i < static_cast<int64_t>(group) * d) {
      const int g = static_cast<int>(i / d), dim = static_cast<int>(i % d);
      float acc = 0.f;
      for (int64_t it = lo; it < hi; ++it) {
        const int64_t t = it * group + g;
        if (part_s[t] > 0.f) acc += __expf(part_m[t] - m_s[g]) * part_o[t * d + dim];
      }
      const float total = total_s[g];
      out[(seq * hq + head0 + g) * d + dim] = static_cast<scalar_t>(total > 0.f ? acc / total : 0.f);
    }
    if (blockIdx.y == 0) {
      for (int g = threadIdx.x; g < group; g += blockDim.x) lse[seq * hq + head0 + g] = lse_s[g];
    }
  }
  const int64_t e = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (e >= width) return;
  float acc = 0.f;
  if (e < guarded_length(lengths, c, width, nullptr)) {
    for (int g = 0; g < group; ++g) {
      const float l = lse_s[g];
      // A head with no usable entry (lse -inf) gives no probability, not exp(-inf + inf).
      if (l != -INFINITY) acc += __expf(logits[(c * group + g) * width + e] - l);
    }
  }
  scores[c * width + e] = acc;
}

// The decode launches of kv_ragged_decode and kv_decode_step (arguments checked by the caller;
// lens int32, contiguous).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ragged_decode_launch(
    const char* op, const at::Tensor& q, const at::Tensor& kv_rows, const at::Tensor& page_table,
    const at::Tensor& lens, int64_t page_rows, double scale, int64_t num_splits,
    const std::optional<at::Tensor>& work) {
  at::Tensor qc = q.contiguous(), table = page_table.contiguous();
  const at::Tensor list = work.has_value() ? work->contiguous() : at::Tensor();
  const int64_t batch = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t caches = page_table.size(0), hkv = caches / batch, group = hq / hkv;
  const int64_t pages = page_table.size(1), width = pages * page_rows;
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty_like(qc);
  at::Tensor lse = at::empty({batch, hq}, f32);
  at::Tensor scores = at::empty({caches, width}, f32);
  if (caches == 0 || hq == 0) {  // nothing to attend (a zero-size grid would not launch)
    out.zero_();
    lse.fill_(-INFINITY);
    scores.zero_();
    return {out, lse, scores};
  }
  constexpr int64_t most_items = std::numeric_limits<int32_t>::max();  // gridDim.x
  TORCH_CHECK_VALUE(list.defined() || num_splits <= most_items / caches, op, ": ", caches,
                    " caches x ", num_splits, " splits are too many work items for one CUDA "
                    "launch");
  const int64_t items = list.defined() ? list.size(0) : caches * num_splits;
  TORCH_CHECK_VALUE(items <= most_items, op, ": ", items, " work items are too many for one "
                    "CUDA launch");
  TORCH_CHECK_VALUE(group <= 4096, op, ": at most 4096 query heads per KV head on CUDA, got ",
                    group);
  const int64_t entry_blocks = std::max<int64_t>(1, (width + kThreads - 1) / kThreads);
  const int64_t output_blocks = (group * d + kThreads - 1) / kThreads;
  TORCH_CHECK_VALUE(entry_blocks <= 65535 && output_blocks <= 65535, op, ": a page table of ",
                    width, " entries or a group of ", group, " heads x ", d, " dims is too large "
                    "for one CUDA launch");
  const DecodeWork plan_items{list.defined() ? list.const_data_ptr<int32_t>() : nullptr, items,
                              num_splits, caches};
  at::Tensor logits = at::empty({caches * group, std::max<int64_t>(width, 1)}, f32);
  at::Tensor part_m = at::empty({items * group}, f32);
  at::Tensor part_s = at::empty({items * group}, f32);
  at::Tensor part_o = at::empty({items * group, d}, f32);
  auto stream = at::cuda::getCurrentCUDAStream();
  unsigned int* err = device_error_word(q);
  // The logits already carry the scale (folded into q), so the scores kernel needs none.
  const DecodeLaunch plan = plan_decode(group, d, q.element_size());
  const bool grouped = plan.grouped && (reinterpret_cast<uintptr_t>(kv_rows.data_ptr()) & 15) == 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kv_ragged_decode", [&] {
    if constexpr (sizeof(scalar_t) <= 4) {
      if (grouped) {
        decode_gqa_kernel<scalar_t>
            <<<static_cast<unsigned>(items), kDecodeThreads, plan.shared_bytes, stream>>>(
                qc.const_data_ptr<scalar_t>(), kv_rows.const_data_ptr<scalar_t>(),
                table.const_data_ptr<int32_t>(), lens.const_data_ptr<int32_t>(), plan_items,
                logits.data_ptr<float>(), part_m.data_ptr<float>(), part_s.data_ptr<float>(),
                part_o.data_ptr<float>(), hq, hkv, pages, page_rows, kv_rows.size(0) / page_rows,
                std::max<int64_t>(width, 1), static_cast<int>(d), static_cast<int>(plan.tile),
                static_cast<int>(plan.key_lanes), static_cast<float>(scale), err);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (!grouped) {
      decode_split_kernel<scalar_t>
          <<<dim3(static_cast<unsigned>(items), static_cast<unsigned>(group)), kThreads,
             d * sizeof(float), stream>>>(
              qc.const_data_ptr<scalar_t>(), kv_rows.const_data_ptr<scalar_t>(),
              table.const_data_ptr<int32_t>(), lens.const_data_ptr<int32_t>(), plan_items,
              logits.data_ptr<float>(), part_m.data_ptr<float>(), part_s.data_ptr<float>(),
              part_o.data_ptr<float>(), hq, hkv, pages, page_rows, kv_rows.size(0) / page_rows,
              std::max<int64_t>(width, 1), static_cast<int>(d), static_cast<float>(scale), err);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    decode_merge_scores_kernel<scalar_t>
        <<<dim3(static_cast<unsigned>(caches),
                static_cast<unsigned>(std::max(entry_blocks, output_blocks))),
           kThreads, 3 * group * sizeof(float), stream>>>(
            part_m.data_ptr<float>(), part_s.data_ptr<float>(), part_o.data_ptr<float>(),
            logits.data_ptr<float>(), lens.const_data_ptr<int32_t>(), plan_items,
            out.data_ptr<scalar_t>(), lse.data_ptr<float>(), scores.data_ptr<float>(), hq, hkv,
            static_cast<int>(d), width, err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse, scores};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_ragged_decode_cuda(
    const at::Tensor& q, const at::Tensor& kv_rows, const at::Tensor& page_table,
    const at::Tensor& lengths, int64_t page_rows, double scale, int64_t num_splits,
    const std::optional<at::Tensor>& work) {
  check_decode_args(q, kv_rows, page_table, lengths, page_rows, num_splits, work);
  const c10::cuda::CUDAGuard guard(q.device());
  return ragged_decode_launch("fastllm.kv_ragged_decode", q, kv_rows, page_table,
                              lengths.contiguous(), page_rows, scale, num_splits, work);
}

// Eviction round: one warp per cache. Lanes stride over the entries (adding the step's scores and
// counting the evictable ones), a shuffle reduction finds the lowest score (the first entry on
// ties, as the CPU loop does), and lane 0 moves the last entry's bookkeeping into the hole. A cache
// whose length lies outside [0, cap] is left alone (and reported); one with no victim (only
// possible with a negative heavy count, checked on the host in the debug mode) never evicts.
constexpr int kEvictWarps = 4;

// `appended` (kv_decode_step; null for kv_evict_round): the lengths after the step's append, 0
// for a cache the append left alone (no room: reported there), which then must not change.
__global__ void evict_round_kernel(int64_t* pos, float* score, uint8_t* flags, int64_t* lengths,
                                   const float* step_scores, int64_t step_width,
                                   const int64_t* newest, const int64_t* window,
                                   const int64_t* heavy, const bool* grow, int64_t* moves,
                                   int64_t caches, int64_t cap, const int32_t* appended,
                                   unsigned int* err) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kEvictWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= caches) return;  // whole warps leave together: c is uniform within a warp
  if (appended != nullptr && appended[c] == 0) return;  // uniform, like c
  const int64_t len = lengths[c];
  if (!length_in_range(len, cap)) {  // uniform within the warp, like c
    if (lane == 0) report_index_error(err, kKvEvictLengths);
    return;
  }
  int64_t* p = pos + c * cap;
  float* s = score + c * cap;
  uint8_t* f = flags + c * cap;
  const int64_t added = len < step_width ? len : step_width;
  int64_t count = 0, victim = -1;
  float best = 0.f;
  for (int64_t j = lane; j < len; j += 32) {
    float value = s[j];
    if (j < added) {
      value += step_scores[c * step_width + j];
      s[j] = value;
    }
    if (evictable(f[j], p[j], newest[c], window[c])) {
      ++count;
      if (victim < 0 || value < best) {
        best = value;
        victim = j;
      }
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    count += __shfl_down_sync(0xffffffffu, count, offset);
    const float other_best = __shfl_down_sync(0xffffffffu, best, offset);
    const int64_t other = __shfl_down_sync(0xffffffffu, victim, offset);
    if (other >= 0 && (victim < 0 || other_best < best || (other_best == best && other < victim))) {
      best = other_best;
      victim = other;
    }
  }
  __syncwarp();  // lane 0 reads scores other lanes just wrote
  if (lane != 0 || grow[c] || count <= heavy[c] || victim < 0) return;
  evict_entry(pos, score, flags, lengths, moves, c, cap, victim);
}

at::Tensor kv_evict_round_cuda(at::Tensor& pos, at::Tensor& score, at::Tensor& flags,
                               at::Tensor& lengths, const at::Tensor& step_scores,
                               const at::Tensor& newest, const at::Tensor& window,
                               const at::Tensor& heavy, const at::Tensor& grow) {
  check_evict_args(pos, score, flags, lengths, step_scores, newest, window, heavy, grow);
  const c10::cuda::CUDAGuard guard(pos.device());
  const int64_t caches = pos.size(0);
  at::Tensor moves = at::full({caches, 2}, -1, lengths.options());
  if (caches == 0) return moves;
  const auto blocks = static_cast<unsigned>((caches + kEvictWarps - 1) / kEvictWarps);
  evict_round_kernel<<<blocks, 32 * kEvictWarps, 0, at::cuda::getCurrentCUDAStream()>>>(
      pos.data_ptr<int64_t>(), score.data_ptr<float>(), flags.data_ptr<uint8_t>(),
      lengths.data_ptr<int64_t>(), step_scores.const_data_ptr<float>(), step_scores.size(1),
      newest.const_data_ptr<int64_t>(), window.const_data_ptr<int64_t>(),
      heavy.const_data_ptr<int64_t>(), grow.const_data_ptr<bool>(), moves.data_ptr<int64_t>(),
      caches, pos.size(1), nullptr, device_error_word(pos));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return moves;
}

// ---- kv_decode_step: the append and the row moves around the decode and eviction launches ----

// One pool row (a key|value entry) copied by a whole block: 16-byte words when both rows and the
// row length allow it (the usual case: head_dim a multiple of 4 halves), else bytes.
__device__ void copy_pool_row(char* dst, const char* src, int64_t row_bytes) {
  const bool words = ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                       static_cast<uintptr_t>(row_bytes)) & 15) == 0;
  if (words) {
    for (int64_t i = threadIdx.x; i < row_bytes / 16; i += blockDim.x) {
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
    }
  } else {
    for (int64_t i = threadIdx.x; i < row_bytes; i += blockDim.x) dst[i] = src[i];
  }
}

// One block per cache: its new entry's row into the pool and its bookkeeping (kv_math.h,
// new_entry_index / new_entry_flags), and the int32 lengths the decode kernels read. A cache
// with no room for the entry (or a bad page id) is left alone, attends as empty and is reported.
__global__ void decode_step_append_kernel(
    const char* __restrict__ new_rows, const int64_t* __restrict__ new_pos,
    const uint8_t* __restrict__ new_class, char* kv_rows, const int32_t* __restrict__ table,
    int64_t* lengths, int64_t* pos, float* score, uint8_t* flags,
    const uint8_t* __restrict__ keep_classes, const int64_t* __restrict__ sinks,
    const int64_t* __restrict__ capacity, int32_t* lens32, int64_t pages, int64_t page_rows,
    int64_t pool_pages, int64_t cap, int64_t row_bytes, unsigned int* err) {
  const int64_t c = blockIdx.x;
  const int64_t len = lengths[c];
  const int64_t limit = capacity != nullptr ? capacity[c] : -1;
  __syncthreads();  // every thread has read the length before thread 0 writes the new one
  const int64_t e = new_entry_index(len, limit);
  const int64_t room = cap < pages * page_rows ? cap : pages * page_rows;
  // The host's rules (check_decode_step_args): lengths < room, or with a capacity, lengths <=
  // room and capacity in [1, room].
  const bool fits = capacity == nullptr ? len >= 0 && len < room
                                        : len >= 0 && len <= room && limit >= 1 && limit <= room;
  const int64_t page = fits ? table[c * pages + e / page_rows] : -1;
  if (!fits || !page_in_range(page, pool_pages)) {
    if (threadIdx.x == 0) {
      report_index_error(err, fits ? kKvPageTable : kKvStepRoom);
      lens32[c] = 0;
    }
    return;  // uniform: c is the block's
  }
  copy_pool_row(kv_rows + (page * page_rows + e % page_rows) * row_bytes,
                new_rows + c * row_bytes, row_bytes);
  if (threadIdx.x != 0) return;
  pos[c * cap + e] = new_pos[c];
  flags[c * cap + e] = new_entry_flags(new_class[c], keep_classes[c], new_pos[c], sinks[c]);
  score[c * cap + e] = 0.f;
  lengths[c] = e + 1;
  lens32[c] = static_cast<int32_t>(e + 1);
}

// One block per cache that evicted: the pool row of its last entry into the victim's slot.
__global__ void decode_step_move_kernel(const int64_t* __restrict__ moves, char* kv_rows,
                                        const int32_t* __restrict__ table, int64_t pages,
                                        int64_t page_rows, int64_t pool_pages, int64_t row_bytes,
                                        unsigned int* err) {
  const int64_t c = blockIdx.x;
  const int64_t victim = moves[2 * c], last = moves[2 * c + 1];
  if (victim < 0 || victim == last) return;
  if (last >= pages * page_rows) {  // only from a length past the table: reported, never read
    if (threadIdx.x == 0) report_index_error(err, kKvPageTable);
    return;
  }
  const int64_t to = table[c * pages + victim / page_rows];
  const int64_t from = table[c * pages + last / page_rows];
  if (!page_in_range(to, pool_pages) || !page_in_range(from, pool_pages)) {
    if (threadIdx.x == 0) report_index_error(err, kKvPageTable);
    return;
  }
  copy_pool_row(kv_rows + (to * page_rows + victim % page_rows) * row_bytes,
                kv_rows + (from * page_rows + last % page_rows) * row_bytes, row_bytes);
}

std::tuple<at::Tensor, at::Tensor> kv_decode_step_cuda(
    const at::Tensor& q, const at::Tensor& new_rows, const at::Tensor& new_pos,
    const at::Tensor& new_class, at::Tensor& kv_rows, const at::Tensor& page_table,
    at::Tensor& lengths, at::Tensor& pos, at::Tensor& score, at::Tensor& flags,
    const at::Tensor& keep_classes, const at::Tensor& sinks, const at::Tensor& window,
    const at::Tensor& heavy, const at::Tensor& grow, int64_t page_rows, double scale,
    int64_t num_splits, const std::optional<at::Tensor>& work,
    const std::optional<at::Tensor>& capacity) {
  constexpr const char* op = "fastllm.kv_decode_step";
  check_decode_step_args(q, new_rows, new_pos, new_class, kv_rows, page_table, lengths, pos, score,
                         flags, keep_classes, sinks, window, heavy, grow, page_rows, num_splits,
                         work, capacity);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t caches = pos.size(0), cap = pos.size(1);
  at::Tensor moves = at::full({caches, 2}, -1, lengths.options());
  if (caches == 0) return {at::zeros_like(q), moves};
  TORCH_CHECK_VALUE(caches <= std::numeric_limits<int32_t>::max(), op, ": ", caches,
                    " caches are too many for one CUDA launch");
  const at::Tensor rows_in = new_rows.contiguous(), table = page_table.contiguous();
  const at::Tensor classes = new_class.contiguous(), keep = keep_classes.contiguous();
  const at::Tensor sink_counts = sinks.contiguous();
  const at::Tensor room = capacity.has_value() ? capacity->contiguous() : at::Tensor();
  const int64_t pages = table.size(1), pool_pages = kv_rows.size(0) / page_rows;
  const int64_t row_bytes = kv_rows.size(1) * kv_rows.element_size();
  at::Tensor lens32 = at::empty({caches}, lengths.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  unsigned int* err = device_error_word(q);
  const auto grid = static_cast<unsigned>(caches);
  decode_step_append_kernel<<<grid, kThreads, 0, stream>>>(
      static_cast<const char*>(rows_in.const_data_ptr()), new_pos.const_data_ptr<int64_t>(),
      classes.const_data_ptr<uint8_t>(), static_cast<char*>(kv_rows.data_ptr()),
      table.const_data_ptr<int32_t>(), lengths.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
      score.data_ptr<float>(), flags.data_ptr<uint8_t>(), keep.const_data_ptr<uint8_t>(),
      sink_counts.const_data_ptr<int64_t>(), room.defined() ? room.const_data_ptr<int64_t>() : nullptr,
      lens32.data_ptr<int32_t>(), pages, page_rows, pool_pages, cap, row_bytes, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto [out, lse, step_scores] = ragged_decode_launch(op, q, kv_rows, table, lens32, page_rows,
                                                      scale, num_splits, work);
  const auto evict_blocks = static_cast<unsigned>((caches + kEvictWarps - 1) / kEvictWarps);
  evict_round_kernel<<<evict_blocks, 32 * kEvictWarps, 0, stream>>>(
      pos.data_ptr<int64_t>(), score.data_ptr<float>(), flags.data_ptr<uint8_t>(),
      lengths.data_ptr<int64_t>(), step_scores.const_data_ptr<float>(), step_scores.size(1),
      new_pos.const_data_ptr<int64_t>(), window.const_data_ptr<int64_t>(),
      heavy.const_data_ptr<int64_t>(), grow.const_data_ptr<bool>(), moves.data_ptr<int64_t>(),
      caches, cap, lens32.const_data_ptr<int32_t>(), err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  decode_step_move_kernel<<<grid, kThreads, 0, stream>>>(
      moves.const_data_ptr<int64_t>(), static_cast<char*>(kv_rows.data_ptr()),
      table.const_data_ptr<int32_t>(), pages, page_rows, pool_pages, row_bytes, err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, moves};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("kv_attention_scores", &kv_attention_scores_cuda);
  m.impl("kv_policy_recovery", &kv_policy_recovery_cuda);
  m.impl("kv_ragged_decode", &kv_ragged_decode_cuda);
  m.impl("kv_evict_round", &kv_evict_round_cuda);
  m.impl("kv_decode_step", &kv_decode_step_cuda);
}

}  // namespace fastllm::kv
