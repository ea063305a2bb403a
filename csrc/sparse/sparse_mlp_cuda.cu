// CUDA sparse MLP, three kernels:
//   hidden_kernel: passes over the batch (up to kRowsPerPass rows of a shared set, or one row of
//     per-row sets, plan_sparse_hidden); each pass stages its rows of x in shared memory as fp32
//     (sparse_mlp.h: staged_x_slot) and spreads its set's positions over every warp of the grid,
//     one warp per active neuron; lanes stride the neuron's contiguous up/gate row in 16-byte
//     words (8 fp16 / bf16, 4 fp32), kHiddenWordsPerStep words of each row loaded before any is
//     used, so each weight row is one coalesced read, reused for the pass's rows; fp32 h[b, j]
//     goes to scratch.
//   down_vec_kernel: a block owns 256 x vec output columns x one slice of the active neurons
//     (sparse_mlp.h, plan_sparse_down); each thread walks its slice and reads one 16-byte word of
//     w_down_t[idx_j] per neuron, skipping neurons whose h is 0 in every row it serves (ReLU).
//     down_kernel is the scalar form, for rows that are not whole aligned words. Default:
//     atomicAdd into an fp32 accumulator. Deterministic: each slice writes its own partial row and
//     finish_kernel sums the slices in slice order.
//   finish_kernel: adds the bias and casts to the output dtype.
// No host synchronisation: index values are not read on the host (outside the debug mode); both
// kernels guard them (sparse_mlp.h: guarded_count, neuron_in_range) and the hidden kernel reports
// bad ones to the device error word (kSparseCounts, kSparseActiveIdx). A neuron index out of range
// contributes nothing. With k == 0 no kernel reads counts, so nothing can be reported for them.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/index_guard.cuh"
#include "common/vec_words.cuh"
#include "sparse/sparse_mlp.h"

