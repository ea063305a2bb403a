// CPU sparse MLP, two strategies (both over contiguous rows, every sum in fp32, weights of any
// dtype widened lane by lane as they are loaded):
//   * fused (sets of at most kFusedRows rows: decode): one parallel region. A set's active neurons
//     are cut into slices fixed by the set's count alone; a slice's owner computes its neurons'
//     hidden values and at once adds h * down row into the slice's own fp32 partial output, and
//     the slices are summed in order afterwards. The slices go through cpu::claim_parallel
//     (common/cpu_parallel.h): a thread the OS has descheduled leaves its share to the threads
//     still running, and a call site that keeps seeing late threads runs serially for a while.
//   * two-phase (wider sets: prefill): 1. hidden, parallel over active neurons: each up (and gate)
//     row is read once and dotted with every row of x (the x rows stay in L1); 2. down, parallel
//     over column blocks of the output, each task walking the active neurons in index order.
// In both, every output element's summation order is fixed by the inputs, not by the number of
// threads, so the result is deterministic and no atomics touch the data (the `deterministic` flag
// changes nothing on CPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/cpu_parallel.h"
#include "common/cpu_vec.h"
#include "sparse/sparse_mlp.h"

#if defined(__GNUC__)
#define FASTLLM_PREFETCH(address) __builtin_prefetch(address)
#else
#define FASTLLM_PREFETCH(address) ((void)0)
#endif

namespace fastllm::sparse {
namespace {

constexpr const char* kOp = "fastllm.sparse_mlp";

// Down-projection rows accumulated per pass: the fp32 output block is loaded and stored once per
// kGroup weight rows instead of once per row (one load and one store per row left the loop bound
// by the output block, not by the weights it exists to stream).
constexpr int kGroup = 4;

// The fused strategy's limits: rows per set (each neuron's hidden values for all of them live in
// registers' worth of stack), neurons per slice (enough weight bytes per slice that claiming it
// costs nothing), slices per set (the partial outputs summed at the end), and the partial outputs'
// total size (past it, the two-phase strategy's single output wins).
constexpr int64_t kFusedRows = 4;
constexpr int64_t kMinSliceNeurons = 32;
constexpr int64_t kMaxSlices = 64;
constexpr int64_t kMaxPartialFloats = int64_t{1} << 22;

#ifdef FASTLLM_HAVE_VEC
using cpu::horizontal_sum;
using cpu::kLanes;
using cpu::load_vec;
using cpu::store_vec;
using cpu::VecF;

// up . x and, for gated MLPs, gate . x in one pass over x, two independent chains per row.
template <typename w_t>
FASTLLM_INLINE void hidden_dots_f32(const float* __restrict__ x, const w_t* __restrict__ up_row,
                                    const w_t* __restrict__ gate_row, int64_t n, float* up,
                                    float* gate) {
  if (gate_row == nullptr) {
    *up = cpu::dot_f32(x, up_row, n);
    return;
  }
  VecF u0 = {}, u1 = {}, g0 = {}, g1 = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const VecF x0 = load_vec(x + i), x1 = load_vec(x + i + kLanes);
    u0 += x0 * load_vec(up_row + i);
    u1 += x1 * load_vec(up_row + i + kLanes);
    g0 += x0 * load_vec(gate_row + i);
    g1 += x1 * load_vec(gate_row + i + kLanes);
  }
  float su = horizontal_sum(u0 + u1), sg = horizontal_sum(g0 + g1);
  for (; i < n; ++i) {
    su += x[i] * static_cast<float>(up_row[i]);
    sg += x[i] * static_cast<float>(gate_row[i]);
  }
  *up = su;
  *gate = sg;
}

// y[0:n] += sum over g < kGroup of coeff[g] * rows[g][0:n].
template <typename w_t>
FASTLLM_INLINE void accumulate_rows_f32(float* __restrict__ y, const float* coeff,
                                        const w_t* const* rows, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    VecF acc = load_vec(y + i);
#pragma GCC unroll 4
    for (int g = 0; g < kGroup; ++g) acc += coeff[g] * load_vec(rows[g] + i);
    store_vec(y + i, acc);
  }
  for (; i < n; ++i) {
    float acc = y[i];
    for (int g = 0; g < kGroup; ++g) acc += coeff[g] * static_cast<float>(rows[g][i]);
    y[i] = acc;
  }
}
#else
template <typename w_t>
void hidden_dots_f32(const float* x, const w_t* up_row, const w_t* gate_row, int64_t n, float* up,
                     float* gate) {
  *up = cpu::dot_f32(x, up_row, n);
  if (gate_row != nullptr) *gate = cpu::dot_f32(x, gate_row, n);
}
template <typename w_t>
void accumulate_rows_f32(float* y, const float* coeff, const w_t* const* rows, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    for (int g = 0; g < kGroup; ++g) y[i] += coeff[g] * static_cast<float>(rows[g][i]);
  }
}
#endif

