// Deja Vu style sparse MLP: only the active neurons' weights are read.
//
//   h[b, j]  = act(w_gate[idx_j] . x[b] + b_gate[idx_j]) * (w_up[idx_j] . x[b] + b_up[idx_j])
//              (or act(w_up[idx_j] . x[b] + b_up[idx_j]) without a gate)
//   out[b]   = b_down + sum_j h[b, j] * w_down_t[idx_j]
//
// w_up / w_gate are nn.Linear weights ([n_neurons, d_in], one neuron per contiguous row) and
// w_down_t is the down projection's weight transposed and made contiguous ([n_neurons, d_out]),
// so every active neuron costs three contiguous row reads. The index set is either shared by
// every row of the batch (1-D idx) or one set per row (2-D idx), with optional counts (one per
// set: [1] for a shared set, [rows] for per-row sets): only the first counts[s] entries of set s
// are used, so a set can be built on the device with a fixed, host-known width (no sync).
//
// Index values: CPU tensors are checked on the host. On CUDA (outside the debug mode, see
// common/index_errors.h) the kernels guard them instead: a count outside [0, k] is clamped into
// it and reports kSparseCounts; an active_idx entry outside [0, n) contributes nothing (its
// weights are never read) and reports kSparseActiveIdx.
// Shared by the CPU and CUDA kernels: activations, argument checks.
#pragma once

#include <cmath>
#include <string>

#include "common/checks.h"
#include "common/host_device.h"

namespace fastllm::sparse {

enum class Activation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

inline Activation parse_activation(const char* op, const std::string& name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK_VALUE(false, op, ": activation must be one of relu, gelu, gelu_tanh, silu, got '",
                    name, "'");
}

FASTLLM_HOST_DEVICE float apply_activation(Activation act, float v) {
  switch (act) {
    case Activation::kRelu: return v > 0.f ? v : 0.f;
    case Activation::kGelu: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case Activation::kGeluTanh: {
      const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + tanhf(inner));
    }
    case Activation::kSilu: default: return v / (1.f + expf(-v));
  }
}

// The hidden value of one neuron from its pre-activations (gate is ignored without a gate).
FASTLLM_HOST_DEVICE float hidden_value(Activation act, bool gated, float up, float gate) {
  return gated ? apply_activation(act, gate) * up : apply_activation(act, up);
}

// The usable length of a set whose count is `raw` (k without counts): clamped into [0, k], so a
// bad count never sends a kernel past the set's k entries. `*bad` tells whether it was outside.
FASTLLM_HOST_DEVICE int64_t guarded_count(int64_t raw, int64_t k, bool* bad) {
  *bad = raw < 0 || raw > k;
  return raw < 0 ? 0 : (raw > k ? k : raw);
}

// Whether a neuron index may be dereferenced (n = number of neurons).
FASTLLM_HOST_DEVICE bool neuron_in_range(int64_t neuron, int64_t n) {
  return neuron >= 0 && neuron < n;
}

// The entries [*begin, *end) of a set of `count` entries that slice `slice` of `slices` sums.
// Computed from the set's own count, so a set padded to a wide fixed width (built on the device
// without knowing its count) still spreads its real entries over every slice.
FASTLLM_HOST_DEVICE void slice_range(int64_t count, int64_t slices, int64_t slice, int64_t* begin,
                                     int64_t* end) {
  const int64_t per = (count + slices - 1) / slices;
  const int64_t b = slice * per;
  *begin = b < count ? b : count;
  *end = b + per < count ? b + per : count;
}

// ---- CUDA launch planning (host functions, unit-tested on the CPU) --------------------------------
//
// The down projection's grid: x = column tiles (kSparseThreads threads, each owning `vec`
// contiguous output columns, one 16-byte word of w_down_t's row: vec = 8 for fp16 / bf16, 4 for
// fp32, 1 where rows are not whole aligned words), y = slices of the active set, z = row groups
// (the rows of a shared set that read each weight once; per-row sets one row each).
constexpr int kSparseThreads = 256;

// Rows of a shared set served by one read of each weight: a shared set of up to 8 rows reads its
// weights once (the kernels keep 8 rows of sums in registers); a wider one re-reads them per 8
// rows, but its union set is then nearly dense (docs/sparse.md, batch study) and the runtime
// runs the dense MLP well before (dense_above). The kernels are built for 4 and 8 rows, so a
// decode step (1 row) or per-row sets (one row per pass) do not pay for 8 rows of registers.
constexpr int kSparseRowsNarrow = 4;
constexpr int kSparseRowsWide = 8;

inline int sparse_rows_per_pass(int64_t rows, bool per_row) {
  return per_row || rows <= kSparseRowsNarrow ? kSparseRowsNarrow : kSparseRowsWide;
}

struct SparseDownLaunch {
  int64_t col_tiles, slices, row_groups;
};