namespace fastllm::sparse {
namespace {

constexpr const char* kOp = "fastllm.sparse_mlp";
constexpr int kThreads = kSparseThreads;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kRowsPerPass = kSparseRowsPerPass;  // batch rows per read of a weight row

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

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    hidden_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w_up,
                  const scalar_t* __restrict__ w_gate, const scalar_t* __restrict__ b_up,
                  const scalar_t* __restrict__ b_gate, const index_t* __restrict__ idx,
                  const index_t* __restrict__ counts, float* __restrict__ h, int64_t rows,
                  int64_t d, int64_t k, int64_t neurons, bool per_row, Activation act,
                  bool vector, int rows_per_pass, int64_t row_floats,
                  unsigned int* __restrict__ error_word) {
  extern __shared__ float4 staged[];  // rows_per_pass rows of row_floats / 4 slots
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
      float up[kRowsPerPass] = {0.f, 0.f, 0.f, 0.f};
      float gate[kRowsPerPass] = {0.f, 0.f, 0.f, 0.f};
      if constexpr (sizeof(scalar_t) <= 4) {
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
              for (int r = 0; r < kRowsPerPass; ++r) {
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
      }
      for (int64_t i = lane; i < d && !(vector && sizeof(scalar_t) <= 4); i += 32) {
        const float wu = to_f(up_row[i]);
        const float wg = gate_row != nullptr ? to_f(gate_row[i]) : 0.f;
        const int at = 4 * staged_x_slot(static_cast<int>(i >> 2)) + static_cast<int>(i & 3);
#pragma unroll
        for (int r = 0; r < kRowsPerPass; ++r) {
          if (r < nb) {
            const float xv = staged_f[r * static_cast<int>(row_floats) + at];
            up[r] += wu * xv;
            gate[r] += wg * xv;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerPass; ++r) {
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
// (kRowsPerPass for a shared set, one for per-row sets), their set, and its slice of the set's
// actual count (read on the device; a bad count is reported by hidden_kernel).
template <typename index_t>
struct DownBlock {
  int64_t b_first, j_begin, j_end;
  int nb;
  const index_t* set;

  __device__ DownBlock(const index_t* idx, const index_t* counts, int64_t rows, int64_t k,
                       bool per_row) {
    b_first = per_row ? blockIdx.z : static_cast<int64_t>(blockIdx.z) * kRowsPerPass;
    nb = per_row ? 1 : static_cast<int>(min64(kRowsPerPass, rows - b_first));
    bool bad_count;
    const int64_t count = set_count(counts, per_row ? b_first : 0, k, &bad_count);
    slice_range(count, gridDim.y, blockIdx.y, &j_begin, &j_end);
    set = idx + (per_row ? b_first * k : 0);
  }
};

// grid: x = column tiles, y = neuron slices, z = row groups (kRowsPerPass rows for a shared set,
// one row for per-row sets).
template <typename scalar_t, typename index_t>
__global__ void down_kernel(const scalar_t* __restrict__ w_down_t, const index_t* __restrict__ idx,
                            const index_t* __restrict__ counts, const float* __restrict__ h,
                            float* __restrict__ acc, int64_t rows, int64_t d_out, int64_t k,
                            int64_t neurons, bool per_row, bool partials) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= d_out) return;
  const DownBlock<index_t> block(idx, counts, rows, k, per_row);
  const int64_t b_first = block.b_first, j_begin = block.j_begin, j_end = block.j_end;
  const int nb = block.nb;
  const index_t* set = block.set;
  float sum[kRowsPerPass] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t j = j_begin; j < j_end; ++j) {
    const int64_t neuron = static_cast<int64_t>(set[j]);
    if (!neuron_in_range(neuron, neurons)) continue;  // reported by hidden_kernel
    const float w = to_f(w_down_t[neuron * d_out + col]);
#pragma unroll
    for (int r = 0; r < kRowsPerPass; ++r) {
      if (r < nb) sum[r] += h[(b_first + r) * k + j] * w;
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerPass; ++r) {
    if (r >= nb) continue;
    const int64_t b = b_first + r;
    if (partials) {
      acc[(static_cast<int64_t>(blockIdx.y) * rows + b) * d_out + col] = sum[r];
    } else if (j_begin < j_end) {
      atomicAdd(acc + b * d_out + col, sum[r]);
    }
  }
}

// The 16-byte form of down_kernel (same grid, columns in words of vec): the host takes it when
// w_down_t's rows are whole aligned words.
template <typename scalar_t, typename index_t>
__global__ void down_vec_kernel(const scalar_t* __restrict__ w_down_t,
                                const index_t* __restrict__ idx,
                                const index_t* __restrict__ counts, const float* __restrict__ h,
                                float* __restrict__ acc, int64_t rows, int64_t d_out, int64_t k,
                                int64_t neurons, bool per_row, bool partials) {
  constexpr int vec = kWordElems<scalar_t>;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * vec;
  if (col >= d_out) return;  // d_out is a whole number of words
  const DownBlock<index_t> block(idx, counts, rows, k, per_row);
  const int64_t b_first = block.b_first, j_begin = block.j_begin, j_end = block.j_end;
  const int nb = block.nb;
  const index_t* set = block.set;
  float sum[kRowsPerPass][vec];
#pragma unroll
  for (int r = 0; r < kRowsPerPass; ++r) {
#pragma unroll
    for (int e = 0; e < vec; ++e) sum[r][e] = 0.f;
  }
#pragma unroll 4
  for (int64_t j = j_begin; j < j_end; ++j) {
    const int64_t neuron = static_cast<int64_t>(set[j]);
    if (!neuron_in_range(neuron, neurons)) continue;  // reported by hidden_kernel
    float hv[kRowsPerPass];
    bool live = false;
#pragma unroll
    for (int r = 0; r < kRowsPerPass; ++r) {
      hv[r] = r < nb ? h[(b_first + r) * k + j] : 0.f;
      live |= hv[r] != 0.f;
    }
    // The same for the whole block: the row is never read. (So an Inf or NaN in the row of a
    // neuron whose h is exactly 0 does not reach the output, as it would through 0 * w.)
    if (!live) continue;
    float w[vec];
    word_floats<scalar_t>(load_word(w_down_t + neuron * d_out + col), w);
#pragma unroll
    for (int r = 0; r < kRowsPerPass; ++r) {
#pragma unroll
      for (int e = 0; e < vec; ++e) sum[r][e] += hv[r] * w[e];
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerPass; ++r) {
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

template <typename scalar_t>
__global__ void finish_kernel(const float* __restrict__ acc, const scalar_t* __restrict__ b_down,
                              scalar_t* __restrict__ out, int64_t rows, int64_t d_out,
                              int64_t slices) {
  const int64_t total = rows * d_out;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = b_down != nullptr ? to_f(b_down[e % d_out]) : 0.f;
    for (int64_t s = 0; s < slices; ++s) v += acc[s * total + e];
    out[e] = static_cast<scalar_t>(v);
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

// down_vec_kernel exists for 16- and 32-bit types (vector_down is false for fp64).
template <typename scalar_t, typename index_t>
void launch_down_vec(dim3 grid, cudaStream_t stream, const at::Tensor& w_down_t,
                     const at::Tensor& active_idx, const index_t* counts, const at::Tensor& h,
                     at::Tensor& acc, const SparseMlpShape& s, bool deterministic) {
  if constexpr (sizeof(scalar_t) <= 4) {
    down_vec_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
        w_down_t.const_data_ptr<scalar_t>(), active_idx.const_data_ptr<index_t>(), counts,
        h.const_data_ptr<float>(), acc.data_ptr<float>(), s.rows, s.d_out, s.k, s.neurons,
        s.per_row, deterministic);
  }
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
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t sms = props->multiProcessorCount;

  // 16-byte words where every weight row is whole aligned words; scalar loads otherwise (x is
  // staged in shared memory by scalar loads either way).
  const int64_t vec = x.element_size() <= 4 ? 16 / x.element_size() : 1;
  auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  const bool vector_in = vec > 1 && s.d_in % vec == 0 && aligned(w_up.data_ptr()) &&
                         (!w_gate.has_value() || aligned(w_gate->data_ptr()));
  const bool vector_down = vec > 1 && s.d_out % vec == 0 && aligned(w_down_t.data_ptr());
  const SparseHiddenLaunch hidden = plan_sparse_hidden(s.rows, s.d_in, s.k, s.per_row, sms);
  TORCH_CHECK_VALUE(hidden.shared_bytes <= static_cast<int64_t>(props->sharedMemPerBlockOptin),
                    kOp, ": d_in (", s.d_in, ") is too wide for one row of x in shared memory (",
                    hidden.shared_bytes, " bytes; this GPU allows ",
                    props->sharedMemPerBlockOptin, " per block)");
  const SparseDownLaunch plan =
      plan_sparse_down(s.rows, s.d_out, s.k, s.per_row, sms, vector_down ? vec : 1);
  const int64_t col_tiles = plan.col_tiles, slices = plan.slices, row_groups = plan.row_groups;
  TORCH_CHECK_VALUE(row_groups <= 65535, kOp, ": too many per-row sets for one launch (",
                    s.rows, ")");

  at::Tensor h = at::empty({s.rows, std::max<int64_t>(s.k, 1)}, x.options().dtype(at::kFloat));
  const int64_t acc_slices = deterministic ? slices : 1;
  at::Tensor acc = deterministic
                       ? at::empty({acc_slices, s.rows, s.d_out}, x.options().dtype(at::kFloat))
                       : at::zeros({1, s.rows, s.d_out}, x.options().dtype(at::kFloat));

  unsigned int* error_word = device_error_word(x);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_mlp_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(active_idx.scalar_type(), "sparse_mlp_cuda_index", [&] {
      const index_t* cp = counts.has_value() ? counts->const_data_ptr<index_t>() : nullptr;
      if (s.k > 0) {
        auto kernel = hidden_kernel<scalar_t, index_t>;
        if (hidden.shared_bytes > 48 * 1024) {
          C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(hidden.shared_bytes)));
        }
        kernel<<<static_cast<unsigned>(hidden.blocks), kThreads,
                 static_cast<size_t>(hidden.shared_bytes), stream>>>(
            x.const_data_ptr<scalar_t>(), w_up.const_data_ptr<scalar_t>(),
            ptr_or_null<scalar_t>(w_gate), ptr_or_null<scalar_t>(b_up),
            ptr_or_null<scalar_t>(b_gate), active_idx.const_data_ptr<index_t>(), cp,
            h.data_ptr<float>(), s.rows, s.d_in, s.k, s.neurons, s.per_row, act, vector_in,
            static_cast<int>(hidden.rows_per_pass), hidden.row_floats, error_word);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (s.k > 0 || deterministic) {
        const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(slices),
                        static_cast<unsigned>(row_groups));
        if (vector_down) {
          launch_down_vec<scalar_t, index_t>(grid, stream, w_down_t, active_idx, cp, h, acc, s,
                                             deterministic);
        } else {
          down_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
              w_down_t.const_data_ptr<scalar_t>(), active_idx.const_data_ptr<index_t>(), cp,
              h.const_data_ptr<float>(), acc.data_ptr<float>(), s.rows, s.d_out, s.k, s.neurons,
              s.per_row, deterministic);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const int64_t total = s.rows * s.d_out;
      const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, sms * 8);
      finish_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          acc.const_data_ptr<float>(), ptr_or_null<scalar_t>(b_down), out.data_ptr<scalar_t>(),
          s.rows, s.d_out, acc_slices);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) { m.impl("sparse_mlp", &sparse_mlp_cuda); }

}  // namespace fastllm::sparse
