// The one place where fastllm's op schemas are declared. This file is always compiled, so a
// CPU-only build still exposes every op; the per-capability *_cpu.cpp and *_cuda.cu files only add
// implementations for their dispatch key.
#include <torch/library.h>

TORCH_LIBRARY(fastllm, m) {
  // ---- memory: the unified page pool -----------------------------------------------------------
  // pool is a [num_slots, width] view of the pool's storage; rows[i] goes to pool[slots[i]].
  m.def("pool_write(Tensor(a!) pool, Tensor slots, Tensor rows) -> ()");
  // out[i] = pool[slots[i]]; slots may repeat.
  m.def("pool_gather(Tensor pool, Tensor slots) -> Tensor");
  // ---- sparse: Deja Vu contextual-sparsity MLP ---------------------------------------------------
  // out = b_down + sum over active neurons j of h_j * w_down_t[j], h_j = act(gate_j) * up_j (gated)
  // or act(up_j). active_idx: 1-D, one set for every row, or 2-D [rows, k], a set per row (the
  // first counts[r] entries of row r when counts is given).
  m.def("sparse_mlp(Tensor x, Tensor w_up, Tensor? w_gate, Tensor w_down_t, Tensor? b_up, "
        "Tensor? b_gate, Tensor? b_down, Tensor active_idx, Tensor? counts, str activation, "
        "bool deterministic=False) -> Tensor");

  // ---- galore: gradient low-rank projection (GaLore) ---------------------------------------------
  // A projected weight W (m x n) has projectors left (m x r) and/or right (r x n); its low-rank
  // gradient is left^T grad right^T (a missing side is skipped). One fused Adam step: moments in
  // the low-rank space (fp32), W = decay * W + alpha * left (m / (sqrt(v) + eps)) right with
  // decay = 1 - lr * weight_decay and alpha = -lr * bias_correction(step) * scale * decay.
  // Without projectors it is a plain AdamW step on W. grad_is_projected: grad is already low-rank.
  m.def("galore_adam_step(Tensor(a!) param, Tensor grad, Tensor? left, Tensor? right, "
        "Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, bool grad_is_projected, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, float scale, int step) -> ()");
  // The same with blockwise 8-bit moments: int8/uint8 codes, one fp32 absmax per 256 elements.
  m.def("galore_adam8bit_step(Tensor(a!) param, Tensor grad, Tensor? left, Tensor? right, "
        "Tensor(b!) exp_avg_codes, Tensor(c!) exp_avg_absmax, Tensor(d!) exp_avg_sq_codes, "
        "Tensor(e!) exp_avg_sq_absmax, bool grad_is_projected, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, float scale, int step) -> ()");
  // left^T grad right^T as a new fp32 tensor.
  m.def("galore_project(Tensor grad, Tensor? left, Tensor? right) -> Tensor");
  // param = beta * param + alpha * (left low right), in place.
  m.def("galore_project_back_(Tensor(a!) param, Tensor low, Tensor? left, Tensor? right, "
        "float alpha, float beta) -> ()");
}
