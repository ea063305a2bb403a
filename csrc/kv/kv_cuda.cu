// CUDA kernels for FastGen profiling and ragged decode attention.
//
// Profiling: one block per (query head, query row). The block finds the row's max and sum with
// an online softmax over its keys, then recomputes each logit (cheaper than holding a row of
// arbitrary length) and adds the probability into the key's score or the policy's mass. No
// attention map is ever stored, so the `chunk` argument (the CPU's working-set bound) is unused.
//
// Decode: grid (cache x group head, split). A split writes its logits to a workspace, then its
// threads (one per head_dim element) sum exp(logit - max) * value; a second kernel merges splits
// and a third turns logits into per-entry probabilities summed over the group.
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

#include <cfloat>

#include "common/index_guard.cuh"
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

__device__ float block_sum(float v) {
  __shared__ float buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
    __syncthreads();
  }
  const float out = buf[0];
  __syncthreads();
  return out;
}

template <typename scalar_t>
__device__ float dot_row(const float* q_shared, const scalar_t* key, int d) {
  float acc = 0.f;
  for (int i = 0; i < d; ++i) acc += q_shared[i] * static_cast<float>(key[i]);
  return acc;
}

// mode 0: scores[g, j] += p. mode 1: mass[h, policy] += p (policy from key_class and window).
template <typename scalar_t, int mode>
__global__ void profile_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                               const uint8_t* __restrict__ key_class, float* __restrict__ out,
                               int64_t hq, int64_t lq, int64_t hkv, int64_t lk, int d,
                               int64_t window, float scale) {
  extern __shared__ float q_shared[];
  const int64_t h = blockIdx.x / lq, r = blockIdx.x % lq;
  const int64_t g = h / (hq / hkv);
  const int64_t qpos = lk - lq + r;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    q_shared[i] = static_cast<float>(q[(h * lq + r) * d + i]) * scale;
  }
  __syncthreads();
  const scalar_t* keys = k + g * lk * d;
  float m = -FLT_MAX, s = 0.f;
  for (int64_t j = threadIdx.x; j <= qpos; j += blockDim.x) {
    const float x = dot_row(q_shared, keys + j * d, d);
    const float mm = fmaxf(m, x);
    s = s * __expf(m - mm) + __expf(x - mm);
    m = mm;
  }
  block_softmax_stats(m, s);
  const float inv = 1.f / s;
  float part[5] = {0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t j = threadIdx.x; j <= qpos; j += blockDim.x) {
    const float p = __expf(dot_row(q_shared, keys + j * d, d) - m) * inv;
    if constexpr (mode == 0) {
      atomicAdd(out + g * lk + j, p);
    } else {
      part[first_policy_keeping(key_class[g * lk + j], qpos, j, window)] += p;
    }
  }
  if constexpr (mode == 1) {
    for (int p = 0; p < 4; ++p) {
      const float total = block_sum(part[p]);
      if (threadIdx.x == 0) atomicAdd(out + h * 4 + p, total);
    }
  }
}

