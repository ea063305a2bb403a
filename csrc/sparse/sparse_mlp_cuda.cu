// CUDA sparse MLP, two kernels:
//   hidden_kernel: passes over the batch (up to kRows rows of a shared set, or one row of
//     per-row sets, plan_sparse_hidden); each pass stages its rows of x in shared memory as fp32
//     (sparse_mlp.h: staged_x_slot) and spreads its set's positions over every warp of the grid,
//     one warp per active neuron; lanes stride the neuron's contiguous up/gate row in 16-byte
//     words (8 fp16 / bf16, 4 fp32), kHiddenWordsPerStep words of each row loaded before any is
//     used, so each weight row is one coalesced read, reused for the pass's rows; fp32 h[b, j]
//     goes to scratch. It also zeroes the down kernel's accumulator and tile counters, which
//     saves the memset launch a decode step would otherwise pay.
//   down_vec_kernel: a block owns 256 x vec output columns x one slice of the active neurons
//     (sparse_mlp.h, plan_sparse_down); each thread walks its slice and reads one 16-byte word of
//     w_down_t[idx_j] per neuron, skipping neurons whose h is 0 in every row it serves (ReLU).
//     down_kernel is the scalar form, for rows that are not whole aligned words. Default: the
//     slices atomicAdd into an fp32 accumulator. Deterministic: each slice writes its own partial
//     row. Either way the last block of a column tile to finish (a counter per tile, split-K
//     style) adds the bias, sums the partial rows in slice order where there are several, and
//     writes the output in its dtype: no separate finishing kernel.
// No host synchronisation: index values are not read on the host (outside the debug mode); both
// kernels guard them (sparse_mlp.h: guarded_count, neuron_in_range) and the hidden kernel reports
// bad ones to the device error word (kSparseCounts, kSparseActiveIdx). A neuron index out of range
// contributes nothing. With k == 0 no kernel runs (the output is the bias), so nothing can be
// reported for counts.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "common/dependent_launch.cuh"
#include "common/index_guard.cuh"
#include "common/occupancy.cuh"
#include "common/vec_words.cuh"
#include "sparse/sparse_mlp.h"