// Target-cloned entry points (see cpu_vec.h). fp16 stays on the baseline ISA: c10::Half's scalar
// conversion does not vectorize in any clone (kv_cpu.cpp widens fp16 with F16C; not done here).
FASTLLM_MULTIVERSION void hidden_dots(const float* x, const float* up_row, const float* gate_row,
                                      int64_t n, float* up, float* gate) {
  hidden_dots_f32(x, up_row, gate_row, n, up, gate);
}
FASTLLM_MULTIVERSION void hidden_dots(const float* x, const c10::BFloat16* up_row,
                                      const c10::BFloat16* gate_row, int64_t n, float* up,
                                      float* gate) {
  hidden_dots_f32(x, up_row, gate_row, n, up, gate);
}
void hidden_dots(const float* x, const c10::Half* up_row, const c10::Half* gate_row, int64_t n,
                 float* up, float* gate) {
  hidden_dots_f32(x, up_row, gate_row, n, up, gate);
}
FASTLLM_MULTIVERSION void accumulate_rows(float* y, const float* coeff, const float* const* rows,
                                          int64_t n) {
  accumulate_rows_f32(y, coeff, rows, n);
}
FASTLLM_MULTIVERSION void accumulate_rows(float* y, const float* coeff,
                                          const c10::BFloat16* const* rows, int64_t n) {
  accumulate_rows_f32(y, coeff, rows, n);
}
void accumulate_rows(float* y, const float* coeff, const c10::Half* const* rows, int64_t n) {
  accumulate_rows_f32(y, coeff, rows, n);
}

template <typename index_t>
void check_index_values(const at::Tensor& idx, const c10::optional<at::Tensor>& counts,
                        const SparseMlpShape& s) {
  const index_t* p = idx.const_data_ptr<index_t>();
  const int64_t sets = s.per_row ? s.rows : 1;
  for (int64_t r = 0; r < sets; ++r) {
    int64_t count = s.k;
    if (counts.has_value()) {
      count = counts->scalar_type() == at::kInt ? counts->const_data_ptr<int32_t>()[r]
                                                : counts->const_data_ptr<int64_t>()[r];
      bool bad = false;
      guarded_count(count, s.k, &bad);
      TORCH_CHECK_INDEX(!bad, kOp, ": counts[", r, "] must lie in [0, ", s.k, "], got ", count);
    }
    for (int64_t j = 0; j < count; ++j) {
      const int64_t v = p[r * s.k + j];
      TORCH_CHECK_INDEX(neuron_in_range(v, s.neurons), kOp, ": active_idx must lie in [0, ", s.neurons,
                        "), got ", v, " at set ", r, " position ", j);
    }
  }
}

// The slices a set of `count` active neurons is cut into: from the count alone, so the summation
// order (and the result) does not depend on the number of threads.
int64_t fused_slices(int64_t count) {
  return std::min<int64_t>(kMaxSlices, std::max<int64_t>(1, count / kMinSliceNeurons));
}

// Whether the fused strategy takes this call (see the file comment).
bool use_fused(const SparseMlpShape& s, const std::vector<int64_t>& count_of) {
  const int64_t rows_per_set = s.per_row ? 1 : s.rows;
  if (rows_per_set > kFusedRows) return false;
  int64_t partial_floats = 0;
  for (const int64_t count : count_of) partial_floats += fused_slices(count) * rows_per_set;
  return partial_floats * s.d_out <= kMaxPartialFloats;
}