template <int mode>
at::Tensor launch_profile(const at::Tensor& q, const at::Tensor& k, const at::Tensor* key_class,
                          int64_t window, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t hq = q.size(0), lq = q.size(1), hkv = k.size(0), lk = k.size(1), d = q.size(2);
  at::Tensor qc = q.contiguous(), kc = k.contiguous();
  at::Tensor out = mode == 0 ? at::zeros({hkv, lk}, q.options().dtype(at::kFloat))
                             : at::zeros({hq, 4}, q.options().dtype(at::kFloat));
  at::Tensor cls = key_class ? key_class->contiguous() : at::Tensor();
  if (hq * lq > 0 && d > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kv_profile", [&] {
      profile_kernel<scalar_t, mode>
          <<<static_cast<unsigned>(hq * lq), kThreads, d * sizeof(float),
             at::cuda::getCurrentCUDAStream()>>>(
              qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(),
              key_class ? cls.const_data_ptr<uint8_t>() : nullptr, out.data_ptr<float>(), hq, lq,
              hkv, lk, static_cast<int>(d), window, static_cast<float>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (mode == 0) return out;
  const int64_t group = hq / hkv;
  return out.view({hkv, group, 4}).sum(1).cumsum(1).div_(static_cast<double>(std::max<int64_t>(lq, 1) * group));
}

at::Tensor kv_attention_scores_cuda(const at::Tensor& q, const at::Tensor& k, double scale,
                                    int64_t chunk) {
  check_profile_args("fastllm.kv_attention_scores", q, k, chunk);
  return launch_profile<0>(q, k, nullptr, 0, scale);
}

at::Tensor kv_policy_recovery_cuda(const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& key_class, int64_t window, double scale,
                                   int64_t chunk) {
  constexpr const char* op = "fastllm.kv_policy_recovery";
  check_profile_args(op, q, k, chunk);
  check_key_class(op, k, key_class, window);
  return launch_profile<1>(q, k, &key_class, window, scale);
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

template <typename scalar_t>
__global__ void decode_split_kernel(const scalar_t* __restrict__ q,
                                    const scalar_t* __restrict__ rows,
                                    const int32_t* __restrict__ table,
                                    const int32_t* __restrict__ lengths, float* __restrict__ logits,
                                    float* __restrict__ part_m, float* __restrict__ part_s,
                                    float* __restrict__ part_o, int64_t hq, int64_t hkv,
                                    int64_t pages, int64_t page_rows, int64_t pool_pages,
                                    int64_t width, int d, int64_t splits, float scale,
                                    unsigned int* err) {
  extern __shared__ float q_shared[];
  const int64_t group = hq / hkv;
  const int64_t cg = blockIdx.x, s = blockIdx.y;
  const int64_t c = cg / group, g = cg % group;
  const int64_t seq = c / hkv, head = (c % hkv) * group + g;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    q_shared[i] = static_cast<float>(q[(seq * hq + head) * d + i]) * scale;
  }
  __syncthreads();
  int64_t begin, end;
  // Only split 0 reports a bad length: one report per cache is enough.
  split_range(guarded_length(lengths, c, pages * page_rows, s == 0 && g == 0 ? err : nullptr),
              splits, s, &begin, &end);
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
  const int64_t t = cg * splits + s;
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

template <typename scalar_t>
__global__ void decode_merge_kernel(const float* __restrict__ part_m,
                                    const float* __restrict__ part_s,
                                    const float* __restrict__ part_o, scalar_t* __restrict__ out,
                                    float* __restrict__ lse, int64_t hq, int64_t hkv, int d,
                                    int64_t splits) {
  const int64_t group = hq / hkv;
  const int64_t cg = blockIdx.x, c = cg / group, g = cg % group;
  const int64_t seq = c / hkv, head = (c % hkv) * group + g;
  float m = -FLT_MAX;
  for (int64_t s = 0; s < splits; ++s) {
    if (part_s[cg * splits + s] > 0.f) m = fmaxf(m, part_m[cg * splits + s]);
  }
  float total = 0.f;
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t t = cg * splits + s;
    if (part_s[t] > 0.f) total += __expf(part_m[t] - m) * part_s[t];
  }
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float acc = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t t = cg * splits + s;
      if (part_s[t] > 0.f) acc += __expf(part_m[t] - m) * part_o[t * d + i];
    }
    out[(seq * hq + head) * d + i] = static_cast<scalar_t>(total > 0.f ? acc / total : 0.f);
  }
  if (threadIdx.x == 0) lse[seq * hq + head] = total > 0.f ? m + logf(total) : -INFINITY;
}