namespace fastllm::sparse {
namespace {

constexpr const char* kOp = "fastllm.sparse_mlp";
constexpr int kThreads = kSparseThreads;
constexpr int kWarpsPerBlock = kThreads / 32;

template <typename T>
__device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The usable length of `set` (k without counts); *bad when its count was outside [0, k].
template <typename index_t>
__device__ __forceinline__ int64_t set_count(const index_t* counts, int64_t set, int64_t k,
                                             bool* bad) {
  *bad = false;
  return counts == nullptr ? k : guarded_count(static_cast<int64_t>(counts[set]), k, bad);
}

// Words of each weight row a lane loads before using any (with a gate, twice as many loads are in
// flight: 8 per lane).
constexpr int kHiddenWordsPerStep = 4;

// Stages rows [b0, b0 + nb) of x as fp32 into the block's shared memory (sparse_mlp.h:
// staged_x_slot). Scalar loads: x is read once per block and pass, the weights once per neuron.
template <typename scalar_t>
__device__ __forceinline__ void stage_rows(float4* staged, const scalar_t* __restrict__ x,
                                           int64_t b0, int nb, int64_t d, int slots) {
  for (int s = threadIdx.x; s < nb * slots; s += blockDim.x) {
    const int r = s / slots, f = s - r * slots;
    const int64_t c = 4 * static_cast<int64_t>(f);
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (c + 3 < d) {
      const scalar_t* p = x + (b0 + r) * d + c;
      v = make_float4(to_f(p[0]), to_f(p[1]), to_f(p[2]), to_f(p[3]));
    } else if (c < d) {  // the last columns of a row whose length is not a multiple of 4
      float e[4] = {0.f, 0.f, 0.f, 0.f};
      for (int i = 0; c + i < d; ++i) e[i] = to_f(x[(b0 + r) * d + c + i]);
      v = make_float4(e[0], e[1], e[2], e[3]);
    }
    staged[r * slots + staged_x_slot(f)] = v;
  }
}

// kRows: the most batch rows one read of a weight row serves (sparse_rows_per_pass).
template <typename scalar_t, typename index_t, int kRows>
__global__ void __launch_bounds__(kThreads)
    hidden_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w_up,
                  const scalar_t* __restrict__ w_gate, const scalar_t* __restrict__ b_up,
                  const scalar_t* __restrict__ b_gate, const index_t* __restrict__ idx,
                  const index_t* __restrict__ counts, float* __restrict__ h, int64_t rows,
                  int64_t d, int64_t k, int64_t neurons, bool per_row, Activation act,
                  bool vector, int rows_per_pass, int64_t row_floats,
                  unsigned int* __restrict__ error_word, float* __restrict__ zero_acc,
                  int64_t zero_acc_count, unsigned int* __restrict__ zero_arrivals,
                  int64_t zero_arrivals_count) {
  extern __shared__ float4 staged[];  // rows_per_pass rows of row_floats / 4 slots
  // The down kernel may be scheduled now: it waits for this grid before reading h or the
  // workspace zeroed below (common/dependent_launch.cuh).
  allow_dependent_launch();
  {
    // The down kernel's workspace; it runs after this kernel in stream order.
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    for (int64_t e = t; e < zero_acc_count; e += stride) zero_acc[e] = 0.f;
    for (int64_t e = t; e < zero_arrivals_count; e += stride) zero_arrivals[e] = 0u;
  }
  const float* staged_f = reinterpret_cast<const float*>(staged);
  const int lane = threadIdx.x & 31;
  const int slots = static_cast<int>(row_floats / 4);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // A pass: rows_per_pass rows of a shared set, or one row (and its own set) of per-row sets.
  for (int64_t b0 = 0; b0 < rows; b0 += rows_per_pass) {
    const int nb = static_cast<int>(min64(rows_per_pass, rows - b0));
    __syncthreads();  // every warp is done with the previous pass's rows
    stage_rows(staged, x, b0, nb, d, slots);
    __syncthreads();
    const int64_t set = per_row ? b0 : 0;
    bool bad_count;
    const int64_t count = set_count(counts, set, k, &bad_count);
    if (bad_count && first == 0 && lane == 0) report_index_error(error_word, kSparseCounts);
    for (int64_t j = first; j < count; j += warp_stride) {  // padding past the count: never read
      const int64_t neuron = static_cast<int64_t>(idx[set * k + j]);
      if (!neuron_in_range(neuron, neurons)) {
        // Never dereferenced: h is 0 for the pass's rows, so the neuron contributes nothing.
        if (lane == 0) report_index_error(error_word, kSparseActiveIdx);
        for (int r = lane; r < nb; r += 32) h[(b0 + r) * k + j] = 0.f;
        continue;
      }
      const scalar_t* up_row = w_up + neuron * d;
      const scalar_t* gate_row = w_gate != nullptr ? w_gate + neuron * d : nullptr;
      float up[kRows], gate[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) up[r] = gate[r] = 0.f;
      if (vector) {  // the rows are whole aligned 16-byte words (host check)
        constexpr int vec = kWordElems<scalar_t>;
        constexpr int quads = vec / 4;  // float4s of staged x per word
        const int words = static_cast<int>(d / vec);
        for (int w0 = lane; w0 < words; w0 += 32 * kHiddenWordsPerStep) {
          uint4 wu[kHiddenWordsPerStep], wg[kHiddenWordsPerStep];
          // Every load of the step before any use: up to 8 16-byte loads in flight per lane.
#pragma unroll
          for (int u = 0; u < kHiddenWordsPerStep; ++u) {
            const int w = w0 + 32 * u;
            wu[u] = w < words ? load_word(up_row + static_cast<int64_t>(w) * vec)
                              : make_uint4(0, 0, 0, 0);
            wg[u] = w < words && gate_row != nullptr
                        ? load_word(gate_row + static_cast<int64_t>(w) * vec)
                        : make_uint4(0, 0, 0, 0);
          }
#pragma unroll
          for (int u = 0; u < kHiddenWordsPerStep; ++u) {
            const int w = w0 + 32 * u;
            if (w >= words) break;
            float fu[vec], fg[vec];
            word_floats<scalar_t>(wu[u], fu);
            word_floats<scalar_t>(wg[u], fg);
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
              if (r >= nb) break;
#pragma unroll
              for (int q = 0; q < quads; ++q) {
                const float4 xv = staged[r * slots + staged_x_slot(w * quads + q)];
                up[r] += fu[4 * q] * xv.x + fu[4 * q + 1] * xv.y + fu[4 * q + 2] * xv.z +
                         fu[4 * q + 3] * xv.w;
                gate[r] += fg[4 * q] * xv.x + fg[4 * q + 1] * xv.y + fg[4 * q + 2] * xv.z +
                           fg[4 * q + 3] * xv.w;
              }
            }
          }
        }
      }
      for (int64_t i = lane; i < d && !vector; i += 32) {
        const float wu = to_f(up_row[i]);
        const float wg = gate_row != nullptr ? to_f(gate_row[i]) : 0.f;
        const int at = 4 * staged_x_slot(static_cast<int>(i >> 2)) + static_cast<int>(i & 3);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r < nb) {
            const float xv = staged_f[r * static_cast<int>(row_floats) + at];
            up[r] += wu * xv;
            gate[r] += wg * xv;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r >= nb) break;
        const float u = warp_sum(up[r]);
        const float g = warp_sum(gate[r]);
        if (lane == 0) {
          const float ub = b_up != nullptr ? to_f(b_up[neuron]) : 0.f;
          const float gb = b_gate != nullptr ? to_f(b_gate[neuron]) : 0.f;
          h[(b0 + r) * k + j] = hidden_value(act, gate_row != nullptr, u + ub, g + gb);
        }
      }
    }
  }
}