template <typename scalar_t, typename index_t>
void sparse_mlp_fused_kernel(const float* xf, const scalar_t* wu, const scalar_t* wg,
                             const scalar_t* wd, const scalar_t* bu, const scalar_t* bg,
                             const scalar_t* bd, const index_t* ip,
                             const std::vector<int64_t>& count_of, Activation act,
                             const SparseMlpShape& s, scalar_t* op) {
  const int64_t d = s.d_in, dout = s.d_out, k = s.k;
  const int64_t sets = s.per_row ? s.rows : 1;
  const int64_t rows_per_set = s.per_row ? 1 : s.rows;
  // Slice t of the whole call is slice t - first_slice[set] of its set.
  std::vector<int64_t> first_slice(static_cast<size_t>(sets + 1), 0);
  for (int64_t g = 0; g < sets; ++g) first_slice[g + 1] = first_slice[g] + fused_slices(count_of[g]);
  const int64_t slices = first_slice[sets];
  std::vector<float> partial(static_cast<size_t>(slices * rows_per_set * dout), 0.f);
  static cpu::ContentionBackoff contention;
  cpu::claim_parallel(contention, slices, [&](int64_t t) {
    const int64_t g = std::upper_bound(first_slice.begin(), first_slice.end(), t) -
                      first_slice.begin() - 1;
    int64_t begin = 0, end = 0;
    slice_range(count_of[g], first_slice[g + 1] - first_slice[g], t - first_slice[g], &begin,
                &end);
    const index_t* set = ip + (s.per_row ? g * k : 0);
    const float* x_set = xf + g * rows_per_set * d;  // g is 0 for a shared set
    float* part = partial.data() + t * rows_per_set * dout;
    // Down rows wait here until kGroup neurons with a nonzero hidden value are collected, so a
    // ReLU zero costs no down-row read and the partial output is walked once per kGroup rows.
    const scalar_t* rows[kGroup];
    float coeff[kFusedRows][kGroup];
    int pending = 0;
    auto flush = [&] {
      for (int r = pending; r < kGroup; ++r) {
        rows[r] = rows[0];  // a short group repeats its first row (cache-hot) with coefficient 0
        for (int64_t b = 0; b < rows_per_set; ++b) coeff[b][r] = 0.f;
      }
      for (int64_t b = 0; b < rows_per_set; ++b) {
        accumulate_rows(part + b * dout, coeff[b], rows, dout);
      }
      pending = 0;
    };
    for (int64_t j = begin; j < end; ++j) {
      const int64_t neuron = set[j];
      if (j + 1 < end) {
        // The next neuron's rows are somewhere else in memory: start fetching them now.
        FASTLLM_PREFETCH(wu + set[j + 1] * d);
        if (wg) FASTLLM_PREFETCH(wg + set[j + 1] * d);
      }
      const scalar_t* up_row = wu + neuron * d;
      const scalar_t* gate_row = wg ? wg + neuron * d : nullptr;
      const float up_bias = bu ? static_cast<float>(bu[neuron]) : 0.f;
      const float gate_bias = bg ? static_cast<float>(bg[neuron]) : 0.f;
      bool live = false;
      for (int64_t b = 0; b < rows_per_set; ++b) {
        float up = 0.f, gate = 0.f;
        hidden_dots(x_set + b * d, up_row, gate_row, d, &up, &gate);
        const float h = hidden_value(act, s.gated, up + up_bias, gate + gate_bias);
        coeff[b][pending] = h;
        live = live || h != 0.f;
      }
      if (!live) continue;
      rows[pending++] = wd + neuron * dout;
      if (pending == kGroup) flush();
    }
    if (pending > 0) flush();
  });

  // Each set's slices summed in slice order, the bias first.
  std::vector<float> sum(static_cast<size_t>(dout));
  for (int64_t g = 0; g < sets; ++g) {
    for (int64_t b = 0; b < rows_per_set; ++b) {
      for (int64_t c = 0; c < dout; ++c) sum[c] = bd ? static_cast<float>(bd[c]) : 0.f;
      for (int64_t t = first_slice[g]; t < first_slice[g + 1]; ++t) {
        const float* p = partial.data() + (t * rows_per_set + b) * dout;
        for (int64_t c = 0; c < dout; ++c) sum[c] += p[c];
      }
      scalar_t* o = op + (g * rows_per_set + b) * dout;
      for (int64_t c = 0; c < dout; ++c) o[c] = static_cast<scalar_t>(sum[c]);
    }
  }
}

