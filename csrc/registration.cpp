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
}