// What a down-projection block serves (grid y = neuron slices, z = row groups): its batch rows
// (kRows for a shared set, one for per-row sets), their set, and its slice of the set's actual
// count (read on the device; a bad count is reported by hidden_kernel).
template <typename index_t, int kRows>
struct DownBlock {
  int64_t b_first, j_begin, j_end;
  int nb;
  const index_t* set;

  __device__ DownBlock(const index_t* idx, const index_t* counts, int64_t rows, int64_t k,
                       bool per_row) {
    b_first = per_row ? blockIdx.z : static_cast<int64_t>(blockIdx.z) * kRows;
    nb = per_row ? 1 : static_cast<int>(min64(kRows, rows - b_first));
    bool bad_count;
    const int64_t count = set_count(counts, per_row ? b_first : 0, k, &bad_count);
    slice_range(count, gridDim.y, blockIdx.y, &j_begin, &j_end);
    set = idx + (per_row ? b_first * k : 0);
  }
};

// Split-K finish of a (column tile, row group): each block counts itself in once its sums are
// visible device-wide; true in the last of the tile's gridDim.y blocks to arrive, which then sees
// every block's sums. (The threadFenceReduction pattern; the reads go through L2, __ldcg.)
__device__ __forceinline__ bool last_to_arrive(unsigned int* arrivals) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int tile = blockIdx.z * gridDim.x + blockIdx.x;
    last = atomicAdd(arrivals + tile, 1u) == gridDim.y - 1;
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// out[b, col + e] for e < kCols, the last block's rows: the bias plus the accumulator (one slice)
// or the partial rows of every slice, summed in slice order. kCols = 4 * n reads float4s: the
// vector kernel's columns are whole 16-byte words of acc (d_out and col are multiples of vec).
template <int kCols, typename scalar_t>
__device__ __forceinline__ void finish_columns(const float* acc, int64_t acc_slices,
                                               const scalar_t* __restrict__ b_down,
                                               scalar_t* __restrict__ out, int64_t rows,
                                               int64_t d_out, int64_t b_first, int nb,
                                               int64_t col) {
  constexpr int quads = kCols % 4 == 0 ? kCols / 4 : 0;
  const int64_t slice_stride = rows * d_out;
  for (int r = 0; r < nb; ++r) {
    const int64_t b = b_first + r;
    float v[kCols];
#pragma unroll
    for (int e = 0; e < kCols; ++e) v[e] = b_down != nullptr ? to_f(b_down[col + e]) : 0.f;
    const float* from = acc + b * d_out + col;
#pragma unroll 4
    for (int64_t slice = 0; slice < acc_slices; ++slice) {
      if constexpr (quads > 0) {
#pragma unroll
        for (int q = 0; q < quads; ++q) {
          const float4 p = __ldcg(reinterpret_cast<const float4*>(from + slice * slice_stride) + q);
          v[4 * q] += p.x;
          v[4 * q + 1] += p.y;
          v[4 * q + 2] += p.z;
          v[4 * q + 3] += p.w;
        }
      } else {
#pragma unroll
        for (int e = 0; e < kCols; ++e) v[e] += __ldcg(from + slice * slice_stride + e);
      }
    }
#pragma unroll
    for (int e = 0; e < kCols; ++e) out[b * d_out + col + e] = static_cast<scalar_t>(v[e]);
  }
}