// Slices: one full wave (blocks_per_sm, the down kernel's occupancy as the runtime reports it,
// times the SMs), but at least 32 neurons per slice of a full set (each block splits its set's
// actual count, read on the device, over the slices evenly, so a single even wave has no tail).
// rows_per_pass: the kernel form's rows (sparse_rows_per_pass).
inline SparseDownLaunch plan_sparse_down(int64_t rows, int64_t d_out, int64_t k, bool per_row,
                                         int64_t sms, int64_t vec, int64_t blocks_per_sm,
                                         int64_t rows_per_pass) {
  const int64_t columns = kSparseThreads * (vec > 0 ? vec : 1);
  const int64_t col_tiles = (d_out + columns - 1) / columns;
  rows_per_pass = rows_per_pass > 0 ? rows_per_pass : 1;
  const int64_t row_groups = per_row ? rows : (rows + rows_per_pass - 1) / rows_per_pass;
  const int64_t base = col_tiles * row_groups > 0 ? col_tiles * row_groups : 1;
  const int64_t resident = (blocks_per_sm > 0 ? blocks_per_sm : 1) * (sms > 0 ? sms : 1);
  const int64_t want = (resident + base - 1) / base;
  const int64_t most = (k + 31) / 32 > 0 ? (k + 31) / 32 : 1;
  return {col_tiles, want < most ? (want > 0 ? want : 1) : most, row_groups};
}

// ---- x staged in shared memory (the CUDA up/gate and predictor-scoring kernels) ------------------
//
// A block stages rows_per_pass rows of x in shared memory as fp32, each row padded to a multiple
// of 32 floats (whole groups of 8 float4 slots). A lane reads the float4s of x under its 16-byte
// weight word: 1 (fp32 weights), 2 (fp16 / bf16), 4 (int8 codes) or 8 (packed int4) consecutive
// ones, so a quarter warp's 128-bit reads would hit the same banks up to 8 times over. Float4 f of
// a row is therefore kept at slot f ^ ((f >> 3) & 7): a permutation inside each group of 8 slots
// that gives the 8 lanes of a quarter warp 8 different slots (bank quads) in every one of these
// layouts, and keeps the staging writes of 8 consecutive threads inside one 128-byte line.
FASTLLM_HOST_DEVICE int staged_x_slot(int f) { return f ^ ((f >> 3) & 7); }

// Staged x stays under the default 48 KB per block (no opt-in; four blocks fit an SM); only a row
// wider than that (d_in > 12288) asks for more, one row per pass.
constexpr int64_t kStagedXBudget = 48 * 1024;

struct StagedRows {
  int64_t rows_per_pass, row_floats, shared_bytes;
};

// As many of `rows` as fit the budget, at most `most`, at least one.
inline StagedRows plan_staged_rows(int64_t rows, int64_t d, int64_t most) {
  const int64_t row_floats = (d + 31) / 32 * 32;
  const int64_t row_bytes = row_floats * 4 > 0 ? row_floats * 4 : 4;
  const int64_t cap = rows < most ? (rows > 0 ? rows : 1) : most;
  int64_t per_pass = kStagedXBudget / row_bytes;
  per_pass = per_pass < 1 ? 1 : (per_pass > cap ? cap : per_pass);
  return {per_pass, row_floats, per_pass * row_bytes};
}

// Blocks of `warps_per_block` warps for `items` (neurons) spread evenly: each warp serves
// ceil(items / (blocks_per_sm * sms * warps_per_block)) of them (grid-stride) and the grid is just
// large enough for that, so no warp idles for a tail while its block's staged x serves them all.
// blocks_per_sm is the kernel's occupancy as the runtime reports it for its registers and shared
// memory (common/occupancy.cuh): a grid planned for more blocks than fit leaves a tail wave.
inline int64_t spread_blocks(int64_t items, int64_t sms, int64_t blocks_per_sm,
                             int64_t warps_per_block) {
  const int64_t warps =
      (blocks_per_sm > 0 ? blocks_per_sm : 1) * (sms > 0 ? sms : 1) * warps_per_block;
  const int64_t per_warp = items > warps ? (items + warps - 1) / warps : 1;
  const int64_t per_block = per_warp * warps_per_block;
  return items > 0 ? (items + per_block - 1) / per_block : 1;
}

// The up/gate kernel's grid: passes over the batch rows (sparse_rows_per_pass rows of a shared
// set per pass, within the staging budget; one row per pass for per-row sets, whose set is that
// row's), each pass spreading the k positions of its set over every warp of the grid.
struct SparseHiddenLaunch {
  int64_t rows_per_pass, blocks, row_floats, shared_bytes;
};

// The staging part of the plan: it fixes the dynamic shared memory, which the occupancy query
// needs before the grid can be sized.
inline StagedRows plan_sparse_hidden_staging(int64_t rows, int64_t d, bool per_row,
                                             int64_t rows_per_pass) {
  return plan_staged_rows(rows, d, per_row ? 1 : rows_per_pass);
}