__global__ void decode_scores_kernel(const float* __restrict__ logits,
                                     const float* __restrict__ lse,
                                     const int32_t* __restrict__ lengths,
                                     float* __restrict__ scores, int64_t hq, int64_t hkv,
                                     int64_t width) {
  const int64_t group = hq / hkv;
  const int64_t c = blockIdx.y;
  const int64_t seq = c / hkv;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= width) return;
  float acc = 0.f;
  if (e < guarded_length(lengths, c, width, nullptr)) {
    for (int64_t g = 0; g < group; ++g) {
      const int64_t head = (c % hkv) * group + g;
      const float l = lse[seq * hq + head];
      // A head with no usable entry (lse -inf) gives no probability, not exp(-inf + inf).
      if (l != -INFINITY) acc += __expf(logits[(c * group + g) * width + e] - l);
    }
  }
  scores[c * width + e] = acc;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_ragged_decode_cuda(
    const at::Tensor& q, const at::Tensor& kv_rows, const at::Tensor& page_table,
    const at::Tensor& lengths, int64_t page_rows, double scale, int64_t num_splits) {
  check_decode_args(q, kv_rows, page_table, lengths, page_rows, num_splits);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor qc = q.contiguous(), table = page_table.contiguous(), lens = lengths.contiguous();
  const int64_t batch = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t caches = page_table.size(0), hkv = caches / batch, group = hq / hkv;
  const int64_t pages = page_table.size(1), width = pages * page_rows;
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty_like(qc);
  at::Tensor lse = at::empty({batch, hq}, f32);
  at::Tensor scores = at::empty({caches, width}, f32);
  if (caches == 0 || d == 0) {
    out.zero_();
    lse.fill_(-INFINITY);
    scores.zero_();
    return {out, lse, scores};
  }
  at::Tensor logits = at::empty({caches * group, std::max<int64_t>(width, 1)}, f32);
  at::Tensor part_m = at::empty({caches * group * num_splits}, f32);
  at::Tensor part_s = at::empty({caches * group * num_splits}, f32);
  at::Tensor part_o = at::empty({caches * group * num_splits, d}, f32);
  auto stream = at::cuda::getCurrentCUDAStream();
  unsigned int* err = device_error_word(q);
  // The logits already carry the scale (folded into q), so the scores kernel needs none.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kv_ragged_decode", [&] {
    decode_split_kernel<scalar_t>
        <<<dim3(static_cast<unsigned>(caches * group), static_cast<unsigned>(num_splits)), kThreads,
           d * sizeof(float), stream>>>(
            qc.const_data_ptr<scalar_t>(), kv_rows.const_data_ptr<scalar_t>(),
            table.const_data_ptr<int32_t>(), lens.const_data_ptr<int32_t>(), logits.data_ptr<float>(),
            part_m.data_ptr<float>(), part_s.data_ptr<float>(), part_o.data_ptr<float>(), hq, hkv,
            pages, page_rows, kv_rows.size(0) / page_rows, std::max<int64_t>(width, 1),
            static_cast<int>(d), num_splits, static_cast<float>(scale), err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    decode_merge_kernel<scalar_t><<<static_cast<unsigned>(caches * group), kThreads, 0, stream>>>(
        part_m.data_ptr<float>(), part_s.data_ptr<float>(), part_o.data_ptr<float>(),
        out.data_ptr<scalar_t>(), lse.data_ptr<float>(), hq, hkv, static_cast<int>(d), num_splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (width > 0) {
    decode_scores_kernel<<<dim3(static_cast<unsigned>((width + kThreads - 1) / kThreads),
                                static_cast<unsigned>(caches)),
                           kThreads, 0, stream>>>(logits.data_ptr<float>(), lse.data_ptr<float>(),
                                                  lens.const_data_ptr<int32_t>(),
                                                  scores.data_ptr<float>(), hq, hkv, width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, lse, scores};
}

// Eviction round: one warp per cache. Lanes stride over the entries (adding the step's scores and
// counting the evictable ones), a shuffle reduction finds the lowest score (the first entry on
// ties, as the CPU loop does), and lane 0 moves the last entry's bookkeeping into the hole. A cache
// whose length lies outside [0, cap] is left alone (and reported); one with no victim (only
// possible with a negative heavy count, checked on the host in the debug mode) never evicts.
constexpr int kEvictWarps = 4;

__global__ void evict_round_kernel(int64_t* pos, float* score, uint8_t* flags, int64_t* lengths,
                                   const float* step_scores, int64_t step_width,
                                   const int64_t* newest, const int64_t* window,
                                   const int64_t* heavy, const bool* grow, int64_t* moves,
                                   int64_t caches, int64_t cap, unsigned int* err) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kEvictWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= caches) return;  // whole warps leave together: c is uniform within a warp
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
      caches, pos.size(1), device_error_word(pos));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return moves;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("kv_attention_scores", &kv_attention_scores_cuda);
  m.impl("kv_policy_recovery", &kv_policy_recovery_cuda);
  m.impl("kv_ragged_decode", &kv_ragged_decode_cuda);
  m.impl("kv_evict_round", &kv_evict_round_cuda);
}

}  // namespace fastllm::kv