// grid: x = column tiles, y = neuron slices, z = row groups (kRows rows for a shared set, one row
// for per-row sets).
template <typename scalar_t, typename index_t, int kRows>
__global__ void down_kernel(const scalar_t* __restrict__ w_down_t, const index_t* __restrict__ idx,
                            const index_t* __restrict__ counts, const float* h, float* acc,
                            unsigned int* arrivals,
                            const scalar_t* __restrict__ b_down, scalar_t* __restrict__ out,
                            int64_t rows, int64_t d_out, int64_t k, int64_t neurons, bool per_row,
                            bool partials) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool owns_column = col < d_out;  // every thread reaches the finish's barriers
  const DownBlock<index_t, kRows> block(idx, counts, rows, k, per_row);
  const int64_t b_first = block.b_first, j_begin = block.j_begin, j_end = block.j_end;
  const int nb = block.nb;
  const index_t* set = block.set;
  // h, the accumulator and the counters come from hidden_kernel. Every thread waits, with no
  // return before it: the next kernel in the stream relies on this one finishing after it.
  wait_for_producer();
  if (owns_column) {
    float sum[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) sum[r] = 0.f;
    for (int64_t j = j_begin; j < j_end; ++j) {
      const int64_t neuron = static_cast<int64_t>(set[j]);
      if (!neuron_in_range(neuron, neurons)) continue;  // reported by hidden_kernel
      const float w = to_f(w_down_t[neuron * d_out + col]);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < nb) sum[r] += __ldcg(h + (b_first + r) * k + j) * w;
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= nb) continue;
      const int64_t b = b_first + r;
      if (partials) {
        acc[(static_cast<int64_t>(blockIdx.y) * rows + b) * d_out + col] = sum[r];
      } else if (j_begin < j_end) {
        atomicAdd(acc + b * d_out + col, sum[r]);
      }
    }
  }
  if (last_to_arrive(arrivals) && owns_column) {
    finish_columns<1>(acc, partials ? gridDim.y : 1, b_down, out, rows, d_out, b_first, nb, col);
  }
}

// Rows of its slice whose words a down_vec_kernel thread prefetches into L2 before waiting for
// hidden_kernel: enough to cover the block's ramp-up (4 x 16 B per thread, 16 KB per block, a
// few MB per call), few enough that the up/gate rows streaming through L2 do not evict them.
constexpr int kDownPrefetchRows = 4;

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// One thread's share of a down-projection block in 16-byte words: vec columns from `col`, the
// block's rows, neurons [j_begin, j_end) of its set; into the accumulator (atomics) or its slice's
// partial row.
template <typename scalar_t, typename index_t, int kRows>
__device__ __forceinline__ void accumulate_down_words(
    const scalar_t* __restrict__ w_down_t, const index_t* __restrict__ set, const float* h,
    float* acc, int64_t rows, int64_t d_out, int64_t k,
    int64_t neurons, int64_t b_first, int nb, int64_t j_begin, int64_t j_end, int64_t col,
    bool partials) {
  constexpr int vec = kWordElems<scalar_t>;
  float sum[kRows][vec];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int e = 0; e < vec; ++e) sum[r][e] = 0.f;
  }
#pragma unroll 4
  for (int64_t j = j_begin; j < j_end; ++j) {
    const int64_t neuron = static_cast<int64_t>(set[j]);
    if (!neuron_in_range(neuron, neurons)) continue;  // reported by hidden_kernel
    float hv[kRows];
    bool live = false;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      hv[r] = r < nb ? __ldcg(h + (b_first + r) * k + j) : 0.f;
      live |= hv[r] != 0.f;
    }
    // The same for the whole block: the row is never read. (So an Inf or NaN in the row of a
    // neuron whose h is exactly 0 does not reach the output, as it would through 0 * w.)
    if (!live) continue;
    float w[vec];
    word_floats<scalar_t>(load_word(w_down_t + neuron * d_out + col), w);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int e = 0; e < vec; ++e) sum[r][e] += hv[r] * w[e];
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= nb) continue;
    const int64_t b = b_first + r;
    if (partials) {
      float* to = acc + (static_cast<int64_t>(blockIdx.y) * rows + b) * d_out + col;
#pragma unroll
      for (int e = 0; e < vec; ++e) to[e] = sum[r][e];
    } else if (j_begin < j_end) {
#pragma unroll
      for (int e = 0; e < vec; ++e) atomicAdd(acc + b * d_out + col + e, sum[r][e]);
    }
  }
}

