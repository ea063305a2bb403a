// Neuron scores from an int8 copy of the up (and gate) weights: the quantized predictor.
//
//   u[b, j] = sum_g up_scale[j, g]   * (q_up[j, g-th group]   . x[b, g-th group]) + b_up[j]
//   g[b, j] = sum_g gate_scale[j, g] * (q_gate[j, g-th group] . x[b, g-th group]) + b_gate[j]
//   score[b, j] = |act(g) * u|   (gated)   or   |act(u)|   (no gate)
//
// A low-rank predictor of a gated MLP ranks neurons far from |act(gate) * up| (top-k recall 0.72
// at 50% on SmolLM2 for 14% of the MLP's multiply-adds); symmetric int8 with one fp32 scale per
// group of input columns keeps the ranking (recall 0.99) while reading 1 + 4/group bytes per
// weight, a sixth of an fp32 MLP's gate and up bytes. Shared by the CPU and CUDA kernels.
#pragma once

#include "common/checks.h"
#include "sparse/sparse_mlp.h"

namespace fastllm::sparse {

// Column groups are whole 16-byte vectors, so no vector load straddles two scales.
constexpr int64_t kScoreGroupMultiple = 16;

struct NeuronScoreShape {
  int64_t rows;
  int64_t d_in;
  int64_t neurons;
  int64_t group;  // input columns per scale
  bool gated;
};

inline void check_quantized_weight(const char* op, const char* q_name, const at::Tensor& q,
                                   const char* s_name, const at::Tensor& scale,
                                   const at::Tensor& x, int64_t neurons) {
  check_dim(op, q_name, q, 2);
  check_dtype_in(op, q_name, q, {at::kChar});
  check_contiguous(op, q_name, q);
  check_same_device(op, "x", x, q_name, q);
  TORCH_CHECK_VALUE(q.size(0) == neurons && q.size(1) == x.size(1), op, ": ", q_name,
                    " must have shape [", neurons, ", ", x.size(1), "] (n_neurons, d_in), got ",
                    q.sizes());
  check_dim(op, s_name, scale, 2);
  check_dtype_in(op, s_name, scale, {at::kFloat});
  check_contiguous(op, s_name, scale);
  check_same_device(op, "x", x, s_name, scale);
  TORCH_CHECK_VALUE(scale.size(0) == neurons && scale.size(1) >= 1 &&
                        x.size(1) % scale.size(1) == 0,
                    op, ": ", s_name, " must have shape [", neurons,
                    ", groups] with groups dividing d_in (", x.size(1), "), got ", scale.sizes());
}

inline void check_float_bias(const char* op, const char* name, const c10::optional<at::Tensor>& b,
                             const at::Tensor& x, int64_t neurons) {
  if (!b.has_value()) return;
  check_dim(op, name, *b, 1);
  check_dtype_in(op, name, *b, {at::kFloat});
  check_contiguous(op, name, *b);
  check_same_device(op, "x", x, name, *b);
  TORCH_CHECK_VALUE(b->size(0) == neurons, op, ": ", name, " must have length ", neurons, ", got ",
                    b->size(0));
}

inline NeuronScoreShape check_neuron_scores(const char* op, const at::Tensor& x,
                                            const at::Tensor& q_up, const at::Tensor& up_scale,
                                            const c10::optional<at::Tensor>& q_gate,
                                            const c10::optional<at::Tensor>& gate_scale,
                                            const c10::optional<at::Tensor>& b_up,
                                            const c10::optional<at::Tensor>& b_gate) {
  check_dim(op, "x", x, 2);
  check_dtype_in(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  check_contiguous(op, "x", x);
  // Zero columns would make the scale group 0 (the kernels divide by it).
  TORCH_CHECK_VALUE(x.size(1) > 0, op, ": x must have at least one column (d_in > 0), got shape ",
                    x.sizes());
  check_dim(op, "q_up", q_up, 2);
  const int64_t neurons = q_up.size(0);
  check_quantized_weight(op, "q_up", q_up, "up_scale", up_scale, x, neurons);
  TORCH_CHECK_VALUE(q_gate.has_value() == gate_scale.has_value(), op,
                    ": q_gate and gate_scale must be given together");
  if (q_gate.has_value()) {
    check_quantized_weight(op, "q_gate", *q_gate, "gate_scale", *gate_scale, x, neurons);
    TORCH_CHECK_VALUE(gate_scale->size(1) == up_scale.size(1), op,
                      ": gate_scale must have up_scale's groups (", up_scale.size(1), "), got ",
                      gate_scale->size(1));
  }
  check_float_bias(op, "b_up", b_up, x, neurons);
  check_float_bias(op, "b_gate", b_gate, x, neurons);
  TORCH_CHECK_VALUE(!b_gate.has_value() || q_gate.has_value(), op,
                    ": b_gate was given without q_gate");
  const int64_t group = x.size(1) / up_scale.size(1);
  TORCH_CHECK_VALUE(group % kScoreGroupMultiple == 0, op, ": the scale group (d_in / groups = ",
                    group, ") must be a multiple of ", kScoreGroupMultiple);
  return {x.size(0), x.size(1), neurons, group, q_gate.has_value()};
}

}  // namespace fastllm::sparse