inline SparseHiddenLaunch plan_sparse_hidden(int64_t rows, int64_t d, int64_t k, bool per_row,
                                             int64_t sms, int64_t blocks_per_sm,
                                             int64_t rows_per_pass) {
  const StagedRows staging = plan_sparse_hidden_staging(rows, d, per_row, rows_per_pass);
  return {staging.rows_per_pass, spread_blocks(k, sms, blocks_per_sm, kSparseThreads / 32),
          staging.row_floats, staging.shared_bytes};
}

struct SparseMlpShape {
  int64_t rows;      // B
  int64_t d_in;
  int64_t neurons;   // n
  int64_t d_out;
  int64_t k;         // active entries per set (the padded width for per-row sets)
  bool per_row;
  bool gated;
};

inline void check_optional_vector(const char* op, const char* name, const c10::optional<at::Tensor>& t,
                                  const at::Tensor& like, int64_t length) {
  if (!t.has_value()) return;
  check_dim(op, name, *t, 1);
  check_same_dtype(op, "x", like, name, *t);
  check_same_device(op, "x", like, name, *t);
  check_contiguous(op, name, *t);
  TORCH_CHECK_VALUE(t->size(0) == length, op, ": ", name, " must have length ", length, ", got ",
                    t->size(0));
}

inline void check_weight(const char* op, const char* name, const at::Tensor& w, const at::Tensor& x,
                         int64_t neurons, int64_t cols, const char* cols_name) {
  check_dim(op, name, w, 2);
  check_same_dtype(op, "x", x, name, w);
  check_same_device(op, "x", x, name, w);
  check_contiguous(op, name, w);
  TORCH_CHECK_VALUE(w.size(0) == neurons && w.size(1) == cols, op, ": ", name, " must have shape [",
                    neurons, ", ", cols, "] (n_neurons, ", cols_name, "), got ", w.sizes());
}

// Every check that needs no look at index values; the caller then checks the index range.
inline SparseMlpShape check_sparse_mlp(const char* op, const at::Tensor& x, const at::Tensor& w_up,
                                       const c10::optional<at::Tensor>& w_gate,
                                       const at::Tensor& w_down_t,
                                       const c10::optional<at::Tensor>& b_up,
                                       const c10::optional<at::Tensor>& b_gate,
                                       const c10::optional<at::Tensor>& b_down,
                                       const at::Tensor& idx,
                                       const c10::optional<at::Tensor>& counts) {
  check_dim(op, "x", x, 2);
  check_dtype_in(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  check_contiguous(op, "x", x);
  check_dim(op, "w_up", w_up, 2);
  const int64_t neurons = w_up.size(0);
  const int64_t d_in = x.size(1);
  check_weight(op, "w_up", w_up, x, neurons, d_in, "d_in");
  if (w_gate.has_value()) check_weight(op, "w_gate", *w_gate, x, neurons, d_in, "d_in");
  check_dim(op, "w_down_t", w_down_t, 2);
  const int64_t d_out = w_down_t.size(1);
  check_weight(op, "w_down_t", w_down_t, x, neurons, d_out, "d_out");
  check_optional_vector(op, "b_up", b_up, x, neurons);
  check_optional_vector(op, "b_gate", b_gate, x, neurons);
  TORCH_CHECK_VALUE(!b_gate.has_value() || w_gate.has_value(), op,
                    ": b_gate was given without w_gate");
  check_optional_vector(op, "b_down", b_down, x, d_out);
  check_index_dtype(op, "active_idx", idx);
  check_contiguous(op, "active_idx", idx);
  check_same_device(op, "x", x, "active_idx", idx);
  TORCH_CHECK_VALUE(idx.dim() == 1 || idx.dim() == 2, op,
                    ": active_idx must be 1-D (one set shared by the batch) or 2-D [rows, k] "
                    "(one set per row), got shape ", idx.sizes());
  const bool per_row = idx.dim() == 2;
  if (per_row) {
    TORCH_CHECK_VALUE(idx.size(0) == x.size(0), op, ": a per-row active_idx must have one row per "
                      "row of x (", x.size(0), "), got shape ", idx.sizes());
  }
  if (counts.has_value()) {
    check_dim(op, "counts", *counts, 1);
    TORCH_CHECK_VALUE(per_row || counts->size(0) == 1, op,
                      ": counts is only meaningful with one entry per set: length 1 for a 1-D "
                      "(shared) active_idx, got shape ", counts->sizes());
    check_index_dtype(op, "counts", *counts);
    TORCH_CHECK_TYPE(counts->scalar_type() == idx.scalar_type(), op,
                     ": counts must have active_idx's dtype (", idx.scalar_type(), "), got ",
                     counts->scalar_type());
    check_contiguous(op, "counts", *counts);
    check_same_device(op, "x", x, "counts", *counts);
    TORCH_CHECK_VALUE(!per_row || counts->size(0) == x.size(0), op, ": counts must have length ",
                      x.size(0), ", got ", counts->size(0));
  }
  return {x.size(0), d_in, neurons, d_out, per_row ? idx.size(1) : idx.size(0), per_row,
          w_gate.has_value()};
}

}  // namespace fastllm::sparse