template <typename scalar_t, typename index_t>
void sparse_mlp_kernel(const at::Tensor& x, const at::Tensor& w_up,
                       const c10::optional<at::Tensor>& w_gate, const at::Tensor& w_down_t,
                       const c10::optional<at::Tensor>& b_up,
                       const c10::optional<at::Tensor>& b_gate,
                       const c10::optional<at::Tensor>& b_down, const at::Tensor& idx,
                       const std::vector<int64_t>& count_of, Activation act,
                       const SparseMlpShape& s, at::Tensor& out) {
  const index_t* ip = idx.const_data_ptr<index_t>();
  const scalar_t* wu = w_up.const_data_ptr<scalar_t>();
  const scalar_t* wg = s.gated ? w_gate->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* wd = w_down_t.const_data_ptr<scalar_t>();
  const scalar_t* bu = b_up.has_value() ? b_up->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bg = b_gate.has_value() ? b_gate->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bd = b_down.has_value() ? b_down->const_data_ptr<scalar_t>() : nullptr;
  const int64_t B = s.rows, d = s.d_in, dout = s.d_out, k = s.k;

  // x in fp32, once (it is small next to the weights).
  at::Tensor xf_t = x.to(at::kFloat).contiguous();
  const float* xf = xf_t.const_data_ptr<float>();
  if (use_fused(s, count_of)) {
    sparse_mlp_fused_kernel<scalar_t, index_t>(xf, wu, wg, wd, bu, bg, bd, ip, count_of, act, s,
                                               out.data_ptr<scalar_t>());
    return;
  }
  std::vector<float> h(static_cast<size_t>(B * k), 0.f);

  // Phase 1: hidden values. Shared set: a task is a neuron, dotted with every row. Per-row sets:
  // a task is one (row, position) pair. Only counted entries are tasks (a set padded to a wide
  // fixed width would otherwise leave the threads given its padding idle): task t of set b is
  // entry t - first[b].
  const int64_t sets = s.per_row ? B : 1;
  std::vector<int64_t> first(static_cast<size_t>(sets + 1), 0);
  for (int64_t b = 0; b < sets; ++b) first[b + 1] = first[b] + count_of[b];
  const int64_t tasks = first[sets];
  at::parallel_for(0, tasks, 16, [&](int64_t begin, int64_t end) {
    int64_t b0 = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t t = begin; t < end; ++t) {
      while (t >= first[b0 + 1]) ++b0;
      const int64_t j = t - first[b0];
      const int64_t pos = b0 * k + j;  // position in idx (b0 is 0 for a shared set)
      const int64_t neuron = ip[pos];
      if (t + 1 < end && t + 1 < first[b0 + 1]) {
        // The next neuron's rows are somewhere else in memory: start fetching them now.
        const int64_t next = ip[pos + 1];
        FASTLLM_PREFETCH(wu + next * d);
        if (s.gated) FASTLLM_PREFETCH(wg + next * d);
      }
      const scalar_t* up_row = wu + neuron * d;
      const scalar_t* gate_row = s.gated ? wg + neuron * d : nullptr;
      const float up_bias = bu ? static_cast<float>(bu[neuron]) : 0.f;
      const float gate_bias = bg ? static_cast<float>(bg[neuron]) : 0.f;
      const int64_t b_end = s.per_row ? b0 + 1 : B;
      for (int64_t b = b0; b < b_end; ++b) {
        float up = 0.f, gate = 0.f;
        hidden_dots(xf + b * d, up_row, gate_row, d, &up, &gate);
        h[b * k + j] = hidden_value(act, s.gated, up + up_bias, gate + gate_bias);
      }
    }
  });

  // The positions whose down row is needed, per set: ReLU zeros (in every row of the set) cost
  // no weight reads.
  const int64_t groups = s.per_row ? B : 1;
  std::vector<int64_t> live(static_cast<size_t>(groups * k));
  std::vector<int64_t> live_count(static_cast<size_t>(groups), 0);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b_begin = s.per_row ? g : 0, b_end = s.per_row ? g + 1 : B;
    const int64_t count = count_of[g];
    for (int64_t j = 0; j < count; ++j) {
      bool nonzero = false;
      for (int64_t b = b_begin; b < b_end && !nonzero; ++b) nonzero = h[b * k + j] != 0.f;
      if (nonzero) live[g * k + live_count[g]++] = j;
    }
  }

  // Phase 2: down projection, one owner per (set, column block). One column block per thread (at
  // least 256 columns): each active row is then read in the longest contiguous runs the split
  // allows, which is what keeps the hardware prefetcher busy.
  const int64_t threads = at::get_num_threads();
  int64_t block = std::max<int64_t>(256, (dout + threads - 1) / threads);
  block = std::min<int64_t>(dout, (block + 15) / 16 * 16);
  const int64_t col_blocks = block > 0 ? (dout + block - 1) / block : 0;
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, groups * col_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / col_blocks;
      const int64_t c0 = (task % col_blocks) * block;
      const int64_t width = std::min(block, dout - c0);
      const int64_t b_begin = s.per_row ? g : 0;
      const int64_t b_end = s.per_row ? g + 1 : B;
      const index_t* set = ip + (s.per_row ? g * k : 0);
      const int64_t* positions = live.data() + g * k;
      const int64_t n_live = live_count[g];
      acc.assign(static_cast<size_t>((b_end - b_begin) * width), 0.f);
      for (int64_t first = 0; first < n_live; first += kGroup) {
        const int64_t n = std::min<int64_t>(kGroup, n_live - first);
        const scalar_t* rows[kGroup];
        for (int64_t r = 0; r < kGroup; ++r) {
          // A short last group repeats its first row (cache-hot) with coefficient 0.
          rows[r] = wd + set[positions[first + (r < n ? r : 0)]] * dout + c0;
        }
        for (int64_t r = 0; first + kGroup + r < n_live && r < kGroup; ++r) {
          FASTLLM_PREFETCH(wd + set[positions[first + kGroup + r]] * dout + c0);
        }
        for (int64_t b = b_begin; b < b_end; ++b) {
          float coeff[kGroup];
          for (int64_t r = 0; r < kGroup; ++r) {
            coeff[r] = r < n ? h[b * k + positions[first + r]] : 0.f;
          }
          accumulate_rows(acc.data() + (b - b_begin) * width, coeff, rows, width);
        }
      }
      for (int64_t b = b_begin; b < b_end; ++b) {
        const float* a = acc.data() + (b - b_begin) * width;
        scalar_t* o = op + b * dout + c0;
        for (int64_t c = 0; c < width; ++c) {
          o[c] = static_cast<scalar_t>(a[c] + (bd ? static_cast<float>(bd[c0 + c]) : 0.f));
        }
      }
    }
  });
}