// The 16-byte form of down_kernel (same grid, columns in words of vec): the host takes it when
// w_down_t's rows are whole aligned words.
template <typename scalar_t, typename index_t, int kRows>
__global__ void down_vec_kernel(const scalar_t* __restrict__ w_down_t,
                                const index_t* __restrict__ idx,
                                const index_t* __restrict__ counts, const float* h, float* acc,
                                unsigned int* arrivals,
                                const scalar_t* __restrict__ b_down, scalar_t* __restrict__ out,
                                int64_t rows, int64_t d_out, int64_t k, int64_t neurons,
                                bool per_row, bool partials, bool prefetch_rows) {
  constexpr int vec = kWordElems<scalar_t>;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * vec;
  // d_out is a whole number of words; every thread reaches the finish's barriers.
  const bool owns_column = col < d_out;
  const DownBlock<index_t, kRows> block(idx, counts, rows, k, per_row);
  const int64_t b_first = block.b_first, j_begin = block.j_begin, j_end = block.j_end;
  const int nb = block.nb;
  const index_t* set = block.set;
  if (prefetch_rows && owns_column) {
    // While hidden_kernel finishes: its first rows' words into L2 (the weights and the set do
    // not depend on h). Not for ReLU, whose rows with h == 0 are never read.
    const int64_t last = min64(j_end, j_begin + kDownPrefetchRows);
    for (int64_t j = j_begin; j < last; ++j) {
      const int64_t neuron = static_cast<int64_t>(set[j]);
      if (neuron_in_range(neuron, neurons)) prefetch_l2(w_down_t + neuron * d_out + col);
    }
  }
  // h, the accumulator and the counters come from hidden_kernel. Every thread waits, with no
  // return before it: the next kernel in the stream relies on this one finishing after it.
  wait_for_producer();
  if (owns_column) {
    accumulate_down_words<scalar_t, index_t, kRows>(w_down_t, set, h, acc, rows, d_out, k, neurons,
                                             b_first, nb, j_begin, j_end, col, partials);
  }
  if (last_to_arrive(arrivals) && owns_column) {
    finish_columns<vec>(acc, partials ? gridDim.y : 1, b_down, out, rows, d_out, b_first, nb,
                        col);
  }
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// The debug mode's full check (FASTLLM_CHECK_INDICES=1 / fastllm.ops.checked_indices()): the same
// errors as on CPU, at the price of synchronisations. Outside it nothing here runs.
void check_index_values_cuda(const at::Tensor& idx, const c10::optional<at::Tensor>& counts,
                             const SparseMlpShape& s) {
  // BEGIN host value checks
  if (!host_checks_index_values(idx)) return;
  if (!counts.has_value()) {
    check_index_range(kOp, "active_idx", idx, s.neurons);
    return;
  }
  check_index_range(kOp, "counts", *counts, s.k + 1);
  // Padding past a set's count may hold anything (e.g. -1): only the counted entries are checked.
  const at::Tensor sets = idx.dim() == 1 ? idx.unsqueeze(0) : idx;
  at::Tensor live = at::arange(s.k, idx.options().dtype(at::kLong)).unsqueeze(0) <
                    counts->to(at::kLong).unsqueeze(1);
  check_index_range(kOp, "active_idx", sets.masked_select(live), s.neurons);
  // END host value checks
}

// The tensors and plans of one call, for the kernels' launch (sparse_mlp_cuda).
struct SparseMlpCall {
  const at::Tensor &x, &w_up, &w_down_t, &active_idx;
  const c10::optional<at::Tensor>&w_gate, &b_up, &b_gate, &b_down, &counts;
  SparseMlpShape shape;
  Activation act;
  bool deterministic, vector_in, vector_down;
  int64_t vec, sms;
};

// Both kernels for row passes of up to kRows rows: each grid is sized from its kernel's
// occupancy (common/occupancy.cuh), so the one even wave the plans aim for is one wave.
template <typename scalar_t, typename index_t, int kRows>
at::Tensor launch_sparse_mlp(const SparseMlpCall& c, at::Tensor out) {
  const SparseMlpShape& s = c.shape;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto* props = at::cuda::getCurrentDeviceProperties();

  auto hidden = hidden_kernel<scalar_t, index_t, kRows>;
  const StagedRows staging = plan_sparse_hidden_staging(s.rows, s.d_in, s.per_row, kRows);
  TORCH_CHECK_VALUE(staging.shared_bytes <= static_cast<int64_t>(props->sharedMemPerBlockOptin),
                    kOp, ": d_in (", s.d_in, ") is too wide for one row of x in shared memory (",
                    staging.shared_bytes, " bytes; this GPU allows ",
                    props->sharedMemPerBlockOptin, " per block)");
  // before the occupancy query, which depends on it
  allow_dynamic_shared(reinterpret_cast<const void*>(hidden),
                       static_cast<size_t>(staging.shared_bytes));
  const SparseHiddenLaunch hidden_plan = plan_sparse_hidden(
      s.rows, s.d_in, s.k, s.per_row, c.sms,
      resident_blocks_per_sm(reinterpret_cast<const void*>(hidden), kThreads,
                             static_cast<size_t>(staging.shared_bytes)),
      kRows);

  const void* down =
      c.vector_down ? reinterpret_cast<const void*>(down_vec_kernel<scalar_t, index_t, kRows>)
                    : reinterpret_cast<const void*>(down_kernel<scalar_t, index_t, kRows>);
  const SparseDownLaunch plan =
      plan_sparse_down(s.rows, s.d_out, s.k, s.per_row, c.sms, c.vector_down ? c.vec : 1,
                       resident_blocks_per_sm(down, kThreads, 0), kRows);
  TORCH_CHECK_VALUE(plan.row_groups <= 65535, kOp, ": too many per-row sets for one launch (",
                    s.rows, ")");
  TORCH_CHECK_VALUE(plan.col_tiles * plan.row_groups <= std::numeric_limits<unsigned int>::max(),
                    kOp, ": too many output tiles (", plan.col_tiles * plan.row_groups, ")");

  const at::TensorOptions f32 = c.x.options().dtype(at::kFloat);
  at::Tensor h = at::empty({s.rows, s.k}, f32);
  // Deterministic: a partial row per neuron slice, summed in slice order by each tile's last
  // block. Otherwise one accumulator the slices add into atomically. Both zeroed, with the tile
  // counters, by hidden_kernel.
  const int64_t acc_slices = c.deterministic ? plan.slices : 1;
  at::Tensor acc = at::empty({acc_slices, s.rows, s.d_out}, f32);
  at::Tensor arrivals = at::empty({plan.col_tiles * plan.row_groups}, c.x.options().dtype(at::kInt));
  // The hidden kernel's grid is sized by k, not by the output: it zeroes an accumulator of up
  // to 16 floats per thread (a decode step's), and a larger one (a prefill's) is a memset.
  const bool zero_in_hidden = !c.deterministic &&
                              acc.numel() <= hidden_plan.blocks * static_cast<int64_t>(kThreads) * 16;
  if (!c.deterministic && !zero_in_hidden) acc.zero_();
  auto* counters = reinterpret_cast<unsigned int*>(arrivals.data_ptr<int32_t>());

  const index_t* cp = c.counts.has_value() ? c.counts->const_data_ptr<index_t>() : nullptr;
  const index_t* idx = c.active_idx.const_data_ptr<index_t>();
  hidden<<<static_cast<unsigned>(hidden_plan.blocks), kThreads,
           static_cast<size_t>(hidden_plan.shared_bytes), stream>>>(
      c.x.const_data_ptr<scalar_t>(), c.w_up.const_data_ptr<scalar_t>(),
      ptr_or_null<scalar_t>(c.w_gate), ptr_or_null<scalar_t>(c.b_up),
      ptr_or_null<scalar_t>(c.b_gate), idx, cp, h.data_ptr<float>(), s.rows, s.d_in, s.k,
      s.neurons, s.per_row, c.act, c.vector_in, static_cast<int>(hidden_plan.rows_per_pass),
      hidden_plan.row_floats, device_error_word(c.x),
      zero_in_hidden ? acc.data_ptr<float>() : nullptr, zero_in_hidden ? acc.numel() : 0,
      counters, arrivals.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const dim3 grid(static_cast<unsigned>(plan.col_tiles), static_cast<unsigned>(plan.slices),
                  static_cast<unsigned>(plan.row_groups));
  const scalar_t* bias = ptr_or_null<scalar_t>(c.b_down);
  const scalar_t* w_down = c.w_down_t.const_data_ptr<scalar_t>();
  const float* hidden_values = h.const_data_ptr<float>();
  float* sums = acc.data_ptr<float>();
  scalar_t* result = out.data_ptr<scalar_t>();
  // A programmatic dependent of hidden_kernel where the GPU and the code that runs support it.
  const bool dependent = dependent_launch_supported(down);
  if (c.vector_down) {
    launch_maybe_dependent(down_vec_kernel<scalar_t, index_t, kRows>, grid, dim3(kThreads), 0,
                           stream, dependent, w_down, idx, cp, hidden_values, sums, counters,
                           bias, result, s.rows, s.d_out, s.k, s.neurons, s.per_row,
                           c.deterministic, c.act != Activation::kRelu);
  } else {
    launch_maybe_dependent(down_kernel<scalar_t, index_t, kRows>, grid, dim3(kThreads), 0, stream,
                           dependent, w_down, idx, cp, hidden_values, sums, counters, bias, result,
                           s.rows, s.d_out, s.k, s.neurons, s.per_row, c.deterministic);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sparse_mlp_cuda(const at::Tensor& x, const at::Tensor& w_up,
                           const c10::optional<at::Tensor>& w_gate, const at::Tensor& w_down_t,
                           const c10::optional<at::Tensor>& b_up,
                           const c10::optional<at::Tensor>& b_gate,
                           const c10::optional<at::Tensor>& b_down, const at::Tensor& active_idx,
                           const c10::optional<at::Tensor>& counts, c10::string_view activation,
                           bool deterministic) {
  const SparseMlpShape s =
      check_sparse_mlp(kOp, x, w_up, w_gate, w_down_t, b_up, b_gate, b_down, active_idx, counts);
  const Activation act = parse_activation(kOp, std::string(activation));
  const c10::cuda::CUDAGuard guard(x.device());
  check_index_values_cuda(active_idx, counts, s);
  at::Tensor out = at::empty({s.rows, s.d_out}, x.options());
  if (out.numel() == 0) return out;
  if (s.k == 0) {  // no active neuron: the output is the bias; no kernel of ours runs
    if (b_down.has_value()) {
      out.copy_(b_down->unsqueeze(0).expand_as(out));
    } else {
      out.zero_();
    }
    return out;
  }
  // 16-byte words where every weight row is whole aligned words; scalar loads otherwise (x is
  // staged in shared memory by scalar loads either way).
  const int64_t vec = 16 / x.element_size();
  auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  const SparseMlpCall call{
      x, w_up, w_down_t, active_idx, w_gate, b_up, b_gate, b_down, counts, s, act, deterministic,
      vec > 1 && s.d_in % vec == 0 && aligned(w_up.data_ptr()) &&
          (!w_gate.has_value() || aligned(w_gate->data_ptr())),
      vec > 1 && s.d_out % vec == 0 && aligned(w_down_t.data_ptr()), vec,
      at::cuda::getCurrentDeviceProperties()->multiProcessorCount};
  const bool wide = sparse_rows_per_pass(s.rows, s.per_row) == kSparseRowsWide;
  // x is fp32, fp16 or bf16 (check_sparse_mlp): no double instantiation.
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    AT_DISPATCH_INDEX_TYPES(active_idx.scalar_type(), "sparse_mlp_cuda_index", [&] {
      if (wide) {
        launch_sparse_mlp<scalar_t, index_t, kSparseRowsWide>(call, out);
      } else {
        launch_sparse_mlp<scalar_t, index_t, kSparseRowsNarrow>(call, out);
      }
    });
  };
  switch (x.scalar_type()) {
    case at::kHalf: run(at::Half{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    default: run(float{}); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) { m.impl("sparse_mlp", &sparse_mlp_cuda); }

}  // namespace fastllm::sparse
