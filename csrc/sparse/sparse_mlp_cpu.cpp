// CPU sparse MLP. Two phases, both over contiguous rows:
//   1. hidden: parallel over active neurons; each neuron's up (and gate) row is read once and dotted
//      with every row of x (the x rows stay in L1), giving h[b, j] in fp32.
//   2. down: parallel over column blocks of the output; each task walks the active neurons in index
//      order and accumulates h[b, j] * w_down_t[idx_j, block] into an fp32 block. Every output
//      element has one owner and a fixed summation order, so the result is deterministic and no
//      atomics are needed (the `deterministic` flag changes nothing on CPU).
// Reduced-precision weights are widened to fp32 one row at a time into a per-thread buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "sparse/sparse_mlp.h"

#if defined(__GNUC__)
#define FASTLLM_PREFETCH(address) __builtin_prefetch(address)
#else
#define FASTLLM_PREFETCH(address) ((void)0)
#endif

namespace fastllm::sparse {
namespace {

constexpr const char* kOp = "fastllm.sparse_mlp";

// The inner loops, compiled twice: for AVX2+FMA (picked at run time when the CPU has it) and for
// the baseline x86-64 / other ISAs. The `omp simd` reductions let the compiler reorder the sums.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FASTLLM_HAVE_AVX2_CLONE 1
__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}
__attribute__((target("avx2,fma"))) void axpy_avx2(float alpha, const float* x, float* y,
                                                   int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}
#endif

float dot_base(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}
void axpy_base(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

struct Kernels {
  float (*dot)(const float*, const float*, int64_t);
  void (*axpy)(float, const float*, float*, int64_t);
};

const Kernels& kernels() {
  static const Kernels k = [] {
#ifdef FASTLLM_HAVE_AVX2_CLONE
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return Kernels{dot_avx2, axpy_avx2};
    }
#endif
    return Kernels{dot_base, axpy_base};
  }();
  return k;
}

// A row of `n` scalar_t as fp32: the row itself for float, else widened into `buffer`.
template <typename scalar_t>
const float* as_float(const scalar_t* row, int64_t n, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    buffer.resize(n);
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(row[i]);
    return buffer.data();
  }
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
      TORCH_CHECK_INDEX(count >= 0 && count <= s.k, kOp, ": counts[", r, "] must lie in [0, ",
                        s.k, "], got ", count);
    }
    for (int64_t j = 0; j < count; ++j) {
      const int64_t v = p[r * s.k + j];
      TORCH_CHECK_INDEX(v >= 0 && v < s.neurons, kOp, ": active_idx must lie in [0, ", s.neurons,
                        "), got ", v, " at set ", r, " position ", j);
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
  const Kernels& kern = kernels();
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
  std::vector<float> h(static_cast<size_t>(B * k), 0.f);

  // Phase 1: hidden values. Shared set: a task is a neuron, dotted with every row. Per-row sets:
  // a task is one (row, position) pair.
  const int64_t tasks = s.per_row ? B * k : k;
  at::parallel_for(0, tasks, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> up_buf, gate_buf;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = s.per_row ? t / k : 0;
      const int64_t j = s.per_row ? t % k : t;
      if (s.per_row && j >= count_of[b0]) continue;  // padding: h stays 0, never read
      const int64_t neuron = ip[t];
      if (t + 1 < end) {
        // The next neuron's rows are somewhere else in memory: start fetching them now.
        const int64_t next = ip[t + 1];
        FASTLLM_PREFETCH(wu + next * d);
        if (s.gated) FASTLLM_PREFETCH(wg + next * d);
      }
      const float* up_row = as_float(wu + neuron * d, d, up_buf);
      const float* gate_row = s.gated ? as_float(wg + neuron * d, d, gate_buf) : nullptr;
      const float up_bias = bu ? static_cast<float>(bu[neuron]) : 0.f;
      const float gate_bias = bg ? static_cast<float>(bg[neuron]) : 0.f;
      const int64_t b_end = s.per_row ? b0 + 1 : B;
      for (int64_t b = b0; b < b_end; ++b) {
        const float up = kern.dot(up_row, xf + b * d, d) + up_bias;
        const float gate = s.gated ? kern.dot(gate_row, xf + b * d, d) + gate_bias : 0.f;
        h[b * k + j] = hidden_value(act, s.gated, up, gate);
      }
    }
  });

  // Phase 2: down projection, one owner per (row group, column block). Blocks are wide enough for
  // long contiguous reads of each active row and numerous enough to keep every thread busy.
  // One column block per thread (at least 256 columns): each active row is then read in the
  // longest contiguous runs the split allows, which is what keeps the hardware prefetcher busy.
  const int64_t threads = at::get_num_threads();
  int64_t block = std::max<int64_t>(256, (dout + threads - 1) / threads);
  block = std::min<int64_t>(dout, (block + 15) / 16 * 16);
  const int64_t col_blocks = block > 0 ? (dout + block - 1) / block : 0;
  const int64_t groups = s.per_row ? B : 1;
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, groups * col_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc, row_buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / col_blocks;
      const int64_t c0 = (task % col_blocks) * block;
      const int64_t width = std::min(block, dout - c0);
      const int64_t b_begin = s.per_row ? g : 0;
      const int64_t b_end = s.per_row ? g + 1 : B;
      const int64_t count = s.per_row ? count_of[g] : k;
      acc.assign(static_cast<size_t>((b_end - b_begin) * width), 0.f);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t neuron = ip[(s.per_row ? g * k : 0) + j];
        if (j + 1 < count) FASTLLM_PREFETCH(wd + ip[(s.per_row ? g * k : 0) + j + 1] * dout + c0);
        const float* w_row = nullptr;
        for (int64_t b = b_begin; b < b_end; ++b) {
          const float hv = h[b * k + j];
          if (hv == 0.f) continue;  // ReLU zeros cost no weight reads
          if (w_row == nullptr) w_row = as_float(wd + neuron * dout + c0, width, row_buf);
          kern.axpy(hv, w_row, acc.data() + (b - b_begin) * width, width);
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
    for (int64_t r = 0; r < s.rows; ++r) count_of[r] = c.const_data_ptr<int64_t>()[r];
  }
  at::Tensor out = at::empty({s.rows, s.d_out}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_mlp_cpu", [&] {
    if (active_idx.scalar_type() == at::kInt) {
      sparse_mlp_kernel<scalar_t, int32_t>(x, w_up, w_gate, w_down_t, b_up, b_gate, b_down,
                                           active_idx, count_of, act, s, out);
    } else {
      sparse_mlp_kernel<scalar_t, int64_t>(x, w_up, w_gate, w_down_t, b_up, b_gate, b_down,
                                           active_idx, count_of, act, s, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CPU, m) { m.impl("sparse_mlp", &sparse_mlp_cpu); }

}  // namespace fastllm::sparse