at::Tensor sparse_mlp_cpu(const at::Tensor& x, const at::Tensor& w_up,
                          const c10::optional<at::Tensor>& w_gate, const at::Tensor& w_down_t,
                          const c10::optional<at::Tensor>& b_up,
                          const c10::optional<at::Tensor>& b_gate,
                          const c10::optional<at::Tensor>& b_down, const at::Tensor& active_idx,
                          const c10::optional<at::Tensor>& counts, c10::string_view activation,
                          bool deterministic) {
  (void)deterministic;  // CPU results are always deterministic (see the file comment)
  const SparseMlpShape s =
      check_sparse_mlp(kOp, x, w_up, w_gate, w_down_t, b_up, b_gate, b_down, active_idx, counts);
  const Activation act = parse_activation(kOp, std::string(activation));
  if (active_idx.scalar_type() == at::kInt) {
    check_index_values<int32_t>(active_idx, counts, s);
  } else {
    check_index_values<int64_t>(active_idx, counts, s);
  }
  std::vector<int64_t> count_of(static_cast<size_t>(s.per_row ? s.rows : 1), s.k);
  if (counts.has_value()) {
    at::Tensor c = counts->to(at::kLong);
    for (size_t r = 0; r < count_of.size(); ++r) count_of[r] = c.const_data_ptr<int64_t>()[r];
  }
  at::Tensor out = at::empty({s.rows, s.d_out}, x.options());
  if (out.numel() == 0) return out;
  // x is fp32, fp16 or bf16 (check_sparse_mlp): no double instantiation.
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (active_idx.scalar_type() == at::kInt) {
      sparse_mlp_kernel<scalar_t, int32_t>(x, w_up, w_gate, w_down_t, b_up, b_gate, b_down,
                                           active_idx, count_of, act, s, out);
    } else {
      sparse_mlp_kernel<scalar_t, int64_t>(x, w_up, w_gate, w_down_t, b_up, b_gate, b_down,
                                           active_idx, count_of, act, s, out);
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

TORCH_LIBRARY_IMPL(fastllm, CPU, m) { m.impl("sparse_mlp", &sparse_mlp_cpu); }

}  // namespace fastllm::sparse
