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

  // ---- lora: paged multi-adapter LoRA (S-LoRA) --------------------------------------------------
  // Adapter rows live anywhere in `pool` (the flat storage of a page pool); row j of slice s of the
  // batch's adapter a starts at element a_rows[s, a, j] (b_rows for B^T rows). token_adapter[t] is
  // the batch adapter of token t, or -1 for the base model. path: 0 auto, 1 BGMV, 2 SGMV.
  // h[s, t, j] = x[t] . A_{s,a,j} for j < ranks[s, a], else 0; h is float32 (float64 for float64).
  m.def("lora_shrink(Tensor x, Tensor pool, Tensor a_rows, Tensor ranks, Tensor token_adapter, "
        "int path=0) -> Tensor");
  // y[t, slice s] += scalings[s, a] * sum_j h[s, t, j] * B^T_{s,a,j}; slice s is slice_sizes[s]
  // columns wide, slices laid side by side. Tokens with adapter -1 are left untouched.
  m.def("lora_expand(Tensor(a!) y, Tensor h, Tensor pool, Tensor b_rows, Tensor ranks, "
        "Tensor scalings, Tensor token_adapter, int[] slice_sizes, int path=0) -> ()");
}
